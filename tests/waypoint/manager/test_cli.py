"""The `waypoint` command: `manager --kubeconfig` as a real process, and the lazy `proxy` hand-off."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from e2e.fakekube import FakeApiServer
from waypoint import cli

from .helpers import gateway

ROOT = Path(__file__).resolve().parents[3]


def test_proxy_subcommand_is_imported_lazily(monkeypatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("waypoint.proxy.cli")

    def main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 0

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "waypoint.proxy.cli", fake)
    assert cli.main(["proxy", "--flag", "x"]) == 0
    assert seen == [["--flag", "x"]]


def test_manager_requires_a_subcommand(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([])
    assert "manager" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--renew-deadline=20"], "--renew-deadline 20.0: must be between 0 and --lease-duration"),
        (["--lease-duration=0"], "--lease-duration 0: must be at least 1 second"),
        (["--retry-period=11"], "--retry-period 11.0: must be between 0 and --renew-deadline"),
        (["--tls-key=/k.pem"], "--tls-cert-chain and --tls-key go together"),
        (["--monitoring-address=15014"], "--monitoring-address: '15014' is not HOST:PORT"),
        (["--monitoring-address=host:1"], "'host' is not an IP address"),
        (["--proxy-xds-address=cp.svc:15012"], "--proxy-xds-address 'cp.svc:15012': expected"),
        (["--proxy-ca-address=https://ca.svc"], "--proxy-ca-address 'https://ca.svc': expected"),
        (["--proxy-xds-address=https://cp:x"], "--proxy-xds-address 'https://cp:x':"),
        (["--proxy-cluster-id="], "--proxy-cluster-id: empty"),
    ],
    ids=[
        "renew-past-lease",
        "zero-lease",
        "retry-past-renew",
        "half-tls",
        "no-host",
        "dns-host",
        "proxy-xds-no-scheme",
        "proxy-ca-no-port",
        "proxy-xds-bad-port",
        "proxy-cluster-id-empty",
    ],
)
def test_bad_manager_flags_are_refused_with_the_flag_named(
    flags: list[str], message: str, capsys
) -> None:
    with pytest.raises(SystemExit):
        cli.parse_manager_args(["manager", *flags])
    assert message in capsys.readouterr().err


def test_manager_flags_include_the_control_plane_and_monitoring() -> None:
    args = cli.parse_manager_args(["manager"])
    assert args.xds_address == "0.0.0.0:15012"
    assert args.monitoring_address == "0.0.0.0:15014"
    assert args.leader_elect is True
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (15, 10.0, 2.0)


def test_proxy_flags_default_to_the_render_defaults_and_reach_the_render_config() -> None:
    from waypoint.manager.render import RenderConfig

    assert cli.render_config(cli.parse_manager_args(["manager"])) == RenderConfig()
    config = cli.render_config(
        cli.parse_manager_args(
            [
                "manager",
                "--proxy-xds-address=https://cp.mesh.svc:15012",
                "--proxy-ca-address=http://10.0.0.1:15012",
                "--proxy-cluster-id=east",
                "--trust-domain=example.org",
            ]
        )
    )
    assert (config.xds_address, config.ca_address, config.cluster_id, config.trust_domain) == (
        "https://cp.mesh.svc:15012",
        "http://10.0.0.1:15012",
        "east",
        "example.org",
    )


@pytest.mark.timeout(60)
def test_manager_process_reconciles_and_stops_on_sigterm(tmp_path: Path) -> None:
    with FakeApiServer.running_in_thread() as server:
        server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        obj = gateway()
        obj["metadata"].pop("uid")
        server.put_object(obj)
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        table = tmp_path / "bindings.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "waypoint.cli",
                "manager",
                "--kubeconfig",
                str(kubeconfig),
                "--binding-table",
                str(table),
                # Loopback and ephemeral ports: never the real 0.0.0.0:15012/15014 in tests.
                "--xds-address=127.0.0.1:0",
                "--monitoring-address=127.0.0.1:0",
                "--no-leader-elect",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and server.get_object("apps/v1", "Deployment", "waypoint", "shop") is None
            ):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
            assert server.get_object("apps/v1", "Deployment", "waypoint", "shop") is not None
            while time.monotonic() < deadline and not table.exists():
                time.sleep(0.1)
            assert json.loads(table.read_text()) == {"services": [], "workloads": []}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


# --- deploy/manager/deployment.yaml runs exactly this command --------------------------------


def _manager_deployment() -> dict:
    import yaml

    docs = yaml.safe_load_all((ROOT / "deploy" / "manager" / "deployment.yaml").read_text())
    (dep,) = [d for d in docs if d and d["kind"] == "Deployment"]
    return dep


def _deployment_args() -> tuple[dict, dict, argparse.Namespace]:
    import re

    dep = _manager_deployment()
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"] for e in container.get("env", [])}
    refs = re.findall(r"\$\((\w+)\)", " ".join(container["args"]))
    assert set(refs) <= env, "Kubernetes expands $(VAR) only for variables the container defines"
    argv = [
        re.sub(r"\$\((\w+)\)", lambda m: f"value-of-{m.group(1)}", a) for a in container["args"]
    ]
    return pod, container, cli.parse_manager_args(argv)


def test_deployment_args_are_valid_manager_flags() -> None:
    _, container, args = _deployment_args()
    assert container["command"] == ["waypoint"]
    assert container["args"][0] == "manager"
    assert args.leader_elect is True  # two replicas need the Lease
    assert args.lease_namespace == "value-of-POD_NAMESPACE"
    assert args.identity == "value-of-POD_NAME"


def test_deployment_has_two_replicas_rolled_without_losing_serving_capacity() -> None:
    dep = _manager_deployment()
    assert dep["spec"]["replicas"] == 2
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_deployment_ports_and_probes_match_the_process() -> None:
    from waypoint.manager.health import parse_listen_address

    _, container, args = _deployment_args()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc-xds": 15012, "http-monitoring": 15014}
    assert parse_listen_address(args.xds_address, flag="x")[1] == ports["grpc-xds"]
    assert parse_listen_address(args.monitoring_address, flag="m")[1] == ports["http-monitoring"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-monitoring"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-monitoring"}


def test_deployment_mounts_the_ca_read_only_and_issues_its_serving_cert() -> None:
    pod, container, args = _deployment_args()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert all(m.get("readOnly") is True for m in mounts.values())
    cacerts = mounts[str(args.ca_dir)]
    assert volumes[cacerts["name"]]["secret"]["secretName"] == "cacerts"
    # The serving certificate is issued from the CA by the process (no Secret for it), over TLS.
    assert args.tls_cert_chain is None
    assert args.tls_key is None
    assert not args.plaintext

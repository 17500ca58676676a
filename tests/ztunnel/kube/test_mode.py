"""Kubernetes-mode settings from the DaemonSet's environment (and flag overrides)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel.identity.ca import LocalCa
from ztunnel.kube.mode import KubeModeConfig, KubeModeError, build, parse_endpoint

BASE = {"XDS_ADDRESS": "http://cp:15012", "NODE_NAME": "node-a"}


def test_defaults_and_node_info() -> None:
    cfg = KubeModeConfig.from_env(
        {
            **BASE,
            "POD_NAME": "ztunnel-x",
            "POD_NAMESPACE": "istio-system",
            "INSTANCE_IP": "10.1.0.3",
            "ISTIO_META_DNS_CAPTURE": "false",
        }
    )
    assert cfg.xds.target == cfg.ca.target == "cp:15012"
    assert not cfg.xds.tls
    assert cfg.xds.credentials() is None
    assert cfg.node == "node-a"
    assert cfg.cluster_id == "Kubernetes"
    assert cfg.trust_domain == "cluster.local"
    assert cfg.token_path == Path("/var/run/secrets/tokens/istio-token")
    assert cfg.node_info.node_id == (
        "ztunnel~10.1.0.3~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    )
    assert cfg.node_info.cluster_id == "Kubernetes"
    assert cfg.node_info.metadata["DNS_CAPTURE"] == "false"
    assert cfg.host_proc == Path("/proc")
    assert cfg.netns_dir == Path("/var/run/netns")


def test_overrides_win_and_none_is_unset() -> None:
    cfg = KubeModeConfig.from_env(
        {**BASE, "CA_ADDRESS": "http://ca:1"},
        {
            "NODE_NAME": "node-b",
            "CA_ADDRESS": None,
            "ISTIO_TOKEN_PATH": "",
            "POD_NETNS_GLOB": "x-*",
        },
    )
    assert cfg.node == "node-b"
    assert cfg.ca.target == "ca:1"
    assert cfg.token_path is None
    assert cfg.netns_glob == "x-*"


def test_tls_roots_from_file_inline_and_system(tmp_path: Path) -> None:
    ca = LocalCa.generate("cluster.local")
    root = tmp_path / "root-cert.pem"
    root.write_bytes(ca.roots_pem())
    env = {**BASE, "XDS_ADDRESS": "https://cp.svc:15012", "XDS_ROOT_CA": str(root)}
    env["CA_ROOT_CA"] = ca.roots_pem().decode()
    cfg = KubeModeConfig.from_env(env)
    assert cfg.xds.tls
    assert cfg.xds.root_pem == ca.roots_pem()
    assert cfg.ca.tls
    assert cfg.ca.root_pem == ca.roots_pem()
    sys_cfg = KubeModeConfig.from_env({**env, "XDS_ROOT_CA": "SYSTEM"})
    assert sys_cfg.xds.root_pem is None
    assert sys_cfg.xds.credentials() is not None


ERRORS = [
    ("no-xds", {"NODE_NAME": "n"}, "XDS_ADDRESS is not set"),
    ("no-node", {"XDS_ADDRESS": "http://cp:1"}, "NODE_NAME is not set"),
    ("bad-scheme", {**BASE, "XDS_ADDRESS": "grpc://cp:1"}, "XDS_ADDRESS='grpc://cp:1': scheme"),
    ("no-port", {**BASE, "XDS_ADDRESS": "http://cp"}, "XDS_ADDRESS='http://cp': expected"),
    ("bad-port", {**BASE, "CA_ADDRESS": "http://cp:99999"}, "CA_ADDRESS="),
    (
        "missing-root",
        {**BASE, "XDS_ADDRESS": "https://cp:1", "XDS_ROOT_CA": "/nonexistent/root.pem"},
        "XDS_ROOT_CA: cannot read root certificate /nonexistent/root.pem",
    ),
    ("bad-metajson", {**BASE, "ISTIO_METAJSON_X": "{"}, "ISTIO_METAJSON_X"),
]


@pytest.mark.parametrize(("env", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(KubeModeError, match=message.replace("(", r"\(").replace("*", r"\*")):
        KubeModeConfig.from_env(env)


def test_root_file_without_pem(tmp_path: Path) -> None:
    junk = tmp_path / "root.pem"
    junk.write_text("nope")
    with pytest.raises(KubeModeError, match="holds no PEM"):
        parse_endpoint("https://cp:1", "XDS_ADDRESS", root=str(junk), root_var="XDS_ROOT_CA")


def test_bare_host_port_means_tls() -> None:
    ep = parse_endpoint("cp:15012", "XDS_ADDRESS", root="SYSTEM", root_var="XDS_ROOT_CA")
    assert ep.tls
    assert ep.target == "cp:15012"


def test_build_wires_the_pieces() -> None:
    mode = build(KubeModeConfig.from_env({**BASE, "CLUSTER_ID": "c1", "TRUST_DOMAIN": "td"}))
    assert mode.source.local_pods is mode.local_pods
    assert mode.local_pods.cluster_id == "c1"
    assert mode.local_pods.trust_domain == "td"
    assert mode.source.kind == "xds"
    assert mode.source.node == "node-a"
    assert not mode.local_pods.synced

"""The control-plane process wiring: flags, serving, and the leader-gated waypoint controller."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from e2e.fakekube import FakeApiServer
from tests.controlplane import objects as o
from waypoint.controlplane import cli
from waypoint.controlplane.service import ControlPlane
from waypoint.manager.client import connect
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.session import NodeInfo

pytestmark = pytest.mark.timeout(30)


class _Ignore:
    def on_resources(self, type_url, added, removed):
        return {}


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_have_istio_like_defaults() -> None:
    args = _args()
    assert args.xds_address == "0.0.0.0:15012"
    assert args.leader_elect is True
    assert (args.cluster_id, args.root_namespace) == ("Kubernetes", "istio-system")
    assert args.trusted_node_accounts == "ambient-system/ztunnel"  # deploy/ztunnel's account


def test_bad_trusted_node_accounts_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--trusted-node-accounts", "ztunnel"])
    with pytest.raises(SystemExit):
        cli.check_arguments(parser, args)
    assert "--trusted-node-accounts: 'ztunnel' is not <namespace>/<service account>" in (
        capsys.readouterr().err
    )


async def test_run_serves_and_runs_the_controller_only_while_leader(tmp_path: Path) -> None:
    server = FakeApiServer()
    await server.start()
    server.put_object(o.namespace("istio-system"))
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    api = await connect(kubeconfig)
    raw = await cli.api_client(kubeconfig)
    stop = asyncio.Event()
    events: list[str] = []
    serving: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def start_controller() -> None:
        events.append("start")

    async def stop_controller() -> None:
        events.append("stop")

    def on_serving(_plane: ControlPlane, port: int) -> None:
        serving.set_result(port)

    args = _args("--xds-address", "127.0.0.1:0", "--identity", "replica-a")
    task = asyncio.create_task(
        cli.run(
            args,
            api,
            raw,
            stop,
            start_controller=start_controller,
            stop_controller=stop_controller,
            on_serving=on_serving,
        )
    )
    try:
        port = await asyncio.wait_for(serving, 10)
        client = XdsClient(
            XdsClientConfig(
                address=f"127.0.0.1:{port}", node=NodeInfo(pod_name="z", namespace="istio-system")
            ),
            _Ignore(),
        )
        client_task = asyncio.create_task(client.run())
        await client.wait_ready(timeout=5)
        await client.close()
        await asyncio.wait_for(client_task, 5)
        async with asyncio.timeout(5):
            while "start" not in events:
                await asyncio.sleep(0.02)
        lease = server.get_object(
            "coordination.k8s.io/v1", "Lease", "waypoint-manager", "istio-system"
        )
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "replica-a"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await raw.close()
        await api.close()
        await server.stop()
    assert events == ["start", "stop"]
    lease = server.get_object("coordination.k8s.io/v1", "Lease", "waypoint-manager", "istio-system")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == ""  # released for the next replica


def test_lease_timings_are_flags_with_client_go_defaults() -> None:
    args = _args("--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "0.5")
    assert (args.lease_duration, args.renew_deadline, args.retry_period) == (3, 2.0, 0.5)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    cli.check_arguments(parser, args)  # consistent: no exit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lease-duration", "2", "--renew-deadline", "5"], "--renew-deadline 5.0"),
        (["--tls-cert-chain", "/c.pem"], "--tls-cert-chain and --tls-key go together"),
        (["--identity", ""], "--identity: empty"),
    ],
    ids=["renew-past-lease", "half-tls", "no-identity"],
)
def test_check_arguments_names_the_bad_flag(argv: list[str], message: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    with pytest.raises(SystemExit):
        cli.check_arguments(parser, parser.parse_args(argv))
    assert message in capsys.readouterr().err


async def test_run_status_reports_serving_and_leadership(tmp_path: Path) -> None:
    server = FakeApiServer()
    await server.start()
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    api = await connect(kubeconfig)
    raw = await cli.api_client(kubeconfig)
    stop = asyncio.Event()
    status = cli.RunStatus()

    async def noop() -> None:
        return None

    args = _args("--xds-address", "127.0.0.1:0", "--no-leader-elect")
    task = asyncio.create_task(
        cli.run(args, api, raw, stop, start_controller=noop, stop_controller=noop, status=status)
    )
    try:
        await asyncio.wait_for(status.serving.wait(), 10)
        assert status.port
        assert status.plane is not None
        assert status.ca is not None
        async with asyncio.timeout(5):
            while not status.is_leader:  # without election the controller always runs
                await asyncio.sleep(0.02)
        assert status.elector is None
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await raw.close()
        await api.close()
        await server.stop()
    assert not status.is_leader

"""`waypoint manager` as one process: control plane + leader-gated waypoint controller on one cache.

Against the fake API server (e2e/fakekube) with real gRPC and a real ztunnel `XdsClient`:
* in-process through the async entry point `run_manager`: xDS over TLS, a Gateway reconciled into a
  Deployment, one binding table shared by the controller and the xDS view, each kind watched
  once, health and metrics endpoints;
* two replicas with leader election (short leases): replica A as a subprocess (`--kubeconfig`),
  replica B in-process. Only the leader reconciles, both serve xDS; SIGKILL of the leader hands
  over within the lease time, without A releasing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from e2e.fakekube import FakeApiServer
from tests.controlplane import objects as o
from waypoint import cli
from waypoint.controlplane.cli import RunStatus
from ztunnel.xds import protos
from ztunnel.xds.channel import tls_credentials
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.session import NodeInfo, Versioned

from .helpers import gateway

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
POD_UID = "Kubernetes//Pod/shop/web-1"
LEASE = ("coordination.k8s.io/v1", "Lease", "waypoint-manager", "istio-system")
# Short leases so a handover takes about two seconds (client-go defaults are 15/10/2).
LEASE_FLAGS = ("--lease-duration=2", "--renew-deadline=1.5", "--retry-period=0.2")
LEASE_SECONDS = 2.0


class Watcher:
    """ztunnel's ResourceHandler role: keep what was pushed, wake waiters."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {t: {} for t in protos.ZTUNNEL_TYPE_URLS}
        self.changed = asyncio.Event()

    def on_resources(
        self, type_url: str, added: Mapping[str, Versioned], removed: Sequence[str]
    ) -> Mapping[str, str]:
        for name, (_version, msg) in added.items():
            self.state[type_url][name] = msg
        for name in removed:
            self.state[type_url].pop(name, None)
        self.changed.set()
        return {}

    @property
    def addresses(self) -> dict[str, Any]:
        return self.state[protos.ADDRESS_TYPE_URL]


@contextlib.asynccontextmanager
async def xds_client(
    port: int, credentials: Any = None, server_name: str | None = None
) -> AsyncIterator[Watcher]:
    watcher = Watcher()
    client = XdsClient(
        XdsClientConfig(
            address=f"127.0.0.1:{port}",
            node=NodeInfo(pod_name="ztunnel-a", namespace="istio-system", node_name="node-a"),
            credentials=credentials,
            server_name=server_name,
        ),
        watcher,
    )
    task = asyncio.create_task(client.run())
    try:
        await client.wait_ready(timeout=10)
        yield watcher
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def serving_cert(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A self-signed serving certificate for `localhost` (chain path, key path, root PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    chain, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    chain.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return chain, key_path, pem


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.5)
    await srv.start()
    srv.put_object(o.namespace("istio-system"))
    srv.put_object(o.namespace("shop", ambient=True))
    srv.put_object(o.pod("web-1", ip="10.1.0.7", labels={"app": "web"}))
    try:
        yield srv
    finally:
        await srv.stop()


def put_gateway(server: FakeApiServer, name: str) -> None:
    obj = gateway(name)
    obj["metadata"].pop("uid")  # the server assigns it
    server.put_object(obj)


def deployment(server: FakeApiServer, name: str) -> Any:
    return server.get_object("apps/v1", "Deployment", name, "shop")


def mark_ready(server: FakeApiServer, name: str) -> None:
    dep = copy.deepcopy(deployment(server, name))
    dep["status"] = {"replicas": 2, "readyReplicas": 2, "availableReplicas": 2}
    server.put_object(dep)


def holder(server: FakeApiServer) -> str | None:
    lease = server.get_object(*LEASE)
    return None if lease is None else str(lease["spec"].get("holderIdentity") or "")


@contextlib.asynccontextmanager
async def in_process(
    kubeconfig: Path, *flags: str
) -> AsyncIterator[tuple[cli.ManagerStatus, asyncio.Task[int]]]:
    args = cli.parse_manager_args(
        [
            "manager",
            f"--kubeconfig={kubeconfig}",
            "--xds-address=127.0.0.1:0",
            "--monitoring-address=127.0.0.1:0",
            "--lease-namespace=istio-system",
            *flags,
        ]
    )
    status = cli.ManagerStatus(control=RunStatus())
    stop = asyncio.Event()
    task = asyncio.create_task(cli.run_manager(args, stop, status))
    try:
        async with asyncio.timeout(15):
            await status.control.serving.wait()
        assert status.health is not None
        assert status.health.port
        yield status, task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_one_process_serves_xds_over_tls_and_reconciles(
    server: FakeApiServer, tmp_path: Path
) -> None:
    chain, key, root = serving_cert(tmp_path)
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    put_gateway(server, "waypoint")
    async with in_process(
        kubeconfig, "--no-leader-elect", f"--tls-cert-chain={chain}", f"--tls-key={key}"
    ) as (status, _):
        assert status.health is not None
        assert status.health.port
        health_port = status.health.port
        assert await get(health_port, "/healthz") == (200, "ok\n")
        assert status.control.port is not None
        async with xds_client(
            status.control.port, tls_credentials(root), server_name="localhost"
        ) as watcher:
            await eventually(lambda: POD_UID in watcher.addresses, "the pod over xDS")
            await eventually(lambda: deployment(server, "waypoint") is not None, "Deployment")
            assert (await get(health_port, "/readyz"))[0] == 200

            # One binding table: the controller's is the very object the xDS view was built from.
            server.put_object(
                o.service(
                    "web",
                    selector={"app": "web"},
                    ports=[{"name": "http", "port": 80}],
                    labels={"istio.io/use-waypoint": "waypoint"},
                )
            )
            mark_ready(server, "waypoint")  # the kubelet's part: the waypoint pods are ready
            manager, plane = status.manager, status.control.plane
            assert manager is not None
            assert plane is not None
            svc = "shop/web.shop.svc.cluster.local"
            await eventually(
                lambda: (
                    svc in watcher.addresses and watcher.addresses[svc].service.HasField("waypoint")
                ),
                "the service's waypoint over xDS",
            )
            # The controller's table is updated by its own work queue, which may trail xDS.
            await eventually(
                lambda: (
                    manager.binding_table.waypoint_for_service("shop", "web")
                    == ("shop", "waypoint")
                ),
                "the controller's binding",
            )
            await manager.wait_idle()
            # Both come from the cache's one memoized computation (recomputed when a watched
            # object changes, e.g. by the controller's own Service status writes).
            await eventually(
                lambda: plane.bindings.to_data() == manager.binding_table.to_data(), "one table"
            )
            assert status.cache is not None
            assert status.cache.binding_table() is status.cache.binding_table()

            # Each kind is watched once: one informer per (kind, selector) in the process.
            assert status.cache is not None
            keys = [(i.rt.plural, i.label_selector) for i in status.cache.informers]
            assert len(keys) == len(set(keys))
            assert plane.informers["Pod"] is manager.pods
            assert plane.informers["Gateway"] is manager.gateways

            code, text = await get(health_port, "/metrics")
            assert code == 200
            assert metric(text, "waypoint_manager_leader") == 1
            assert metric(text, "waypoint_manager_xds_clients") == 1
            assert metric(text, "waypoint_manager_reconciles_total") >= 2
            assert metric(text, "waypoint_manager_reconcile_errors_total") == 0
            assert metric(text, "waypoint_manager_certificates_signed_total") == 0
            assert 'waypoint_manager_informer_relists_total{resource="pods"} 1.0' in text


async def test_readyz_says_why_until_the_caches_sync() -> None:
    from waypoint.manager.health import HealthServer

    status = cli.ManagerStatus(control=RunStatus())
    health = HealthServer(ready=status.not_ready, snapshot=status.snapshot)
    port = await health.start("127.0.0.1:0")
    try:
        assert await get(port, "/healthz") == (200, "ok\n")
        assert await get(port, "/readyz") == (503, "watch caches not synced\n")
        code, text = await get(port, "/metrics")
        assert code == 200
        assert metric(text, "waypoint_manager_leader") == 0
    finally:
        await health.stop()


class Replica:
    """A `waypoint manager` subprocess; its ports are read from its log."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.xds_port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            m = re.search(r"serving xDS and CA on port (\d+)", line)
            if m and not self.xds_port.done():
                self.xds_port.set_result(int(m.group(1)))

    @classmethod
    async def start(cls, kubeconfig: Path, *flags: str) -> Replica:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "waypoint.cli",
            "manager",
            f"--kubeconfig={kubeconfig}",
            "--xds-address=127.0.0.1:0",
            "--monitoring-address=127.0.0.1:0",
            "--lease-namespace=istio-system",
            *flags,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    def log(self) -> str:
        return "\n".join(self.lines[-40:])

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)


async def test_two_replicas_only_the_leader_writes_and_a_killed_leader_hands_over(
    server: FakeApiServer, tmp_path: Path
) -> None:
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    put_gateway(server, "waypoint")
    a = await Replica.start(kubeconfig, "--identity=replica-a", *LEASE_FLAGS)
    try:
        await eventually(lambda: holder(server) == "replica-a", "replica-a to lead", timeout=20)
        await eventually(lambda: deployment(server, "waypoint") is not None, "A reconciles")
        port_a = await asyncio.wait_for(a.xds_port, 10)

        async with in_process(kubeconfig, "--identity=replica-b", *LEASE_FLAGS) as (b, _):
            assert b.control.port is not None
            assert b.manager is not None
            # Both replicas serve xDS, including the standby.
            async with xds_client(port_a) as wa, xds_client(b.control.port) as wb:
                await eventually(lambda: POD_UID in wa.addresses, "xDS from the leader")
                await eventually(lambda: POD_UID in wb.addresses, "xDS from the standby")
            assert b.health is not None
            assert b.health.port
            assert (await get(b.health.port, "/readyz"))[0] == 200  # standbys are ready

            # The standby does not write: its controller never ran while A leads.
            put_gateway(server, "second")
            await eventually(lambda: deployment(server, "second") is not None, "A reconciles")
            assert not b.control.is_leader
            assert not b.manager.running
            assert b.manager.reconciles == 0
            assert metric((await get(b.health.port, "/metrics"))[1], "waypoint_manager_leader") == 0

            # A dies without releasing the Lease; B takes over once the lease expires.
            assert a.proc.returncode is None, a.log()
            await a.kill()
            killed = time.monotonic()
            put_gateway(server, "third")
            await eventually(lambda: holder(server) == "replica-b", "replica-b to lead")
            took = time.monotonic() - killed
            await eventually(lambda: deployment(server, "third") is not None, "B reconciles")
            assert b.control.is_leader
            assert b.manager.reconciles > 0
            # At most one lease duration plus one election round and scheduling slack.
            assert took < LEASE_SECONDS + 2.0, f"handover took {took:.2f}s"
        assert holder(server) == "", "B released the Lease on a clean stop"
    finally:
        await a.kill()

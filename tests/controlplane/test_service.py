"""Integration: fake API server + ControlPlane + a real delta-xDS client (ztunnel's) over gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer
from tests.controlplane import objects as o
from waypoint.controlplane.service import AUTHORIZATION_POLICY, ControlPlane, ControlPlaneConfig
from waypoint.manager.client import AsyncKubeClient, connect
from ztunnel.xds import protos
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.session import NodeInfo, Versioned

pytestmark = pytest.mark.timeout(30)

HBONE = 1  # istio.workload.TunnelProtocol
NONE = 0


class Watcher:
    """ResourceHandler that keeps the client's view and wakes waiters on every push."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {t: {} for t in protos.ZTUNNEL_TYPE_URLS}
        self._changed = asyncio.Event()

    def on_resources(
        self, type_url: str, added: Mapping[str, Versioned], removed: Sequence[str]
    ) -> Mapping[str, str]:
        for name, (_version, msg) in added.items():
            self.state[type_url][name] = msg
        for name in removed:
            self.state[type_url].pop(name, None)
        self._changed.set()
        return {}

    async def until(self, predicate: Callable[[], bool], timeout: float) -> float:
        """Wait until predicate() holds; returns how long it took."""
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        return time.monotonic() - start

    def workload(self, uid: str) -> Any:
        addr = self.state[protos.ADDRESS_TYPE_URL].get(uid)
        return addr.workload if addr is not None else None


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.5)
    await srv.start()
    srv.put_object(o.namespace("shop"))
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def kube(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[AsyncKubeClient]:
    client = await connect(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def plane(kube: AsyncKubeClient) -> AsyncIterator[tuple[ControlPlane, int]]:
    cp = ControlPlane(kube, ControlPlaneConfig(debounce_seconds=0.02))
    await cp.start(sync_timeout=10)
    port = await cp.serve("127.0.0.1:0")
    try:
        yield cp, port
    finally:
        await cp.stop()


@pytest.fixture
async def watcher(plane: tuple[ControlPlane, int]) -> AsyncIterator[Watcher]:
    _, port = plane
    w = Watcher()
    client = XdsClient(
        XdsClientConfig(
            address=f"127.0.0.1:{port}",
            node=NodeInfo(pod_name="ztunnel-a", namespace="istio-system", node_name="node-a"),
        ),
        w,
    )
    task = asyncio.create_task(client.run())
    try:
        await client.wait_ready(timeout=5)
        yield w
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)  # run() returns once closed


def _label_namespace(server: FakeApiServer, name: str, ambient: bool) -> None:
    server.put_object(o.namespace(name, ambient=ambient))


async def test_namespace_label_moves_pods_in_and_out_of_the_mesh(
    server: FakeApiServer, watcher: Watcher
) -> None:
    _label_namespace(server, "shop", ambient=False)
    server.put_object(o.pod("a", ip="10.1.0.5"))
    server.put_object(o.pod("b", ip="10.1.0.6", labels={"istio.io/dataplane-mode": "none"}))
    uid_a, uid_b = "Kubernetes//Pod/shop/a", "Kubernetes//Pod/shop/b"

    await watcher.until(lambda: watcher.workload(uid_a) is not None, 1.0)
    assert watcher.workload(uid_a).tunnel_protocol == NONE

    _label_namespace(server, "shop", ambient=True)
    took = await watcher.until(
        lambda: (
            watcher.workload(uid_a) is not None and watcher.workload(uid_a).tunnel_protocol == HBONE
        ),
        1.0,
    )
    assert took < 1.0
    assert watcher.workload(uid_b).tunnel_protocol == NONE  # the pod opted out

    _label_namespace(server, "shop", ambient=False)
    await watcher.until(lambda: watcher.workload(uid_a).tunnel_protocol == NONE, 1.0)

    server.delete_object("v1", "Pod", "a", "shop")
    await watcher.until(lambda: watcher.workload(uid_a) is None, 1.0)


async def test_authorization_policy_arrives_within_a_second(
    server: FakeApiServer, kube: AsyncKubeClient, watcher: Watcher
) -> None:
    # Created through the HTTP API (server-side apply), as kubectl would.
    await kube.apply(
        AUTHORIZATION_POLICY,
        o.authz("deny-9999", action="DENY", rules=[{"to": [{"operation": {"ports": ["9999"]}}]}]),
        field_manager="test",
        force=True,
    )
    authz = watcher.state[protos.AUTHORIZATION_TYPE_URL]
    took = await watcher.until(lambda: "shop/deny-9999" in authz, 1.0)
    assert took < 1.0
    pol = authz["shop/deny-9999"]
    assert pol.action == 1  # DENY
    assert list(pol.rules[0].clauses[0].matches[0].destination_ports) == [9999]

    await kube.delete(AUTHORIZATION_POLICY, "shop", "deny-9999")
    await watcher.until(lambda: "shop/deny-9999" not in authz, 1.0)


async def test_service_with_endpoints_and_waypoint(
    server: FakeApiServer, watcher: Watcher, plane: tuple[ControlPlane, int]
) -> None:
    _label_namespace(server, "shop", ambient=True)
    server.put_object(o.pod("web-1", ip="10.1.0.7", labels={"app": "web"}, ports={"http": 8080}))
    server.put_object(
        o.service(
            "web",
            selector={"app": "web"},
            ports=[{"name": "http", "port": 80, "targetPort": "http"}],
        )
    )
    uid = "Kubernetes//Pod/shop/web-1"
    key = "shop/web.shop.svc.cluster.local"
    addresses = watcher.state[protos.ADDRESS_TYPE_URL]
    await watcher.until(
        lambda: key in addresses and uid in addresses and bool(addresses[uid].workload.services),
        1.0,
    )
    svc = addresses[key].service
    assert [(p.service_port, p.target_port) for p in svc.ports] == [(80, 0)]
    ports = addresses[uid].workload.services[key].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080)]

    # Bind the service to a ready waypoint.
    server.put_object(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
            "status": {
                "addresses": [{"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}]
            },
        }
    )
    labelled = o.service(
        "web",
        selector={"app": "web"},
        ports=[{"name": "http", "port": 80, "targetPort": "http"}],
        labels={"istio.io/use-waypoint": "waypoint"},
    )
    server.put_object(labelled)
    await watcher.until(lambda: addresses[key].service.HasField("waypoint"), 1.0)
    wp = addresses[key].service.waypoint
    assert wp.hostname.hostname == "waypoint.shop.svc.cluster.local"
    assert wp.hbone_mtls_port == 15008


async def test_shared_cache_serves_both_consumers_and_outlives_the_controller(
    server: FakeApiServer, kube: AsyncKubeClient
) -> None:
    from waypoint.manager.controller import WatchCache, WaypointManager

    cache = WatchCache(kube, watch_timeout=5)
    cp = ControlPlane(kube, ControlPlaneConfig(debounce_seconds=0.02), cache=cache)
    manager = WaypointManager(kube, cache=cache)
    try:
        await cp.start(sync_timeout=10)
        # One informer per kind: the controller listens to the control plane's, not its own.
        assert manager.pods is cp.informers["Pod"]
        assert manager.services is cp.informers["Service"]
        keys = [(i.rt.plural, i.label_selector) for i in cache.informers]
        assert len(keys) == len(set(keys))

        # The controller joins a synced cache (as on gaining leadership): it gets a replay.
        server.put_object(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "shop"},
                "spec": {
                    "gatewayClassName": "istio-waypoint",
                    "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
                },
            }
        )
        await asyncio.sleep(0.1)
        await manager.start()
        await manager.wait_idle()
        assert server.get_object("apps/v1", "Deployment", "waypoint", "shop") is not None

        # Losing leadership stops the controller only; the watches keep feeding xDS.
        await manager.stop()
        assert cache.running
        before = cp.rebuilds
        server.put_object(o.pod("late", ip="10.1.0.9"))
        async with asyncio.timeout(5):
            while "Kubernetes//Pod/shop/late" not in (
                cp.translation.workloads if cp.translation else {}
            ):
                await asyncio.sleep(0.02)
        assert cp.rebuilds > before

        # Regaining it replays again: a Gateway made while stopped is reconciled.
        server.delete_object("apps/v1", "Deployment", "waypoint", "shop")
        await manager.start()
        await manager.wait_idle()
        assert server.get_object("apps/v1", "Deployment", "waypoint", "shop") is not None
    finally:
        await manager.stop()
        await cp.stop()
        await cache.stop()


async def test_a_failing_listener_does_not_starve_the_others(
    server: FakeApiServer, kube: AsyncKubeClient
) -> None:
    from waypoint.manager import kinds
    from waypoint.manager.controller import WatchCache

    cache = WatchCache(kube, watch_timeout=5)
    inf = cache.informer(kinds.POD)
    seen: list[str] = []

    def broken(_type: str, _obj: Mapping[str, Any]) -> None:
        raise RuntimeError("consumer bug")

    inf.add_listener(broken)
    inf.add_listener(lambda t, obj: seen.append(obj["metadata"]["name"]))
    cache.start()
    try:
        await cache.wait_synced(timeout=5)
        server.put_object(o.pod("p1", ip="10.1.0.11"))
        async with asyncio.timeout(5):
            while "p1" not in seen:
                await asyncio.sleep(0.02)
    finally:
        await cache.stop()

"""kubesource against the fake API server: L7 objects created/updated/deleted through the API reach
the proxy's configuration; a bad route is rejected and reported while the rest works; a watch whose
history was compacted (410 Gone) recovers by relisting."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer
from waypoint.manager.client import AsyncKubeClient, connect
from waypoint.proxy.app import L7Sources
from waypoint.proxy.config import L7Config
from waypoint.proxy.kubesource import KubeL7Source, watch_namespaces
from waypoint.proxy.telemetry import Telemetry

pytestmark = pytest.mark.timeout(30)

GW = "gateway.networking.k8s.io/v1"
SEC = "security.istio.io/v1"


class FakeProxy:
    """What L7Sources pushes into: the proxy's set_config."""

    def __init__(self) -> None:
        self.config: L7Config | None = None
        self.changed = asyncio.Event()

    def set_config(self, config: L7Config) -> None:
        self.config = config
        self.changed.set()


def http_route(name: str, path: str, *, ns: str = "shop", service: str = "web") -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": service}],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": path}}],
                    "backendRefs": [{"name": service, "port": 80}],
                }
            ],
        },
    }


def grpc_route(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GW,
        "kind": "GRPCRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "grpc"}],
            "rules": [{"backendRefs": [{"name": "grpc", "port": 9000}]}],
        },
    }


def deny_path(name: str, path: str) -> dict[str, Any]:
    return {
        "apiVersion": SEC,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": [path]}}]}],
        },
    }


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.2)
    await srv.start()
    srv.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def api(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[AsyncKubeClient]:
    client = await connect(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        yield client
    finally:
        await client.close()


class Running:
    def __init__(self, source: KubeL7Source, proxy: FakeProxy, sources: L7Sources) -> None:
        self.source, self.proxy, self.sources = source, proxy, sources

    @property
    def config(self) -> L7Config:
        assert self.proxy.config is not None
        return self.proxy.config

    def routes(self, service: str = "web", port: int = 80) -> list[str]:
        return [
            r.name for r in self.config.routes.http_routes_for("Service", "shop", service, port)
        ]

    def policies(self) -> list[str]:
        return sorted(p.name for p in self.config.policies if p.invalid is None)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.proxy.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proxy.changed.wait(), 0.2)


@pytest.fixture
async def running(api: AsyncKubeClient) -> AsyncIterator[Running]:
    proxy = FakeProxy()
    telemetry = Telemetry()
    sources = L7Sources(proxy, telemetry)  # type: ignore[arg-type]
    source = KubeL7Source(api, lambda objs: sources.update("kubernetes", objs), retry_delay=0.05)
    await source.initial()
    task = asyncio.create_task(source.run())
    try:
        yield Running(source, proxy, sources)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_initial_list_sees_existing_objects(server: FakeApiServer, api) -> None:
    server.put_object(http_route("early", "/early"))
    proxy = FakeProxy()
    sources = L7Sources(proxy, Telemetry())  # type: ignore[arg-type]
    source = KubeL7Source(api, lambda objs: sources.update("kubernetes", objs))
    await source.initial()
    assert proxy.config is not None
    assert [r.name for r in proxy.config.routes.http_routes_for("Service", "shop", "web", 80)] == [
        "early"
    ]


async def test_create_update_delete_reach_the_config(
    server: FakeApiServer, running: Running
) -> None:
    assert running.routes() == []
    server.put_object(http_route("r1", "/a"))
    server.put_object(grpc_route("g1"))
    server.put_object(deny_path("no-admin", "/admin"))

    def grpc_routes() -> list[str]:
        routes = running.config.routes.grpc_routes_for("Service", "shop", "grpc", 9000)
        return [r.name for r in routes]

    # Each kind has its own watch: wait for all three.
    await running.until(
        lambda: (
            running.routes() == ["r1"]
            and running.policies() == ["no-admin"]
            and grpc_routes() == ["g1"]
        ),
        "create",
    )
    # Update: the new path replaces the old one.
    server.put_object(http_route("r1", "/b"))

    def updated() -> bool:
        routes = running.config.routes.http_routes_for("Service", "shop", "web", 80)
        return len(routes) == 1 and "/b" in repr(routes[0])

    await running.until(updated, "update")
    # Delete.
    server.delete_object(GW, "HTTPRoute", "r1", "shop")
    server.delete_object(SEC, "AuthorizationPolicy", "no-admin", "shop")
    await running.until(lambda: running.routes() == [] and running.policies() == [], "delete")


async def test_bad_route_is_rejected_and_reported_while_the_rest_works(
    server: FakeApiServer, running: Running
) -> None:
    server.put_object(http_route("good", "/ok"))
    bad = http_route("bad", "/x")
    bad["spec"]["rules"][0]["matches"][0]["path"] = {"type": "Exact", "value": "no-slash"}
    server.put_object(bad)
    await running.until(
        lambda: running.routes() == ["good"] and bool(running.sources.errors), "rejection"
    )
    assert any("HTTPRoute shop/bad" in e for e in running.sources.errors), running.sources.errors
    assert (
        running.sources.telemetry.value("waypoint_config_rejected_objects", {"source": "all"}) == 1
    )
    # Fixing it clears the report.
    server.put_object(http_route("bad", "/fixed"))
    await running.until(
        lambda: sorted(running.routes()) == ["bad", "good"] and not running.sources.errors, "fix"
    )


async def test_watch_expired_by_compaction_relists(server: FakeApiServer, api) -> None:
    proxy = FakeProxy()
    sources = L7Sources(proxy, Telemetry())  # type: ignore[arg-type]
    source = KubeL7Source(api, lambda objs: sources.update("kubernetes", objs), retry_delay=0.05)
    server.put_object(http_route("before", "/before"))
    await source.initial()
    # Changes the watch will never see as events: its resourceVersion is compacted away (410).
    server.put_object(http_route("during", "/during"))
    server.delete_object(GW, "HTTPRoute", "before", "shop")
    server.store.compact_history()
    run = Running(source, proxy, sources)
    task = asyncio.create_task(source.run())
    try:
        await run.until(lambda: run.routes() == ["during"], "relist after 410 Gone")
        assert source.relists >= 1
        assert source.errors == 0  # Gone is routine, not an error
        # And the resumed watch delivers later events again.
        server.put_object(http_route("after", "/after"))
        await run.until(lambda: sorted(run.routes()) == ["after", "during"], "event after relist")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_broken_connection_recovers(server: FakeApiServer, running: Running) -> None:
    server.put_object(http_route("before", "/before"))
    await running.until(lambda: running.routes() == ["before"], "first route")
    await server.stop()  # every watch stream breaks
    server.put_object(http_route("during", "/during"))
    server.delete_object(GW, "HTTPRoute", "before", "shop")
    await server.start()  # same port
    # Whether the re-watch hit the dead server (error, relist) or the new one (resume), the
    # view converges on what the API holds.
    await running.until(lambda: running.routes() == ["during"], "recovery", timeout=10)


# --- which namespaces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"POD_NAMESPACE": "shop"}, ("shop",)),
        ({"POD_NAMESPACE": "shop", "WAYPOINT_WATCH_NAMESPACES": "shop, web,shop"}, ("shop", "web")),
        ({"POD_NAMESPACE": "shop", "WAYPOINT_WATCH_NAMESPACES": "*"}, None),
        ({"WAYPOINT_WATCH_NAMESPACES": " "}, None),
    ],
    ids=["local-mode-all", "own-namespace", "widened-list", "widened-all", "blank-is-unset"],
)
def test_watch_namespaces_from_the_environment(
    env: dict[str, str], expected: tuple[str, ...] | None
) -> None:
    assert watch_namespaces(env) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WAYPOINT_WATCH_NAMESPACES": "shop,Bad_Name"}, "WAYPOINT_WATCH_NAMESPACES: 'Bad_Name'"),
        ({"WAYPOINT_WATCH_NAMESPACES": ",,"}, "WAYPOINT_WATCH_NAMESPACES: no namespace"),
        ({"POD_NAMESPACE": "a/b"}, "POD_NAMESPACE: 'a/b' is not a namespace name"),
    ],
    ids=["bad-name", "empty-list", "bad-pod-namespace"],
)
def test_bad_namespaces_are_refused_with_the_variable_named(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        watch_namespaces(env)


async def test_default_scope_is_the_pods_own_namespace(
    server: FakeApiServer, api, monkeypatch
) -> None:
    """A waypoint pod (POD_NAMESPACE set) lists and watches only its namespace."""
    server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
    server.put_object(http_route("mine", "/mine"))
    server.put_object(http_route("theirs", "/theirs", ns="web"))
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    monkeypatch.delenv("WAYPOINT_WATCH_NAMESPACES", raising=False)
    seen: list[dict[str, list[Any]]] = []
    source = KubeL7Source(api, lambda objs: seen.append(dict(objs)), retry_delay=0.05)
    assert source.namespaces == ("shop",)
    assert {ns for _, ns in source.scopes} == {"shop"}
    await source.initial()
    assert [r["metadata"]["name"] for r in seen[-1]["httpRoutes"]] == ["mine"]


async def test_several_namespaces_are_watched_each_on_its_own(server: FakeApiServer, api) -> None:
    for name in ("web", "elsewhere"):
        server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    server.put_object(http_route("a", "/a"))
    server.put_object(http_route("b", "/b", ns="web"))
    server.put_object(http_route("c", "/c", ns="elsewhere"))
    seen: list[dict[str, list[Any]]] = []

    def names() -> list[str]:
        return sorted(r["metadata"]["name"] for r in seen[-1]["httpRoutes"]) if seen else []

    source = KubeL7Source(
        api, lambda objs: seen.append(dict(objs)), namespaces=["shop", "web"], retry_delay=0.05
    )
    await source.initial()
    assert names() == ["a", "b"]
    task = asyncio.create_task(source.run())
    try:
        server.put_object(http_route("b2", "/b2", ns="web"))
        server.put_object(http_route("c2", "/c2", ns="elsewhere"))
        server.delete_object(GW, "HTTPRoute", "a", "shop")
        deadline = time.monotonic() + 5
        while names() != ["b", "b2"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert names() == ["b", "b2"]
        # A 410 relist of one namespace keeps the other namespace's objects.
        server.store.compact_history()
        await source._relist(("httpRoutes", "shop"))
        assert names() == ["b", "b2"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    wide = KubeL7Source(api, lambda objs: seen.append(dict(objs)), namespaces="*")
    await wide.initial()
    assert names() == ["b", "b2", "c", "c2"]

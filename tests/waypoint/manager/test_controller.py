"""Controller tests: the real kubernetes_asyncio client against the in-project fake API server."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer
from waypoint.manager import kinds
from waypoint.manager.client import AsyncKubeClient, connect
from waypoint.manager.controller import WaypointManager
from waypoint.manager.kube import KubeError
from waypoint.manager.render import RenderConfig

from .helpers import configmap, gateway

NOW = "2026-01-01T00:00:00Z"
CONFIG = RenderConfig(image="registry.example/ambient/waypoint:0.1.0")
OWNED = [
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
]
pytestmark = pytest.mark.timeout(30)


async def eventually(check: Callable[[], Any], timeout: float = 8.0, what: str = "") -> Any:
    """Poll `check` until it returns a truthy value (bounded); the fake server's watches are async."""
    deadline = asyncio.get_running_loop().time() + timeout
    last: Any = None
    while asyncio.get_running_loop().time() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or check}; last value {last!r}")


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.5)
    await srv.start()
    try:
        for ns in ("shop", "other", "istio-system"):
            srv.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        srv.put_object(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GatewayClass",
                "metadata": {"name": "istio-waypoint"},
                "spec": {"controllerName": "istio.io/mesh-controller"},
            }
        )
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def kubeconfig(server: FakeApiServer, tmp_path: Path) -> Path:
    return server.write_kubeconfig(tmp_path / "kubeconfig")


class Managers:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.running: list[tuple[WaypointManager, AsyncKubeClient]] = []

    async def start(self, api: Any = None, **kwargs: Any) -> WaypointManager:
        client = await connect(str(self.kubeconfig))
        manager = WaypointManager(
            api or client,
            CONFIG,
            now=lambda: NOW,
            watch_timeout=kwargs.pop("watch_timeout", 5),
            **kwargs,
        )
        self.running.append((manager, client))
        await manager.start()
        return manager

    async def stop(self, manager: WaypointManager) -> None:
        for m, client in list(self.running):
            if m is manager:
                await m.stop()
                await client.close()
                self.running.remove((m, client))


@pytest.fixture
async def managers(kubeconfig: Path) -> AsyncIterator[Managers]:
    ms = Managers(kubeconfig)
    try:
        yield ms
    finally:
        for m, _ in list(ms.running):
            await ms.stop(m)


def get(
    server: FakeApiServer, api_version: str, kind: str, name: str = "waypoint", ns: str = "shop"
) -> Any:
    return server.get_object(api_version, kind, name, ns)


def condition(obj: dict[str, Any] | None, type_: str) -> Any:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


def gw_cond(server: FakeApiServer, type_: str, name: str = "waypoint") -> Any:
    return condition(get(server, "gateway.networking.k8s.io/v1", "Gateway", name), type_)


def exists(server: FakeApiServer, api_version: str, kind: str) -> Callable[[], Any]:
    return lambda: get(server, api_version, kind)


def gone(server: FakeApiServer, api_version: str, kind: str) -> Callable[[], bool]:
    return lambda: get(server, api_version, kind) is None


def labelled(server: FakeApiServer, api_version: str, kind: str) -> Callable[[], bool]:
    return lambda: (
        (get(server, api_version, kind) or {}).get("metadata", {}).get("labels", {}).get("team")
        == "payments"
    )


def mark_ready(
    server: FakeApiServer, name: str = "waypoint", ns: str = "shop", ready: int = 2
) -> None:
    dep = copy.deepcopy(get(server, "apps/v1", "Deployment", name, ns))
    assert dep is not None
    dep["status"] = {"replicas": ready, "readyReplicas": ready, "availableReplicas": ready}
    server.put_object(dep)


def put_gateway(server: FakeApiServer, **kwargs: Any) -> dict[str, Any]:
    obj = gateway(**kwargs)
    obj["metadata"].pop("uid")
    return server.put_object(obj)


async def test_create_makes_every_object_with_owner_and_labels_then_programmed(
    server, managers
) -> None:
    await managers.start()
    gw = put_gateway(server)
    uid = gw["metadata"]["uid"]
    for api_version, kind in OWNED:
        obj = await eventually(exists(server, api_version, kind), what=kind)
        meta = obj["metadata"]
        assert meta["ownerReferences"][0]["uid"] == uid, kind
        assert meta["ownerReferences"][0]["kind"] == "Gateway"
        assert meta["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
        assert meta["labels"]["gateway.networking.k8s.io/gateway-class-name"] == "istio-waypoint"
        assert meta["labels"]["gateway.istio.io/managed"] == "istio.io-mesh-controller"
        assert any(f["manager"] == "ambient-waypoint-manager" for f in meta["managedFields"])
    accepted = await eventually(lambda: gw_cond(server, "Accepted"), what="Accepted")
    assert (accepted["status"], accepted["reason"]) == ("True", "Accepted")
    programmed = gw_cond(server, "Programmed")
    assert programmed
    assert (programmed["status"], programmed["reason"]) == ("False", "Pending")
    assert "addresses" not in get(server, "gateway.networking.k8s.io/v1", "Gateway")["status"]

    mark_ready(server)
    await eventually(
        lambda: (gw_cond(server, "Programmed") or {}).get("status") == "True", what="Programmed"
    )
    status = get(server, "gateway.networking.k8s.io/v1", "Gateway")["status"]
    ip = get(server, "v1", "Service")["spec"]["clusterIP"]
    assert status["addresses"] == [
        {"type": "IPAddress", "value": ip},
        {"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"},
    ]
    (listener,) = status["listeners"]
    assert {c["type"]: c["status"] for c in listener["conditions"]} == {
        "Accepted": "True",
        "Conflicted": "False",
        "Programmed": "True",
        "ResolvedRefs": "True",
    }
    gc = await eventually(
        lambda: condition(
            server.get_object("gateway.networking.k8s.io/v1", "GatewayClass", "istio-waypoint"),
            "Accepted",
        )
    )
    assert gc["status"] == "True"


async def test_edit_gateway_and_parameters_objects_follow(server, managers) -> None:
    server.put_object(configmap("params", maxReplicas="4"))
    await managers.start()
    put_gateway(
        server,
        infrastructure={"parametersRef": {"group": "", "kind": "ConfigMap", "name": "params"}},
    )
    hpa = await eventually(lambda: get(server, "autoscaling/v2", "HorizontalPodAutoscaler"))
    assert hpa["spec"]["maxReplicas"] == 4

    server.put_object(configmap("params", maxReplicas="7", minReplicas="3"))
    await eventually(
        lambda: (
            (get(server, "autoscaling/v2", "HorizontalPodAutoscaler") or {})
            .get("spec", {})
            .get("maxReplicas")
            == 7
        )
    )

    gw = copy.deepcopy(get(server, "gateway.networking.k8s.io/v1", "Gateway"))
    gw["spec"]["infrastructure"]["labels"] = {"team": "payments"}
    server.put_object(gw)
    for api_version, kind in OWNED:
        await eventually(
            labelled(server, api_version, kind),
            what=f"{kind} label",
        )


async def test_autoscaling_and_pdb_off_delete_the_objects(server, managers) -> None:
    server.put_object(configmap("params"))
    await managers.start()
    put_gateway(
        server,
        infrastructure={"parametersRef": {"group": "", "kind": "ConfigMap", "name": "params"}},
    )
    await eventually(lambda: get(server, "autoscaling/v2", "HorizontalPodAutoscaler"))
    await eventually(lambda: get(server, "policy/v1", "PodDisruptionBudget"))

    server.put_object(
        configmap("params", autoscaling="false", disruptionBudget="false", minReplicas="3")
    )
    await eventually(
        lambda: get(server, "autoscaling/v2", "HorizontalPodAutoscaler") is None, what="HPA deleted"
    )
    await eventually(
        lambda: get(server, "policy/v1", "PodDisruptionBudget") is None, what="PDB deleted"
    )
    await eventually(lambda: get(server, "apps/v1", "Deployment")["spec"].get("replicas") == 3)

    server.put_object(configmap("params"))  # back on: the HPA returns
    await eventually(
        lambda: get(server, "autoscaling/v2", "HorizontalPodAutoscaler"), what="HPA back"
    )


async def test_delete_gateway_removes_everything(server, managers) -> None:
    await managers.start()
    put_gateway(server)
    for api_version, kind in OWNED:
        await eventually(exists(server, api_version, kind), what=kind)
    server.delete_object("gateway.networking.k8s.io/v1", "Gateway", "waypoint", "shop")
    for api_version, kind in OWNED:
        await eventually(gone(server, api_version, kind), what=f"{kind} deleted")


async def test_foreign_object_with_same_name_is_left_alone_and_reported(server, managers) -> None:
    foreign = server.put_object(
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "waypoint", "namespace": "shop", "labels": {"owner": "someone"}},
        }
    )
    manager = await managers.start()
    put_gateway(server)
    programmed = await eventually(
        lambda: gw_cond(server, "Programmed"), what="Programmed condition"
    )
    assert programmed["status"] == "False"
    assert programmed["reason"] == "Invalid"
    assert "ServiceAccount shop/waypoint" in programmed["message"]
    report = manager.reports[("shop", "waypoint")]
    assert any("ServiceAccount shop/waypoint" in f for f in report.foreign)
    sa = get(server, "v1", "ServiceAccount")
    assert sa["metadata"]["labels"] == {"owner": "someone"}
    assert sa["metadata"]["resourceVersion"] == foreign["metadata"]["resourceVersion"]
    assert "ownerReferences" not in sa["metadata"]
    assert get(server, "apps/v1", "Deployment") is not None  # the rest is still managed


@pytest.mark.parametrize(
    ("kwargs", "params", "reason", "needle"),
    [
        (
            {"listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]},
            None,
            "ListenersNotValid",
            "protocol 'HTTP' is not supported",
        ),
        (
            {"listeners": [{"name": "mesh", "port": 15009, "protocol": "HBONE"}]},
            None,
            "ListenersNotValid",
            "port 15009",
        ),
        (
            {
                "infrastructure": {
                    "parametersRef": {"group": "example.com", "kind": "WaypointParams", "name": "p"}
                }
            },
            None,
            "InvalidParameters",
            "unknown infrastructure parameters type",
        ),
        (
            {
                "infrastructure": {
                    "parametersRef": {"group": "", "kind": "ConfigMap", "name": "missing"}
                }
            },
            None,
            "InvalidParameters",
            "ConfigMap shop/missing does not exist",
        ),
        (
            {
                "infrastructure": {
                    "parametersRef": {"group": "", "kind": "ConfigMap", "name": "bad"}
                }
            },
            configmap("bad", maxReplicas="lots"),
            "InvalidParameters",
            'ConfigMap shop/bad key "maxReplicas": must be an integer',
        ),
    ],
    ids=[
        "wrong-protocol",
        "wrong-port",
        "parametersref-kind",
        "parametersref-missing",
        "bad-configmap-value",
    ],
)
async def test_invalid_gateway_gets_a_reason_and_nothing_is_created(
    server, managers, kwargs, params, reason, needle
) -> None:
    if params:
        server.put_object(params)
    manager = await managers.start()
    put_gateway(server, **kwargs)
    accepted = await eventually(lambda: gw_cond(server, "Accepted"), what="Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", reason)
    assert needle in accepted["message"]
    await manager.wait_idle()
    for api_version, kind in OWNED:
        assert get(server, api_version, kind) is None, f"{kind} was created for an invalid Gateway"
    assert gw_cond(server, "Programmed")["status"] == "False"


async def test_listener_condition_names_the_problem(server, managers) -> None:
    await managers.start()
    put_gateway(server, listeners=[{"name": "http", "port": 80, "protocol": "HTTP"}])
    await eventually(lambda: gw_cond(server, "Accepted"))
    (listener,) = get(server, "gateway.networking.k8s.io/v1", "Gateway")["status"]["listeners"]
    accepted = next(c for c in listener["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedProtocol")


class CrashingApi:
    """Delegates to a real client but fails every write after `allowed` applies: a crash mid-reconcile."""

    def __init__(self, inner: AsyncKubeClient, allowed: int) -> None:
        self.inner = inner
        self.allowed = allowed

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def apply(self, rt, obj, **kwargs):
        if kwargs.get("subresource"):
            return await self.inner.apply(rt, obj, **kwargs)
        if self.allowed <= 0:
            raise KubeError(0, "simulated crash")
        self.allowed -= 1
        return await self.inner.apply(rt, obj, **kwargs)


async def test_restart_mid_reconcile_converges_without_duplicates(
    server, managers, kubeconfig
) -> None:
    crash_client = await connect(str(kubeconfig))
    first = await managers.start(api=CrashingApi(crash_client, allowed=3))
    put_gateway(server)
    await eventually(lambda: get(server, "apps/v1", "Deployment"), what="partial apply")
    assert get(server, "v1", "Service") is None  # stopped half way
    await managers.stop(first)
    await crash_client.close()

    await managers.start()
    for api_version, kind in OWNED:
        await eventually(exists(server, api_version, kind), what=kind)
    mark_ready(server)
    await eventually(lambda: (gw_cond(server, "Programmed") or {}).get("status") == "True")
    client = managers.running[0][1]
    for rt in kinds.OWNED_KINDS:
        items, _ = await client.list(
            rt, label_selector="gateway.networking.k8s.io/gateway-name=waypoint"
        )
        assert [o["metadata"]["name"] for o in items] == ["waypoint"], (
            f"duplicate or lost {rt.kind}"
        )


async def test_watch_broken_with_410_gone_relists_and_recovers(server, managers) -> None:
    server.bookmark_interval = 3600.0  # no bookmark may move the watch past the compaction
    manager = await managers.start(watch_timeout=1)
    before = manager.gateways.relists
    server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bump"}})
    server.compact_history()
    # The streams end after 1 s; resuming from a compacted resourceVersion answers 410 Gone.
    await eventually(lambda: manager.gateways.relists > before, timeout=10, what="relist after 410")
    put_gateway(server)
    await eventually(lambda: get(server, "apps/v1", "Deployment"), what="Deployment after recovery")


async def test_waypoint_bound_condition_on_services(server, managers) -> None:
    await managers.start()
    put_gateway(server)
    for name, labels in (
        ("reviews", {"istio.io/use-waypoint": "waypoint"}),
        ("ratings", {"istio.io/use-waypoint": "missing"}),
        ("plain", {}),
    ):
        server.put_object(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "shop", "labels": labels},
                "spec": {"ports": [{"port": 80}], "selector": {"app": name}},
            }
        )
    await eventually(lambda: get(server, "apps/v1", "Deployment"))
    bound = await eventually(
        lambda: condition(get(server, "v1", "Service", "reviews"), "istio.io/WaypointBound")
    )
    assert (bound["status"], bound["reason"]) == ("False", "WaypointIsNotReady")
    mark_ready(server)
    await eventually(
        lambda: (
            (
                condition(get(server, "v1", "Service", "reviews"), "istio.io/WaypointBound") or {}
            ).get("reason")
            == "WaypointAccepted"
        ),
        what="WaypointAccepted",
    )
    missing = condition(get(server, "v1", "Service", "ratings"), "istio.io/WaypointBound")
    assert (missing["status"], missing["reason"]) == ("False", "WaypointIsNotReady")
    assert "does not exist" in missing["message"]
    assert condition(get(server, "v1", "Service", "plain"), "istio.io/WaypointBound") is None
    assert condition(get(server, "v1", "Service", "waypoint"), "istio.io/WaypointBound") is None
    manager = managers.running[0][0]
    assert manager.binding_table.waypoint_for_service("shop", "reviews") == ("shop", "waypoint")

    svc = copy.deepcopy(get(server, "v1", "Service", "reviews"))
    svc["metadata"]["labels"] = {}
    server.put_object(svc)  # unbinding removes our condition
    await eventually(
        lambda: (
            condition(get(server, "v1", "Service", "reviews"), "istio.io/WaypointBound") is None
        ),
        what="condition removed",
    )


async def test_malformed_gateway_is_reported_not_retried(server, managers) -> None:
    manager = await managers.start()
    obj = gateway(listeners=[{"name": "mesh", "port": "15008", "protocol": "HBONE"}])
    obj["metadata"].pop("uid")
    server.put_object(obj)
    accepted = await eventually(lambda: gw_cond(server, "Accepted"), what="Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "InvalidParameters")
    assert "spec.listeners[0].port must be an integer" in accepted["message"]
    await manager.wait_idle()
    assert get(server, "apps/v1", "Deployment") is None


async def test_service_account_form_gateway_is_programmed(server, managers) -> None:
    await managers.start()
    put_gateway(
        server,
        name="reviews-wp",
        class_name="istio-mesh",
        annotations={"istio.io/service-account": "reviews"},
    )
    dep = await eventually(lambda: get(server, "apps/v1", "Deployment", "reviews-wp"))
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["WAYPOINT_FOR_SERVICE_ACCOUNT"] == "reviews"
    mark_ready(server, "reviews-wp")
    await eventually(
        lambda: (gw_cond(server, "Programmed", "reviews-wp") or {}).get("status") == "True"
    )

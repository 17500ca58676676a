"""Root certificate publishing (ConfigMap istio-ca-root-cert in every namespace), pure and live.

Pure: which namespaces, the object, the plan (create, update after rotation, foreign left alone).
Live, the real kubernetes_asyncio client against the fake API server: every namespace gets it, a
deleted one is recreated, a new namespace gets one, a foreign one is left alone, a root rotation
reaches every namespace; and `waypoint manager` in-process publishes its CA's roots and passes
--proxy-xds-address/--proxy-ca-address/--proxy-cluster-id into the waypoint Deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer
from waypoint import cli
from waypoint.controlplane.cli import RunStatus
from waypoint.manager.client import connect
from waypoint.manager.controller import WaypointManager
from waypoint.manager.model import MANAGED_LABEL, MANAGED_VALUE
from waypoint.manager.render import RenderConfig
from waypoint.manager.rootcert import (
    ROOT_CERT_CONFIGMAP,
    ROOT_CERT_KEY,
    plan_root_cert,
    render_root_cert,
    wants_root_cert,
)
from ztunnel.identity.ca import LocalCa

from .helpers import gateway

pytestmark = pytest.mark.timeout(30)

PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
PEM2 = PEM + PEM.replace("AAAA", "BBBB")


def ns(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, **meta}}


def observed(obj: dict[str, Any], rv: str = "5") -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].update(resourceVersion=rv, uid="u1")
    return out


# --- pure -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "wanted"),
    [
        (ns("shop"), True),
        (ns("ambient-system"), True),
        (ns("kube-system"), False),
        (ns("kube-node-lease"), False),
        (ns("gone", deletionTimestamp="2026-01-01T00:00:00Z"), False),
        ({**ns("ending"), "status": {"phase": "Terminating"}}, False),
        (None, False),
    ],
    ids=[
        "plain",
        "system-of-ours",
        "kube-system",
        "kube-node-lease",
        "deleting",
        "terminating",
        "none",
    ],
)
def test_which_namespaces_get_the_root_cert(namespace: Any, wanted: bool) -> None:
    assert wants_root_cert(namespace) is wanted


def test_rendered_configmap() -> None:
    cm = render_root_cert("shop", PEM)
    assert cm["metadata"]["name"] == ROOT_CERT_CONFIGMAP == "istio-ca-root-cert"
    assert cm["metadata"]["labels"] == {MANAGED_LABEL: MANAGED_VALUE, "istio.io/config": "true"}
    assert cm["data"] == {ROOT_CERT_KEY: PEM}
    with pytest.raises(ValueError, match=r"ConfigMap shop/istio-ca-root-cert: .* not PEM"):
        render_root_cert("shop", "garbage")


def test_missing_is_created() -> None:
    p = plan_root_cert(ns("shop"), None, PEM)
    ((apply,),) = (p.applies,)
    assert apply.resource_version is None
    assert apply.obj == render_root_cert("shop", PEM)


def test_ours_unchanged_plans_nothing_and_rotation_updates_pinned() -> None:
    current = observed(render_root_cert("shop", PEM))
    current["metadata"]["managedFields"] = [{"manager": "x"}]  # server additions are ignored
    assert plan_root_cert(ns("shop"), current, PEM).empty
    p = plan_root_cert(ns("shop"), current, PEM2)
    assert [(a.key.name, a.resource_version) for a in p.applies] == [(ROOT_CERT_CONFIGMAP, "5")]
    assert p.applies[0].obj["data"][ROOT_CERT_KEY] == PEM2


def test_foreign_is_left_alone_and_reported() -> None:
    foreign = observed(render_root_cert("shop", PEM))
    del foreign["metadata"]["labels"][MANAGED_LABEL]
    p = plan_root_cert(ns("shop"), foreign, PEM2)
    assert not p.applies
    assert not p.deletes
    assert "ConfigMap shop/istio-ca-root-cert exists without label" in p.foreign[0].reason


def test_skipped_namespace_plans_nothing() -> None:
    assert plan_root_cert(ns("kube-system"), None, PEM) == plan_root_cert(None, None, PEM)
    assert plan_root_cert(ns("kube-system"), None, PEM).empty


# --- live, against the fake API server -------------------------------------------------------


async def eventually(check: Callable[[], Any], what: str, timeout: float = 8.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if result := check():
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(bookmark_interval=0.5)
    await srv.start()
    try:
        for name in ("shop", "other", "ambient-system"):
            srv.put_object(ns(name))
        yield srv
    finally:
        await srv.stop()


def root_cert(server: FakeApiServer, namespace: str) -> dict[str, Any] | None:
    return server.get_object("v1", "ConfigMap", ROOT_CERT_CONFIGMAP, namespace)


def roots_in(server: FakeApiServer, namespace: str) -> str | None:
    cm = root_cert(server, namespace)
    return None if cm is None else cm.get("data", {}).get(ROOT_CERT_KEY)


def holds(server: FakeApiServer, namespace: str, roots: str) -> Callable[[], bool]:
    return lambda: roots_in(server, namespace) == roots


@contextlib.asynccontextmanager
async def manager(
    server: FakeApiServer, tmp_path: Path, roots: Callable[[], bytes | None]
) -> AsyncIterator[WaypointManager]:
    client = await connect(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    m = WaypointManager(
        client, RenderConfig(), watch_timeout=5, roots=roots, roots_poll_interval=0.1
    )
    await m.start()
    try:
        yield m
    finally:
        await m.stop()
        await client.close()


async def test_published_everywhere_recreated_rotated_and_foreign_left_alone(
    server: FakeApiServer, tmp_path: Path
) -> None:
    ca = LocalCa.generate("cluster.local")
    foreign = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": "other"},
        "data": {ROOT_CERT_KEY: "someone else's"},
    }
    server.put_object(foreign)
    async with manager(server, tmp_path, ca.roots_pem) as m:
        first = ca.roots_pem().decode()
        for name in ("default", "shop", "ambient-system"):
            await eventually(holds(server, name, first), f"root cert in {name}")
        assert root_cert(server, "kube-system") is None
        await m.wait_idle()
        assert roots_in(server, "other") == "someone else's"
        assert MANAGED_LABEL not in (root_cert(server, "other") or {})["metadata"].get("labels", {})
        assert "without label" in m.root_cert_foreign["other"]

        # Deleted -> recreated; a new namespace gets one.
        server.delete_object("v1", "ConfigMap", ROOT_CERT_CONFIGMAP, "shop")
        server.put_object(ns("late"))
        await eventually(lambda: roots_in(server, "shop") == first, "recreated root cert")
        await eventually(lambda: roots_in(server, "late") == first, "root cert in a new namespace")

        # Root rotation: every namespace gets both roots (old and new), found by the poll.
        ca.rotate_root()
        both = ca.roots_pem().decode()
        assert both != first
        assert both.count("BEGIN CERTIFICATE") == 2
        for name in ("default", "shop", "late", "ambient-system"):
            await eventually(holds(server, name, both), f"rotated roots in {name}")
        assert roots_in(server, "other") == "someone else's"

        # The foreign one is adopted only once its owner hands it over (labels it as ours).
        adopted = copy.deepcopy(root_cert(server, "other"))
        assert adopted is not None
        adopted["metadata"].setdefault("labels", {})[MANAGED_LABEL] = MANAGED_VALUE
        server.put_object(adopted)
        await eventually(lambda: roots_in(server, "other") == both, "adopted root cert")
        assert "other" not in m.root_cert_foreign


async def test_no_roots_means_no_writes(server: FakeApiServer, tmp_path: Path) -> None:
    async with manager(server, tmp_path, lambda: None) as m:
        await m.wait_idle()
        assert root_cert(server, "shop") is None


async def test_manager_process_publishes_its_ca_and_passes_proxy_flags(
    server: FakeApiServer, tmp_path: Path
) -> None:
    ca = LocalCa.generate("cluster.local")
    ca.save(tmp_path / "ca")
    obj = gateway()
    obj["metadata"].pop("uid")
    server.put_object(obj)
    args = cli.parse_manager_args(
        [
            "manager",
            f"--kubeconfig={server.write_kubeconfig(tmp_path / 'kubeconfig')}",
            "--xds-address=127.0.0.1:0",
            "--monitoring-address=",
            "--no-leader-elect",
            f"--ca-dir={tmp_path / 'ca'}",
            "--proxy-xds-address=https://cp.mesh.svc:15012",
            "--proxy-ca-address=https://ca.mesh.svc:15012",
            "--proxy-cluster-id=east",
        ]
    )
    status = cli.ManagerStatus(control=RunStatus())
    stop = asyncio.Event()
    task = asyncio.create_task(cli.run_manager(args, stop, status))
    try:
        await eventually(
            lambda: roots_in(server, "shop") == ca.roots_pem().decode(), "the CA's roots"
        )
        dep = await eventually(
            lambda: server.get_object("apps/v1", "Deployment", "waypoint", "shop"), "Deployment"
        )
        env = {
            e["name"]: e.get("value")
            for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["XDS_ADDRESS"] == "https://cp.mesh.svc:15012"
        assert env["CA_ADDRESS"] == "https://ca.mesh.svc:15012"
        assert env["CLUSTER_ID"] == "east"
        assert server.get_object("rbac.authorization.k8s.io/v1", "RoleBinding", "waypoint", "shop")
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0


async def test_waypoint_work_goes_before_root_cert_work() -> None:
    """Thousands of namespaces to publish to must not hold up a Gateway's reconcile."""
    m = WaypointManager(object(), RenderConfig())  # type: ignore[arg-type]  # never started
    for key in [("rootcert", "a"), ("rootcert", "b"), ("gateway", "shop", "w"), ("bindings",)]:
        m.enqueue(key)
    order = [m._queue.get_nowait()[2] for _ in range(4)]
    assert order == [("gateway", "shop", "w"), ("bindings",), ("rootcert", "a"), ("rootcert", "b")]

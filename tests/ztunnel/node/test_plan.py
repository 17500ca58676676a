"""The node agent's pure decisions: which pods are enrolled and the start/stop/restart plan."""

from __future__ import annotations

import pytest

from ztunnel.node.plan import Running, enrolled, local_pods, plan
from ztunnel.state.model import TunnelProtocol, Workload


def wl(
    name: str,
    *,
    node: str = "n1",
    netns: str | None = "/run/netns/x",
    sa: str = "default",
    proto: TunnelProtocol = TunnelProtocol.HBONE,
    native: bool = False,
) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/demo/{name}",
        name=name,
        namespace="demo",
        node=node,
        netns=netns if netns is None else f"{netns}-{name}",
        service_account=sa,
        tunnel_protocol=proto,
        native_tunnel=native,
    )


@pytest.mark.parametrize(
    ("workload", "expected"),
    [
        (wl("a"), True),
        (wl("a", node="n2"), False),
        (wl("a", netns=None), False),
        (wl("a", proto=TunnelProtocol.NONE), False),
        (wl("a", native=True), False),
    ],
    ids=["mesh-pod-here", "other-node", "no-netns", "outside-mesh", "waypoint"],
)
def test_enrolled(workload: Workload, expected: bool) -> None:
    assert enrolled(workload, "n1") is expected


def running(w: Workload, *, up: bool = True, nsid: tuple[int, int] | None = (1, 1)) -> Running:
    assert w.netns is not None
    return Running(uid=w.uid, netns=w.netns, netns_id=nsid, identity=w.identity(), up=up)


def test_plan_start_stop_keep() -> None:
    a, b, c = wl("a"), wl("b"), wl("c")
    wanted = local_pods([a, c, wl("x", node="n2")], "n1")
    ids: dict[str, tuple[int, int] | None] = {"/run/netns/x-a": (1, 1), "/run/netns/x-c": (1, 3)}
    p = plan({a.uid: running(a), b.uid: running(b)}, wanted, ids)
    assert p.start == (c,)
    assert p.stop == (b.uid,)
    assert p.keep == (a.uid,)
    assert not p.retry


def test_plan_nothing_to_do_is_empty() -> None:
    a = wl("a")
    assert plan({a.uid: running(a)}, {a.uid: a}, {str(a.netns): (1, 1)}).empty


@pytest.mark.parametrize(
    "change",
    ["netns-recreated", "identity-changed", "netns-path-changed"],
)
def test_plan_restarts_changed_pods(change: str) -> None:
    a = wl("a")
    new = a
    ids: dict[str, tuple[int, int] | None] = {str(a.netns): (1, 1)}
    if change == "netns-recreated":
        ids = {str(a.netns): (1, 99)}
    elif change == "identity-changed":
        new = wl("a", sa="other")
    else:
        new = wl("a", netns="/run/netns/y")
        ids = {str(new.netns): (1, 1)}
    p = plan({a.uid: running(a)}, {a.uid: new}, ids)
    assert p.stop == (a.uid,)
    assert p.start == (new,)


def test_plan_retries_pending_pods() -> None:
    a = wl("a")
    p = plan({a.uid: running(a, up=False)}, {a.uid: a}, {str(a.netns): (1, 1)})
    assert p.retry == (a,)
    assert not p.start
    assert not p.stop

"""Membership table, the cluster view's change detection and the local workload (pure)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from ztunnel.kube.pods import (
    ClusterView,
    local_pod,
    local_workload,
    membership,
    pod_ips,
    workload_uid,
)
from ztunnel.state.model import TunnelProtocol, Workload

NODE = "node-a"
AMBIENT_NS = {"istio.io/dataplane-mode": "ambient"}


def pod(
    name: str = "web",
    ns: str = "app",
    *,
    node: str = NODE,
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    ip: str | None = "10.0.0.5",
    host_network: bool = False,
    terminating: bool = False,
    uid: str = "u1",
    sa: str = "web-sa",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid, "labels": labels or {}}
    if terminating:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    spec: dict[str, Any] = {"nodeName": node, "serviceAccountName": sa}
    if host_network:
        spec["hostNetwork"] = True
    return {"metadata": meta, "spec": spec, "status": status}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}}


CASES = [
    ("ns-ambient", pod(), AMBIENT_NS, True, "namespace"),
    ("ns-unlabelled", pod(), {}, False, "not ambient"),
    ("ns-other-mode", pod(), {"istio.io/dataplane-mode": "sidecar"}, False, "not ambient"),
    ("ns-unknown", pod(), None, False, "not known"),
    (
        "pod-none-wins",
        pod(labels={"istio.io/dataplane-mode": "none"}),
        AMBIENT_NS,
        False,
        "pod label",
    ),
    (
        "pod-ambient-enrols",
        pod(labels={"istio.io/dataplane-mode": "ambient"}),
        {},
        True,
        "pod label",
    ),
    ("host-network", pod(host_network=True), AMBIENT_NS, False, "host network"),
    ("terminating", pod(terminating=True), AMBIENT_NS, False, "terminating"),
    ("succeeded", pod(phase="Succeeded"), AMBIENT_NS, False, "phase Succeeded"),
    ("failed", pod(phase="Failed"), AMBIENT_NS, False, "phase Failed"),
    ("pending-with-ip", pod(phase="Pending"), AMBIENT_NS, True, "namespace"),
    ("pending-no-ip", pod(phase="Pending", ip=None), AMBIENT_NS, False, "no pod IP"),
    ("other-node", pod(node="node-b"), AMBIENT_NS, False, "scheduled on node-b"),
    (
        "waypoint",
        pod(labels={"gateway.istio.io/managed": "istio.io-mesh-controller"}),
        AMBIENT_NS,
        False,
        "waypoint",
    ),
    (
        "gateway-name",
        pod(labels={"gateway.networking.k8s.io/gateway-name": "wp"}),
        AMBIENT_NS,
        False,
        "waypoint",
    ),
]


@pytest.mark.parametrize(
    ("obj", "ns_labels", "enrolled", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_membership(
    obj: dict[str, Any], ns_labels: dict[str, str] | None, enrolled: bool, reason: str
) -> None:
    decision = membership(obj, ns_labels, NODE)
    assert decision.enrolled is enrolled
    assert reason in decision.reason


def test_pod_ips_dual_stack_and_garbage() -> None:
    obj = pod()
    obj["status"]["podIPs"] = [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}, {"ip": "nope"}]
    assert pod_ips(obj) == (ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("fd00::5"))


def test_view_members_follow_namespace_label() -> None:
    view = ClusterView(NODE)
    view.replace_namespaces([namespace("app")])
    view.replace_pods([pod("a", uid="1", ip="10.0.0.1"), pod("b", uid="2", ip="10.0.0.2")])
    assert view.members() == {}
    assert view.apply_namespace("MODIFIED", namespace("app", AMBIENT_NS)) is True
    assert sorted(view.members()) == ["app/a", "app/b"]
    # A namespace without pods here changes nothing for this node.
    assert view.apply_namespace("ADDED", namespace("elsewhere", AMBIENT_NS)) is False
    assert view.apply_namespace("MODIFIED", namespace("app")) is True
    assert view.members() == {}


def test_view_ignores_status_churn_but_sees_label_and_delete() -> None:
    view = ClusterView(NODE)
    view.replace_namespaces([namespace("app", AMBIENT_NS)])
    obj = pod()
    assert view.apply_pod("ADDED", obj) is True
    churn = pod()
    churn["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    churn["metadata"]["resourceVersion"] = "99"
    assert view.apply_pod("MODIFIED", churn) is False
    opted_out = pod(labels={"istio.io/dataplane-mode": "none"})
    assert view.apply_pod("MODIFIED", opted_out) is True
    assert view.members() == {}
    assert view.apply_pod("DELETED", opted_out) is True
    assert view.apply_pod("DELETED", opted_out) is False
    assert view.pod_count == 0


def test_local_workload_from_pod_until_xds_arrives() -> None:
    lp = local_pod(pod())
    w = local_workload(lp, netns="/run/netns/x", xds=None, cluster_id="C", trust_domain="td")
    assert w.uid == workload_uid("C", "app", "web") == "C//Pod/app/web"
    assert w.netns == "/run/netns/x"
    assert w.is_hbone
    assert w.node == NODE
    assert str(w.identity()) == "spiffe://td/ns/app/sa/web-sa"
    assert w.addresses == (ipaddress.ip_address("10.0.0.5"),)


def test_local_workload_prefers_xds_and_forces_hbone() -> None:
    lp = local_pod(pod())
    xds = Workload(
        uid="C//Pod/app/web",
        name="web",
        namespace="app",
        addresses=(ipaddress.ip_address("10.0.0.5"),),
        tunnel_protocol=TunnelProtocol.NONE,  # the control plane has not caught up yet
        service_account="web-sa",
        services={"app/web.app.svc.cluster.local": {80: 8080}},
        node=NODE,
    )
    w = local_workload(lp, netns="/run/netns/x", xds=xds)
    assert w.tunnel_protocol is TunnelProtocol.HBONE
    assert w.netns == "/run/netns/x"
    assert dict(w.services) == {"app/web.app.svc.cluster.local": {80: 8080}}

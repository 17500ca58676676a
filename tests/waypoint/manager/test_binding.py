"""Binding precedence and every WaypointBound reason (waypoint.manager.binding)."""

from __future__ import annotations

from typing import Any

import pytest

from waypoint.manager.binding import (
    ACCEPTED,
    ATTACHMENT_DENIED,
    CROSS_NAMESPACE_FORBIDDEN,
    NOT_READY,
    UNSUPPORTED_TRAFFIC,
    NamespaceInfo,
    ServiceInfo,
    WaypointInfo,
    WorkloadInfo,
    resolve_bindings,
    waypoint_bound_condition,
)
from waypoint.manager.model import parse_gateway

from .helpers import gateway

READY = (("IPAddress", "10.96.0.10"), ("Hostname", "waypoint.shop.svc.cluster.local"))


def wp(
    name: str = "waypoint",
    namespace: str = "shop",
    *,
    ready: bool = True,
    class_for: str | None = None,
    **kw: Any,
) -> WaypointInfo:
    return WaypointInfo(
        gateway=parse_gateway(gateway(name, namespace, **kw)),
        addresses=READY if ready else (),
        class_waypoint_for=class_for,
    )


NAMESPACES = {
    "shop": {},
    "shop-ns-bound": {
        "istio.io/use-waypoint": "waypoint",
        "istio.io/use-waypoint-namespace": "shop",
    },
    "other": {"team": "blue"},
}


def svc_binding(
    labels: dict[str, str],
    *,
    namespace: str = "shop",
    waypoints: list[WaypointInfo],
    ns_labels: dict[str, str] | None = None,
):
    namespaces = {**NAMESPACES, **({namespace: ns_labels} if ns_labels is not None else {})}
    table = resolve_bindings(
        namespaces=[NamespaceInfo(name=n, labels=v) for n, v in namespaces.items()],
        services=[ServiceInfo(namespace=namespace, name="svc", labels=labels)],
        workloads=[],
        waypoints=waypoints,
    )
    return table.services[(namespace, "svc")]


CASES = [
    # (id, service labels, namespace, namespace labels, waypoints, expected waypoint, expected reason)
    (
        "service label binds",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp()],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "namespace label binds",
        {},
        "shop",
        {"istio.io/use-waypoint": "waypoint"},
        [wp()],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "service label beats namespace label",
        {"istio.io/use-waypoint": "special"},
        "shop",
        {"istio.io/use-waypoint": "waypoint"},
        [wp(), wp("special")],
        ("shop", "special"),
        ACCEPTED,
    ),
    (
        "service none opts out of namespace waypoint",
        {"istio.io/use-waypoint": "none"},
        "shop",
        {"istio.io/use-waypoint": "waypoint"},
        [wp()],
        None,
        None,
    ),
    (
        "namespace none means no waypoint",
        {},
        "shop",
        {"istio.io/use-waypoint": "none"},
        [wp()],
        None,
        None,
    ),
    ("nothing asked", {}, "shop", {}, [wp()], None, None),
    ("missing waypoint", {"istio.io/use-waypoint": "nope"}, "shop", {}, [wp()], None, NOT_READY),
    (
        "waypoint without address",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp(ready=False)],
        None,
        NOT_READY,
    ),
    (
        "cross namespace denied by allowedRoutes Same",
        {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"},
        "other",
        {"team": "blue"},
        [wp()],
        None,
        ATTACHMENT_DENIED,
    ),
    (
        "cross namespace allowed by All",
        {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"},
        "other",
        {"team": "blue"},
        [wp(allowed_from="All")],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "cross namespace allowed by Selector",
        {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"},
        "other",
        {"team": "blue"},
        [wp(allowed_from="Selector", selector={"matchLabels": {"team": "blue"}})],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "cross namespace rejected by Selector",
        {"istio.io/use-waypoint": "waypoint", "istio.io/use-waypoint-namespace": "shop"},
        "other",
        {"team": "red"},
        [wp(allowed_from="Selector", selector={"matchLabels": {"team": "blue"}})],
        None,
        ATTACHMENT_DENIED,
    ),
    (
        "namespace label with use-waypoint-namespace",
        {},
        "shop-ns-bound",
        NAMESPACES["shop-ns-bound"],
        [wp(allowed_from="All")],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "explicit label on workload-only waypoint",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp(labels={"istio.io/waypoint-for": "workload"})],
        None,
        UNSUPPORTED_TRAFFIC,
    ),
    (
        "inherited wrong traffic type is skipped silently",
        {},
        "shop",
        {"istio.io/use-waypoint": "waypoint"},
        [wp(labels={"istio.io/waypoint-for": "workload"})],
        None,
        None,
    ),
    (
        "waypoint-for all serves services",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp(labels={"istio.io/waypoint-for": "all"})],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "gateway label beats class label",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp(labels={"istio.io/waypoint-for": "service"}, class_for="workload")],
        ("shop", "waypoint"),
        ACCEPTED,
    ),
    (
        "class label applies when gateway has none",
        {"istio.io/use-waypoint": "waypoint"},
        "shop",
        {},
        [wp(class_for="workload")],
        None,
        UNSUPPORTED_TRAFFIC,
    ),
    (
        "per service account waypoint from another namespace",
        {"istio.io/use-waypoint": "reviews-wp", "istio.io/use-waypoint-namespace": "shop"},
        "other",
        {},
        [
            wp(
                "reviews-wp",
                class_name="istio-mesh",
                annotations={"istio.io/service-account": "reviews"},
                allowed_from="All",
            )
        ],
        None,
        CROSS_NAMESPACE_FORBIDDEN,
    ),
]


@pytest.mark.parametrize(
    ("labels", "namespace", "ns_labels", "waypoints", "expected", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_service_binding(labels, namespace, ns_labels, waypoints, expected, reason) -> None:
    b = svc_binding(labels, namespace=namespace, ns_labels=ns_labels, waypoints=waypoints)
    assert (b.waypoint, b.reason) == (expected, reason), b.message


def test_workload_precedence_pod_label_then_service_account_waypoint_then_namespace() -> None:
    waypoints = [
        wp("ns-wp", labels={"istio.io/waypoint-for": "all"}),
        wp("pod-wp", labels={"istio.io/waypoint-for": "workload"}),
        wp(
            "reviews-wp",
            class_name="istio-mesh",
            annotations={"istio.io/service-account": "reviews"},
        ),
    ]
    table = resolve_bindings(
        namespaces=[NamespaceInfo(name="shop", labels={"istio.io/use-waypoint": "ns-wp"})],
        services=[],
        workloads=[
            WorkloadInfo(
                namespace="shop",
                name="labelled",
                service_account="reviews",
                labels={"istio.io/use-waypoint": "pod-wp"},
            ),
            WorkloadInfo(namespace="shop", name="reviews-1", service_account="reviews"),
            WorkloadInfo(namespace="shop", name="ratings-1", service_account="ratings"),
            WorkloadInfo(
                namespace="shop",
                name="opted-out",
                service_account="reviews",
                labels={"istio.io/use-waypoint": "none"},
            ),
        ],
        waypoints=waypoints,
    )
    assert table.waypoint_for_workload("shop", "labelled") == ("shop", "pod-wp")
    assert table.waypoint_for_workload("shop", "reviews-1") == ("shop", "reviews-wp")
    assert table.waypoint_for_workload("shop", "ratings-1") == ("shop", "ns-wp")
    assert table.waypoint_for_workload("shop", "opted-out") is None


def test_service_waypoint_does_not_bind_workloads_through_namespace() -> None:
    table = resolve_bindings(
        namespaces=[NamespaceInfo(name="shop", labels={"istio.io/use-waypoint": "waypoint"})],
        services=[ServiceInfo(namespace="shop", name="svc")],
        workloads=[WorkloadInfo(namespace="shop", name="pod")],
        waypoints=[wp()],
    )
    assert table.waypoint_for_service("shop", "svc") == ("shop", "waypoint")
    assert table.waypoint_for_workload("shop", "pod") is None


def test_waypoint_own_service_and_pods_are_never_bound() -> None:
    managed = {"gateway.istio.io/managed": "istio.io-mesh-controller"}
    table = resolve_bindings(
        namespaces=[NamespaceInfo(name="shop", labels={"istio.io/use-waypoint": "waypoint"})],
        services=[ServiceInfo(namespace="shop", name="waypoint", labels=managed)],
        workloads=[WorkloadInfo(namespace="shop", name="waypoint-abc", labels=managed)],
        waypoints=[wp(labels={"istio.io/waypoint-for": "all"})],
    )
    assert not table.services
    assert not table.workloads


def test_table_as_data_and_condition() -> None:
    table = resolve_bindings(
        namespaces=[NamespaceInfo(name="shop")],
        services=[
            ServiceInfo(namespace="shop", name="svc", labels={"istio.io/use-waypoint": "waypoint"})
        ],
        workloads=[],
        waypoints=[wp()],
    )
    assert table.to_data() == {
        "services": [
            {
                "namespace": "shop",
                "name": "svc",
                "waypoint": {
                    "namespace": "shop",
                    "name": "waypoint",
                    "hostname": "waypoint.shop.svc.cluster.local",
                },
                "reason": "WaypointAccepted",
                "message": "Successfully attached to waypoint shop/waypoint",
            }
        ],
        "workloads": [],
    }
    cond = waypoint_bound_condition(table.services[("shop", "svc")], [], "2026-01-01T00:00:00Z")
    assert cond == {
        "type": "istio.io/WaypointBound",
        "status": "True",
        "reason": "WaypointAccepted",
        "message": "Successfully attached to waypoint shop/waypoint",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    assert waypoint_bound_condition(None, [], "t") is None

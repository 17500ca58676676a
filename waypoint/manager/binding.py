"""Which services and workloads use which waypoint: the binding table and the WaypointBound condition.

Owns `resolve_bindings(...)` -> `BindingTable` (plain data the rest of the system reads; `to_data()`
gives JSON-ready dicts) and `waypoint_bound_condition(...)`. Istio's precedence
(`fetchWaypointForTarget`, reference/waypoint.md §A8):

1. the object's own `istio.io/use-waypoint` (`none` opts out), with `istio.io/use-waypoint-namespace`;
2. for a workload only: a per-service-account waypoint (class istio-mesh, annotation
   `istio.io/service-account`) for its account in its namespace;
3. the namespace's `istio.io/use-waypoint` / `-namespace` labels (`none` opts out).

Then: a missing waypoint, or one without published addresses, gives `WaypointIsNotReady`; a
namespace the HBONE listener's allowedRoutes does not admit gives `AttachmentDenied`; a per-account
waypoint used from another namespace gives `CrossNamespaceWaypointForbidden`; a traffic type the
waypoint does not serve (`istio.io/waypoint-for` on the Gateway, else its GatewayClass, else
`service`) gives `UnsupportedTrafficType` when the object asked explicitly, and is silently skipped
when inherited from the namespace. A waypoint's own Service and pods never get a waypoint.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .model import (
    MANAGED_LABEL,
    SA_WAYPOINT_CLASS,
    USE_WAYPOINT_LABEL,
    USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_BOUND_CONDITION,
    WAYPOINT_FOR_VALUES,
    Gateway,
)
from .status import set_condition

ACCEPTED: Final = "WaypointAccepted"
NOT_READY: Final = "WaypointIsNotReady"
ATTACHMENT_DENIED: Final = "AttachmentDenied"
UNSUPPORTED_TRAFFIC: Final = "UnsupportedTrafficType"
CROSS_NAMESPACE_FORBIDDEN: Final = "CrossNamespaceWaypointForbidden"

TargetKind = Literal["service", "workload"]


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceInfo:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceInfo:
    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadInfo:
    namespace: str
    name: str
    service_account: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointInfo:
    gateway: Gateway
    addresses: tuple[tuple[str, str], ...] = ()
    """status.addresses as (type, value); empty = not ready (no ready replica yet, or invalid)."""
    class_waypoint_for: str | None = None
    """The GatewayClass's istio.io/waypoint-for label."""

    @property
    def traffic_type(self) -> str:
        for value in (self.gateway.waypoint_for_label, self.class_waypoint_for):
            if value in WAYPOINT_FOR_VALUES:
                return value
        # A per-account waypoint serves that account's workloads by construction.
        return "workload" if self.gateway.class_name == SA_WAYPOINT_CLASS else "service"

    @property
    def hostname(self) -> str | None:
        return next((v for t, v in self.addresses if t == "Hostname"), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Binding:
    """The outcome for one service or workload."""

    kind: TargetKind
    namespace: str
    name: str
    waypoint: tuple[str, str] | None
    """(namespace, name) of the waypoint traffic goes through; None = direct."""
    reason: str | None
    """WaypointBound reason; None = nothing asked for a waypoint (no condition)."""
    message: str = ""
    hostname: str | None = None

    @property
    def bound(self) -> bool:
        return self.waypoint is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class BindingTable:
    services: Mapping[tuple[str, str], Binding] = field(default_factory=dict)
    workloads: Mapping[tuple[str, str], Binding] = field(default_factory=dict)

    def waypoint_for_service(self, namespace: str, name: str) -> tuple[str, str] | None:
        b = self.services.get((namespace, name))
        return b.waypoint if b else None

    def waypoint_for_workload(self, namespace: str, name: str) -> tuple[str, str] | None:
        b = self.workloads.get((namespace, name))
        return b.waypoint if b else None

    def to_data(self) -> dict[str, list[dict[str, Any]]]:
        def row(b: Binding) -> dict[str, Any]:
            return {
                "namespace": b.namespace,
                "name": b.name,
                "waypoint": None
                if b.waypoint is None
                else {"namespace": b.waypoint[0], "name": b.waypoint[1], "hostname": b.hostname},
                "reason": b.reason,
                "message": b.message,
            }

        return {
            "services": [row(b) for _, b in sorted(self.services.items())],
            "workloads": [row(b) for _, b in sorted(self.workloads.items())],
        }


def _allowed(wp: WaypointInfo, namespace: str, ns_labels: Mapping[str, str]) -> bool:
    listener = wp.gateway.mesh_listener()
    if listener is None:
        return False
    if listener.allowed_from == "All":
        return True
    if listener.allowed_from == "Selector":
        return listener.allowed_selector is not None and listener.allowed_selector.matches(
            ns_labels
        )
    return namespace == wp.gateway.namespace


def _resolve(
    kind: TargetKind,
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    ns_labels: Mapping[str, str],
    waypoints: Mapping[tuple[str, str], WaypointInfo],
    sa_waypoint: WaypointInfo | None,
) -> Binding:
    def result(
        wp: tuple[str, str] | None, reason: str | None, message: str = "", host: str | None = None
    ) -> Binding:
        return Binding(
            kind=kind,
            namespace=namespace,
            name=name,
            waypoint=wp,
            reason=reason,
            message=message,
            hostname=host,
        )

    own = labels.get(USE_WAYPOINT_LABEL)
    if own == "none":
        return result(None, None, "opted out with istio.io/use-waypoint=none")
    if own:
        ref = (labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, own)
        explicit = True
    elif sa_waypoint is not None:
        ref, explicit = sa_waypoint.gateway.key, True
    else:
        ns_value = ns_labels.get(USE_WAYPOINT_LABEL)
        if not ns_value or ns_value == "none":
            return result(None, None)
        ref = (ns_labels.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, ns_value)
        explicit = False
    where = f"{ref[0]}/{ref[1]}"
    wp = waypoints.get(ref)
    if wp is None:
        return result(None, NOT_READY, f"waypoint {where} does not exist")
    if not wp.addresses:
        return result(None, NOT_READY, f"waypoint {where} is not ready (no address published yet)")
    is_sa = wp.gateway.class_name == SA_WAYPOINT_CLASS
    if is_sa and ref[0] != namespace:
        return result(
            None,
            CROSS_NAMESPACE_FORBIDDEN,
            f"waypoint {where} serves one service account of namespace {ref[0]} and cannot be used from {namespace}",
        )
    if not _allowed(wp, namespace, ns_labels):
        return result(
            None,
            ATTACHMENT_DENIED,
            f"waypoint {where} does not allow namespace {namespace} (missing allowedRoutes?)",
        )
    traffic = wp.traffic_type
    if traffic not in (kind, "all"):
        if not explicit:
            return result(
                None, None, f"waypoint {where} (from the namespace) is for {traffic} traffic"
            )
        return result(
            None, UNSUPPORTED_TRAFFIC, f"waypoint {where} is for {traffic} traffic, not {kind}"
        )
    return result(ref, ACCEPTED, f"Successfully attached to waypoint {where}", wp.hostname)


def resolve_bindings(
    *,
    namespaces: Iterable[NamespaceInfo],
    services: Iterable[ServiceInfo],
    workloads: Iterable[WorkloadInfo],
    waypoints: Sequence[WaypointInfo],
) -> BindingTable:
    ns_labels = {ns.name: ns.labels for ns in namespaces}
    by_key = {wp.gateway.key: wp for wp in waypoints}
    sa_waypoints = {
        (wp.gateway.namespace, wp.gateway.for_service_account): wp
        for wp in sorted(waypoints, key=lambda w: w.gateway.key)
        if wp.gateway.class_name == SA_WAYPOINT_CLASS and wp.gateway.for_service_account
    }
    svc_out: dict[tuple[str, str], Binding] = {}
    for svc in services:
        if MANAGED_LABEL in svc.labels:
            continue  # a waypoint's own Service never goes through a waypoint
        svc_out[(svc.namespace, svc.name)] = _resolve(
            "service",
            svc.namespace,
            svc.name,
            svc.labels,
            ns_labels.get(svc.namespace, {}),
            by_key,
            None,
        )
    wl_out: dict[tuple[str, str], Binding] = {}
    for wl in workloads:
        if MANAGED_LABEL in wl.labels:
            continue
        sa_wp = sa_waypoints.get((wl.namespace, wl.service_account))
        wl_out[(wl.namespace, wl.name)] = _resolve(
            "workload",
            wl.namespace,
            wl.name,
            wl.labels,
            ns_labels.get(wl.namespace, {}),
            by_key,
            sa_wp,
        )
    return BindingTable(services=svc_out, workloads=wl_out)


def waypoint_bound_condition(
    binding: Binding | None, previous: Sequence[Mapping[str, Any]], now: str
) -> dict[str, Any] | None:
    """The istio.io/WaypointBound condition for a Service, or None when it should carry none."""
    if binding is None or binding.reason is None:
        return None
    return set_condition(
        previous,
        type_=WAYPOINT_BOUND_CONDITION,
        status=binding.reason == ACCEPTED,
        reason=binding.reason,
        message=binding.message,
        generation=None,
        now=now,
    )

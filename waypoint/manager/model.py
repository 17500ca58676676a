"""Names, labels and the parsed form of the Gateway API objects the waypoint manager reads.

Owns the constants with Istio's meanings (class and controller names, the managed label, binding labels),
the value types `Gateway`, `Listener`, `GatewayClass`, `ObjectKey`, and the parsers that turn raw API
dicts into them. Parsing is strict about structure (a Gateway without a name is a `ModelError` naming
the field) and lenient about semantics: a listener on the wrong port parses fine and is judged by
`validate_gateway`, which returns `Problem`s the status writer turns into conditions.

Pure: no I/O, no Kubernetes client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ztunnel.config import INBOUND_HBONE_PORT, METRICS_PORT, READINESS_PORT

# --- classes and ownership (Istio-compatible, reference/waypoint.md §A1) ---
WAYPOINT_CLASS: Final = "istio-waypoint"
SA_WAYPOINT_CLASS: Final = "istio-mesh"
"""The per-service-account form of the first ambient release (DESIGN.md §1)."""
CONTROLLER_NAME: Final = "istio.io/mesh-controller"
BUILTIN_CLASSES: Final = frozenset({WAYPOINT_CLASS, SA_WAYPOINT_CLASS})

MANAGED_LABEL: Final = "gateway.istio.io/managed"
MANAGED_VALUE: Final = "istio.io-mesh-controller"
FIELD_MANAGER: Final = "ambient-waypoint-manager"
GATEWAY_NAME_LABEL: Final = "gateway.networking.k8s.io/gateway-name"
GATEWAY_CLASS_LABEL: Final = "gateway.networking.k8s.io/gateway-class-name"
GATEWAY_API_PREFIX: Final = "gateway.networking.k8s.io/"

# --- Gateway annotations ---
SERVICE_ACCOUNT_ANNOTATION: Final = "istio.io/service-account"
"""On an `istio-mesh` Gateway: the only service account whose workloads the waypoint serves."""
LEGACY_SERVICE_ACCOUNT_ANNOTATION: Final = "istio.io/for-service-account"

# --- binding (reference/waypoint.md §A8) ---
USE_WAYPOINT_LABEL: Final = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL: Final = "istio.io/use-waypoint-namespace"
WAYPOINT_FOR_LABEL: Final = "istio.io/waypoint-for"
DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
WAYPOINT_BOUND_CONDITION: Final = "istio.io/WaypointBound"

WaypointFor = Literal["service", "workload", "all", "none"]
WAYPOINT_FOR_VALUES: Final[tuple[WaypointFor, ...]] = ("service", "workload", "all", "none")

# --- the listener contract ---
MESH_LISTENER_PORT: Final = INBOUND_HBONE_PORT
MESH_LISTENER_PROTOCOL: Final = "HBONE"
WAYPOINT_METRICS_PORT: Final = METRICS_PORT
WAYPOINT_READINESS_PORT: Final = READINESS_PORT

GATEWAY_API_VERSION: Final = "gateway.networking.k8s.io/v1"


class ModelError(ValueError):
    """A structurally malformed API object; the message names the object and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectKey:
    """Identity of a namespaced (or, with namespace "", cluster-scoped) object of one kind."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else f"{self.kind} {self.name}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelSelector:
    """A Kubernetes label selector (matchLabels and matchExpressions)."""

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    """(key, operator In|NotIn|Exists|DoesNotExist, values)."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True, slots=True, kw_only=True)
class Listener:
    name: str
    port: int
    protocol: str
    allowed_from: Literal["Same", "All", "Selector"] = "Same"
    """allowedRoutes.namespaces.from: which namespaces may bind to this waypoint."""
    allowed_selector: LabelSelector | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParametersRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Gateway:
    """The fields of a Gateway the manager acts on."""

    namespace: str
    name: str
    uid: str
    generation: int
    class_name: str
    listeners: tuple[Listener, ...]
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    infra_labels: Mapping[str, str] | None = None
    """spec.infrastructure.labels; None when the Gateway has no spec.infrastructure."""
    infra_annotations: Mapping[str, str] | None = None
    parameters_ref: ParametersRef | None = None
    spec_addresses: tuple[tuple[str, str], ...] = ()
    """spec.addresses as (type, value)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def for_service_account(self) -> str | None:
        """The service account a per-account waypoint serves, or None for a namespace waypoint."""
        return self.annotations.get(SERVICE_ACCOUNT_ANNOTATION) or self.annotations.get(
            LEGACY_SERVICE_ACCOUNT_ANNOTATION
        )

    @property
    def waypoint_for_label(self) -> str | None:
        return self.labels.get(WAYPOINT_FOR_LABEL)

    def mesh_listener(self) -> Listener | None:
        """The HBONE listener whose allowedRoutes governs binding (first valid one)."""
        for listener in self.listeners:
            if listener.port == MESH_LISTENER_PORT and listener.protocol == MESH_LISTENER_PROTOCOL:
                return listener
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayClass:
    name: str
    controller_name: str
    generation: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Why a Gateway cannot be programmed; becomes a status condition (nothing is created)."""

    condition: Literal["Accepted", "ResolvedRefs"]
    reason: str
    """A Gateway API reason: ListenersNotValid, InvalidParameters, UnsupportedAddress, ..."""
    message: str
    listener: str | None = None
    """For listener problems: the listener's name; its own Accepted condition gets `listener_reason`."""
    listener_reason: str | None = None


# --- parsing helpers ---


def _where(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    kind = obj.get("kind", "object")
    ns = meta.get("namespace")
    name = meta.get("name", "<unnamed>")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _mapping(value: Any, where: str, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ModelError(f"{where}: {path} must be an object, got {type(value).__name__}")
    return value


def _str_map(value: Any, where: str, path: str) -> dict[str, str]:
    out: dict[str, str] = {}
    raw: Mapping[Any, Any] = _mapping(value, where, path)
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ModelError(f"{where}: {path}.{k} must be a string, got {type(v).__name__}")
        out[k] = v
    return out


def _required_str(value: Any, where: str, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ModelError(f"{where}: {path} is required and must be a non-empty string")
    return value


def parse_label_selector(value: Any, where: str, path: str) -> LabelSelector:
    raw = _mapping(value, where, path)
    exprs: list[tuple[str, str, tuple[str, ...]]] = []
    for i, expr in enumerate(raw.get("matchExpressions") or []):
        e = _mapping(expr, where, f"{path}.matchExpressions[{i}]")
        op = e.get("operator")
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ModelError(f"{where}: {path}.matchExpressions[{i}].operator {op!r} is not valid")
        values = tuple(str(v) for v in (e.get("values") or []))
        exprs.append(
            (_required_str(e.get("key"), where, f"{path}.matchExpressions[{i}].key"), op, values)
        )
    return LabelSelector(
        match_labels=_str_map(raw.get("matchLabels"), where, f"{path}.matchLabels"),
        match_expressions=tuple(exprs),
    )


def _parse_listener(raw: Any, where: str, i: int) -> Listener:
    path = f"spec.listeners[{i}]"
    obj = _mapping(raw, where, path)
    port = obj.get("port")
    if not isinstance(port, int) or isinstance(port, bool):
        raise ModelError(f"{where}: {path}.port must be an integer, got {port!r}")
    protocol = _required_str(obj.get("protocol"), where, f"{path}.protocol")
    namespaces = _mapping(
        _mapping(obj.get("allowedRoutes"), where, f"{path}.allowedRoutes").get("namespaces"),
        where,
        f"{path}.allowedRoutes.namespaces",
    )
    allowed_from = namespaces.get("from", "Same")
    if allowed_from not in ("Same", "All", "Selector"):
        raise ModelError(
            f"{where}: {path}.allowedRoutes.namespaces.from must be Same, All or Selector, "
            f"got {allowed_from!r}"
        )
    selector = None
    if allowed_from == "Selector":
        selector = parse_label_selector(
            namespaces.get("selector"), where, f"{path}.allowedRoutes.namespaces.selector"
        )
    return Listener(
        name=_required_str(obj.get("name"), where, f"{path}.name"),
        port=port,
        protocol=protocol,
        allowed_from=allowed_from,
        allowed_selector=selector,
    )


def parse_gateway(obj: Mapping[str, Any]) -> Gateway:
    """Parse a gateway.networking.k8s.io/v1 Gateway dict; raises ModelError naming the bad field."""
    where = _where(obj)
    meta = _mapping(obj.get("metadata"), where, "metadata")
    spec = _mapping(obj.get("spec"), where, "spec")
    listeners_raw = spec.get("listeners") or []
    if not isinstance(listeners_raw, Sequence) or isinstance(listeners_raw, str):
        raise ModelError(f"{where}: spec.listeners must be a list")
    infra_raw = spec.get("infrastructure")
    infra = _mapping(infra_raw, where, "spec.infrastructure")
    pref = None
    if infra.get("parametersRef") is not None:
        p = _mapping(infra["parametersRef"], where, "spec.infrastructure.parametersRef")
        pref = ParametersRef(
            group=str(p.get("group", "")),
            kind=_required_str(p.get("kind"), where, "spec.infrastructure.parametersRef.kind"),
            name=_required_str(p.get("name"), where, "spec.infrastructure.parametersRef.name"),
        )
    addresses = []
    for i, a in enumerate(spec.get("addresses") or []):
        addr = _mapping(a, where, f"spec.addresses[{i}]")
        addresses.append((str(addr.get("type", "IPAddress")), str(addr.get("value", ""))))
    generation = meta.get("generation", 0)
    return Gateway(
        namespace=_required_str(meta.get("namespace"), where, "metadata.namespace"),
        name=_required_str(meta.get("name"), where, "metadata.name"),
        uid=str(meta.get("uid", "")),
        generation=generation if isinstance(generation, int) else 0,
        class_name=_required_str(spec.get("gatewayClassName"), where, "spec.gatewayClassName"),
        listeners=tuple(_parse_listener(raw, where, i) for i, raw in enumerate(listeners_raw)),
        labels=_str_map(meta.get("labels"), where, "metadata.labels"),
        annotations=_str_map(meta.get("annotations"), where, "metadata.annotations"),
        infra_labels=(
            None
            if infra_raw is None
            else _str_map(infra.get("labels"), where, "spec.infrastructure.labels")
        ),
        infra_annotations=(
            None
            if infra_raw is None
            else _str_map(infra.get("annotations"), where, "spec.infrastructure.annotations")
        ),
        parameters_ref=pref,
        spec_addresses=tuple(addresses),
    )


def parse_gateway_class(obj: Mapping[str, Any]) -> GatewayClass:
    where = _where(obj)
    meta = _mapping(obj.get("metadata"), where, "metadata")
    spec = _mapping(obj.get("spec"), where, "spec")
    generation = meta.get("generation", 0)
    return GatewayClass(
        name=_required_str(meta.get("name"), where, "metadata.name"),
        controller_name=_required_str(spec.get("controllerName"), where, "spec.controllerName"),
        generation=generation if isinstance(generation, int) else 0,
        labels=_str_map(meta.get("labels"), where, "metadata.labels"),
    )


def validate_gateway(gw: Gateway) -> list[Problem]:
    """Semantic checks of a waypoint Gateway; an empty list means it may be programmed.

    The contract (reference/waypoint.md §A4): exactly one listener, port 15008, protocol HBONE; a
    per-service-account Gateway (class istio-mesh) must name its account. Addresses: at most one
    IPAddress (a Hostname or several addresses mean "unmanaged" in Istio; we refuse them clearly).
    """
    problems: list[Problem] = []
    expected = f'expected a single listener on port {MESH_LISTENER_PORT} with protocol "{MESH_LISTENER_PROTOCOL}"'
    if not gw.listeners:
        problems.append(
            Problem(
                condition="Accepted",
                reason="ListenersNotValid",
                message=f"no listeners: {expected}",
            )
        )
    for listener in gw.listeners:
        if listener.protocol != MESH_LISTENER_PROTOCOL:
            problems.append(
                Problem(
                    condition="Accepted",
                    reason="ListenersNotValid",
                    message=f'listener "{listener.name}": protocol {listener.protocol!r} is not supported; {expected}',
                    listener=listener.name,
                    listener_reason="UnsupportedProtocol",
                )
            )
        elif listener.port != MESH_LISTENER_PORT:
            problems.append(
                Problem(
                    condition="Accepted",
                    reason="ListenersNotValid",
                    message=f'listener "{listener.name}": port {listener.port} is not supported; {expected}',
                    listener=listener.name,
                    listener_reason="PortUnavailable",
                )
            )
    if len(gw.listeners) > 1 and not problems:
        problems.append(
            Problem(
                condition="Accepted",
                reason="ListenersNotValid",
                message=f"{len(gw.listeners)} listeners: {expected}",
                listener=gw.listeners[1].name,
                listener_reason="PortUnavailable",
            )
        )
    if gw.class_name == SA_WAYPOINT_CLASS and not gw.for_service_account:
        problems.append(
            Problem(
                condition="Accepted",
                reason="InvalidParameters",
                message=f"class {SA_WAYPOINT_CLASS} needs annotation {SERVICE_ACCOUNT_ANNOTATION}: <service account>",
            )
        )
    wf = gw.waypoint_for_label
    if wf is not None and wf not in WAYPOINT_FOR_VALUES:
        problems.append(
            Problem(
                condition="Accepted",
                reason="InvalidParameters",
                message=f"label {WAYPOINT_FOR_LABEL}={wf!r} must be one of {', '.join(WAYPOINT_FOR_VALUES)}",
            )
        )
    if len(gw.spec_addresses) > 1 or any(t != "IPAddress" for t, _ in gw.spec_addresses):
        problems.append(
            Problem(
                condition="Accepted",
                reason="UnsupportedAddress",
                message="spec.addresses: a waypoint takes at most one IPAddress (its ClusterIP)",
            )
        )
    return problems

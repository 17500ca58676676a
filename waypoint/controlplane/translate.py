"""Kubernetes objects -> the Istio workload API (Workloads, Services, Authorizations), as istiod does.

Owns `translate(state, config) -> Translation`, the control plane's whole decision: which pods are
workloads and how (HBONE or not, native tunnel, health, identity, waypoint, service membership with
per-endpoint ports, the selector policies that apply), which Services ztunnel learns (VIPs, ports,
waypoint), and how AuthorizationPolicy and PeerAuthentication become L4 authorizations
(`convert_authorization_policy`, reference ztunnel.md §6.2; `peerauth`). Semantics:

* a pod is in the mesh when its namespace has `istio.io/dataplane-mode=ambient` and the pod itself does
  not say `istio.io/dataplane-mode=none` (the pod label wins; a pod label `ambient` enrols it too, as
  in Istio); mesh pods are HBONE, others NONE (still
  sent, as istiod does, so ztunnel knows they are outside the mesh); waypoint pods (label
  `gateway.istio.io/managed` or `gateway.networking.k8s.io/gateway-name`) are HBONE + native_tunnel;
* only Running pods with an IP that are not terminating; health from the Ready condition;
* Services: ClusterIP VIPs, ports with numeric target ports (0 = named, resolved per endpoint from
  the pod's containerPorts), waypoint from the binding table; members from EndpointSlices, or from the
  selector when a Service has no slices.

Bad objects never break the whole translation: they are skipped and reported in `warnings`, each
naming the object and field. Pure: plain dicts and `ztunnel.state.model` values, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from waypoint.controlplane import peerauth
from waypoint.manager.binding import BindingTable
from ztunnel.config import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, INBOUND_HBONE_PORT
from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    GatewayAddress,
    HealthStatus,
    IPAddress,
    IpFamilies,
    IPNetwork,
    LbMode,
    LbScope,
    LoadBalancing,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    TunnelProtocol,
    Workload,
    WorkloadType,
)

DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
AMBIENT: Final = "ambient"
MANAGED_GATEWAY_LABEL: Final = "gateway.istio.io/managed"
GATEWAY_NAME_LABEL: Final = "gateway.networking.k8s.io/gateway-name"
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"  # EndpointSlice -> its Service
TRAFFIC_DISTRIBUTION_ANNOTATION: Final = "networking.istio.io/traffic-distribution"
DEFAULT_CLUSTER_ID: Final = "Kubernetes"
DEFAULT_ROOT_NAMESPACE: Final = "istio-system"

# `when` keys ztunnel can enforce; any other key is an HTTP attribute (authorization.go).
L4_WHEN_KEYS: Final = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
_L7_OPERATION_FIELDS: Final = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
_L7_SOURCE_FIELDS: Final = (
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class TranslateConfig:
    cluster_id: str = DEFAULT_CLUSTER_ID
    cluster_domain: str = "cluster.local"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    network: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterState:
    """The watched objects (as the API returns them) and the waypoint binding table."""

    namespaces: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    services: Sequence[Mapping[str, Any]] = ()
    endpoint_slices: Sequence[Mapping[str, Any]] = ()
    authorization_policies: Sequence[Mapping[str, Any]] = ()
    peer_authentications: Sequence[Mapping[str, Any]] = ()
    bindings: BindingTable = field(default_factory=BindingTable)


@dataclass(frozen=True, slots=True, kw_only=True)
class Translation:
    workloads: Mapping[str, Workload]  # by uid
    services: Mapping[str, Service]  # by "ns/hostname"
    authorizations: Mapping[str, Authorization]  # by "ns/name"
    warnings: tuple[str, ...] = ()


# --- small helpers ---------------------------------------------------------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _annotations(obj: Mapping[str, Any]) -> Mapping[str, str]:
    value = _meta(obj).get("annotations")
    return value if isinstance(value, Mapping) else {}


def _ns_name(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = _meta(obj)
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    status = obj.get("status")
    return status if isinstance(status, Mapping) else {}


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    """istiod's pod uid: ``<cluster>//Pod/<ns>/<name>``."""
    return f"{cluster_id}//Pod/{namespace}/{name}"


def service_hostname(name: str, namespace: str, domain: str) -> str:
    return f"{name}.{namespace}.svc.{domain}"


def in_mesh(namespace_labels: Mapping[str, str], pod_labels: Mapping[str, str]) -> bool:
    """Ambient enrolment: the namespace opts in, the pod can opt out (its label wins)."""
    pod_mode = pod_labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == "none":
        return False
    if pod_mode == AMBIENT:
        # Istio also honours a pod label "ambient" without the namespace label.
        return True
    return namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT


def is_waypoint_pod(labels: Mapping[str, str]) -> bool:
    return MANAGED_GATEWAY_LABEL in labels or GATEWAY_NAME_LABEL in labels


# --- AuthorizationPolicy ---------------------------------------------------------------------------


class PolicyError(ValueError):
    """An AuthorizationPolicy that cannot be converted; the message names the object and field."""


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of strings")
    return list(value)


def string_match(value: str) -> StringMatch:
    """Istio's pattern rule: ``*`` presence, ``*x`` suffix, ``x*`` prefix, else exact."""
    if value == "*":
        return StringMatch(kind=StringMatchKind.PRESENCE)
    if value.startswith("*"):
        return StringMatch(kind=StringMatchKind.SUFFIX, value=value[1:])
    if value.endswith("*"):
        return StringMatch(kind=StringMatchKind.PREFIX, value=value[:-1])
    return StringMatch(kind=StringMatchKind.EXACT, value=value)


def _ports(values: list[str], where: str, warnings: list[str]) -> tuple[int, ...]:
    out = []
    for v in values:
        # istiod silently drops what is not a port; we say so.
        if v.isdigit() and int(v) <= 65535:
            out.append(int(v))
        else:
            warnings.append(f"{where}: {v!r} is not a port number; ignored")
    return tuple(out)


def _ips(values: list[str], where: str, warnings: list[str]) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for v in values:
        if not v:
            continue
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            warnings.append(f"{where}: {v!r} is not an IP address or CIDR; ignored")
    return tuple(out)


def _service_accounts(values: list[str], namespace: str) -> tuple[ServiceAccountMatch, ...]:
    out = []
    for v in values:
        ns, sep, sa = v.partition("/")
        out.append(
            ServiceAccountMatch(namespace=ns, service_account=sa)
            if sep
            else ServiceAccountMatch(namespace=namespace, service_account=v)
        )
    return tuple(out)


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where} must be an object")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where} must be a list")
    return value


def _convert_rule(
    rule: Mapping[str, Any], where: str, namespace: str, warnings: list[str]
) -> tuple[list[Clause], list[str]]:
    """One AuthorizationPolicy rule -> clauses (AND-ed) and the HTTP attributes it used."""
    l7: list[str] = []
    to_matches = []
    for i, to in enumerate(_list(rule.get("to"), f"{where}.to")):
        op = _obj(_obj(to, f"{where}.to[{i}]").get("operation"), f"{where}.to[{i}].operation")
        w = f"{where}.to[{i}].operation"
        l7 += [f for f in _L7_OPERATION_FIELDS if _strings(op.get(f), f"{w}.{f}")]
        to_matches.append(
            Match(
                destination_ports=_ports(
                    _strings(op.get("ports"), f"{w}.ports"), f"{w}.ports", warnings
                ),
                not_destination_ports=_ports(
                    _strings(op.get("notPorts"), f"{w}.notPorts"), f"{w}.notPorts", warnings
                ),
            )
        )
    from_matches = []
    for i, src in enumerate(_list(rule.get("from"), f"{where}.from")):
        s = _obj(_obj(src, f"{where}.from[{i}]").get("source"), f"{where}.from[{i}].source")
        w = f"{where}.from[{i}].source"

        def strs(key: str, s: Mapping[str, Any] = s, w: str = w) -> list[str]:
            return _strings(s.get(key), f"{w}.{key}")

        l7 += [f for f in _L7_SOURCE_FIELDS if strs(f)]
        from_matches.append(
            Match(
                source_ips=_ips(strs("ipBlocks"), f"{w}.ipBlocks", warnings),
                not_source_ips=_ips(strs("notIpBlocks"), f"{w}.notIpBlocks", warnings),
                namespaces=tuple(string_match(v) for v in strs("namespaces")),
                not_namespaces=tuple(string_match(v) for v in strs("notNamespaces")),
                service_accounts=_service_accounts(strs("serviceAccounts"), namespace),
                not_service_accounts=_service_accounts(strs("notServiceAccounts"), namespace),
                principals=tuple(string_match(v) for v in strs("principals")),
                not_principals=tuple(string_match(v) for v in strs("notPrincipals")),
            )
        )
    clauses = []
    if to_matches:
        clauses.append(Clause(matches=tuple(to_matches)))
    if from_matches:
        clauses.append(Clause(matches=tuple(from_matches)))
    for i, when in enumerate(_list(rule.get("when"), f"{where}.when")):
        w = f"{where}.when[{i}]"
        cond = _obj(when, w)
        key = cond.get("key")
        if not isinstance(key, str) or not key:
            raise PolicyError(f"{w}.key is required")
        values = _strings(cond.get("values"), f"{w}.values")
        not_values = _strings(cond.get("notValues"), f"{w}.notValues")
        if key not in L4_WHEN_KEYS:
            l7.append(key)
        # One clause per condition; an HTTP key leaves an empty match (which never matches).
        m: dict[str, Any] = {}
        if key == "source.namespace":
            m["namespaces"] = tuple(string_match(v) for v in values)
            m["not_namespaces"] = tuple(string_match(v) for v in not_values)
        elif key == "source.principal":
            m["principals"] = tuple(string_match(v) for v in values)
            m["not_principals"] = tuple(string_match(v) for v in not_values)
        elif key == "source.ip":
            m["source_ips"] = _ips(values, f"{w}.values", warnings)
            m["not_source_ips"] = _ips(not_values, f"{w}.notValues", warnings)
        elif key == "destination.ip":
            m["destination_ips"] = _ips(values, f"{w}.values", warnings)
            m["not_destination_ips"] = _ips(not_values, f"{w}.notValues", warnings)
        elif key == "destination.port":
            m["destination_ports"] = _ports(values, f"{w}.values", warnings)
            m["not_destination_ports"] = _ports(not_values, f"{w}.notValues", warnings)
        clauses.append(Clause(matches=(Match(**m),)))
    return clauses, l7


def has_target_refs(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("targetRef")) or bool(spec.get("targetRefs"))


def convert_authorization_policy(
    obj: Mapping[str, Any], root_namespace: str
) -> tuple[Authorization | None, list[str]]:
    """One AuthorizationPolicy -> (the ztunnel policy or None, warnings), exactly as istiod.

    None for targetRef(s) policies (they are for waypoints) and for CUSTOM/AUDIT (unsupported).
    ALLOW rules using HTTP attributes are dropped (an ALLOW left without rules never matches but
    still counts as an ALLOW); DENY rules keep their L4 parts (broader than asked). Raises
    PolicyError for objects whose shape is wrong.
    """
    namespace, name = _ns_name(obj)
    where = f"AuthorizationPolicy {namespace}/{name}"
    spec = _obj(obj.get("spec"), f"{where}: spec")
    if has_target_refs(spec):
        return None, []
    action_name = spec.get("action") or "ALLOW"
    if action_name == "ALLOW":
        action = Action.ALLOW
    elif action_name == "DENY":
        action = Action.DENY
    elif action_name in ("CUSTOM", "AUDIT"):
        return None, [f"{where}: ztunnel does not support the {action_name} action; not sent"]
    else:
        raise PolicyError(
            f"{where}: spec.action {action_name!r} is not ALLOW, DENY, CUSTOM or AUDIT"
        )
    if spec.get("selector") is not None:
        scope = Scope.WORKLOAD_SELECTOR
    elif namespace == root_namespace:
        scope = Scope.GLOBAL
    else:
        scope = Scope.NAMESPACE
    warnings: list[str] = []
    rules: list[Rule] = []
    l7_found: set[str] = set()
    dropped = False
    for i, rule in enumerate(_list(spec.get("rules"), f"{where}: spec.rules")):
        rule_where = f"{where}: spec.rules[{i}]"
        clauses, l7 = _convert_rule(_obj(rule, rule_where), rule_where, namespace, warnings)
        l7_found.update(l7)
        if l7 and action is Action.ALLOW:
            dropped = True  # an ALLOW with HTTP attributes never matches at L4
            continue
        rules.append(Rule(clauses=tuple(clauses)))
    if l7_found:
        consequence = (
            "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be "
            "more restrictive than requested."
            if action is Action.DENY
            else "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be "
            "more restrictive than requested."
        )
        warnings.append(
            f"{where}: ztunnel does not support HTTP attributes (found: "
            f"{', '.join(sorted(l7_found))}). In ambient mode you must use a waypoint proxy to "
            f"enforce HTTP rules. {consequence}"
        )
    return (
        Authorization(
            name=name,
            namespace=namespace,
            scope=scope,
            action=action,
            rules=tuple(rules),
            l7_rules_dropped=dropped,
        ),
        warnings,
    )


# --- Services --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _SvcPort:
    port: int
    target: int  # 0: named, see target_name
    target_name: str = ""
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _SvcInfo:
    namespace: str
    name: str
    service: Service
    ports: tuple[_SvcPort, ...]
    selector: Mapping[str, str]


def _service_ports(spec: Mapping[str, Any], where: str) -> tuple[_SvcPort, ...]:
    out = []
    for i, p in enumerate(spec.get("ports") or []):
        if not isinstance(p, Mapping):
            raise ValueError(f"{where}: spec.ports[{i}] must be an object")
        if str(p.get("protocol") or "TCP") == "UDP":
            continue  # ztunnel carries TCP only
        port = p.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise ValueError(f"{where}: spec.ports[{i}].port {port!r} is not a port (1-65535)")
        target = p.get("targetPort", port)
        name = str(p.get("name") or "")
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, int) and not isinstance(target, bool):
            if not 0 < target < 65536:
                raise ValueError(
                    f"{where}: spec.ports[{i}].targetPort {target} is not a port (1-65535)"
                )
            out.append(_SvcPort(port=port, target=target, name=name))
        elif isinstance(target, str) and target:
            out.append(_SvcPort(port=port, target=0, target_name=target, name=name))
        else:
            raise ValueError(f"{where}: spec.ports[{i}].targetPort {target!r} is not valid")
    return tuple(out)


def _ip_families(spec: Mapping[str, Any]) -> IpFamilies:
    families = set(spec.get("ipFamilies") or [])
    if families == {"IPv4", "IPv6"}:
        return IpFamilies.DUAL
    if families == {"IPv4"}:
        return IpFamilies.IPV4_ONLY
    if families == {"IPv6"}:
        return IpFamilies.IPV6_ONLY
    return IpFamilies.AUTOMATIC


def _waypoint_address(
    ref: tuple[str, str] | None, hostname: str | None, config: TranslateConfig
) -> GatewayAddress | None:
    if ref is None:
        return None
    # istiod prefers the Gateway's Hostname address; it names the waypoint's own Service.
    host = hostname or service_hostname(ref[1], ref[0], config.cluster_domain)
    return GatewayAddress(
        destination=NamespacedHostname(namespace=ref[0], hostname=host),
        hbone_mtls_port=INBOUND_HBONE_PORT,
    )


def _translate_service(
    obj: Mapping[str, Any], config: TranslateConfig, bindings: BindingTable
) -> _SvcInfo | None:
    namespace, name = _ns_name(obj)
    where = f"Service {namespace}/{name}"
    spec = _spec(obj)
    if spec.get("type") == "ExternalName":
        return None
    ports = _service_ports(spec, where)
    vips = []
    for ip in spec.get("clusterIPs") or [spec.get("clusterIP")]:
        if not ip or ip == "None":
            continue
        try:
            vips.append(NetworkAddress(network=config.network, address=ipaddress.ip_address(ip)))
        except ValueError:
            raise ValueError(f"{where}: spec.clusterIPs entry {ip!r} is not an IP") from None
    binding = bindings.services.get((namespace, name))
    waypoint = _waypoint_address(
        binding.waypoint if binding else None, binding.hostname if binding else None, config
    )
    distribution = _annotations(obj).get(TRAFFIC_DISTRIBUTION_ANNOTATION) or spec.get(
        "trafficDistribution"
    )
    load_balancing = None
    if distribution == "PreferClose":
        # istiod: prefer the closest healthy endpoints, fail over to the rest.
        load_balancing = LoadBalancing(
            routing_preference=(LbScope.NETWORK, LbScope.REGION, LbScope.ZONE, LbScope.SUBZONE),
            mode=LbMode.FAILOVER,
        )
    service = Service(
        name=name,
        namespace=namespace,
        hostname=service_hostname(name, namespace, config.cluster_domain),
        vips=tuple(vips),
        ports={p.port: p.target for p in ports},
        waypoint=waypoint,
        load_balancing=load_balancing,
        ip_families=_ip_families(spec),
    )
    selector = spec.get("selector") or {}
    return _SvcInfo(
        namespace=namespace,
        name=name,
        service=service,
        ports=ports,
        selector={str(k): str(v) for k, v in selector.items()},
    )


def _container_ports(pod: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for container in _spec(pod).get("containers") or []:
        for p in (container or {}).get("ports") or []:
            if isinstance(p, Mapping) and p.get("name") and isinstance(p.get("containerPort"), int):
                out.setdefault(str(p["name"]), int(p["containerPort"]))
    return out


def _port_map(
    svc: _SvcInfo, named: Mapping[str, int], slice_ports: Mapping[str, int]
) -> dict[int, int]:
    """Per-endpoint service port -> target port; a named port the pod lacks is left out (istiod)."""
    out = {}
    for p in svc.ports:
        if p.target:
            out[p.port] = p.target
        elif p.target_name in named:
            out[p.port] = named[p.target_name]
        elif p.name in slice_ports:
            # The EndpointSlice already resolved the name for this endpoint.
            out[p.port] = slice_ports[p.name]
    return out


# --- Pods ------------------------------------------------------------------------------------------


def _running(pod: Mapping[str, Any]) -> bool:
    return _status(pod).get("phase") == "Running" and not _meta(pod).get("deletionTimestamp")


def _ready(pod: Mapping[str, Any]) -> bool:
    return any(
        isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in _status(pod).get("conditions") or []
    )


def _pod_ips(pod: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    status = _status(pod)
    raw = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, Mapping)]
    if not raw and status.get("podIP"):
        raw = [status.get("podIP")]
    out = []
    for ip in raw:
        try:
            out.append(ipaddress.ip_address(str(ip)))
        except ValueError:
            continue  # garbage in status: ignore the entry, as istiod does
    return tuple(out)


_RS_HASH = re.compile(r"^(?P<name>.+)-[a-z0-9]+$")


def _workload_name_and_type(pod: Mapping[str, Any]) -> tuple[str, WorkloadType]:
    _, name = _ns_name(pod)
    owner = next(
        (o for o in _meta(pod).get("ownerReferences") or [] if o.get("controller")),
        None,
    )
    if owner is None:
        return name, WorkloadType.POD
    kind, owner_name = owner.get("kind"), str(owner.get("name") or "")
    labels = _labels(pod)
    if kind == "ReplicaSet" and "pod-template-hash" in labels:
        suffix = "-" + labels["pod-template-hash"]
        if owner_name.endswith(suffix):
            return owner_name[: -len(suffix)], WorkloadType.DEPLOYMENT
    if kind == "Job":
        return owner_name, WorkloadType.JOB
    return name, WorkloadType.POD


def _canonical(labels: Mapping[str, str], workload_name: str) -> tuple[str, str]:
    name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload_name
    )
    revision = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return name, revision


# --- the whole translation -------------------------------------------------------------------------


def _policy_selectors(
    objects: Iterable[Mapping[str, Any]],
    converted: Mapping[str, Authorization],
) -> list[tuple[str, str, Mapping[str, str]]]:
    """(namespace, key, matchLabels) of every converted WORKLOAD_SELECTOR policy."""
    out: list[tuple[str, str, Mapping[str, str]]] = []
    for obj in objects:
        ns, name = _ns_name(obj)
        pol = converted.get(f"{ns}/{name}")
        if pol is None or pol.scope is not Scope.WORKLOAD_SELECTOR:
            continue
        selector = _spec(obj).get("selector") or {}
        labels = selector.get("matchLabels") if isinstance(selector, Mapping) else None
        out.append((ns, pol.key, {str(k): str(v) for k, v in (labels or {}).items()}))
    return out


def translate(state: ClusterState, config: TranslateConfig | None = None) -> Translation:
    """The full workload-API view of the cluster."""
    config = config or TranslateConfig()
    warnings: list[str] = []

    # Authorizations.
    authorizations: dict[str, Authorization] = {}
    for obj in state.authorization_policies:
        try:
            pol, pol_warnings = convert_authorization_policy(obj, config.root_namespace)
        except PolicyError as err:
            warnings.append(f"{err}; policy not sent")
            continue
        warnings.extend(pol_warnings)
        if pol is not None:
            authorizations[pol.key] = pol
    selector_policies = _policy_selectors(state.authorization_policies, authorizations)
    peer_auths = []
    for obj in state.peer_authentications:
        try:
            peer_auths.append(peerauth.parse_peer_authentication(obj))
        except peerauth.PeerAuthError as err:
            warnings.append(f"{err}; ignored")
    authorizations.update(peerauth.convert_all(config.root_namespace, peer_auths))

    # Services.
    services: list[_SvcInfo] = []
    for obj in state.services:
        try:
            info = _translate_service(obj, config, state.bindings)
        except ValueError as err:
            warnings.append(f"{err}; service not sent")
            continue
        if info is not None:
            services.append(info)
    by_namespace: dict[str, list[_SvcInfo]] = defaultdict(list)
    for info in services:
        by_namespace[info.namespace].append(info)

    # EndpointSlices: service -> endpoints by pod name and by IP, with the slice's named ports.
    sliced: set[tuple[str, str]] = set()
    slice_by_pod: dict[tuple[str, str, str], dict[str, int]] = {}
    slice_by_ip: dict[tuple[str, str, IPAddress], dict[str, int]] = {}
    for es in state.endpoint_slices:
        ns, es_name = _ns_name(es)
        svc_name = _labels(es).get(SERVICE_NAME_LABEL)
        if not svc_name:
            continue
        sliced.add((ns, svc_name))
        ports = {
            str(p.get("name") or ""): int(p["port"])
            for p in es.get("ports") or []
            if isinstance(p, Mapping) and isinstance(p.get("port"), int)
        }
        for ep in es.get("endpoints") or []:
            if not isinstance(ep, Mapping):
                continue
            ref = ep.get("targetRef") or {}
            if ref.get("kind") == "Pod" and ref.get("name"):
                slice_by_pod[(ns, svc_name, str(ref["name"]))] = ports
            for ip in ep.get("addresses") or []:
                try:
                    slice_by_ip[(ns, svc_name, ipaddress.ip_address(ip))] = ports
                except ValueError:
                    warnings.append(
                        f"EndpointSlice {ns}/{es_name}: endpoint address {ip!r} is not an IP; ignored"
                    )

    # Workloads.
    ns_labels = {_ns_name(o)[1]: _labels(o) for o in state.namespaces}
    workloads: dict[str, Workload] = {}
    for pod in state.pods:
        ns, name = _ns_name(pod)
        if not _running(pod):
            continue
        addresses = _pod_ips(pod)
        if not addresses:
            continue
        labels = _labels(pod)
        spec = _spec(pod)
        waypoint_pod = is_waypoint_pod(labels)
        mesh = in_mesh(ns_labels.get(ns, {}), labels)
        named = _container_ports(pod)
        members: dict[str, dict[int, int]] = {}
        for svc in by_namespace.get(ns, ()):
            key = (svc.namespace, svc.name)
            if key in sliced:
                slice_ports = slice_by_pod.get((ns, svc.name, name))
                if slice_ports is None:
                    slice_ports = next(
                        (
                            p
                            for a in addresses
                            if (p := slice_by_ip.get((ns, svc.name, a))) is not None
                        ),
                        None,
                    )
                if slice_ports is None:
                    continue
            elif svc.selector and _selects(svc.selector, labels):
                slice_ports = {}
            else:
                continue
            members[svc.service.key] = _port_map(svc, named, slice_ports)
        policies = sorted(
            key
            for pol_ns, key, selector in selector_policies
            if pol_ns in (ns, config.root_namespace) and _selects(selector, labels)
        )
        policies += peerauth.workload_policy_keys(
            config.root_namespace,
            peerauth.select_for_workload(peer_auths, config.root_namespace, ns, labels),
        )
        binding = state.bindings.workloads.get((ns, name))
        workload_name, workload_type = _workload_name_and_type(pod)
        canonical_name, canonical_revision = _canonical(labels, workload_name)
        uid = workload_uid(config.cluster_id, ns, name)
        workloads[uid] = Workload(
            uid=uid,
            name=name,
            namespace=ns,
            addresses=addresses,
            network=config.network,
            tunnel_protocol=TunnelProtocol.HBONE if (mesh or waypoint_pod) else TunnelProtocol.NONE,
            native_tunnel=waypoint_pod,
            trust_domain=config.trust_domain,
            service_account=str(spec.get("serviceAccountName") or DEFAULT_SERVICE_ACCOUNT),
            node=str(spec.get("nodeName") or ""),
            waypoint=None
            if waypoint_pod
            else _waypoint_address(
                binding.waypoint if binding else None,
                binding.hostname if binding else None,
                config,
            ),
            canonical_name=canonical_name,
            canonical_revision=canonical_revision,
            workload_type=workload_type,
            workload_name=workload_name,
            services=members,
            authorization_policies=tuple(policies),
            status=HealthStatus.HEALTHY if _ready(pod) else HealthStatus.UNHEALTHY,
            cluster_id=config.cluster_id,
        )
    return Translation(
        workloads=workloads,
        services={s.service.key: s.service for s in services},
        authorizations=authorizations,
        warnings=tuple(warnings),
    )

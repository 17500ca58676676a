"""Conversion between Istio's workload API protobufs and ztunnel's state model, both directions.

``*_from_proto`` turn an ``istio.workload.Address`` (Workload or Service) or an
``istio.security.Authorization`` into the frozen values of ``ztunnel.state.model`` with the semantics
of Istio's ztunnel (``state/workload.rs``, ``state/service.rs``, ``rbac.rs``; ztunnel.md sections 4.2
and 6) and of the local file (``ztunnel.sources.localfile``): empty trust domain means
``cluster.local``, empty service account ``default``, unset capacity 1; ``LEGACY_ISTIO_MTLS`` is
rejected; an unknown enum value is rejected except where ztunnel falls back to a default
(``workload_type`` -> DEPLOYMENT, ``visibility`` -> PUBLIC).

Bad input raises ``ConversionError`` listing every problem, each naming the resource and the field,
e.g. ``workload 'Kubernetes//Pod/ns/name': addresses[1]: 5 bytes is not an IPv4 or IPv6 address``.
Where ztunnel silently drops a bad entry of an authorization match (an unparsable CIDR, a string match
without a kind) this module rejects the policy instead: dropping an entry can turn a DENY into a
no-op, so the control plane gets a NACK and the last good version stays in force.

Fields the model cannot represent are handled explicitly: ``network_mode: HOST_NETWORK`` workloads
keep no addresses (ztunnel never indexes them by IP); CIDR service VIPs are rejected; extensions,
``ingress_use_waypoint``, ``weighted_waypoints`` (``waypoint`` stays the primary) and port
``app_protocol`` are ignored as ztunnel ignores them; ``Workload.netns`` and
``Authorization.l7_rules_dropped`` have no proto field and are not sent.

``*_to_proto`` are the inverse for every model value the proto can carry (round-trip tested), and
``model_to_resources`` renders a whole model as the named resources an xDS server serves.

Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final, TypeVar

from google.protobuf import empty_pb2, wrappers_pb2

from ztunnel.config import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN
from ztunnel.identity.spiffe import SCHEME, SpiffeId, SpiffeIdError
from ztunnel.state.model import (
    Action,
    ApplicationTunnel,
    AppTunnelProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    IpFamilies,
    IPNetwork,
    LbMode,
    LbScope,
    LoadBalancing,
    Locality,
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
    Visibility,
    Workload,
    WorkloadType,
)
from ztunnel.xds import protos  # first: says what to run if the generated code is missing
from ztunnel.xds.gen.workloadapi import workload_pb2 as wpb
from ztunnel.xds.gen.workloadapi.security import authorization_pb2 as apb

_T = TypeVar("_T")
_D = TypeVar("_D")

__all__ = [
    "ConversionError",
    "address_from_proto",
    "address_to_proto",
    "authorization_from_proto",
    "authorization_to_proto",
    "model_to_resources",
    "resource_name",
    "service_from_proto",
    "service_to_proto",
    "workload_from_proto",
    "workload_to_proto",
]


class ConversionError(ValueError):
    """A resource cannot be converted; ``issues`` holds every (field, problem) found."""

    def __init__(self, resource: str, issues: Sequence[tuple[str, str]]) -> None:
        self.resource = resource
        self.issues = tuple(issues)
        parts = [f"{where}: {what}" if where else what for where, what in self.issues]
        super().__init__(f"{resource}: " + "; ".join(parts))


# ----- validation plumbing -------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal: the current field is unusable."""


class _Bad(_Invalid):
    """Internal: record ``message`` at the current field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Recorded(_Invalid):
    """Internal: a nested field already recorded its problem; abandon the enclosing one too."""


class _Check:
    """Collects issues with the dotted path of the field being read."""

    def __init__(self) -> None:
        self.path: list[str] = []
        self.issues: list[tuple[str, str]] = []

    @contextmanager
    def at(self, part: str | int) -> Iterator[None]:
        self.path.append(f"[{part!r}]" if _is_key(part) else str(part))
        try:
            yield
        finally:
            self.path.pop()

    def where(self) -> str:
        out = ""
        for part in self.path:
            out += part if part.startswith("[") or not out else "." + part
        return out

    def run(self, part: str | int, parse: Callable[[], _T]) -> _T:
        """Run ``parse`` at ``part``; a problem is recorded and re-raised as ``_Recorded``."""
        with self.at(part):
            try:
                return parse()
            except _Bad as bad:
                self.issues.append((self.where(), bad.message))
                raise _Recorded() from None

    def field(self, part: str | int, parse: Callable[[], _T], default: _D) -> _T | _D:
        """Like ``run`` but returns ``default`` on a problem, so checking continues."""
        try:
            return self.run(part, parse)
        except _Recorded:
            return default

    def each(self, part: str, values: Iterable[Any], parse: Callable[[Any], _T]) -> tuple[_T, ...]:
        """Parse every element (recording each failure at its index); raise if any failed."""
        out: list[_T] = []
        failed = False
        with self.at(part):
            for index, value in enumerate(values):
                try:
                    out.append(self.run(index, functools.partial(parse, value)))
                except _Recorded:
                    failed = True
        if failed:
            raise _Recorded()
        return tuple(out)

    def each_or_empty(
        self, part: str, values: Iterable[Any], parse: Callable[[Any], _T]
    ) -> tuple[_T, ...]:
        try:
            return self.each(part, values, parse)
        except _Recorded:
            return ()


class _Key(str):
    """A map key in a field path (rendered as ``['ns/host']``)."""

    __slots__ = ()


def _is_key(part: str | int) -> bool:
    return isinstance(part, (int, _Key))


def _finish(label: str, check: _Check, build: Callable[[], _T]) -> _T:
    if check.issues:
        raise ConversionError(label, check.issues)
    try:
        return build()
    except ValueError as err:  # a model invariant the checks above did not anticipate
        raise ConversionError(label, [("", str(err))]) from None


# ----- scalar readers ------------------------------------------------------------------------------


def _ip(raw: bytes) -> IPAddress:
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise _Bad(f"{len(raw)} bytes is not an IPv4 or IPv6 address")


def _port(value: int, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise _Bad(f"{value} is not a port number ({low}-65535)")
    return value


def _enum_name(wrapper: Any, value: int) -> str:
    """The proto name of an enum number; unknown numbers (a newer control plane) are errors."""
    try:
        return str(wrapper.Name(value))
    except ValueError:
        raise _Bad(f"unknown {wrapper.DESCRIPTOR.name} value {value}") from None


def _required(text: str) -> str:
    if not text:
        raise _Bad("is empty")
    return text


def _ref(text: str, form: str) -> str:
    first, sep, second = text.partition("/")
    if not sep or not first or not second or (form == "<namespace>/<name>" and "/" in second):
        raise _Bad(f"{text!r} is not of the form {form}")
    return text


# ----- workloads -----------------------------------------------------------------------------------

_TUNNEL: Final = {"NONE": TunnelProtocol.NONE, "HBONE": TunnelProtocol.HBONE}


def _tunnel(value: int) -> TunnelProtocol:
    name = _enum_name(wpb.TunnelProtocol, value)
    if name == "LEGACY_ISTIO_MTLS":
        raise _Bad("LEGACY_ISTIO_MTLS is not supported (only NONE and HBONE)")
    return _TUNNEL[name]


def _workload_type(value: int) -> WorkloadType:
    # ztunnel reads it through prost's getter, which falls back to the default for unknown values.
    try:
        return WorkloadType[wpb.WorkloadType.Name(value)]
    except ValueError:
        return WorkloadType.DEPLOYMENT


def _gateway(check: _Check, msg: wpb.GatewayAddress) -> GatewayAddress:
    kind = msg.WhichOneof("destination")
    destination: NetworkAddress | NamespacedHostname
    if kind is None:
        raise _Bad("has neither a hostname nor an address destination")
    if kind == "hostname":
        host = msg.hostname
        namespace = check.field("hostname.namespace", lambda: _required(host.namespace), "")
        hostname = check.run("hostname.hostname", lambda: _required(host.hostname))
        if not namespace:
            raise _Recorded()
        destination = NamespacedHostname(namespace=namespace, hostname=hostname)
    else:
        address = check.run("address.address", lambda: _ip(msg.address.address))
        destination = NetworkAddress(network=msg.address.network, address=address)
    port = check.run("hbone_mtls_port", lambda: _port(msg.hbone_mtls_port))
    return GatewayAddress(destination=destination, hbone_mtls_port=port)


def _app_tunnel(check: _Check, msg: wpb.ApplicationTunnel) -> ApplicationTunnel:
    protocol = check.field(
        "protocol",
        lambda: AppTunnelProtocol[_enum_name(wpb.ApplicationTunnel.Protocol, msg.protocol)],
        AppTunnelProtocol.NONE,
    )
    port = check.run("port", lambda: _port(msg.port, allow_zero=True))
    return ApplicationTunnel(protocol=protocol, port=port or None)


def _port_list(check: _Check, ports: Iterable[wpb.Port]) -> dict[int, int]:
    """Service port -> target port; target 0 is a named port resolved per endpoint."""
    out: dict[int, int] = {}
    failed = False
    with check.at("ports"):
        for index, port in enumerate(ports):
            with check.at(index):
                service_port = check.field(
                    "service_port", functools.partial(_port, port.service_port), 0
                )
                target = check.field(
                    "target_port", functools.partial(_port, port.target_port, allow_zero=True), -1
                )
            if service_port == 0 or target < 0:
                failed = True
            else:
                out[service_port] = target  # a repeated service port: the last one wins, as ztunnel
    if failed:
        raise _Recorded()
    return out


def _workload_services(check: _Check, services: Mapping[str, wpb.PortList]) -> dict[str, Any]:
    out: dict[str, dict[int, int]] = {}
    failed = False
    with check.at("services"):
        for key in sorted(services):
            try:
                check.run(_Key(key), functools.partial(_ref, key, "<namespace>/<hostname>"))
                with check.at(_Key(key)):
                    out[key] = _port_list(check, services[key].ports)
            except _Recorded:
                failed = True
    if failed:
        raise _Recorded()
    return out


def _identity(check: _Check, trust_domain: str, namespace: str, service_account: str) -> None:
    try:
        SpiffeId(trust_domain, namespace, service_account)
    except SpiffeIdError as err:
        text = str(err)
        part = (
            "namespace"
            if text.startswith("namespace")
            else "service_account"
            if text.startswith("service account")
            else "trust_domain"
        )
        with check.at(part):
            check.issues.append((check.where(), f"cannot form a SPIFFE identity: {text}"))


def _workload_label(msg: wpb.Workload) -> str:
    if msg.uid:
        return f"workload {msg.uid!r}"
    return f"workload without uid ({msg.namespace}/{msg.name})"


def workload_from_proto(msg: wpb.Workload) -> Workload:
    """An ``istio.workload.Workload`` as a model Workload; raises ConversionError."""
    check = _Check()
    check.field("uid", lambda: _required(msg.uid), "")
    network_mode = check.field(
        "network_mode", lambda: _enum_name(wpb.NetworkMode, msg.network_mode), "STANDARD"
    )
    addresses = check.each_or_empty("addresses", msg.addresses, _ip)
    if network_mode == "HOST_NETWORK":
        addresses = ()  # the node's IPs: shared by many workloads, never indexed (as ztunnel)
    trust_domain = msg.trust_domain or DEFAULT_TRUST_DOMAIN
    service_account = msg.service_account or DEFAULT_SERVICE_ACCOUNT
    _identity(check, trust_domain, msg.namespace, service_account)
    kw: dict[str, Any] = {
        "tunnel_protocol": check.field(
            "tunnel_protocol", lambda: _tunnel(msg.tunnel_protocol), TunnelProtocol.NONE
        ),
        "status": check.field(
            "status",
            lambda: HealthStatus[_enum_name(wpb.WorkloadStatus, msg.status)],
            HealthStatus.HEALTHY,
        ),
        "waypoint": None,
        "network_gateway": None,
        "application_tunnel": None,
        "services": {},
        "authorization_policies": check.each_or_empty(
            "authorization_policies",
            msg.authorization_policies,
            lambda ref: _ref(ref, "<namespace>/<name>"),
        ),
    }
    for part in ("waypoint", "network_gateway"):
        if msg.HasField(part):
            kw[part] = check.field(
                part, functools.partial(_gateway, check, getattr(msg, part)), None
            )
    if msg.HasField("application_tunnel"):
        kw["application_tunnel"] = check.field(
            "application_tunnel", lambda: _app_tunnel(check, msg.application_tunnel), None
        )
    try:
        kw["services"] = _workload_services(check, msg.services)
    except _Recorded:
        pass
    locality = msg.locality
    return _finish(
        _workload_label(msg),
        check,
        lambda: Workload(
            uid=msg.uid,
            name=msg.name,
            namespace=msg.namespace,
            addresses=addresses,
            hostname=msg.hostname,
            network=msg.network,
            trust_domain=trust_domain,
            service_account=service_account,
            node=msg.node,
            canonical_name=msg.canonical_name,
            canonical_revision=msg.canonical_revision,
            workload_type=_workload_type(msg.workload_type),
            workload_name=msg.workload_name,
            native_tunnel=msg.native_tunnel,
            cluster_id=msg.cluster_id,
            locality=Locality(region=locality.region, zone=locality.zone, subzone=locality.subzone),
            capacity=msg.capacity.value if msg.HasField("capacity") else 1,
            **kw,
        ),
    )


def _gateway_to_proto(gw: GatewayAddress) -> wpb.GatewayAddress:
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        return wpb.GatewayAddress(
            hostname=wpb.NamespacedHostname(namespace=dest.namespace, hostname=dest.hostname),
            hbone_mtls_port=gw.hbone_mtls_port,
        )
    return wpb.GatewayAddress(
        address=wpb.NetworkAddress(network=dest.network, address=dest.address.packed),
        hbone_mtls_port=gw.hbone_mtls_port,
    )


def _ports_to_proto(ports: Mapping[int, int]) -> list[wpb.Port]:
    return [wpb.Port(service_port=p, target_port=t) for p, t in sorted(ports.items())]


def workload_to_proto(w: Workload) -> wpb.Workload:
    """A model Workload as ``istio.workload.Workload`` (``netns`` has no proto field)."""
    msg = wpb.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[a.packed for a in w.addresses],
        hostname=w.hostname,
        network=w.network,
        tunnel_protocol=w.tunnel_protocol.value,
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=w.workload_type.value,
        workload_name=w.workload_name,
        native_tunnel=w.native_tunnel,
        services={k: wpb.PortList(ports=_ports_to_proto(v)) for k, v in w.services.items()},
        authorization_policies=list(w.authorization_policies),
        status=w.status.value,
        cluster_id=w.cluster_id,
    )
    if w.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway_to_proto(w.waypoint))
    if w.network_gateway is not None:
        msg.network_gateway.CopyFrom(_gateway_to_proto(w.network_gateway))
    if w.application_tunnel is not None:
        msg.application_tunnel.CopyFrom(
            wpb.ApplicationTunnel(
                protocol=w.application_tunnel.protocol.value,
                port=w.application_tunnel.port or 0,
            )
        )
    if w.locality != Locality():
        loc = w.locality
        msg.locality.CopyFrom(wpb.Locality(region=loc.region, zone=loc.zone, subzone=loc.subzone))
    if w.capacity != 1:  # unset means 1
        msg.capacity.CopyFrom(wrappers_pb2.UInt32Value(value=w.capacity))
    return msg


# ----- services ------------------------------------------------------------------------------------

_LB_MODE: Final = {
    "UNSPECIFIED_MODE": LbMode.UNSPECIFIED,
    "STRICT": LbMode.STRICT,
    "FAILOVER": LbMode.FAILOVER,
    "PASSTHROUGH": LbMode.PASSTHROUGH,
}
_LB_MODE_NAME: Final = {v: k for k, v in _LB_MODE.items()}


def _vip(msg: wpb.NetworkAddress) -> NetworkAddress:
    ip = _ip(msg.address)
    if msg.HasField("length") and msg.length != ip.max_prefixlen:
        raise _Bad(
            f"CIDR VIP {ip}/{msg.length} is not supported (only single addresses, length "
            f"{ip.max_prefixlen} or unset)"
        )
    return NetworkAddress(network=msg.network, address=ip)


def _lb_scope(value: int) -> LbScope:
    name = _enum_name(wpb.LoadBalancing.Scope, value)
    if name == "UNSPECIFIED_SCOPE":
        raise _Bad("UNSPECIFIED_SCOPE is not a routing preference")
    return LbScope[name]


def _load_balancing(check: _Check, msg: wpb.LoadBalancing) -> LoadBalancing:
    prefs = check.each_or_empty("routing_preference", msg.routing_preference, _lb_scope)
    mode = check.field(
        "mode", lambda: _LB_MODE[_enum_name(wpb.LoadBalancing.Mode, msg.mode)], LbMode.UNSPECIFIED
    )
    health = check.field(
        "health_policy",
        lambda: HealthPolicy[_enum_name(wpb.LoadBalancing.HealthPolicy, msg.health_policy)],
        HealthPolicy.ONLY_HEALTHY,
    )
    return LoadBalancing(routing_preference=prefs, mode=mode, health_policy=health)


def _san(text: str) -> str:
    if text.startswith(SCHEME):
        try:
            SpiffeId.parse(text)
        except SpiffeIdError as err:
            raise _Bad(str(err)) from None
    return text


def _visibility(value: int) -> Visibility:
    # ztunnel: unknown values fall back to PUBLIC (fail open) rather than dropping the service.
    try:
        return Visibility[wpb.Service.Visibility.Name(value)]
    except ValueError:
        return Visibility.PUBLIC


def service_from_proto(msg: wpb.Service) -> Service:
    """An ``istio.workload.Service`` as a model Service; raises ConversionError."""
    check = _Check()
    check.field("namespace", lambda: _required(msg.namespace), "")
    check.field("hostname", lambda: _required(msg.hostname), "")
    vips = check.each_or_empty("addresses", msg.addresses, _vip)
    try:
        ports = _port_list(check, msg.ports)
    except _Recorded:
        ports = {}
    sans = check.each_or_empty("subject_alt_names", msg.subject_alt_names, _san)
    waypoint = None
    if msg.HasField("waypoint"):
        waypoint = check.field("waypoint", lambda: _gateway(check, msg.waypoint), None)
    load_balancing = None
    if msg.HasField("load_balancing"):
        load_balancing = check.field(
            "load_balancing", lambda: _load_balancing(check, msg.load_balancing), None
        )
    ip_families = check.field(
        "ip_families",
        lambda: IpFamilies[_enum_name(wpb.IPFamilies, msg.ip_families)],
        IpFamilies.AUTOMATIC,
    )
    return _finish(
        f"service '{msg.namespace}/{msg.hostname}'",
        check,
        lambda: Service(
            name=msg.name,
            namespace=msg.namespace,
            hostname=msg.hostname,
            vips=vips,
            ports=ports,
            subject_alt_names=sans,
            waypoint=waypoint,
            load_balancing=load_balancing,
            ip_families=ip_families,
            visibility=_visibility(msg.visibility),
            canonical=msg.canonical,
        ),
    )


def service_to_proto(s: Service) -> wpb.Service:
    """A model Service as ``istio.workload.Service``."""
    msg = wpb.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=[wpb.NetworkAddress(network=v.network, address=v.address.packed) for v in s.vips],
        ports=_ports_to_proto(s.ports),
        subject_alt_names=list(s.subject_alt_names),
        ip_families=s.ip_families.value,
        visibility=s.visibility.value,
        canonical=s.canonical,
    )
    if s.waypoint is not None:
        msg.waypoint.CopyFrom(_gateway_to_proto(s.waypoint))
    if s.load_balancing is not None:
        lb = s.load_balancing
        msg.load_balancing.CopyFrom(
            wpb.LoadBalancing(
                routing_preference=[p.value for p in lb.routing_preference],
                mode=_LB_MODE_NAME[lb.mode],
                health_policy=lb.health_policy.value,
            )
        )
    return msg


# ----- addresses (the oneof) -----------------------------------------------------------------------


def address_from_proto(msg: wpb.Address) -> Workload | Service:
    """The Workload or Service an ``istio.workload.Address`` carries; raises ConversionError."""
    kind = msg.WhichOneof("type")
    if kind == "workload":
        return workload_from_proto(msg.workload)
    if kind == "service":
        return service_from_proto(msg.service)
    raise ConversionError("address", [("type", "has neither a workload nor a service")])


def address_to_proto(value: Workload | Service) -> wpb.Address:
    if isinstance(value, Workload):
        return wpb.Address(workload=workload_to_proto(value))
    return wpb.Address(service=service_to_proto(value))


def resource_name(value: Workload | Service | Authorization) -> str:
    """The xDS resource name: workload uid, service ``ns/hostname``, policy ``ns/name``."""
    return value.uid if isinstance(value, Workload) else value.key


# ----- authorization -------------------------------------------------------------------------------


def _string_match(msg: apb.StringMatch) -> StringMatch:
    kind = msg.WhichOneof("match_type")
    if kind is None:
        raise _Bad("string match has none of exact, prefix, suffix, presence")
    if kind == "presence":
        return StringMatch(kind=StringMatchKind.PRESENCE)
    return StringMatch(kind=StringMatchKind[kind.upper()], value=getattr(msg, kind))


def _principal(msg: apb.StringMatch) -> StringMatch:
    match = _string_match(msg)
    if match.kind is not StringMatchKind.PRESENCE and match.value.startswith(SCHEME):
        raise _Bad(
            f"{match.value!r}: principals are sent without {SCHEME!r} (td/ns/<ns>/sa/<sa>); "
            "with it the match could never succeed"
        )
    return match


def _account(msg: apb.ServiceAccountMatch) -> ServiceAccountMatch:
    if not msg.namespace or not msg.serviceAccount:
        raise _Bad(
            f"service account match needs namespace and serviceAccount, got "
            f"{msg.namespace!r}/{msg.serviceAccount!r}"
        )
    return ServiceAccountMatch(namespace=msg.namespace, service_account=msg.serviceAccount)


def _cidr(msg: apb.Address) -> IPNetwork:
    ip = _ip(msg.address)
    if msg.length > ip.max_prefixlen:
        raise _Bad(f"prefix length {msg.length} is too long for {ip} (max {ip.max_prefixlen})")
    # Host bits are masked: ztunnel's IpNet containment ignores them too.
    return ipaddress.ip_network((ip, msg.length), strict=False)


_MATCH_STRINGS: Final = ("namespaces", "not_namespaces")
_MATCH_PRINCIPALS: Final = ("principals", "not_principals")
_MATCH_ACCOUNTS: Final = ("service_accounts", "not_service_accounts")
_MATCH_CIDRS: Final = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")
_MATCH_PORTS: Final = ("destination_ports", "not_destination_ports")


def _match(check: _Check, msg: apb.Match) -> Match:
    kw: dict[str, Any] = {}
    failed = False
    fields: list[tuple[tuple[str, ...], Callable[[Any], Any]]] = [
        (_MATCH_STRINGS, _string_match),
        (_MATCH_PRINCIPALS, _principal),
        (_MATCH_ACCOUNTS, _account),
        (_MATCH_CIDRS, _cidr),
        (_MATCH_PORTS, _port),
    ]
    for names, parse in fields:
        for name in names:
            try:
                kw[name] = check.each(name, getattr(msg, name), parse)
            except _Recorded:
                failed = True
    if failed:
        raise _Recorded()
    return Match(**kw)


def _rule(check: _Check, msg: apb.Rule) -> Rule:
    return Rule(
        clauses=check.each(
            "clauses",
            msg.clauses,
            lambda clause: Clause(
                matches=check.each("matches", clause.matches, lambda m: _match(check, m))
            ),
        )
    )


def authorization_from_proto(msg: apb.Authorization) -> Authorization:
    """An ``istio.security.Authorization`` as a model Authorization; raises ConversionError."""
    check = _Check()
    check.field("name", lambda: _required(msg.name), "")
    check.field("namespace", lambda: _required(msg.namespace), "")
    scope = check.field(
        "scope", lambda: Scope[_enum_name(apb.Scope, msg.scope)], Scope.WORKLOAD_SELECTOR
    )
    action = check.field("action", lambda: Action[_enum_name(apb.Action, msg.action)], Action.ALLOW)
    rules = check.each_or_empty("rules", msg.rules, lambda r: _rule(check, r))
    return _finish(
        f"authorization '{msg.namespace}/{msg.name}'",
        check,
        lambda: Authorization(
            name=msg.name,
            namespace=msg.namespace,
            scope=scope,
            action=action,
            dry_run=msg.dry_run,
            rules=rules,
        ),
    )


def _string_match_to_proto(m: StringMatch) -> apb.StringMatch:
    if m.kind is StringMatchKind.PRESENCE:
        return apb.StringMatch(presence=empty_pb2.Empty())
    kw: dict[str, Any] = {m.kind.value.lower(): m.value}
    return apb.StringMatch(**kw)


def _match_to_proto(m: Match) -> apb.Match:
    kw: dict[str, Any] = {}
    for name in (*_MATCH_STRINGS, *_MATCH_PRINCIPALS):
        kw[name] = [_string_match_to_proto(s) for s in getattr(m, name)]
    for name in _MATCH_ACCOUNTS:
        kw[name] = [
            apb.ServiceAccountMatch(namespace=a.namespace, serviceAccount=a.service_account)
            for a in getattr(m, name)
        ]
    for name in _MATCH_CIDRS:
        kw[name] = [
            apb.Address(address=n.network_address.packed, length=n.prefixlen)
            for n in getattr(m, name)
        ]
    for name in _MATCH_PORTS:
        kw[name] = list(getattr(m, name))
    return apb.Match(**kw)


def authorization_to_proto(p: Authorization) -> apb.Authorization:
    """A model Authorization as ``istio.security.Authorization`` (L7 dropping is istiod's job)."""
    return apb.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=p.scope.value,
        action=p.action.value,
        dry_run=p.dry_run,
        rules=[
            apb.Rule(
                clauses=[
                    apb.Clause(matches=[_match_to_proto(m) for m in c.matches]) for c in r.clauses
                ]
            )
            for r in p.rules
        ],
    )


def model_to_resources(
    workloads: Iterable[Workload] = (),
    services: Iterable[Service] = (),
    policies: Iterable[Authorization] = (),
) -> dict[str, dict[str, protos.Message]]:
    """Named resources per type URL, as an xDS server (``XdsServer.set_resources``) serves them."""
    addresses: dict[str, protos.Message] = {}
    for value in (*workloads, *services):
        assert isinstance(value, Workload | Service)  # for mypy: the tuple joins to object
        addresses[resource_name(value)] = address_to_proto(value)
    authz: dict[str, protos.Message] = {p.key: authorization_to_proto(p) for p in policies}
    return {protos.ADDRESS_TYPE_URL: addresses, protos.AUTHORIZATION_TYPE_URL: authz}

"""The workload API data model: Workload, Service and Authorization with Istio's semantics.

Mirrors the messages of Istio's ``workload.proto`` and ``authorization.proto`` (reference:
ztunnel.md sections 4.2 and 6) as frozen values. Defaults are the proto defaults that ztunnel
applies (empty trust domain means ``cluster.local``, empty service account ``default``, capacity 1).
Only this project's ``Workload.netns`` has no Istio counterpart: in local mode it tells the node agent
where the pod's network namespace is.

Pure: no I/O. Validation of user input happens in the sources (``ztunnel.sources.localfile``); the
checks here only guard invariants that the rest of the code relies on.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ztunnel.config import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN, INBOUND_HBONE_PORT
from ztunnel.identity.spiffe import SpiffeId

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TunnelProtocol(enum.Enum):
    """How a workload receives mesh traffic (``workload.proto`` TunnelProtocol)."""

    NONE = "NONE"  # plain TCP: not captured, traffic to it leaves the mesh
    HBONE = "HBONE"


class HealthStatus(enum.Enum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"


class WorkloadType(enum.Enum):
    DEPLOYMENT = "DEPLOYMENT"
    CRONJOB = "CRONJOB"
    POD = "POD"
    JOB = "JOB"


class AppTunnelProtocol(enum.Enum):
    NONE = "NONE"
    PROXY = "PROXY"  # PROXY protocol v2 header before the payload


class LbScope(enum.Enum):
    """Locality scopes a service can prefer, in ``routing_preference`` order."""

    REGION = "REGION"
    ZONE = "ZONE"
    SUBZONE = "SUBZONE"
    NODE = "NODE"
    CLUSTER = "CLUSTER"
    NETWORK = "NETWORK"


class LbMode(enum.Enum):
    UNSPECIFIED = "UNSPECIFIED"  # plain weighted random over all healthy endpoints
    STRICT = "STRICT"  # only endpoints matching every preferred scope
    FAILOVER = "FAILOVER"  # best-ranked endpoints first
    PASSTHROUGH = "PASSTHROUGH"  # send to the original destination address


class HealthPolicy(enum.Enum):
    ONLY_HEALTHY = "ONLY_HEALTHY"
    ALLOW_ALL = "ALLOW_ALL"


class IpFamilies(enum.Enum):
    AUTOMATIC = "AUTOMATIC"
    IPV4_ONLY = "IPV4_ONLY"
    IPV6_ONLY = "IPV6_ONLY"
    DUAL = "DUAL"


class Visibility(enum.Enum):
    PUBLIC = "PUBLIC"
    NAMESPACE = "NAMESPACE"  # resolvable and routable only from the service's own namespace


class Scope(enum.Enum):
    """Which workloads an Authorization applies to."""

    GLOBAL = "GLOBAL"  # every workload (root-namespace policies without a selector)
    NAMESPACE = "NAMESPACE"  # every workload of its namespace
    WORKLOAD_SELECTOR = "WORKLOAD_SELECTOR"  # workloads that list it in authorization_policies


class Action(enum.Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class StringMatchKind(enum.Enum):
    EXACT = "EXACT"
    PREFIX = "PREFIX"
    SUFFIX = "SUFFIX"
    PRESENCE = "PRESENCE"  # any non-empty value


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkAddress:
    """An IP on a network; the empty network is the default one."""

    network: str = ""
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayAddress:
    """Where a waypoint or network gateway is: an address or a service hostname, and its HBONE port."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = INBOUND_HBONE_PORT

    def __post_init__(self) -> None:
        _check_port("hbone_mtls_port", self.hbone_mtls_port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplicationTunnel:
    protocol: AppTunnelProtocol = AppTunnelProtocol.NONE
    port: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One pod (or VM): what ztunnel needs to route to it, authenticate it and authorize for it.

    ``services`` maps ``"ns/hostname"`` of each service the workload backs to its per-endpoint port map
    (service port -> target port); an empty map means "member, use the service's target ports".
    ``authorization_policies`` lists the ``ns/name`` keys of WORKLOAD_SELECTOR policies for it.
    """

    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    node: str = ""
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    workload_name: str = ""
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    cluster_id: str = ""
    locality: Locality = field(default_factory=Locality)
    capacity: int = 1
    netns: str | None = None  # this project only: path of the pod's network namespace

    def __post_init__(self) -> None:
        if not self.uid:
            raise ValueError(f"workload {self.namespace}/{self.name}: uid is empty")
        if self.capacity < 0:
            raise ValueError(f"workload {self.uid}: capacity {self.capacity} is negative")
        # Freeze the nested maps so a stored workload cannot change under the indexes.
        frozen = {k: MappingProxyType(dict(v)) for k, v in self.services.items()}
        object.__setattr__(self, "services", MappingProxyType(frozen))

    def identity(self) -> SpiffeId:
        """The SPIFFE identity this workload's certificate carries."""
        return SpiffeId(
            self.trust_domain or DEFAULT_TRUST_DOMAIN,
            self.namespace,
            self.service_account or DEFAULT_SERVICE_ACCOUNT,
        )

    @property
    def is_hbone(self) -> bool:
        return self.tunnel_protocol is TunnelProtocol.HBONE

    def network_addresses(self) -> tuple[NetworkAddress, ...]:
        return tuple(NetworkAddress(network=self.network, address=a) for a in self.addresses)

    # Identity of a workload is its uid; the nested maps are not hashable.
    def __hash__(self) -> int:
        return hash(("Workload", self.uid))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancing:
    routing_preference: tuple[LbScope, ...] = ()
    mode: LbMode = LbMode.UNSPECIFIED
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True, slots=True, kw_only=True)
class Service:
    """A service: VIPs per network, its ports (service port -> target port, 0 = per endpoint)."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: Mapping[int, int] = field(default_factory=dict)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancing: LoadBalancing | None = None
    ip_families: IpFamilies = IpFamilies.AUTOMATIC
    visibility: Visibility = Visibility.PUBLIC
    canonical: bool = False

    def __post_init__(self) -> None:
        for port, target in self.ports.items():
            _check_port(f"service {self.key} port", port)
            if target != 0:
                _check_port(f"service {self.key} target port of {port}", target)
        object.__setattr__(self, "ports", MappingProxyType(dict(self.ports)))

    @property
    def key(self) -> str:
        """The xDS key ``namespace/hostname``."""
        return f"{self.namespace}/{self.hostname}"

    @property
    def is_passthrough(self) -> bool:
        return self.load_balancing is not None and self.load_balancing.mode is LbMode.PASSTHROUGH

    def __hash__(self) -> int:
        return hash(("Service", self.key))


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    kind: StringMatchKind
    value: str = ""

    def matches(self, candidate: str) -> bool:
        """Plain string comparison; never a regular expression (identities are untrusted input)."""
        if self.kind is StringMatchKind.EXACT:
            return candidate == self.value
        if self.kind is StringMatchKind.PREFIX:
            return candidate.startswith(self.value)
        if self.kind is StringMatchKind.SUFFIX:
            return candidate.endswith(self.value)
        return candidate != ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceAccountMatch:
    """A namespace + service account pair; the trust domain is deliberately ignored (as Istio)."""

    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """One match of a clause: every populated field type must pass; positives OR, ``not_*`` all fail."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not (
            self.namespaces
            or self.not_namespaces
            or self.principals
            or self.not_principals
            or self.service_accounts
            or self.not_service_accounts
            or self.source_ips
            or self.not_source_ips
            or self.destination_ips
            or self.not_destination_ips
            or self.destination_ports
            or self.not_destination_ports
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Clause:
    """Matches OR-ed; a clause without matches matches everything."""

    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """Clauses AND-ed."""

    clauses: tuple[Clause, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Authorization:
    """An L4 authorization policy as istiod sends it to ztunnel.

    ``l7_rules_dropped`` records that the converter removed rules with HTTP-only attributes. For an
    ALLOW that left no rules the policy still counts as "an ALLOW exists" and never matches, so the
    workload is denied at L4 — Istio's behaviour; the flag only lets the verdict explain why.
    """

    name: str
    namespace: str
    scope: Scope = Scope.WORKLOAD_SELECTOR
    action: Action = Action.ALLOW
    dry_run: bool = False
    rules: tuple[Rule, ...] = ()
    l7_rules_dropped: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _check_port(what: str, port: int) -> None:
    if isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{what} {port!r} is not a port number (1-65535)")

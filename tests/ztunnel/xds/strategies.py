"""Hypothesis strategies for the model values that Istio's workload API protobufs can carry.

Excluded on purpose, because the proto has no field for them: ``Workload.netns``,
``Authorization.l7_rules_dropped``; and values the converter normalises (empty trust domain or
service account, IPv6 zone ids, non-canonical CIDRs).
"""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from ztunnel.state.model import (
    Action,
    ApplicationTunnel,
    AppTunnelProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IpFamilies,
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

# Protobuf strings are UTF-8: no lone surrogates.
text = st.text(st.characters(codec="utf-8"), max_size=12)
nonempty = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True)
trust_domain = st.from_regex(r"[a-z0-9._-]{1,16}", fullmatch=True)
hostname = st.builds(lambda a, b: f"{a}.{b}.svc.cluster.local", label, label)
ips = st.ip_addresses()
ports = st.integers(1, 65535)
targets = st.integers(0, 65535)


def network_addresses() -> st.SearchStrategy[NetworkAddress]:
    return st.builds(NetworkAddress, network=text, address=ips)


def gateways() -> st.SearchStrategy[GatewayAddress]:
    destination = st.one_of(
        network_addresses(), st.builds(NamespacedHostname, namespace=label, hostname=hostname)
    )
    return st.builds(GatewayAddress, destination=destination, hbone_mtls_port=ports)


def workloads() -> st.SearchStrategy[Workload]:
    service_keys = st.builds(lambda ns, h: f"{ns}/{h}", label, hostname)
    return st.builds(
        Workload,
        uid=nonempty,
        name=text,
        namespace=label,
        addresses=st.lists(ips, max_size=3).map(tuple),
        hostname=text,
        network=text,
        tunnel_protocol=st.sampled_from(TunnelProtocol),
        trust_domain=trust_domain,
        service_account=label,
        node=text,
        waypoint=st.none() | gateways(),
        network_gateway=st.none() | gateways(),
        canonical_name=text,
        canonical_revision=text,
        workload_type=st.sampled_from(WorkloadType),
        workload_name=text,
        native_tunnel=st.booleans(),
        application_tunnel=st.none()
        | st.builds(
            ApplicationTunnel,
            protocol=st.sampled_from(AppTunnelProtocol),
            port=st.none() | ports,
        ),
        services=st.dictionaries(
            service_keys, st.dictionaries(ports, targets, max_size=3), max_size=3
        ),
        authorization_policies=st.lists(
            st.builds(lambda ns, n: f"{ns}/{n}", label, label), max_size=3
        ).map(tuple),
        status=st.sampled_from(HealthStatus),
        cluster_id=text,
        locality=st.builds(Locality, region=text, zone=text, subzone=text),
        capacity=st.integers(0, 2**32 - 1),
    )


def services() -> st.SearchStrategy[Service]:
    sans = st.one_of(
        text.filter(lambda s: not s.startswith("spiffe://")),
        st.builds(lambda td, ns, sa: f"spiffe://{td}/ns/{ns}/sa/{sa}", trust_domain, label, label),
    )
    return st.builds(
        Service,
        name=text,
        namespace=label,
        hostname=hostname,
        vips=st.lists(network_addresses(), max_size=3).map(tuple),
        ports=st.dictionaries(ports, targets, max_size=4),
        subject_alt_names=st.lists(sans, max_size=2).map(tuple),
        waypoint=st.none() | gateways(),
        load_balancing=st.none()
        | st.builds(
            LoadBalancing,
            routing_preference=st.lists(st.sampled_from(LbScope), max_size=3).map(tuple),
            mode=st.sampled_from(LbMode),
            health_policy=st.sampled_from(HealthPolicy),
        ),
        ip_families=st.sampled_from(IpFamilies),
        visibility=st.sampled_from(Visibility),
        canonical=st.booleans(),
    )


def _string_matches(principal: bool) -> st.SearchStrategy[StringMatch]:
    values = text.filter(lambda s: not s.startswith("spiffe://")) if principal else text
    return st.one_of(
        st.just(StringMatch(kind=StringMatchKind.PRESENCE)),
        st.builds(
            StringMatch,
            kind=st.sampled_from(
                [StringMatchKind.EXACT, StringMatchKind.PREFIX, StringMatchKind.SUFFIX]
            ),
            value=values,
        ),
    )


def _networks() -> st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    def build(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int
    ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network((ip, length % (ip.max_prefixlen + 1)), strict=False)

    return st.builds(build, ips, st.integers(0, 128))


def _tuples(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[tuple[object, ...]]:
    return st.lists(strategy, max_size=2).map(tuple)


def matches() -> st.SearchStrategy[Match]:
    accounts = st.builds(ServiceAccountMatch, namespace=nonempty, service_account=nonempty)
    return st.builds(
        Match,
        namespaces=_tuples(_string_matches(False)),
        not_namespaces=_tuples(_string_matches(False)),
        principals=_tuples(_string_matches(True)),
        not_principals=_tuples(_string_matches(True)),
        service_accounts=_tuples(accounts),
        not_service_accounts=_tuples(accounts),
        source_ips=_tuples(_networks()),
        not_source_ips=_tuples(_networks()),
        destination_ips=_tuples(_networks()),
        not_destination_ips=_tuples(_networks()),
        destination_ports=_tuples(ports),
        not_destination_ports=_tuples(ports),
    )


def authorizations() -> st.SearchStrategy[Authorization]:
    clauses = st.builds(Clause, matches=st.lists(matches(), max_size=2).map(tuple))
    rules = st.builds(Rule, clauses=st.lists(clauses, max_size=2).map(tuple))
    return st.builds(
        Authorization,
        name=nonempty,
        namespace=nonempty,
        scope=st.sampled_from(Scope),
        action=st.sampled_from(Action),
        dry_run=st.booleans(),
        rules=st.lists(rules, max_size=2).map(tuple),
    )

"""Conversion between the workload-API protobufs and the state model: round trips and every error."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given

from tests.ztunnel.xds import strategies
from ztunnel.state.model import (
    Action,
    HealthStatus,
    IpFamilies,
    LbMode,
    Scope,
    TunnelProtocol,
    Visibility,
    WorkloadType,
)
from ztunnel.xds import convert, protos
from ztunnel.xds.gen.workloadapi import workload_pb2 as wpb
from ztunnel.xds.gen.workloadapi.security import authorization_pb2 as apb

UID = "Kubernetes//Pod/ns/name"


def UNKNOWN(number: int) -> Any:
    """An enum number the generated code does not know (what a newer istiod may send)."""
    return number


# ----- round trips -----------------------------------------------------------------------------


def _via_wire(message: Any) -> Any:
    """Serialize and parse again, as the message crosses the network."""
    return type(message).FromString(message.SerializeToString())


@given(strategies.workloads())
def test_workload_round_trip(workload):
    msg = _via_wire(convert.address_to_proto(workload))
    assert convert.address_from_proto(msg) == workload


@given(strategies.services())
def test_service_round_trip(service):
    msg = _via_wire(convert.address_to_proto(service))
    assert convert.address_from_proto(msg) == service


@given(strategies.authorizations())
def test_authorization_round_trip(policy):
    msg = _via_wire(convert.authorization_to_proto(policy))
    assert convert.authorization_from_proto(msg) == policy


@given(strategies.workloads(), strategies.services(), strategies.authorizations())
def test_model_to_resources_names_every_resource_by_its_key(workload, service, policy):
    resources = convert.model_to_resources([workload], [service], [policy])
    assert set(resources[protos.ADDRESS_TYPE_URL]) == {workload.uid, service.key}
    assert set(resources[protos.AUTHORIZATION_TYPE_URL]) == {policy.key}


# ----- defaults and Istio's semantics ------------------------------------------------------------


def test_workload_defaults_as_ztunnel():
    w = convert.workload_from_proto(wpb.Workload(uid=UID, name="name", namespace="ns"))
    assert (w.trust_domain, w.service_account, w.capacity) == ("cluster.local", "default", 1)
    assert w.tunnel_protocol is TunnelProtocol.NONE
    assert w.status is HealthStatus.HEALTHY
    assert w.waypoint is None
    assert w.application_tunnel is None


def test_explicit_zero_capacity_is_kept():
    msg = wpb.Workload(uid=UID, namespace="ns", capacity={"value": 0})
    assert convert.workload_from_proto(msg).capacity == 0


def test_host_network_workload_is_not_indexed_by_ip():
    msg = wpb.Workload(
        uid=UID, namespace="ns", addresses=[bytes([10, 0, 0, 1])], network_mode="HOST_NETWORK"
    )
    assert convert.workload_from_proto(msg).addresses == ()


def test_service_vip_with_full_length_is_a_plain_vip():
    msg = wpb.Service(
        namespace="ns",
        hostname="h",
        addresses=[wpb.NetworkAddress(address=bytes([10, 96, 0, 1]), length=32)],
    )
    (vip,) = convert.service_from_proto(msg).vips
    assert vip.address == ipaddress.ip_address("10.96.0.1")


def test_policy_cidr_host_bits_are_masked():
    msg = apb.Authorization(
        name="p",
        namespace="ns",
        rules=[
            apb.Rule(
                clauses=[
                    apb.Clause(
                        matches=[
                            apb.Match(
                                source_ips=[apb.Address(address=bytes([10, 1, 2, 3]), length=8)]
                            )
                        ]
                    )
                ]
            )
        ],
    )
    policy = convert.authorization_from_proto(msg)
    assert policy.rules[0].clauses[0].matches[0].source_ips == (ipaddress.ip_network("10.0.0.0/8"),)
    assert policy.scope is Scope.GLOBAL
    assert policy.action is Action.ALLOW


def test_service_and_policy_without_extras_ignore_them():
    """Fields ztunnel ignores (extensions, ingress_use_waypoint, weighted waypoints) stay ignored."""
    msg = wpb.Service(
        namespace="ns",
        hostname="h",
        ingress_use_waypoint=True,
        weighted_waypoints=[wpb.WeightedWaypoint(weight=3)],
        extensions=[wpb.Extension(name="x")],
    )
    assert convert.service_from_proto(msg).waypoint is None


# Unknown enum values (a newer istiod): ztunnel falls back for workload_type and visibility only.
@pytest.mark.parametrize(
    ("build", "read", "expected"),
    [
        (lambda: wpb.Workload(uid=UID, namespace="ns", workload_type=UNKNOWN(42)),
         lambda w: w.workload_type, WorkloadType.DEPLOYMENT),
        (lambda: wpb.Service(namespace="ns", hostname="h", visibility=UNKNOWN(42)),
         lambda s: s.visibility, Visibility.PUBLIC),
        (lambda: wpb.Service(namespace="ns", hostname="h", ip_families="DUAL"),
         lambda s: s.ip_families, IpFamilies.DUAL),
        (lambda: wpb.Service(namespace="ns", hostname="h", load_balancing={"mode": "PASSTHROUGH"}),
         lambda s: s.load_balancing.mode, LbMode.PASSTHROUGH),
    ],
    ids=["workload-type-unknown-is-deployment", "visibility-unknown-is-public", "ip-families",
         "lb-mode"],
)  # fmt: skip
def test_enum_values(build, read, expected):
    msg = build()
    value = (
        convert.workload_from_proto(msg)
        if isinstance(msg, wpb.Workload)
        else convert.service_from_proto(msg)
    )
    assert read(value) == expected


# ----- errors ------------------------------------------------------------------------------------

V4 = bytes([10, 0, 0, 1])


def _wl(**kw: Any) -> Callable[[], Any]:
    kw.setdefault("addresses", [V4])
    return lambda: wpb.Workload(uid=UID, name="name", namespace="ns", **kw)


def _svc(**kw: Any) -> Callable[[], Any]:
    return lambda: wpb.Service(name="s", namespace="ns", hostname="s.ns.svc", **kw)


def _match(**kw: Any) -> Callable[[], Any]:
    return lambda: apb.Authorization(
        name="p",
        namespace="ns",
        rules=[apb.Rule(clauses=[apb.Clause(matches=[apb.Match(**kw)])])],
    )


M = "authorization 'ns/p': rules[0].clauses[0].matches[0]."
W = f"workload '{UID}': "
S = "service 'ns/s.ns.svc': "

ERRORS: list[tuple[str, Callable[[], Any], str]] = [
    # workloads
    ("wl-no-uid", lambda: wpb.Workload(namespace="ns", name="a"),
     "workload without uid (ns/a): uid: is empty"),
    ("wl-address-5-bytes", _wl(addresses=[V4, b"12345"]),
     f"{W}addresses[1]: 5 bytes is not an IPv4 or IPv6 address"),
    ("wl-address-empty", _wl(addresses=[b""]), f"{W}addresses[0]: 0 bytes is not"),
    ("wl-legacy-mtls", _wl(tunnel_protocol="LEGACY_ISTIO_MTLS"),
     f"{W}tunnel_protocol: LEGACY_ISTIO_MTLS is not supported"),
    ("wl-tunnel-unknown", _wl(tunnel_protocol=7), f"{W}tunnel_protocol: unknown TunnelProtocol value 7"),
    ("wl-status-unknown", _wl(status=5), f"{W}status: unknown WorkloadStatus value 5"),
    ("wl-network-mode-unknown", _wl(network_mode=9), f"{W}network_mode: unknown NetworkMode value 9"),
    ("wl-namespace-empty", lambda: wpb.Workload(uid=UID, addresses=[V4]),
     f"{W}namespace: cannot form a SPIFFE identity"),
    ("wl-service-account-bad", _wl(service_account="Bad_SA"),
     f"{W}service_account: cannot form a SPIFFE identity"),
    ("wl-trust-domain-bad", _wl(trust_domain="Cluster Local"),
     f"{W}trust_domain: cannot form a SPIFFE identity"),
    ("wl-waypoint-empty", _wl(waypoint=wpb.GatewayAddress(hbone_mtls_port=15008)),
     f"{W}waypoint: has neither a hostname nor an address destination"),
    ("wl-waypoint-hostname-empty",
     _wl(waypoint={"hostname": {"namespace": "ns"}, "hbone_mtls_port": 15008}),
     f"{W}waypoint.hostname.hostname: is empty"),
    ("wl-waypoint-namespace-empty",
     _wl(waypoint={"hostname": {"hostname": "wp"}, "hbone_mtls_port": 15008}),
     f"{W}waypoint.hostname.namespace: is empty"),
    ("wl-waypoint-address-bad",
     _wl(waypoint={"address": {"address": b"123"}, "hbone_mtls_port": 15008}),
     f"{W}waypoint.address.address: 3 bytes is not"),
    ("wl-waypoint-port-zero", _wl(waypoint={"address": {"address": V4}}),
     f"{W}waypoint.hbone_mtls_port: 0 is not a port number (1-65535)"),
    ("wl-gateway-port-too-big",
     _wl(network_gateway={"address": {"address": V4}, "hbone_mtls_port": 70000}),
     f"{W}network_gateway.hbone_mtls_port: 70000 is not a port number"),
    ("wl-app-tunnel-protocol", _wl(application_tunnel={"protocol": 4}),
     f"{W}application_tunnel.protocol: unknown Protocol value 4"),
    ("wl-app-tunnel-port", _wl(application_tunnel={"port": 65536}),
     f"{W}application_tunnel.port: 65536 is not a port number (0-65535)"),
    ("wl-services-key", _wl(services={"no-slash": wpb.PortList()}),
     f"{W}services['no-slash']: 'no-slash' is not of the form <namespace>/<hostname>"),
    ("wl-services-service-port-zero",
     _wl(services={"ns/h": wpb.PortList(ports=[wpb.Port(service_port=0, target_port=80)])}),
     f"{W}services['ns/h'].ports[0].service_port: 0 is not a port number (1-65535)"),
    ("wl-services-target-port-too-big",
     _wl(services={"ns/h": wpb.PortList(ports=[wpb.Port(service_port=80, target_port=99999)])}),
     f"{W}services['ns/h'].ports[0].target_port: 99999 is not a port number (0-65535)"),
    ("wl-policy-ref", _wl(authorization_policies=["ns/p", "just-a-name"]),
     f"{W}authorization_policies[1]: 'just-a-name' is not of the form <namespace>/<name>"),
    # services
    ("svc-namespace-empty", lambda: wpb.Service(hostname="h"), "service '/h': namespace: is empty"),
    ("svc-hostname-empty", lambda: wpb.Service(namespace="ns"), "service 'ns/': hostname: is empty"),
    ("svc-vip-bad", _svc(addresses=[{"address": b"\x01"}]),
     f"{S}addresses[0]: 1 bytes is not an IPv4 or IPv6 address"),
    ("svc-vip-cidr", _svc(addresses=[{"address": V4, "length": 24}]),
     f"{S}addresses[0]: CIDR VIP 10.0.0.1/24 is not supported"),
    ("svc-port-zero", _svc(ports=[{"service_port": 0, "target_port": 8080}]),
     f"{S}ports[0].service_port: 0 is not a port number (1-65535)"),
    ("svc-target-too-big", _svc(ports=[{"service_port": 80, "target_port": 65536}]),
     f"{S}ports[0].target_port: 65536 is not a port number (0-65535)"),
    ("svc-san-bad-spiffe", _svc(subject_alt_names=["spiffe://td/ns/a"]),
     f"{S}subject_alt_names[0]: SPIFFE ID 'spiffe://td/ns/a' must have the form"),
    ("svc-waypoint-empty", _svc(waypoint={"hbone_mtls_port": 15008}),
     f"{S}waypoint: has neither a hostname nor an address destination"),
    ("svc-lb-scope-unspecified", _svc(load_balancing={"routing_preference": ["ZONE", 0]}),
     f"{S}load_balancing.routing_preference[1]: UNSPECIFIED_SCOPE is not a routing preference"),
    ("svc-lb-scope-unknown", _svc(load_balancing={"routing_preference": [17]}),
     f"{S}load_balancing.routing_preference[0]: unknown Scope value 17"),
    ("svc-lb-mode-unknown", _svc(load_balancing={"mode": 9}),
     f"{S}load_balancing.mode: unknown Mode value 9"),
    ("svc-lb-health-unknown", _svc(load_balancing={"health_policy": 9}),
     f"{S}load_balancing.health_policy: unknown HealthPolicy value 9"),
    ("svc-ip-families-unknown", _svc(ip_families=8),
     f"{S}ip_families: unknown IPFamilies value 8"),
    # addresses
    ("address-empty", lambda: wpb.Address(), "address: type: has neither a workload nor a service"),
    # authorizations
    ("authz-name-empty", lambda: apb.Authorization(namespace="ns"),
     "authorization 'ns/': name: is empty"),
    ("authz-namespace-empty", lambda: apb.Authorization(name="p"),
     "authorization '/p': namespace: is empty"),
    ("authz-scope-unknown", lambda: apb.Authorization(name="p", namespace="ns", scope=UNKNOWN(3)),
     "authorization 'ns/p': scope: unknown Scope value 3"),
    ("authz-action-unknown", lambda: apb.Authorization(name="p", namespace="ns", action=UNKNOWN(2)),
     "authorization 'ns/p': action: unknown Action value 2"),
    ("authz-string-match-empty", _match(namespaces=[{"exact": "a"}, {}]),
     f"{M}namespaces[1]: string match has none of exact, prefix, suffix, presence"),
    ("authz-principal-spiffe", _match(not_principals=[{"prefix": "spiffe://td/"}]),
     f"{M}not_principals[0]: 'spiffe://td/': principals are sent without 'spiffe://'"),
    ("authz-account-incomplete", _match(service_accounts=[{"namespace": "ns"}]),
     f"{M}service_accounts[0]: service account match needs namespace and serviceAccount"),
    ("authz-cidr-bytes", _match(not_source_ips=[{"address": b"\x0a\x00", "length": 8}]),
     f"{M}not_source_ips[0]: 2 bytes is not an IPv4 or IPv6 address"),
    ("authz-cidr-length", _match(destination_ips=[{"address": V4, "length": 33}]),
     f"{M}destination_ips[0]: prefix length 33 is too long for 10.0.0.1 (max 32)"),
    ("authz-port-zero", _match(destination_ports=[0]),
     f"{M}destination_ports[0]: 0 is not a port number (1-65535)"),
    ("authz-port-too-big", _match(not_destination_ports=[80, 65536]),
     f"{M}not_destination_ports[1]: 65536 is not a port number (1-65535)"),
]  # fmt: skip


def _convert(msg: Any) -> Any:
    if isinstance(msg, wpb.Address):
        return convert.address_from_proto(msg)
    if isinstance(msg, wpb.Workload):
        return convert.workload_from_proto(msg)
    if isinstance(msg, wpb.Service):
        return convert.service_from_proto(msg)
    return convert.authorization_from_proto(msg)


@pytest.mark.parametrize(("build", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_conversion_error(build, expected):
    msg = _via_wire(build())
    with pytest.raises(convert.ConversionError) as info:
        _convert(msg)
    assert str(info.value).startswith(expected)


def test_example_error_message_is_exact():
    msg = wpb.Workload(uid=UID, name="name", namespace="ns", addresses=[V4, b"12345"])
    with pytest.raises(convert.ConversionError) as info:
        convert.workload_from_proto(msg)
    assert str(info.value) == (
        "workload 'Kubernetes//Pod/ns/name': addresses[1]: 5 bytes is not an IPv4 or IPv6 address"
    )
    assert info.value.resource == f"workload '{UID}'"
    assert info.value.issues == (("addresses[1]", "5 bytes is not an IPv4 or IPv6 address"),)


def test_every_problem_of_a_resource_is_reported():
    msg = wpb.Workload(
        uid=UID,
        namespace="ns",
        addresses=[b"1"],
        tunnel_protocol="LEGACY_ISTIO_MTLS",
        authorization_policies=["x"],
    )
    with pytest.raises(convert.ConversionError) as info:
        convert.workload_from_proto(msg)
    assert [field for field, _ in info.value.issues] == [
        "addresses[0]",
        "tunnel_protocol",
        "authorization_policies[0]",
    ]

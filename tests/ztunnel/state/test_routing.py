"""Outbound routing decision: the cases of Istio ztunnel's build_request tests, plus properties."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ztunnel.state.builders import ip, skey, store_of, svc, wl, wp_addr, wp_host
from ztunnel.state.model import (
    HealthPolicy,
    HealthStatus,
    LbMode,
    LbScope,
    LoadBalancing,
    Locality,
)
from ztunnel.state.routing import (
    Deny,
    Hbone,
    NoHealthyUpstream,
    Passthrough,
    SockAddr,
    route_outbound,
)


@dataclass
class FixedRng:
    value: float

    def random(self) -> float:
        return self.value


WP_SAN = "spiffe://cluster.local/ns/default/sa/wp-extra"
CLIENT = wl("client", "10.0.0.1", "fd00::1", ns="frontend")
ECHO_1 = wl("echo-1", "10.0.0.2", sa="echo", services={skey("echo"): {}})
ECHO_2 = wl("echo-2", "10.0.0.3", sa="echo", services={skey("echo"): {80: 9080}})
TCP_POD = wl("legacy", "10.0.0.4", hbone=False, services={skey("legacy"): {}})
REVIEWS = wl("reviews", "10.0.0.5", services={skey("reviews"): {}}, waypoint=wp_host("waypoint"))
WAYPOINT = wl("waypoint", "10.0.0.9", services={skey("waypoint"): {}}, native_tunnel=True)
SICK = wl("sick", "10.0.0.6", status=HealthStatus.UNHEALTHY, services={skey("sick"): {}})
ORPHAN = wl("orphan", "10.0.0.7", waypoint=wp_addr("10.99.99.99"))
WORLD = store_of(
    CLIENT,
    ECHO_1,
    ECHO_2,
    TCP_POD,
    REVIEWS,
    WAYPOINT,
    SICK,
    ORPHAN,
    svc("echo", "10.96.0.1", {80: 8080, 90: 0}, subject_alt_names=("spiffe://td/ns/x/sa/y",)),
    svc("reviews", "10.96.0.2", {9080: 9080}, waypoint=wp_host("waypoint")),
    svc("waypoint", "10.96.0.3", {15008: 15008}, subject_alt_names=(WP_SAN,)),
    svc("empty", "10.96.0.4", {80: 80}),
    svc("sick", "10.96.0.5", {80: 80}),
    svc("legacy", "10.96.0.6", {5432: 5432}),
    svc("ext", "10.96.0.7", {443: 443}, load_balancing=LoadBalancing(mode=LbMode.PASSTHROUGH)),
    svc("lost", "10.96.0.8", {80: 80}, waypoint=wp_host("nowhere")),
)


def ident(name: str, ns: str = "default") -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{name}"


def route(dst: str, port: int, source=CLIENT, rng: float = 0.0):
    return route_outbound(WORLD, source, ip(dst), port, FixedRng(rng))


@pytest.mark.parametrize(
    ("dst", "port", "why"),
    [
        ("127.0.0.1", 15001, "self-call"),
        ("127.0.0.1", 15006, "self-call"),
        ("::1", 15008, "self-call"),
        ("10.0.0.1", 15008, "self-call"),
        ("fd00::1", 15006, "self-call"),
        ("10.96.0.8", 80, "waypoint of default/lost"),
        ("10.0.0.7", 80, "waypoint of Kubernetes//Pod/default/orphan"),
    ],
    ids=[
        "loopback-15001",
        "loopback-15006",
        "loopback6-15008",
        "own-ip-15008",
        "own-ip6-15006",
        "unknown-service-waypoint",
        "unknown-workload-waypoint",
    ],
)
def test_denied(dst, port, why):
    decision = route(dst, port)
    assert isinstance(decision, Deny)
    assert why in decision.reason


@pytest.mark.parametrize(
    ("dst", "port", "addr", "workload"),
    [
        ("8.8.8.8", 443, "8.8.8.8:443", None),
        ("127.0.0.1", 8080, "127.0.0.1:8080", None),
        ("10.0.0.4", 5432, "10.0.0.4:5432", TCP_POD),
        ("10.96.0.6", 5432, "10.0.0.4:5432", TCP_POD),
        ("10.96.0.7", 443, "10.96.0.7:443", None),
    ],
    ids=[
        "unknown-ip",
        "loopback-app-port",
        "tunnel-none-pod",
        "tunnel-none-service",
        "passthrough-svc",
    ],
)
def test_plaintext(dst, port, addr, workload):
    decision = route(dst, port)
    assert isinstance(decision, Passthrough)
    assert str(decision.addr) == addr
    assert decision.destination_workload == workload


def test_direct_to_hbone_pod():
    decision = route("10.0.0.2", 8080)
    assert decision == Hbone(
        connect_addr=SockAddr(ip("10.0.0.2"), 15008),
        authority=SockAddr(ip("10.0.0.2"), 8080),
        expected_identities=(ident("echo"),),
        via_waypoint=False,
        destination_workload=ECHO_1,
        target_workload=ECHO_1,
        destination_service=None,
    )


def test_another_pods_15008_is_not_a_self_call():
    decision = route("10.0.0.2", 15008)
    assert isinstance(decision, Hbone)
    assert str(decision.authority) == "10.0.0.2:15008"  # the peer answers 503


@pytest.mark.parametrize(
    ("rng", "pod", "authority"),
    [(0.0, ECHO_1, "10.0.0.2:8080"), (0.99, ECHO_2, "10.0.0.3:9080")],
    ids=["service-target-port", "endpoint-target-port"],
)
def test_service_vip_to_endpoint_with_target_port(rng, pod, authority):
    decision = route("10.96.0.1", 80, rng=rng)
    assert isinstance(decision, Hbone)
    assert decision.target_workload == pod
    assert str(decision.authority) == authority
    assert decision.connect_addr == SockAddr(pod.addresses[0], 15008)
    assert decision.expected_identities == (ident("echo"), "spiffe://td/ns/x/sa/y")
    assert decision.destination_service is not None
    assert decision.destination_service.key == skey("echo")
    assert not decision.via_waypoint


def test_named_target_port_skips_endpoints_without_mapping():
    for r in (0.0, 0.5, 0.99):
        decision = route("10.96.0.1", 90, rng=r)
        assert isinstance(decision, NoHealthyUpstream)  # 90 -> 0 and no endpoint maps 90


def test_service_waypoint():
    decision = route("10.96.0.2", 9080)
    assert isinstance(decision, Hbone)
    assert decision.via_waypoint
    assert decision.connect_addr == SockAddr(ip("10.0.0.9"), 15008)
    assert str(decision.authority) == "10.96.0.2:9080"  # the original VIP, not translated
    assert decision.expected_identities == (ident("waypoint"), WP_SAN)
    assert decision.destination_workload == WAYPOINT
    assert decision.target_workload is None


def test_workload_waypoint():
    decision = route("10.0.0.5", 9080)
    assert isinstance(decision, Hbone)
    assert decision.via_waypoint
    assert decision.connect_addr == SockAddr(ip("10.0.0.9"), 15008)
    assert str(decision.authority) == "10.0.0.5:9080"
    assert decision.target_workload == REVIEWS


@pytest.mark.parametrize("dst", ["10.0.0.5", "10.96.0.2"], ids=["pod-addressed", "vip-addressed"])
def test_source_is_the_waypoint_goes_direct(dst):
    decision = route(dst, 9080, source=WAYPOINT)
    assert isinstance(decision, Hbone)
    assert not decision.via_waypoint
    assert decision.connect_addr == SockAddr(ip("10.0.0.5"), 15008)
    assert decision.expected_identities == (ident("reviews"),)


def test_waypoint_by_address_uses_gateway_port():
    source = wl("c", "10.1.0.1")
    target = wl("t", "10.1.0.2", waypoint=wp_addr("10.1.0.9", port=15999))
    way = wl("w", "10.1.0.9")
    decision = route_outbound(
        store_of(source, target, way), source, ip("10.1.0.2"), 80, FixedRng(0)
    )
    assert isinstance(decision, Hbone)
    assert decision.connect_addr == SockAddr(ip("10.1.0.9"), 15999)


@pytest.mark.parametrize(
    ("dst", "port", "why"),
    [
        ("10.96.0.4", 80, "no endpoint"),
        ("10.96.0.5", 80, "no healthy endpoint"),
        ("10.96.0.1", 81, "has no port 81"),
    ],
    ids=["empty-service", "only-unhealthy", "undeclared-port"],
)
def test_no_healthy_upstream(dst, port, why):
    decision = route(dst, port)
    assert isinstance(decision, NoHealthyUpstream)
    assert why in decision.reason


def test_allow_all_health_policy_uses_unhealthy():
    sick = wl("s", "10.2.0.2", status=HealthStatus.UNHEALTHY, services={skey("s"): {}})
    service = svc(
        "s",
        "10.96.2.1",
        {80: 80},
        load_balancing=LoadBalancing(health_policy=HealthPolicy.ALLOW_ALL),
    )
    decision = route_outbound(
        store_of(CLIENT, sick, service), CLIENT, ip("10.96.2.1"), 80, FixedRng(0)
    )
    assert isinstance(decision, Hbone)
    assert decision.target_workload == sick


def test_weighted_lb_proportions():
    light = wl("light", "10.3.0.1", capacity=1, services={skey("lb"): {}})
    heavy = wl("heavy", "10.3.0.2", capacity=3, services={skey("lb"): {}})
    drained = wl("drained", "10.3.0.3", capacity=0, services={skey("lb"): {}})
    store = store_of(CLIENT, light, heavy, drained, svc("lb", "10.96.3.1", {80: 80}))
    rng = random.Random(1234)
    counts = {"light": 0, "heavy": 0, "drained": 0}
    for _ in range(4000):
        d = route_outbound(store, CLIENT, ip("10.96.3.1"), 80, rng)
        assert isinstance(d, Hbone)
        assert d.target_workload is not None
        counts[d.target_workload.name] += 1
    assert counts["drained"] == 0
    assert 0.72 < counts["heavy"] / 4000 < 0.78


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (LbMode.FAILOVER, {"same-zone"}),
        (LbMode.STRICT, set()),
        (LbMode.UNSPECIFIED, {"same-zone", "other"}),
    ],
    ids=["failover-prefers-zone", "strict-requires-all", "unspecified-ignores"],
)
def test_locality(mode, expected):
    src = wl("src", "10.4.0.1", locality=Locality(region="r", zone="a"), node="n1")
    same = wl(
        "same-zone",
        "10.4.0.2",
        locality=Locality(region="r", zone="a"),
        node="n2",
        services={skey("loc"): {}},
    )
    other = wl(
        "other", "10.4.0.3", locality=Locality(region="r", zone="b"), services={skey("loc"): {}}
    )
    lb = LoadBalancing(routing_preference=(LbScope.REGION, LbScope.ZONE, LbScope.NODE), mode=mode)
    store = store_of(src, same, other, svc("loc", "10.96.4.1", {80: 80}, load_balancing=lb))
    seen = set()
    for r in (0.0, 0.3, 0.6, 0.99):
        d = route_outbound(store, src, ip("10.96.4.1"), 80, FixedRng(r))
        if isinstance(d, Hbone):
            assert d.target_workload is not None
            seen.add(d.target_workload.name)
        else:
            assert isinstance(d, NoHealthyUpstream)
    assert seen == expected


def test_ipv4_mapped_destination_is_unmapped():
    decision = route("::ffff:10.0.0.2", 8080)
    assert isinstance(decision, Hbone)
    assert decision.target_workload == ECHO_1


def test_remote_network_endpoints_are_not_candidates():
    remote = wl("remote", "10.5.0.2", network="net2", services={skey("r"): {}})
    store = store_of(CLIENT, remote, svc("r", "10.96.5.1", {80: 80}))
    assert isinstance(
        route_outbound(store, CLIENT, ip("10.96.5.1"), 80, FixedRng(0)), NoHealthyUpstream
    )


def test_same_ip_on_other_network_is_not_the_workload():
    remote = wl("remote", "10.5.0.2", network="net2")
    store = store_of(CLIENT, remote)
    assert isinstance(route_outbound(store, CLIENT, ip("10.5.0.2"), 80, FixedRng(0)), Passthrough)


MESH_IPS = [str(a) for w in WORLD.workloads() if w.is_hbone for a in w.addresses]
ALL_IPS = [str(a) for w in WORLD.workloads() for a in w.addresses] + [
    str(v.address) for s in WORLD.services() for v in s.vips
]


def _unmapped(text):
    a = ip(text)
    return a.ipv4_mapped if a.version == 6 and a.ipv4_mapped else a


@given(
    dst=st.one_of(st.sampled_from(ALL_IPS), st.ip_addresses().map(str)),
    port=st.integers(1, 65535),
    rng=st.floats(0, 1, exclude_max=True),
    source=st.sampled_from([CLIENT, ECHO_1, WAYPOINT, REVIEWS]),
)
def test_properties(dst, port, rng, source):
    decision = route(dst, port, source=source, rng=rng)
    if isinstance(decision, Passthrough):
        # A destination known to be in the mesh is never sent as plaintext.
        assert str(decision.addr.ip) not in MESH_IPS
        assert decision.destination_workload is None or not decision.destination_workload.is_hbone
    elif isinstance(decision, Hbone):
        assert decision.expected_identities
        assert decision.connect_addr.port == 15008
        assert decision.destination_workload.is_hbone
        if decision.via_waypoint:
            assert decision.destination_workload is WAYPOINT
            assert decision.authority == SockAddr(_unmapped(dst), port)  # original address
    elif isinstance(decision, Deny):
        assert decision.reason
    if ip(dst).is_loopback and port in (15001, 15006, 15008):
        assert isinstance(decision, Deny)

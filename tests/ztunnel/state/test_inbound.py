"""Inbound checks: authority parsing, the authority-IP rule, waypoint sandwich, illegal ports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ztunnel.state.builders import ip, skey, store_of, svc, wl, wp_host
from ztunnel.state.inbound import (
    AuthorityError,
    InboundAccept,
    InboundReject,
    parse_authority,
    resolve_inbound_hbone,
    resolve_inbound_plaintext,
)
from ztunnel.state.model import ApplicationTunnel

POD = wl("pod", "10.0.0.2", "fd00::2", services={skey("app"): {}}, waypoint=wp_host("wp"))
WP = wl("wp", "10.0.0.9", services={skey("wp"): {}})
TUNNEL = wl("tun", "10.0.0.3", application_tunnel=ApplicationTunnel(port=15088))
STORE = store_of(
    POD,
    WP,
    TUNNEL,
    svc("app", "10.96.0.1", {80: 8080}, waypoint=wp_host("wp")),
    svc("wp", "10.96.0.9", {15008: 15008}),
)
LOCAL = {a: w for w in (POD, WP, TUNNEL) for a in w.addresses}


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.2:8080", "10.0.0.2:8080"),
        ("[fd00::2]:80", "[fd00::2]:80"),
        ("1.2.3.4:65535", "1.2.3.4:65535"),
    ],
    ids=["v4", "v6", "max-port"],
)
def test_parse_authority(authority, expected):
    assert str(parse_authority(authority)) == expected


@pytest.mark.parametrize(
    "authority",
    ["10.0.0.2", "10.0.0.2:", ":80", "fd00::2:80", "[10.0.0.2]:80", "host.example:80", "10.0.0.2:0",
     "10.0.0.2:65536", "10.0.0.2:+80", "10.0.0.2:٨٠", "[fe80::1%eth0]:80", "010.0.0.2:80", "10.0.0.2:080080"],
)  # fmt: skip
def test_parse_authority_rejects(authority):
    with pytest.raises(AuthorityError):
        parse_authority(authority)


@given(st.text(max_size=40))
def test_parse_authority_never_crashes(text):
    try:
        addr = parse_authority(text)
    except AuthorityError:
        return
    assert parse_authority(str(addr)) == addr


@pytest.mark.parametrize(
    ("authority", "arrived_on", "status", "why"),
    [
        ("10.0.0.2:8080", "10.0.0.2", 200, ""),
        ("[fd00::2]:8080", "fd00::2", 200, ""),
        ("10.0.0.2:8080", "10.0.0.99", 503, "no local workload"),
        ("10.0.0.2:15008", "10.0.0.2", 503, "port 15008"),
        ("10.0.0.2:15001", "10.0.0.2", 503, "port 15001"),
        ("10.0.0.9:8080", "10.0.0.2", 400, "does not match"),
        ("10.96.0.1:80", "10.0.0.2", 400, "does not match"),
        ("bogus", "10.0.0.2", 400, "has no port"),
        ("10.96.0.1:80", "10.0.0.9", 200, "sandwich-service"),
        ("10.0.0.2:8080", "10.0.0.9", 200, "sandwich-workload"),
        ("10.0.0.5:8080", "10.0.0.3", 200, "app-tunnel"),
    ],
    ids=["match", "match-v6", "unknown-local", "illegal-15008", "illegal-15001", "other-pod-ip", "vip-to-non-waypoint",
         "unparsable", "waypoint-gets-vip", "waypoint-gets-pod", "application-tunnel"],
)  # fmt: skip
def test_resolve_inbound_hbone(authority, arrived_on, status, why):
    d = resolve_inbound_hbone(STORE, LOCAL, authority, ip(arrived_on))
    if status == 200:
        assert isinstance(d, InboundAccept)
        assert str(d.target) == authority
        assert d.via_waypoint_sandwich == why.startswith("sandwich")
        if why == "sandwich-service":
            assert d.destination_service is not None
            assert d.destination_service.key == skey("app")
    else:
        assert isinstance(d, InboundReject)
        assert d.status == status
        assert why in d.reason


def test_resolve_inbound_plaintext():
    ok = resolve_inbound_plaintext(LOCAL, ip("10.0.0.2"), 8080)
    assert isinstance(ok, InboundAccept)
    assert ok.destination_workload is POD
    assert isinstance(resolve_inbound_plaintext(LOCAL, ip("10.0.0.2"), 15006), InboundReject)
    assert isinstance(resolve_inbound_plaintext(LOCAL, ip("10.1.1.1"), 80), InboundReject)

"""Strict :authority parsing: table of good and bad values, plus Hypothesis round-trips."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ztunnel.proxy.test_hbone_attacks import _BAD_AUTHORITIES
from ztunnel.hbone.authority import AuthorityError, parse_authority


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.1:8080", ipaddress.IPv4Address("10.0.0.1"), 8080),
        ("[::1]:15008", ipaddress.IPv6Address("::1"), 15008),
        ("[2001:db8::1]:1", ipaddress.IPv6Address("2001:db8::1"), 1),
        ("reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local", 9080),
        ("Reviews.Default:65535", "reviews.default", 65535),
    ],
    ids=["ipv4", "ipv6 loopback", "ipv6", "service hostname", "hostname lower-cased"],
)
def test_good(text, host, port):
    a = parse_authority(text)
    assert (a.host, a.port) == (host, port)


@pytest.mark.parametrize("text", _BAD_AUTHORITIES)
def test_bad(text):
    with pytest.raises(AuthorityError):
        parse_authority(text)


def test_error_names_the_problem():
    with pytest.raises(AuthorityError, match="userinfo"):
        parse_authority("u@1.2.3.4:80")
    with pytest.raises(AuthorityError, match="out of range"):
        parse_authority("1.2.3.4:70000")


@given(st.ip_addresses(), st.integers(1, 65535))
def test_ip_roundtrip(ip, port):
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    a = parse_authority(text)
    assert a.host == ip
    assert a.port == port
    assert parse_authority(str(a)) == a


@given(st.text(max_size=300))
def test_arbitrary_text_parses_or_raises_authority_error(text):
    try:
        a = parse_authority(text)
    except AuthorityError:
        return
    assert 1 <= a.port <= 65535
    assert parse_authority(str(a)) == a

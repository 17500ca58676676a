from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

GOOD = [
    ("spiffe://cluster.local/ns/default/sa/default", ("cluster.local", "default", "default")),
    ("spiffe://td_1/ns/a-b/sa/c.d", ("td_1", "a-b", "c.d")),
]
BAD = {
    "no scheme": "cluster.local/ns/a/sa/b",
    "upper-case scheme": "SPIFFE://cluster.local/ns/a/sa/b",
    "http scheme": "http://cluster.local/ns/a/sa/b",
    "extra segment": "spiffe://td/ns/a/sa/b/extra",
    "missing sa": "spiffe://td/ns/a",
    "wrong ns key": "spiffe://td/namespace/a/sa/b",
    "wrong sa key": "spiffe://td/ns/a/serviceaccount/b",
    "empty namespace": "spiffe://td/ns//sa/b",
    "empty trust domain": "spiffe:///ns/a/sa/b",
    "upper-case namespace": "spiffe://td/ns/A/sa/b",
    "percent-encoded": "spiffe://td/ns/a%2Fb/sa/b",
    "NUL byte": "spiffe://td/ns/a\x00/sa/b",
    "space": "spiffe://td/ns/a /sa/b",
    "trailing slash": "spiffe://td/ns/a/sa/b/",
    "port in trust domain": "spiffe://td:8080/ns/a/sa/b",
    "userinfo": "spiffe://user@td/ns/a/sa/b",
    "too long": "spiffe://td/ns/a/sa/" + "b" * 3000,
}


@pytest.mark.parametrize(("uri", "parts"), GOOD, ids=[g[0] for g in GOOD])
def test_parse_and_format_round_trip(uri: str, parts: tuple[str, str, str]) -> None:
    ident = SpiffeId.parse(uri)
    assert (ident.trust_domain, ident.namespace, ident.service_account) == parts
    assert str(ident) == uri
    assert ident.principal == uri.removeprefix("spiffe://")


@pytest.mark.parametrize("uri", BAD.values(), ids=BAD.keys())
def test_rejects_malformed(uri: str) -> None:
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(uri)


def test_error_names_the_part() -> None:
    with pytest.raises(SpiffeIdError, match="namespace 'A'"):
        SpiffeId.parse("spiffe://td/ns/A/sa/b")


label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)


@given(td=st.from_regex(r"[a-z0-9._-]{1,30}", fullmatch=True), ns=label, sa=label)
def test_any_valid_identity_round_trips(td: str, ns: str, sa: str) -> None:
    ident = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(ident)) == ident


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_spiffe_error(text: str) -> None:
    try:
        ident = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(ident) == text

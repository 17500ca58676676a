"""h2's outbound header validation is off (connection rule 8): what we send is checked by
``headers.outgoing_header`` instead. Proves the lists we emit are still valid (the server's own
strict validator accepts them after a real HPACK round trip), that bad extra headers are refused
before any byte is queued, and that inbound validation is unchanged on both sides."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ztunnel.hbone.pair import HbonePair
from ztunnel.hbone.events import TunnelEstablished, TunnelRejected, TunnelRequested
from ztunnel.hbone.headers import (
    connect_request_headers,
    outgoing_header,
    response_headers,
    validate_connect_request,
)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("baggage", "k8s.namespace.name=default", (b"baggage", b"k8s.namespace.name=default")),
        ("Forwarded", 'for="10.0.0.1"', (b"forwarded", b'for="10.0.0.1"')),
        ("traceparent", "  00-ab-cd-00\t", (b"traceparent", b"00-ab-cd-00")),
    ],
    ids=["plain", "name-lowered", "value-edges-stripped"],
)
def test_outgoing_header_normalises(name, value, expected):
    assert outgoing_header(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("x-a", "one\r\ntwo: injected", "CR, LF or NUL"),
        ("x-a", "nul\x00", "CR, LF or NUL"),
        ("x a", "v", "not a token"),
        (":path", "/", "not a token"),
        ("connection", "close", "connection-specific"),
        ("te", "trailers", "connection-specific"),
        ("x-é", "v", "ASCII"),
        ("x-a", "é", "ASCII"),
        ("", "v", "not a token"),
    ],
    ids=["crlf", "nul", "space-in-name", "pseudo", "connection", "te", "non-ascii-name",
         "non-ascii-value", "empty-name"],
)  # fmt: skip
def test_outgoing_header_rejects_and_names_it(name, value, needle):
    with pytest.raises(ValueError, match=needle) as err:
        outgoing_header(name, value)
    assert repr(name) in str(err.value)


def test_bad_extra_header_refuses_the_tunnel_before_queueing_anything():
    pair = HbonePair.create()
    before = pair.client.available_streams
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        pair.client.open_tunnel("10.0.0.2:8080", [("baggage", "a\r\nb")])
    assert pair.client.data_to_send() == b""
    assert pair.client.open_streams == 0
    assert pair.client.available_streams == before
    # The connection is still usable.
    sid = pair.client.open_tunnel("10.0.0.2:8080", [("baggage", "ok")])
    pair.roundtrip()
    (req,) = [e for e in pair.server_events if isinstance(e, TunnelRequested)]
    assert req.stream_id == sid


def test_response_extra_headers_are_checked_too():
    with pytest.raises(ValueError, match="connection-specific"):
        response_headers(200, [("Connection", "close")])
    assert response_headers(200, [("Baggage", " x=1 ")]) == [
        (b":status", b"200"),
        (b"baggage", b"x=1"),
    ]


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)


@given(extra=st.lists(st.tuples(_token, _value), max_size=5))
def test_emitted_requests_pass_the_servers_validator(extra):
    extra = [(k, v) for k, v in extra if k not in {"te", "connection", "upgrade"}]
    raw = connect_request_headers("10.1.2.3:8080", extra)
    request = validate_connect_request(raw)  # the strict inbound checker accepts what we send
    assert str(request.authority) == "10.1.2.3:8080"
    assert request.headers == tuple((k, v.strip(" \t")) for k, v in extra)


def test_headers_survive_a_real_hpack_round_trip_and_the_answer_is_read():
    pair = HbonePair.create()
    extra = [
        ("forwarded", 'for="10.0.0.1:3333"'),
        ("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-00"),
    ]
    sid = pair.client.open_tunnel("10.0.0.2:8080", extra)
    pair.roundtrip()
    (req,) = [e for e in pair.server_events if isinstance(e, TunnelRequested)]
    assert req.headers == tuple(extra)
    pair.server.accept(sid, [("baggage", "k8s.namespace.name=ns")])
    pair.roundtrip()
    (est,) = [e for e in pair.client_events if isinstance(e, TunnelEstablished)]
    assert ("baggage", "k8s.namespace.name=ns") in est.headers


def test_inbound_validation_is_unchanged():
    pair = HbonePair.create()
    assert pair.client._h2.config.validate_inbound_headers is True
    assert pair.server._h2.config.validate_inbound_headers is False  # the server's own validator
    assert pair.client._h2.config.validate_outbound_headers is False


def test_server_still_answers_400_to_a_bad_request_from_a_raw_h2_client():
    pair = HbonePair.create()
    # A raw h2 client (its own validation off too) sends what our builder would refuse.
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                  normalize_outbound_headers=False, header_encoding=None)
    )  # fmt: skip
    raw.initiate_connection()
    server = pair.server.__class__(now=0.0)
    server.receive_data(raw.data_to_send(), 0.0)
    raw.receive_data(server.data_to_send())
    raw.send_headers(
        1, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80"), (b"connection", b"close")]
    )
    events = server.receive_data(raw.data_to_send(), 0.0)
    assert not [e for e in events if isinstance(e, TunnelRequested)]
    answer = raw.receive_data(server.data_to_send())
    statuses = [dict(e.headers)[b":status"] for e in answer if hasattr(e, "headers") and e.headers]
    assert statuses == [b"400"]


def test_client_still_rejects_a_malformed_response():
    pair = HbonePair.create()
    sid = pair.client.open_tunnel("10.0.0.2:8080")
    pair.roundtrip()
    # Answer with an uppercase header name through h2 with validation off: the client refuses it.
    h2conn = pair.server._h2
    h2conn.config.validate_outbound_headers = False
    h2conn.send_headers(sid, [(b":status", b"200"), (b"X-Upper", b"v")])
    pair.server._pull_h2(provoked=False)
    pair.roundtrip()
    assert not [e for e in pair.client_events if isinstance(e, TunnelEstablished)]
    assert not [e for e in pair.client_events if isinstance(e, TunnelRejected)]
    assert pair.client.closed or not pair.client.is_open(sid)

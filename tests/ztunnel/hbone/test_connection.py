"""The sans-IO HBONE client and server joined in memory: tunnels, data, half-close, resets, windows."""

from __future__ import annotations

import pytest

from tests.ztunnel.hbone.pair import HbonePair
from ztunnel.hbone import frames as fr
from ztunnel.hbone.connection import HboneClientConnection, HboneServerConnection
from ztunnel.hbone.errors import StreamClosedError
from ztunnel.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelEstablished,
    TunnelRejected,
    TunnelRequested,
    TunnelRequestInvalid,
)


def data_of(events, sid) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid
    )


def open_established(pair: HbonePair, authority="10.0.0.2:8080", headers=()) -> int:
    sid = pair.client.open_tunnel(authority, headers)
    pair.roundtrip()
    _, s = pair.take()
    (req,) = [e for e in s if isinstance(e, TunnelRequested)]
    pair.server.accept(req.stream_id)
    pair.roundtrip()
    c, _ = pair.take()
    assert [e for e in c if isinstance(e, TunnelEstablished)]
    return sid


def test_connect_accept_data_both_ways_and_half_close():
    pair = HbonePair.create()
    sid = pair.client.open_tunnel(
        "10.0.0.2:8080", [("baggage", "k8s.namespace.name=a"), ("traceparent", "00-ab-cd-00")]
    )
    pair.roundtrip()
    _, s = pair.take()
    (req,) = s
    assert isinstance(req, TunnelRequested)
    assert str(req.authority) == "10.0.0.2:8080"
    assert req.header("baggage") == "k8s.namespace.name=a"
    with pytest.raises(StreamClosedError):
        pair.client.send_data(sid, b"early")  # no 200 yet
    pair.server.accept(sid)
    pair.roundtrip()
    c, _ = pair.take()
    assert [type(e) for e in c] == [TunnelEstablished]
    assert pair.client.send_data(sid, b"hello", end_stream=True) == 5
    pair.roundtrip()
    _, s = pair.take()
    assert data_of(s, sid) == b"hello"
    assert isinstance(s[-1], StreamEnded)
    assert pair.server.send_data(sid, b"world") == 5
    pair.server.end_stream(sid)
    pair.roundtrip()
    c, _ = pair.take()
    assert data_of(c, sid) == b"world"
    assert isinstance(c[-1], StreamEnded)
    assert not pair.client.is_open(sid)
    assert not pair.server.is_open(sid)


@pytest.mark.parametrize("status", [401, 503], ids=["policy denial", "upstream refused"])
def test_reject_gives_typed_status(status):
    pair = HbonePair.create()
    sid = pair.client.open_tunnel("10.0.0.2:80")
    pair.roundtrip()
    pair.server.reject(sid, status)
    pair.roundtrip()
    c, _ = pair.take()
    rejected = [e for e in c if isinstance(e, TunnelRejected)]
    assert rejected
    assert rejected[0].status == status
    assert not pair.client.is_open(sid)


def test_large_transfer_chunked_respects_windows():
    pair = HbonePair.create()
    sid = open_established(pair)
    payload = bytes(range(256)) * (40 * 1024)  # 10 MiB > stream window
    sent = 0
    for _ in range(1000):
        if sent < len(payload):
            sent += pair.client.send_data(sid, payload[sent:])
        pair.roundtrip(chunk=70_000)
        if sent == len(payload):
            break
    assert sent == len(payload)
    _, s = pair.take()
    assert data_of(s, sid) == payload


def test_no_ack_means_backpressure():
    pair = HbonePair.create(auto_ack=False)
    sid = open_established(pair)
    payload = b"x" * (5 * 1024 * 1024)
    taken = pair.client.send_data(sid, payload)
    assert taken == 65_535 or taken == 4 * 1024 * 1024  # peer settings decide the initial window
    pair.roundtrip()
    assert pair.client.send_data(sid, payload) == 0 or pair.client.send_window(sid) >= 0
    pair.roundtrip()
    assert pair.client.send_window(sid) == 0


def test_reset_reported_to_other_side():
    pair = HbonePair.create()
    sid = open_established(pair)
    pair.client.reset(sid)
    pair.roundtrip()
    _, s = pair.take()
    assert [e for e in s if isinstance(e, StreamReset) and e.remote and e.stream_id == sid]


def test_reset_while_deciding_then_accept_raises():
    pair = HbonePair.create()
    sid = pair.client.open_tunnel("10.0.0.2:80")
    pair.roundtrip()
    pair.client.reset(sid)
    pair.roundtrip()
    _, s = pair.take()
    assert isinstance(s[-1], StreamReset)
    with pytest.raises(StreamClosedError):
        pair.server.accept(sid)
    assert pair.server.held_streams == 1  # still counts until the app releases it
    pair.server.release(sid)
    assert pair.server.held_streams == 0


def test_bad_request_gets_400_without_tunnel_requested():
    pair = HbonePair.create()
    sid = pair.client.open_tunnel("10.0.0.2:80")
    # replace what the client would have sent: a raw GET via h2 on a new stream
    pair.client._h2.send_headers(
        3, [(b":method", b"GET"), (b":authority", b"a:1"), (b":scheme", b"https"), (b":path", b"/")]
    )
    pair.client._pull_h2(provoked=False)
    pair.client._streams[3] = pair.client._streams[sid].__class__(3, 65535, 65535)
    pair.roundtrip()
    c, s = pair.take()
    assert [e.stream_id for e in s if isinstance(e, TunnelRequestInvalid)] == [3]
    assert [e.stream_id for e in s if isinstance(e, TunnelRequested)] == [sid]
    assert [e.status for e in c if isinstance(e, TunnelRejected)] == [400]


def test_graceful_drain_lets_streams_finish():
    pair = HbonePair.create()
    sid = open_established(pair)
    pair.server.drain()
    pair.roundtrip()
    c, _ = pair.take()
    assert [e for e in c if isinstance(e, GoAwayReceived)]
    assert pair.client.available_streams == 0
    assert pair.client.send_data(sid, b"after goaway", end_stream=True) == 12
    pair.server.send_data(sid, b"reply", end_stream=True)
    pair.roundtrip()
    c, s = pair.take()
    assert data_of(s, sid) == b"after goaway"
    assert data_of(c, sid) == b"reply"


def test_keepalive_ping_and_timeout():
    server = HboneClientConnection(now=0.0)
    assert server.get_timer() == 10.0
    assert server.handle_timer(10.0) == []
    assert server.data_to_send()[-17:][3] == fr.PING
    assert server.get_timer() == 30.0
    events = server.handle_timer(30.0)
    assert isinstance(events[-1], ConnectionTerminated)


def test_keepalive_pong_clears():
    pair = HbonePair.create()
    open_established(pair)
    pair.now = 10.0
    pair.client.handle_timer(10.0)
    pair.roundtrip()
    assert pair.client.get_timer() == 20.0


def test_first_connect_timeout():
    server = HboneServerConnection(now=0.0)
    events = server.handle_timer(server.limits.first_connect_timeout)
    assert isinstance(events[-1], ConnectionTerminated)


def test_garbage_terminates_without_raising():
    server = HboneServerConnection(now=0.0)
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert isinstance(events[-1], ConnectionTerminated)
    assert server.receive_data(b"more", 0.0) == []


def test_client_rejects_wrong_status_stream_cap():
    client = HboneClientConnection(now=0.0)
    for _ in range(100):
        client.open_tunnel("10.0.0.1:1")
    assert client.available_streams == 0

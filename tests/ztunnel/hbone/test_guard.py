"""Every guard limit, on the pure Guard and through the sans-IO server with raw frames."""

from __future__ import annotations

import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from tests.ztunnel.hbone.pair import HbonePair
from ztunnel.hbone import frames as fr
from ztunnel.hbone.connection import HboneServerConnection
from ztunnel.hbone.errors import ErrorCodes
from ztunnel.hbone.events import ConnectionTerminated, StreamReset, TunnelRequested
from ztunnel.hbone.guard import ConnectionCaps, Guard, Limits, ListenerLimits, TokenBucket


def test_token_bucket_refills():
    b = TokenBucket(burst=2, rate=1.0, now=0.0)
    assert b.take(0.0)
    assert b.take(0.0)
    assert not b.take(0.0)
    assert b.take(1.0)
    assert not b.take(1.0)


def test_reset_budget_trips():
    g = Guard(Limits(reset_burst=3, reset_refill_per_second=0), now=0)
    assert [g.on_reset_received(0) for _ in range(3)] == [None] * 3
    trip = g.on_reset_received(0)
    assert trip is not None
    assert trip.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_local_error_reset_cap():
    g = Guard(Limits(max_local_error_resets=2), now=0)
    assert g.on_local_error_reset() is None
    assert g.on_local_error_reset() is None
    assert g.on_local_error_reset() is not None


def test_control_flood_cap_and_drain_resets():
    g = Guard(Limits(max_queued_control_frames=3), now=0)
    assert g.on_provoked_frames_queued(3, 51) is None
    g.on_output_drained()
    assert g.on_provoked_frames_queued(3, 51) is None
    assert g.on_provoked_frames_queued(1, 17) is not None


def test_stream_caps_refuse_not_kill():
    g = Guard(Limits(max_concurrent_streams=2, max_lifetime_streams=3), now=0)
    assert g.admit_stream(0)
    assert g.admit_stream(1)
    assert not g.admit_stream(2)
    assert g.admit_stream(1)
    assert g.lifetime_exhausted
    assert not g.admit_stream(0)


def server_with_preface(limits=None):
    pair = HbonePair.create(server_kwargs={"limits": limits} if limits else {})
    return pair


def raw(pair, *frames_):
    data = b"".join(f.serialize() for f in frames_)
    return pair.server.receive_data(data, pair.now)


def hdr_block(pair, sid, authority="10.0.0.1:80"):
    return pair.client._h2.encoder.encode(
        [(b":method", b"CONNECT"), (b":authority", authority.encode())]
    )


def test_continuation_flood_goaway():
    pair = server_with_preface()
    block = hdr_block(pair, 1)
    frames_ = [HeadersFrame(1, data=block[:1])] + [ContinuationFrame(1, data=b"") for _ in range(6)]
    events = raw(pair, *frames_)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_oversized_header_block_rejected_before_buffering():
    pair = server_with_preface()
    frame = HeadersFrame(1, data=b"\x00" * 20_000, flags=["END_HEADERS"]).serialize()
    events = pair.server.receive_data(frame[:100], 0.0)  # only the header arrived
    assert isinstance(events[-1], ConnectionTerminated)


def test_stream_cap_is_refused_stream_not_goaway():
    pair = server_with_preface(Limits(max_concurrent_streams=2))
    for _ in range(3):
        pair.client.open_tunnel("10.0.0.1:80")
    pair.roundtrip()
    c, s = pair.take()
    assert len([e for e in s if isinstance(e, TunnelRequested)]) == 2
    resets = [e for e in c if isinstance(e, StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.REFUSED_STREAM]
    assert not pair.client.closed
    assert not pair.server.closed


def test_lifetime_cap_graceful_goaway():
    pair = server_with_preface(Limits(max_lifetime_streams=2))
    for _ in range(2):
        pair.client.open_tunnel("10.0.0.1:80")
    pair.roundtrip()
    assert pair.server.goaway_sent
    assert pair.client.goaway_received
    assert pair.client.available_streams == 0


def test_glitch_flood_priority_and_empty_data():
    pair = server_with_preface(Limits(glitch_threshold=10))
    events = raw(pair, *[PriorityFrame(1, depends_on=0) for _ in range(11)])
    assert isinstance(events[-1], ConnectionTerminated)


def test_empty_data_flood():
    pair = server_with_preface(Limits(glitch_threshold=10))
    sid = pair.client.open_tunnel("10.0.0.1:80")
    pair.roundtrip()
    events = raw(pair, *[DataFrame(sid, data=b"") for _ in range(11)])
    assert isinstance(events[-1], ConnectionTerminated)


def test_window_update_flood():
    pair = server_with_preface(Limits(glitch_threshold=10))
    events = raw(pair, *[WindowUpdateFrame(0, window_increment=1) for _ in range(30)])
    assert isinstance(events[-1], ConnectionTerminated)


def test_ping_flood_while_not_reading():
    pair = server_with_preface(Limits(max_queued_control_frames=50, control_burst=10_000))
    events = raw(pair, *[PingFrame(0, opaque_data=b"12345678") for _ in range(60)])
    assert isinstance(events[-1], ConnectionTerminated)


def test_ping_ok_when_output_drains():
    pair = server_with_preface(Limits(max_queued_control_frames=50, control_burst=10_000))
    for _ in range(10):
        assert raw(pair, *[PingFrame(0, opaque_data=b"12345678") for _ in range(20)]) == []
        pair.server.data_to_send()
        pair.server.outbound_drained()


def test_rapid_reset_sans_io():
    pair = server_with_preface(Limits(reset_burst=50, reset_refill_per_second=0))
    frames_: list[object] = []
    for i in range(60):
        sid = 2 * i + 1
        frames_.append(HeadersFrame(sid, data=hdr_block(pair, sid), flags=["END_HEADERS"]))
        frames_.append(RstStreamFrame(sid, error_code=8))
    events = raw(pair, *frames_)
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_flow_control_violation_resets_stream():
    pair = HbonePair.create()
    sid = pair.client.open_tunnel("10.0.0.1:80")
    pair.roundtrip()
    pair.take()
    big = fr.frame_header(70_000, fr.DATA, 0, sid) + b"x" * 70_000
    events = pair.server.receive_data(big * 70, 0.0)  # 4.9 MB > the 4 MiB stream window
    resets = [e for e in events if isinstance(e, StreamReset)]
    assert resets
    assert resets[0].error_code == ErrorCodes.FLOW_CONTROL_ERROR
    assert not pair.server.closed


def test_first_connect_and_idle_timeouts():
    s = HboneServerConnection(now=0.0, limits=Limits(first_connect_timeout=5, idle_timeout=None))
    assert s.get_timer() == 5
    assert isinstance(s.handle_timer(5)[-1], ConnectionTerminated)


def test_listener_defaults_are_the_edge_profile():
    limits = ListenerLimits()
    assert limits.max_connections == 5_000
    assert limits.max_connections_per_identity == 500


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections_per_identity": 0}, "max_connections_per_identity"),
        ({"close_grace": -1.0}, "close_grace"),
    ],
    ids=["global-zero", "identity-zero", "negative-grace"],
)
def test_listener_limits_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ListenerLimits(**kwargs)


def test_global_connection_cap_admits_then_refuses_then_frees():
    caps = ConnectionCaps(ListenerLimits(max_connections=2))
    assert caps.admit_connection()
    assert caps.admit_connection()
    assert not caps.admit_connection()
    assert caps.rejected_global == 1
    caps.release_connection()
    assert caps.admit_connection()
    caps.release_connection()
    caps.release_connection()
    caps.release_connection()
    caps.release_connection()  # never below zero
    assert caps.connections == 0


def test_per_identity_cap_is_per_identity():
    caps = ConnectionCaps(ListenerLimits(max_connections_per_identity=2))
    assert caps.admit_identity("a")
    assert caps.admit_identity("a")
    assert not caps.admit_identity("a")
    assert caps.admit_identity("b")
    assert caps.rejected_identity == 1
    assert caps.connections_of("a") == 2
    caps.release_identity("a")
    assert caps.connections_of("a") == 1
    assert caps.admit_identity("a")
    caps.release_identity("b")
    caps.release_identity("b")  # an unknown release is harmless
    assert caps.connections_of("b") == 0

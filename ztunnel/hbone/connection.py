"""Sans-IO HBONE connections: HTTP/2 CONNECT tunnels over python-hyper/h2 with a DATA fast path.

Owns one HTTP/2 connection's protocol state. No I/O: bytes go in with ``receive_data(data, now)``,
bytes come out of ``data_to_send()`` / ``buffers_to_send()``, time comes in through
``get_timer()`` / ``handle_timer(now)`` (aioquic style), decisions come in as method calls.

Theory of operation
-------------------
A straightforward use of h2 spends most of its time parsing and building DATA frames and doing
flow-control bookkeeping in pure Python (performance.md: ~1/3 of plain TLS). So this module parses
every frame *header* itself (9 bytes) and splits the traffic:

* **Fast path** (owned here): DATA frames on streams that are open for receiving are handed to the
  application as ``memoryview`` slices of the received bytes, streamed as they arrive (no buffering of
  whole 1 MiB frames, no copy). Outgoing DATA frames are a 9-byte header plus a reference to the
  caller's payload. Both directions' flow control (stream and connection windows, WINDOW_UPDATE in and
  out) is accounted here and only here.
* **Slow path** (owned by h2): everything else -- the preface, SETTINGS, HEADERS/CONTINUATION and
  HPACK, RST_STREAM, PING, PRIORITY, unknown frames -- is batched and fed to h2 unchanged, so h2 keeps
  the stream state machines and HPACK tables.

Rules that keep h2's view consistent (each would otherwise make h2 raise or mis-account):

1. h2 never sees a DATA payload. END_STREAM on a fast-path DATA frame reaches h2 as a zero-length DATA
   frame with END_STREAM (zero length costs no window), after the payload was delivered. DATA for a
   stream we do not track (idle, closed, reset) also reaches h2 as a zero-length frame, so h2 makes the
   RFC 9113 decision (connection error or RST_STREAM) while we refund the connection window.
2. h2 never sends DATA: outbound END_STREAM goes through ``h2.end_stream`` (a zero-length frame).
3. WINDOW_UPDATE for the connection and for tracked streams is consumed here, never by h2 (h2 would see
   its own never-used send window grow past 2**31-1). WINDOW_UPDATE for untracked streams goes to h2
   (it ignores closed streams and rejects idle ones).
4. GOAWAY is parsed and written here: h2 moves to CLOSED on GOAWAY and would refuse the frames a
   graceful drain still needs.
5. h2-generated RST_STREAM frames are spotted in h2's output; a tracked stream reset that way is
   dropped and reported as ``StreamReset(remote=False)`` (and counted against MadeYouReset).
6. h2's own inbound concurrency check is disabled (``_H2.open_inbound_streams``): exceeding it is a
   connection error in h2; the guard instead refuses just the offending stream (REFUSED_STREAM), after
   h2 decoded its headers so the HPACK state stays in sync.
7. The server validates CONNECT headers itself (h2's inbound validation off) so a malformed request
   costs one stream (400), not a pooled connection.

Streams: a stream is tracked from its CONNECT until both directions ended or it was reset. The server
additionally *holds* every stream handed to the application until ``release()``, and counts held
streams against the concurrency cap, so a reset stream still counts while its upstream work is torn down
(Rapid Reset mitigation).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.settings import SettingCodes, Settings

from ztunnel.hbone import frames as fr
from ztunnel.hbone.authority import Authority
from ztunnel.hbone.errors import ErrorCodes, HboneError, StreamClosedError, TooManyStreamsError
from ztunnel.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelEstablished,
    TunnelRejected,
    TunnelRequested,
    TunnelRequestInvalid,
    WindowUpdated,
)
from ztunnel.hbone.guard import DEFAULT_LIMITS, Guard, GuardTrip, Limits
from ztunnel.hbone.headers import (
    RequestError,
    connect_request_headers,
    decode_headers,
    response_headers,
    validate_connect_request,
)
from ztunnel.hbone.settings import (
    CLIENT_SETTINGS,
    DEFAULT_WINDOW,
    MAX_WINDOW,
    SERVER_SETTINGS,
    H2Settings,
)

Buffer: TypeAlias = bytes | bytearray | memoryview
# Payloads at least this large are referenced in the output list instead of copied next to their
# header: the TLS layer copies (encrypts) them anyway, one more copy would be pure overhead.
_LARGE = 16 * 1024
_END_STREAM_FRAME_FLAGS = fr.FLAG_END_STREAM


class _H2(h2.connection.H2Connection):
    """h2 without its inbound concurrency check (rule 6): the guard refuses streams one by one."""

    @property
    def open_inbound_streams(self) -> int:
        super().open_inbound_streams  # noqa: B018 -- keeps h2's closed-stream clean-up side effect
        return 0


class _Stream:
    __slots__ = (
        "established",
        "id",
        "local_open",
        "recv_unacked",
        "recv_window",
        "remote_open",
        "send_window",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.recv_unacked = 0
        self.local_open = True
        self.remote_open = True
        self.established = False


class HboneConnection:
    """Common part of the client and server HBONE connection (see the module docstring)."""

    def __init__(
        self, *, client_side: bool, settings: H2Settings, limits: Limits, now: float
    ) -> None:
        self.client_side = client_side
        self.settings = settings
        self.limits = limits
        self.guard = Guard(limits, now=now)
        config = h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            validate_inbound_headers=client_side,
            normalize_inbound_headers=True,
            # Rule 8: every header list we send is built by ``headers`` (pseudo-headers first,
            # lower-case token names, values checked there), so h2 re-checking costs time only.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = _H2(config=config)
        initial: dict[SettingCodes, int] = {
            SettingCodes.HEADER_TABLE_SIZE: settings.header_table_size,
            SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
            SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
            SettingCodes.MAX_CONCURRENT_STREAMS: settings.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: settings.max_header_list_size,
        }
        if client_side:
            initial[SettingCodes.ENABLE_PUSH] = 0
        conn.local_settings = Settings(client=client_side, initial_values=initial)
        conn.decoder.max_header_list_size = settings.max_header_list_size
        conn.max_inbound_frame_size = settings.max_frame_size
        self._h2 = conn
        self._streams: dict[int, _Stream] = {}
        self._events: list[Event] = []
        self._out: list[Buffer] = []
        self._small = bytearray()
        self._pending = bytearray()
        self._batch: list[Buffer] = []
        self._preface_left = 0 if client_side else len(fr.PREFACE)
        self._data_left = 0
        self._data_stream: _Stream | None = None
        self._data_flags = 0
        self._data_sid = 0
        self._conn_send_window = DEFAULT_WINDOW
        self._conn_recv_window = settings.connection_window
        self._conn_recv_unacked = 0
        self._closed = False
        self._goaway_sent: int | None = None
        self._goaway_received: int | None = None
        self._now = now
        self._last_recv = now
        self._ping_sent_at: float | None = None
        self._ping_counter = 0
        conn.initiate_connection()
        self._pull_h2(provoked=False)
        if settings.connection_window > DEFAULT_WINDOW:
            self._small += fr.window_update(0, settings.connection_window - DEFAULT_WINDOW)

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        """True once the connection is finished (after ConnectionTerminated)."""
        return self._closed

    @property
    def goaway_sent(self) -> bool:
        return self._goaway_sent is not None

    @property
    def goaway_received(self) -> bool:
        return self._goaway_received is not None

    @property
    def open_streams(self) -> int:
        """Streams still tracked (not ended in both directions, not reset)."""
        return len(self._streams)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` would accept on this stream now (0 if it cannot send)."""
        s = self._streams.get(stream_id)
        if s is None or not s.local_open or not s.established:
            return 0
        return max(0, min(s.send_window, self._conn_send_window))

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self._h2.remote_settings.max_concurrent_streams)

    # ------------------------------------------------------------------ output
    def data_to_send(self) -> bytes:
        """All pending output as one bytes object (convenient for tests; see buffers_to_send)."""
        return b"".join(self.buffers_to_send())

    def buffers_to_send(self) -> list[Buffer]:
        """Pending output as a list of buffers; large payloads are the caller's own objects."""
        if self._small:
            self._out.append(bytes(self._small))
            self._small.clear()
        out, self._out = self._out, []
        return out

    def outbound_drained(self) -> None:
        """Tell the core the transport wrote everything (resets the control-flood counters)."""
        self.guard.on_output_drained()

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes received from the peer; returns the events they caused.

        ``DataReceived.data`` are views of ``data``: the caller must not mutate ``data`` afterwards.
        Never raises for bad input: protocol errors end in ConnectionTerminated.
        """
        if self._closed:
            return []
        self._now = now
        self._last_recv = now
        if self._pending:
            self._pending += data
            if not self._pending_complete():
                return self._take_events()
            data = bytes(self._pending)  # a unit straddled two reads: the only copy on input
            self._pending.clear()
        pos = self._parse(memoryview(data))  # views handed out keep ``data`` alive
        if not self._dead() and pos < len(data):
            self._pending += data[pos:]
        if not self._closed:
            self._flush_batch()
        return self._take_events()

    def _pending_complete(self) -> bool:
        if self._data_left or self._preface_left:
            return True
        if len(self._pending) < fr.HEADER_SIZE:
            return False
        length = self._pending[0] << 16 | self._pending[1] << 8 | self._pending[2]
        if length > self.settings.max_frame_size or self.guard.header_frame_too_big(
            self._pending[3], length
        ):
            return True  # _parse rejects it at once
        if self._pending[3] == fr.DATA and self._fast_path_candidate(self._pending):
            return True
        return len(self._pending) >= fr.HEADER_SIZE + length

    def _fast_path_candidate(self, header: Buffer) -> bool:
        sid = (header[5] << 24 | header[6] << 16 | header[7] << 8 | header[8]) & fr.STREAM_ID_MASK
        s = self._streams.get(sid)
        return s is not None and s.remote_open and not header[4] & fr.FLAG_PADDED

    def _dead(self) -> bool:
        # A method, not the attribute, so type narrowing does not assume it is still False.
        return self._closed

    def _take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _parse(self, mv: memoryview) -> int:
        end = len(mv)
        pos: int = 0
        max_frame = self.settings.max_frame_size
        guard = self.guard
        while not self._closed:
            if self._data_left:
                k = min(self._data_left, end - pos)
                if k == 0:
                    return pos
                s = self._data_stream
                if s is not None and s.remote_open and s.id in self._streams:
                    self._events.append(
                        DataReceived(
                            stream_id=s.id, data=mv[pos : pos + k], flow_controlled_length=k
                        )
                    )
                else:
                    self._refund_connection(k)  # stream died mid-frame; nobody will ack it
                pos += k
                self._data_left -= k
                if self._data_left:
                    return pos
                if self._data_flags & fr.FLAG_END_STREAM:
                    self._batch.append(
                        fr.frame_header(0, fr.DATA, fr.FLAG_END_STREAM, self._data_sid)
                    )
                continue
            if self._preface_left:
                k = min(self._preface_left, end - pos)
                if k == 0:
                    return pos
                self._batch.append(mv[pos : pos + k])
                self._preface_left -= k
                pos += k
                continue
            if end - pos < fr.HEADER_SIZE:
                return pos
            hi, lo, ftype, flags, sid = fr.HEADER.unpack_from(mv, pos)
            length = hi << 8 | lo
            sid &= fr.STREAM_ID_MASK
            if length > max_frame:
                self._fatal(
                    ErrorCodes.FRAME_SIZE_ERROR, f"frame of {length} bytes exceeds {max_frame}"
                )
                return pos
            if ftype == fr.DATA and not guard.in_header_block:
                if self._batch:
                    self._flush_batch()
                    if self._dead():
                        return pos
                s = self._streams.get(sid)
                if s is not None and s.remote_open and not flags & fr.FLAG_PADDED:
                    pos += fr.HEADER_SIZE
                    self._start_fast_data(s, sid, flags, length)
                    continue
                if end - pos < fr.HEADER_SIZE + length:
                    return pos
                self._whole_data(
                    sid, flags, mv[pos + fr.HEADER_SIZE : pos + fr.HEADER_SIZE + length]
                )
                pos += fr.HEADER_SIZE + length
                continue
            # Size limits act on the declared length, before buffering the payload; the
            # stateful counters run once per frame, when it is complete.
            trip = guard.header_frame_too_big(ftype, length)
            if trip is None and end - pos < fr.HEADER_SIZE + length:
                return pos
            if trip is None:
                trip = self._check_header(ftype, flags, length)
            if trip is not None:
                self._trip(trip)
                return pos
            frame = mv[pos : pos + fr.HEADER_SIZE + length]
            pos += fr.HEADER_SIZE + length
            if guard.in_header_block or ftype not in (fr.WINDOW_UPDATE, fr.GOAWAY):
                self._batch.append(frame)
                continue
            if self._batch:
                self._flush_batch()
                if self._dead():
                    return pos
            if ftype == fr.WINDOW_UPDATE:
                self._on_window_update(sid, frame[fr.HEADER_SIZE :])
            else:
                self._on_goaway(sid, frame[fr.HEADER_SIZE :])
        return pos

    def _check_header(self, ftype: int, flags: int, length: int) -> GuardTrip | None:
        guard = self.guard
        if ftype == fr.HEADERS or ftype == fr.PUSH_PROMISE:
            return guard.on_headers_frame(length, bool(flags & fr.FLAG_END_HEADERS))
        if ftype == fr.CONTINUATION:
            return guard.on_continuation_frame(length, bool(flags & fr.FLAG_END_HEADERS))
        if guard.in_header_block:
            return None  # h2 rejects the interloper with a connection error
        if ftype == fr.RST_STREAM:
            return guard.on_reset_received(self._now)
        if ftype == fr.PING or ftype == fr.SETTINGS:
            return None if flags & fr.FLAG_ACK else guard.on_control_frame_received(self._now)
        if ftype == fr.PRIORITY or ftype > fr.CONTINUATION:
            return guard.on_glitch()
        return None

    def _start_fast_data(self, s: _Stream, sid: int, flags: int, length: int) -> None:
        if length > self._conn_recv_window:
            self._fatal(ErrorCodes.FLOW_CONTROL_ERROR, "peer overran the connection window")
            return
        self._conn_recv_window -= length
        self._data_sid = sid
        self._data_flags = flags
        self._data_left = length
        self._data_stream = s
        if length > s.recv_window:
            self._data_stream = None  # payload is discarded and refunded
            self._reset_for_error(s, ErrorCodes.FLOW_CONTROL_ERROR)
            self._data_flags = 0
            return
        s.recv_window -= length
        if length == 0:
            if flags & fr.FLAG_END_STREAM:
                self._batch.append(fr.frame_header(0, fr.DATA, fr.FLAG_END_STREAM, sid))
            else:
                trip = self.guard.on_glitch()
                if trip is not None:
                    self._trip(trip)

    def _whole_data(self, sid: int, flags: int, payload: memoryview) -> None:
        flow = len(payload)
        data = payload
        if flags & fr.FLAG_PADDED:
            if flow == 0 or payload[0] >= flow:
                self._fatal(ErrorCodes.PROTOCOL_ERROR, "DATA padding exceeds the frame")
                return
            data = payload[1 : flow - payload[0]]
        if flow > self._conn_recv_window:
            self._fatal(ErrorCodes.FLOW_CONTROL_ERROR, "peer overran the connection window")
            return
        self._conn_recv_window -= flow
        s = self._streams.get(sid)
        if s is None or not s.remote_open:
            # Rule 1: h2 judges DATA on an untracked stream from a zero-length copy.
            self._refund_connection(flow)
            self._batch.append(fr.frame_header(0, fr.DATA, flags & fr.FLAG_END_STREAM, sid))
            return
        if flow > s.recv_window:
            self._refund_connection(flow)
            self._reset_for_error(s, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        s.recv_window -= flow
        if data:
            self._events.append(
                DataReceived(stream_id=sid, data=data, flow_controlled_length=len(data))
            )
        elif not flags & fr.FLAG_END_STREAM:
            trip = self.guard.on_glitch()
            if trip is not None:
                self._trip(trip)
                return
        if flow > len(data):
            self.acknowledge_data(sid, flow - len(data))  # padding is ours to give back
        if flags & fr.FLAG_END_STREAM:
            self._batch.append(fr.frame_header(0, fr.DATA, fr.FLAG_END_STREAM, sid))

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            self._fatal(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
            return
        trip = self.guard.on_window_update_received()
        if trip is not None:
            self._trip(trip)
            return
        increment = fr.U32.unpack(payload)[0] & fr.STREAM_ID_MASK
        if sid == 0:
            if increment == 0:
                self._fatal(ErrorCodes.PROTOCOL_ERROR, "connection WINDOW_UPDATE of 0")
                return
            self._conn_send_window += increment
            if self._conn_send_window > MAX_WINDOW:
                self._fatal(ErrorCodes.FLOW_CONTROL_ERROR, "connection send window overflow")
                return
            self._events.append(WindowUpdated(stream_id=0))
            return
        s = self._streams.get(sid)
        if s is None:
            self._batch.append(fr.window_update(sid, increment))  # rule 3: h2 judges it
            return
        if increment == 0:
            self._reset_for_error(s, ErrorCodes.PROTOCOL_ERROR)
            return
        s.send_window += increment
        if s.send_window > MAX_WINDOW:
            self._reset_for_error(s, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        self._events.append(WindowUpdated(stream_id=sid))

    def _on_goaway(self, sid: int, payload: memoryview) -> None:
        if sid != 0:
            self._fatal(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
            return
        if len(payload) < 8:
            self._fatal(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            return
        last, code = fr.GOAWAY_FIXED.unpack_from(payload)
        last &= fr.STREAM_ID_MASK
        if self._goaway_received is not None:
            last = min(last, self._goaway_received)
        self._goaway_received = last
        self._events.append(
            GoAwayReceived(error_code=code, last_stream_id=last, additional_data=bytes(payload[8:]))
        )
        own = 1 if self.client_side else 0
        for stream_id in [i for i in self._streams if i > last and i % 2 == own]:
            del self._streams[stream_id]
            self._events.append(
                StreamReset(stream_id=stream_id, error_code=ErrorCodes.REFUSED_STREAM, remote=True)
            )

    def _flush_batch(self) -> None:
        if not self._batch or self._closed:
            self._batch.clear()
            return
        blob = b"".join(self._batch)
        self._batch.clear()
        try:
            h2_events = self._h2.receive_data(blob)
        except h2.exceptions.ProtocolError as err:
            self._pull_h2(provoked=False)
            self._terminated(
                int(err.error_code or ErrorCodes.PROTOCOL_ERROR), str(err), remote=False
            )
            return
        self._pull_h2(provoked=True)
        for event in h2_events:
            if self._dead():
                return
            self._on_h2_event(event)

    def _on_h2_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.StreamEnded):
            s = self._streams.get(event.stream_id)
            if s is not None and s.remote_open:
                s.remote_open = False
                self._events.append(StreamEnded(stream_id=s.id))
                self._maybe_forget(s)
        elif isinstance(event, h2.events.StreamReset):
            if self._streams.pop(event.stream_id, None) is not None:
                self._events.append(
                    StreamReset(
                        stream_id=event.stream_id,
                        error_code=int(event.error_code or 0),
                        remote=bool(event.remote_reset),
                    )
                )
        elif isinstance(event, h2.events.RequestReceived):
            self._on_request(event)
        elif isinstance(event, h2.events.ResponseReceived):
            self._on_response(event)
        elif isinstance(event, h2.events.TrailersReceived):
            # RFC 9113 §8.5: only DATA and stream management frames on a CONNECT stream.
            s = self._streams.get(event.stream_id or 0)
            if s is not None:
                self._reset_for_error(s, ErrorCodes.PROTOCOL_ERROR)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            changed = event.changed_settings.get(SettingCodes.INITIAL_WINDOW_SIZE)
            if changed is not None and changed.original_value is not None:
                delta = int(changed.new_value) - int(changed.original_value)
                for s in self._streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        self._fatal(ErrorCodes.FLOW_CONTROL_ERROR, "SETTINGS overflowed a window")
                        return
                if delta > 0:
                    self._events.append(WindowUpdated(stream_id=0))
        elif isinstance(event, h2.events.PingAckReceived):
            self._ping_sent_at = None

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        raise HboneError("a client connection received a request")  # pragma: no cover

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        raise HboneError("a server connection received a response")  # pragma: no cover

    # ------------------------------------------------------------------ flow control
    def acknowledge_data(self, stream_id: int, nbytes: int) -> None:
        """The application consumed ``nbytes`` of ``DataReceived.flow_controlled_length``.

        WINDOW_UPDATEs are batched (a quarter of a window at a time) to keep frame counts low.
        """
        if nbytes <= 0 or self._closed:
            return
        self._refund_connection(nbytes)
        s = self._streams.get(stream_id)
        if s is not None and s.remote_open:
            s.recv_unacked += nbytes
            if s.recv_unacked >= self.settings.stream_window >> 2:
                self._small += fr.window_update(stream_id, s.recv_unacked)
                s.recv_window += s.recv_unacked
                s.recv_unacked = 0

    def _refund_connection(self, nbytes: int) -> None:
        self._conn_recv_unacked += nbytes
        if self._conn_recv_unacked >= self.settings.connection_window >> 2:
            self._small += fr.window_update(0, self._conn_recv_unacked)
            self._conn_recv_window += self._conn_recv_unacked
            self._conn_recv_unacked = 0

    # ------------------------------------------------------------------ sending
    def send_data(self, stream_id: int, data: Buffer, *, end_stream: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; returns how many bytes were taken.

        Large payloads are referenced, not copied: do not mutate ``data`` afterwards. With
        ``end_stream`` the stream is half-closed once (and only if) all of ``data`` was taken.
        """
        s = self._sendable(stream_id)
        total = len(data)
        allowed = min(total, s.send_window, self._conn_send_window)
        if allowed > 0:
            mv = data if isinstance(data, memoryview) else memoryview(data)
            max_frame = int(self._h2.max_outbound_frame_size)
            sent = 0
            small = self._small
            frames = 0
            while sent < allowed:
                k = min(max_frame, allowed - sent)
                small += fr.HEADER.pack(k >> 8, k & 0xFF, fr.DATA, 0, stream_id)
                if k >= _LARGE:
                    self._out.append(bytes(small))
                    small.clear()
                    self._out.append(mv[sent : sent + k])
                else:
                    small += mv[sent : sent + k]
                sent += k
                frames += 1
            s.send_window -= allowed
            self._conn_send_window -= allowed
            self.guard.data_frames_sent += frames
        if end_stream and allowed == total:
            self._end(s)
        return max(allowed, 0)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction of the stream (END_STREAM)."""
        self._end(self._sendable(stream_id))

    def _sendable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None:
            raise StreamClosedError(stream_id, "is not open")
        if not s.established:
            raise StreamClosedError(stream_id, "tunnel is not established")
        if not s.local_open:
            raise StreamClosedError(stream_id, "already half-closed by us")
        return s

    def _end(self, s: _Stream) -> None:
        s.local_open = False
        self._h2.end_stream(s.id)
        self._pull_h2(provoked=False)
        self._maybe_forget(s)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM). No-op if it is already gone."""
        self._streams.pop(stream_id, None)
        if self._closed:
            return
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            pass  # h2 already considers it closed
        self._pull_h2(provoked=False)

    def _reset_for_error(self, s: _Stream, code: int) -> None:
        self.reset(s.id, code)
        self._events.append(StreamReset(stream_id=s.id, error_code=code, remote=False))
        trip = self.guard.on_local_error_reset()
        if trip is not None:
            self._trip(trip)

    def _maybe_forget(self, s: _Stream) -> None:
        if not s.local_open and not s.remote_open:
            self._streams.pop(s.id, None)

    # ------------------------------------------------------------------ connection end
    def drain(self) -> None:
        """Graceful GOAWAY: no new streams, existing ones may finish."""
        if self._closed or self._goaway_sent is not None:
            return
        last = int(self._h2.highest_inbound_stream_id)
        self._goaway_sent = last
        self._small += fr.goaway(last, ErrorCodes.NO_ERROR)

    def close(self, error_code: int = ErrorCodes.NO_ERROR, reason: str = "closed locally") -> None:
        """Immediate GOAWAY and termination (queues ConnectionTerminated)."""
        self._fatal(error_code, reason)

    def _trip(self, trip: GuardTrip) -> None:
        self._fatal(trip.error_code, trip.reason)

    def _fatal(self, error_code: int, reason: str) -> None:
        if self._closed:
            return
        last = int(self._h2.highest_inbound_stream_id)
        self._small += fr.goaway(last, error_code, reason.encode("ascii", "replace")[:256])
        self._terminated(error_code, reason, remote=False)

    def _terminated(self, error_code: int, reason: str, *, remote: bool) -> None:
        self._closed = True
        self._data_left = 0
        self._batch.clear()
        self._pending.clear()
        self._streams.clear()
        self._events.append(
            ConnectionTerminated(error_code=error_code, reason=reason, remote=remote)
        )

    def connection_lost(self) -> list[Event]:
        """The transport closed under us; returns the final ConnectionTerminated (once)."""
        if not self._closed:
            self._terminated(ErrorCodes.NO_ERROR, "transport closed", remote=True)
        return self._take_events()

    # ------------------------------------------------------------------ h2 output
    def _pull_h2(self, *, provoked: bool) -> None:
        out = self._h2.data_to_send()
        if not out:
            return
        self._small += out
        # Rule 5, and the flood guard: look at what h2 queued in answer to the peer.
        pos, end, count = 0, len(out), 0
        while pos + fr.HEADER_SIZE <= end:
            hi, lo, ftype, _flags, sid = fr.HEADER.unpack_from(out, pos)
            if ftype == fr.RST_STREAM:
                sid &= fr.STREAM_ID_MASK
                if self._streams.pop(sid, None) is not None:
                    code = fr.U32.unpack_from(out, pos + fr.HEADER_SIZE)[0]
                    self._events.append(StreamReset(stream_id=sid, error_code=code, remote=False))
                    trip = self.guard.on_local_error_reset()
                    if trip is not None:
                        self._trip(trip)
            if ftype != fr.DATA and ftype != fr.HEADERS:
                count += 1
            pos += fr.HEADER_SIZE + (hi << 8 | lo)
        if provoked and count:
            trip = self.guard.on_provoked_frames_queued(count, len(out))
            if trip is not None:
                self._trip(trip)

    # ------------------------------------------------------------------ timers
    def get_timer(self) -> float | None:
        """When ``handle_timer`` should next be called (loop time), or None."""
        if self._closed:
            return None
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.settings.keepalive_timeout
        return self._last_recv + self.settings.keepalive_interval

    def handle_timer(self, now: float) -> list[Event]:
        """Run keepalive (and, on the server, first-CONNECT and idle) deadlines."""
        if self._closed:
            return []
        self._now = now
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self.settings.keepalive_timeout:
                self._terminated(ErrorCodes.NO_ERROR, "keepalive PING unanswered", remote=False)
        elif now >= self._last_recv + self.settings.keepalive_interval:
            self._ping_counter += 1
            self._h2.ping(self._ping_counter.to_bytes(8, "big"))
            self._pull_h2(provoked=False)
            self._ping_sent_at = now
        return self._take_events()


class HboneServerConnection(HboneConnection):
    """Server side: turns CONNECTs into TunnelRequested; you answer with accept() or reject()."""

    def __init__(
        self,
        *,
        now: float,
        settings: H2Settings = SERVER_SETTINGS,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(client_side=False, settings=settings, limits=limits, now=now)
        self._held: set[int] = set()
        self._created = now
        self._idle_since: float | None = now
        self._any_stream = False

    @property
    def held_streams(self) -> int:
        """Streams handed to the application and not yet released."""
        return len(self._held)

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = int(event.stream_id or 0)
        if self._goaway_sent is not None and sid > self._goaway_sent:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        try:
            request = validate_connect_request(list(event.headers or ()))
        except RequestError as err:
            self._h2.send_headers(sid, response_headers(err.status), end_stream=True)
            self.reset(sid, ErrorCodes.NO_ERROR)  # RFC 9113 §8.1: stop the request body
            self._events.append(TunnelRequestInvalid(stream_id=sid, reason=str(err)))
            trip = self.guard.on_local_error_reset()
            if trip is not None:
                self._trip(trip)
            return
        if not self.guard.admit_stream(len(self._held)):
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            if self.guard.lifetime_exhausted:
                self.drain()
            return
        self._any_stream = True
        self._idle_since = None
        self._streams[sid] = _Stream(
            sid, int(self._h2.remote_settings.initial_window_size), self.settings.stream_window
        )
        self._held.add(sid)
        self._events.append(
            TunnelRequested(stream_id=sid, authority=request.authority, headers=request.headers)
        )
        if self.guard.lifetime_exhausted:
            self.drain()

    def accept(self, stream_id: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer 200: the upstream is connected, data may flow."""
        s = self._streams.get(stream_id)
        if s is None or s.established:
            raise StreamClosedError(stream_id, "cannot be accepted (reset, or answered already)")
        self._h2.send_headers(stream_id, response_headers(200, headers))
        self._pull_h2(provoked=False)
        s.established = True

    def reject(self, stream_id: int, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Answer a non-200 status (401 policy, 503 upstream, ...) and close the stream."""
        if status == 200:
            raise ValueError("reject() needs a non-200 status; use accept()")
        s = self._streams.get(stream_id)
        if s is None or s.established:
            raise StreamClosedError(stream_id, "cannot be rejected (reset, or answered already)")
        del self._streams[stream_id]
        self._h2.send_headers(stream_id, response_headers(status, headers), end_stream=True)
        self.reset(stream_id, ErrorCodes.NO_ERROR)

    def release(self, stream_id: int) -> None:
        """The application finished all work for the stream (upstream closed, task ended)."""
        self._held.discard(stream_id)
        if not self._held and self._idle_since is None:
            self._idle_since = self._now

    def get_timer(self) -> float | None:
        timer = super().get_timer()
        if timer is None:
            return None
        if not self._any_stream:
            timer = min(timer, self._created + self.limits.first_connect_timeout)
        if self._idle_since is not None and self.limits.idle_timeout is not None:
            timer = min(timer, self._idle_since + self.limits.idle_timeout)
        return timer

    def handle_timer(self, now: float) -> list[Event]:
        if not self._closed:
            if not self._any_stream and now >= self._created + self.limits.first_connect_timeout:
                self._fatal(ErrorCodes.NO_ERROR, "no CONNECT within the first-CONNECT timeout")
            elif (
                self._idle_since is not None
                and self.limits.idle_timeout is not None
                and now >= self._idle_since + self.limits.idle_timeout
            ):
                self._fatal(ErrorCodes.NO_ERROR, "idle timeout")
        return super().handle_timer(now) if not self._closed else self._take_events()


class HboneClientConnection(HboneConnection):
    """Client side: ``open_tunnel()`` sends a CONNECT; the answer is TunnelEstablished/Rejected."""

    def __init__(
        self,
        *,
        now: float,
        settings: H2Settings = CLIENT_SETTINGS,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(client_side=True, settings=settings, limits=limits, now=now)
        self._opened = 0

    @property
    def available_streams(self) -> int:
        """How many more tunnels this connection may open right now."""
        if self._closed or self._goaway_received is not None or self._goaway_sent is not None:
            return 0
        cap = min(self.settings.max_concurrent_streams, self.peer_max_concurrent_streams)
        in_use = max(len(self._streams), int(self._h2.open_outbound_streams))
        lifetime_left = self.limits.max_lifetime_streams - self._opened
        return max(0, min(cap - in_use, lifetime_left))

    def open_tunnel(
        self, authority: Authority | str, headers: Iterable[tuple[str, str]] = ()
    ) -> int:
        """Send a CONNECT to ``authority`` with extra ``headers``; returns the stream id."""
        if self.available_streams <= 0:
            raise TooManyStreamsError("no stream available on this connection")
        request = connect_request_headers(authority, headers)
        sid = int(self._h2.get_next_available_stream_id())
        self._h2.send_headers(sid, request)
        self._pull_h2(provoked=False)
        self._opened += 1
        self.guard.streams_opened += 1
        self._streams[sid] = _Stream(
            sid, int(self._h2.remote_settings.initial_window_size), self.settings.stream_window
        )
        return sid

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        sid = int(event.stream_id or 0)
        s = self._streams.get(sid)
        if s is None:
            return
        raw = list(event.headers or ())
        status = next((int(v) for k, v in raw if k == b":status"), 0)
        headers = decode_headers(raw)
        if status == 200:
            s.established = True
            self._events.append(TunnelEstablished(stream_id=sid, headers=headers))
            return
        self._events.append(TunnelRejected(stream_id=sid, status=status, headers=headers))
        self.reset(sid, ErrorCodes.CANCEL)

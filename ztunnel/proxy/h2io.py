"""asyncio driver of one sans-IO HBONE connection, and the per-tunnel stream handle.

Owns moving bytes between an asyncio (TLS) transport and ``ztunnel.hbone`` connection cores: feeding
``receive_data``, writing ``buffers_to_send``, re-arming the single keepalive timer (aioquic style),
dispatching events to :class:`HboneStream` objects, and backpressure (a stream stops taking data while
the transport is paused or its window is shut; acknowledgements to the peer wait until the consumer
took the bytes). The peer's SPIFFE identity is verified in ``connection_made``, before the first byte
is written or read. Protocol decisions stay in the core.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from ztunnel.hbone.connection import Buffer, HboneClientConnection, HboneConnection
from ztunnel.hbone.errors import ErrorCodes, HboneError
from ztunnel.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelEstablished,
    TunnelRejected,
    WindowUpdated,
)
from ztunnel.identity.spiffe import SpiffeId

# Data a stream buffers for sending before its producer is paused (edge profile: 256 KiB).
SEND_BUFFER_CAP = 256 * 1024


class TunnelError(HboneError):
    """A tunnel failed: reset by the peer, connection lost, or refused."""


class HboneStatusError(TunnelError):
    """The server answered the CONNECT with a non-200 status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HBONE CONNECT answered with status {status}")
        self.status = status


class StreamRefusedError(TunnelError):
    """The server did not process the stream: RST_STREAM(REFUSED_STREAM), or the stream is above
    the last-stream-id of a GOAWAY. Nothing of it reached the application, so it is safe to retry
    on another connection (RFC 9113 §8.7)."""

    def __init__(self, stream_id: int, why: str) -> None:
        super().__init__(f"stream {stream_id} refused by the server ({why})")
        self.stream_id = stream_id


class Receiver(Protocol):
    """Push-mode consumer of a stream's data (used by ``copy``); it calls ``stream.ack(n)``."""

    def data_received(self, data: memoryview) -> None: ...

    def eof_received(self) -> None: ...

    def stream_reset(self, exc: BaseException) -> None: ...


class HboneStream:
    """One tunnel. Pull mode: ``await read()``; push mode: ``set_receiver``. Send: ``write``."""

    def __init__(self, proto: HboneProtocol, stream_id: int) -> None:
        self.proto = proto
        self.stream_id = stream_id
        loop = proto.loop
        self.established: asyncio.Future[tuple[tuple[str, str], ...]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.bytes_received = 0
        self.bytes_sent = 0
        self._recv: deque[memoryview] = deque()
        self._eof = False
        self._error: BaseException | None = None
        self._read_waiter: asyncio.Future[None] | None = None
        self._receiver: Receiver | None = None
        self._send: deque[memoryview] = deque()
        self._send_buffered = 0
        self._eof_pending = False
        self._local_ended = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.on_writable: Callable[[], None] | None = None
        """Called when buffered outbound data fell below half the cap (resume a producer)."""

    # ---------------------------------------------------------------- receive
    def set_receiver(self, receiver: Receiver) -> None:
        """Switch to push mode; data buffered so far is delivered first."""
        self._receiver = receiver
        while self._recv:
            receiver.data_received(self._recv.popleft())
        if self._error is not None:
            receiver.stream_reset(self._error)
        elif self._eof:
            receiver.eof_received()

    def ack(self, nbytes: int) -> None:
        """Push mode: ``nbytes`` were consumed; the peer may send that much more."""
        self.proto.ack(self.stream_id, nbytes)

    async def read(self, max_bytes: int = -1) -> bytes:
        """Next bytes of the tunnel (b"" at end of stream); raises TunnelError after a reset."""
        while not self._recv:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._read_waiter = self.proto.loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None
        chunk = self._recv.popleft()
        if 0 <= max_bytes < len(chunk):
            self._recv.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.proto.ack(self.stream_id, len(chunk))
        return bytes(chunk)

    async def readexactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n > 0:
            chunk = await self.read(n)
            if not chunk:
                raise TunnelError(f"stream {self.stream_id} ended {n} bytes early")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def _on_data(self, data: memoryview) -> None:
        self.bytes_received += len(data)
        if self._receiver is not None:
            self._receiver.data_received(data)
            return
        self._recv.append(data)
        self._wake_reader()

    def _on_eof(self) -> None:
        self._eof = True
        if self._receiver is not None:
            self._receiver.eof_received()
        self._wake_reader()
        self._maybe_closed()

    def _on_error(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        self._send.clear()
        self._send_buffered = 0
        if not self.established.done():
            self.established.set_exception(exc)
            self.established.exception()  # mark retrieved: nobody may await a failed open
        if self._receiver is not None:
            self._receiver.stream_reset(exc)
        self._wake_reader()
        self._wake_drain()
        if not self.closed.done():
            self.closed.set_result(None)

    def _wake_reader(self) -> None:
        w = self._read_waiter
        if w is not None and not w.done():
            w.set_result(None)

    # ---------------------------------------------------------------- send
    @property
    def send_buffered(self) -> int:
        return self._send_buffered

    def write(self, data: Buffer) -> None:
        """Queue ``data`` (not copied: do not mutate it). Sent as windows and the transport allow."""
        if self._error is not None:
            raise self._error
        if self._eof_pending or self._local_ended:
            raise TunnelError(f"stream {self.stream_id}: write after write_eof")
        if not data:
            return
        proto = self.proto
        conn = proto.conn
        if not self._send and not proto._paused and not conn.closed:
            # Fast path (every small write of a request/response exchange): nothing queued, so
            # hand the bytes straight to the core; only a remainder the windows refuse is queued.
            try:
                taken = conn.send_data(self.stream_id, data)
            except HboneError as err:
                self._on_error(TunnelError(str(err)))
                return
            self.bytes_sent += taken
            proto.flush_soon()
            if taken == len(data):
                return
            data = memoryview(data)[taken:]
        self._send.append(data if isinstance(data, memoryview) else memoryview(data))
        self._send_buffered += len(data)
        proto.pump(self)

    def write_eof(self) -> None:
        """Half-close our direction once queued data is sent."""
        if self._error is not None or self._eof_pending or self._local_ended:
            return
        self._eof_pending = True
        self.proto.pump(self)

    async def drain(self) -> None:
        """Wait until buffered outbound data is below the cap."""
        while self._send_buffered >= SEND_BUFFER_CAP and self._error is None:
            self._drain_waiter = self.proto.loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None
        if self._error is not None:
            raise self._error

    def _wake_drain(self) -> None:
        w = self._drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        if self.on_writable is not None and self._send_buffered < SEND_BUFFER_CAP // 2:
            self.on_writable()

    def reset(self, error_code: int = ErrorCodes.CANCEL) -> None:
        """Abort the tunnel (RST_STREAM)."""
        self.proto.reset_stream(self, error_code)

    @property
    def done(self) -> bool:
        return self.closed.done()

    def _maybe_closed(self) -> None:
        if self._eof and self._local_ended and not self.closed.done():
            self.closed.set_result(None)
            self.proto.forget(self)

    def __repr__(self) -> str:
        return (
            f"<HboneStream {self.stream_id} sent={self.bytes_sent} received={self.bytes_received}>"
        )


class HboneProtocol(asyncio.Protocol):
    """asyncio protocol around one HboneConnection (client or server)."""

    def __init__(
        self,
        conn: HboneConnection,
        loop: asyncio.AbstractEventLoop,
        *,
        verify: Callable[[ssl.SSLObject], SpiffeId] | None = None,
        on_event: Callable[[HboneProtocol, Event], None] | None = None,
    ) -> None:
        self.conn = conn
        self.loop = loop
        self.streams: dict[int, HboneStream] = {}
        self.peer_identity: SpiffeId | None = None
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._verify = verify
        self._on_event = on_event
        self._paused = False
        self._blocked: set[HboneStream] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._in_callback = False
        self._flush_soon = False

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        if self._verify is not None:
            # Identity first: nothing is written or read before the peer is known to be right.
            try:
                sslobj = transport.get_extra_info("ssl_object")
                if sslobj is None:
                    raise TunnelError("HBONE requires TLS")
                self.peer_identity = self._verify(sslobj)
            except Exception as err:
                self._fail_ready(err)
                self.transport.abort()
                return
        self.ready.set_result(None)
        self.flush()
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        self._in_callback = True
        try:
            events = self.conn.receive_data(data, self.loop.time())
            for event in events:
                self._dispatch(event)
        finally:
            self._in_callback = False
        self.flush()
        self._arm_timer()

    def eof_received(self) -> bool | None:
        return None  # HTTP/2 has no half-closed connections: close.

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self.conn.outbound_drained()
        for stream in list(self._blocked):
            self.pump(stream)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_ready(exc or TunnelError("connection closed during set-up"))
        for event in self.conn.connection_lost():
            self._dispatch(event)
        self._fail_all(
            TunnelError(f"HBONE connection lost: {exc}" if exc else "HBONE connection closed")
        )
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed.done():
            self.closed.set_result(None)

    # ---------------------------------------------------------------- plumbing
    def _fail_ready(self, exc: BaseException) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()

    def flush_soon(self) -> None:
        """Write pending output at the end of this loop iteration (one TLS record, one syscall).

        Every TCP read of a spliced connection queues a DATA frame; with many tunnels on one
        connection the reads of one loop iteration then share a single TLS record and ``send``
        instead of one each (bench.lab_bench / bench.hbone_loopback request rate). Ordering is kept: all output goes through
        the core's single queue, and a synchronous ``flush()`` (close, reset) takes it all."""
        if self._in_callback or self._flush_soon:
            return  # data_received flushes at its end / already scheduled
        self._flush_soon = True
        self.loop.call_soon(self._flush_deferred)

    def _flush_deferred(self) -> None:
        self._flush_soon = False
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self._in_callback:
            return
        buffers = self.conn.buffers_to_send()
        if buffers:
            if transport.is_closing():
                return
            # One write per flush: uvloop's SSL transport makes a TLS record (and a syscall) per
            # buffer of writelines, which costs more than joining (measured: bench/hbone_loopback).
            transport.write(buffers[0] if len(buffers) == 1 else b"".join(buffers))
            if transport.get_write_buffer_size() == 0:
                self.conn.outbound_drained()
        if self.conn.closed and not transport.is_closing():
            transport.close()  # flushes the final GOAWAY

    def _arm_timer(self) -> None:
        when = self.conn.get_timer()
        if when is None:
            return
        if self._timer is not None and self._timer_at is not None and self._timer_at <= when:
            return  # fires early at worst, then re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        for event in self.conn.handle_timer(self.loop.time()):
            self._dispatch(event)
        self.flush()
        if self.conn.closed and self.transport is not None:
            self.transport.abort()
            return
        self._arm_timer()

    def _dispatch(self, event: Event) -> None:
        if type(event) is DataReceived:  # the hot path: exact type, no isinstance chain
            stream = self.streams.get(event.stream_id)
            if stream is None:
                self.conn.acknowledge_data(event.stream_id, event.flow_controlled_length)
            else:
                stream._on_data(event.data)
            return
        if isinstance(event, WindowUpdated):
            if event.stream_id == 0:
                for blocked in list(self._blocked):
                    self.pump(blocked)
            else:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self.pump(stream)
            return
        if isinstance(event, StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._on_eof()
        elif isinstance(event, StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                self._blocked.discard(stream)
                exc: TunnelError
                if event.remote and event.error_code == ErrorCodes.REFUSED_STREAM:
                    goaway = self.conn.goaway_received
                    exc = StreamRefusedError(
                        event.stream_id, "above the GOAWAY last-stream-id" if goaway else "reset"
                    )
                else:
                    exc = TunnelError(f"stream {event.stream_id} reset (error {event.error_code})")
                stream._on_error(exc)
        elif isinstance(event, TunnelEstablished):
            stream = self.streams.get(event.stream_id)
            if stream is not None and not stream.established.done():
                stream.established.set_result(event.headers)
        elif isinstance(event, TunnelRejected):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                stream._on_error(HboneStatusError(event.status))
        elif isinstance(event, ConnectionTerminated):
            self._fail_all(TunnelError(f"HBONE connection terminated: {event.reason}"))
        elif isinstance(event, GoAwayReceived):
            pass
        if self._on_event is not None:
            self._on_event(self, event)

    def _fail_all(self, exc: BaseException) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for stream in streams:
            stream._on_error(exc)

    # ---------------------------------------------------------------- used by streams
    def add_stream(self, stream_id: int) -> HboneStream:
        stream = HboneStream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def forget(self, stream: HboneStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._blocked.discard(stream)

    def ack(self, stream_id: int, nbytes: int) -> None:
        self.conn.acknowledge_data(stream_id, nbytes)
        self.flush_soon()

    def pump(self, stream: HboneStream) -> None:
        """Move a stream's queued data into the core as far as windows and the transport allow."""
        if self._paused or self.conn.closed:
            self._blocked.add(stream)
            return
        queue = stream._send
        sid = stream.stream_id
        conn = self.conn
        try:
            while queue:
                head = queue[0]
                taken = conn.send_data(sid, head)
                stream.bytes_sent += taken
                stream._send_buffered -= taken
                if taken < len(head):
                    queue[0] = head[taken:]
                    break
                queue.popleft()
            if not queue and stream._eof_pending and not stream._local_ended:
                stream._eof_pending = False
                stream._local_ended = True
                conn.end_stream(sid)
        except HboneError as err:
            stream._on_error(TunnelError(str(err)))
            return
        if queue:
            self._blocked.add(stream)
        else:
            self._blocked.discard(stream)
        self.flush_soon()
        stream._wake_drain()
        if stream._local_ended:
            stream._maybe_closed()

    def reset_stream(self, stream: HboneStream, error_code: int) -> None:
        self.streams.pop(stream.stream_id, None)
        self._blocked.discard(stream)
        self.conn.reset(stream.stream_id, error_code)
        stream._on_error(TunnelError(f"stream {stream.stream_id} reset locally"))
        self.flush()

    def open_stream(self, authority: str, headers: list[tuple[str, str]]) -> HboneStream:
        """Client: send a CONNECT now (synchronously reserves the stream slot)."""
        conn = self.conn
        assert isinstance(conn, HboneClientConnection)
        sid = conn.open_tunnel(authority, headers)
        stream = self.add_stream(sid)
        self.flush()
        return stream

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.conn.close()
            self.flush()
            self.transport.close()

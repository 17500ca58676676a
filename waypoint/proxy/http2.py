"""HTTP/2 (prior knowledge, gRPC included) over a `ByteStream` with the sans-IO ``h2`` library.

Owns the asyncio driver of one h2 connection, client or server: a reader task feeding
``receive_data`` and dispatching events to `H2Stream` objects; writes with transport backpressure;
flow control in both directions (a received chunk is acknowledged only when the consumer read it,
so a slow reader throttles its peer; a sender waits for window updates). The server side starts a
task per request stream (`serve_http2`); the client side opens streams on demand (`H2Conn.open`)
for the upstream pool. Messages stream in both directions, which gRPC bidirectional calls need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from waypoint.proxy.exchange import Headers, InboundRequest, ResponseSink
from waypoint.proxy.streams import ByteStream

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME = 1024 * 1024 - 1
MAX_CONCURRENT_STREAMS = 200


class H2StreamError(ConnectionError):
    """The stream was reset or its connection went away."""


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _headers(raw: object) -> Headers:
    assert isinstance(raw, list)
    return [(_text(k).lower(), _text(v)) for k, v in raw]


def _sender(
    stream_id: int, chunk: bytes, end_stream: bool
) -> Callable[[h2.connection.H2Connection], object]:
    def send(h2c: h2.connection.H2Connection) -> object:
        h2c.send_data(stream_id, chunk, end_stream=end_stream)
        return None

    return send


class H2Stream:
    """One HTTP/2 stream: received headers, a readable body with trailers, and a writer."""

    def __init__(self, conn: H2Conn, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        loop = asyncio.get_running_loop()
        self.headers: asyncio.Future[Headers] = loop.create_future()
        self.trailers: Headers = []
        self.remote_ended = False
        self.headers_ended = False
        """END_STREAM came with the headers (a request without a body)."""
        self.local_ended = False
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- receiving
    async def read(self) -> bytes:
        """Next body chunk; b"" at END_STREAM. Raises H2StreamError on reset."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.remote_ended:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, flow = self._chunks.popleft()
        self.conn._ack(self.stream_id, flow)
        return data

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if not self.headers.done():
            self.headers.set_exception(exc)
            self.headers.exception()
        self._wake()

    @property
    def failed(self) -> bool:
        return self._error is not None

    # -- sending
    async def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None:
        self.conn._call(
            lambda h2c: h2c.send_headers(self.stream_id, headers, end_stream=end_stream)
        )
        if end_stream:
            self._local_end()
        await self.conn._drain()

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None:
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            window = self.conn._window(self.stream_id)
            if window <= 0:
                await self.conn._wait_window()
                continue
            n = min(window, len(view))
            last = end_stream and n == len(view)
            chunk = bytes(view[:n])
            self.conn._call(_sender(self.stream_id, chunk, last))
            view = view[n:]
            await self.conn._drain()
        if end_stream and not self.local_ended:
            if not data:
                self.conn._call(lambda h2c: h2c.end_stream(self.stream_id))
            self._local_end()
            await self.conn._drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if self.local_ended:
            return
        if trailers:
            await self.send_headers(trailers, end_stream=True)
        else:
            await self.send_data(b"", end_stream=True)

    def reset(self, code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        if self._error is None and not (self.local_ended and self.remote_ended):
            with contextlib.suppress(h2.exceptions.H2Error):
                self.conn._call(lambda h2c: h2c.reset_stream(self.stream_id, code))
        self._fail(H2StreamError(f"stream {self.stream_id} reset locally"))
        self.conn._forget(self)

    def _local_end(self) -> None:
        self.local_ended = True
        if self.remote_ended:
            self.conn._forget(self)


class H2Conn:
    """One HTTP/2 connection over a `ByteStream` (client or server side)."""

    def __init__(
        self,
        stream: ByteStream,
        *,
        client: bool,
        on_request: Callable[[H2Stream], Awaitable[None]] | None = None,
    ) -> None:
        self.stream = stream
        self.client = client
        self._on_request = on_request
        config = h2.config.H2Configuration(client_side=client, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Stream] = {}
        self.goaway_received = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._window_waiter: asyncio.Future[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.requests = 0

    async def start(self, preface: bytes = b"") -> None:
        """Send our preface/settings, feed already-read bytes, start reading."""
        self.h2.local_settings = h2.settings.Settings(
            client=self.client,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        if preface:
            self._receive(preface)
        self._reader = asyncio.ensure_future(self._read_loop())

    @property
    def usable(self) -> bool:
        return (
            not self.closed.done()
            and not self.goaway_received
            and self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams
        )

    def open(self, headers: Headers, *, end_stream: bool = False) -> H2Stream:
        """Client: start a request stream (its response head arrives in ``stream.headers``)."""
        sid = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, sid)
        self.streams[sid] = stream
        self._call(lambda h2c: h2c.send_headers(sid, headers, end_stream=end_stream))
        if end_stream:
            stream.local_ended = True
        self.requests += 1
        return stream

    # -- plumbing used by streams
    def _call(self, action: Callable[[h2.connection.H2Connection], object]) -> None:
        if self.closed.done():
            raise H2StreamError("HTTP/2 connection closed")
        try:
            action(self.h2)
        except h2.exceptions.StreamClosedError as err:
            raise H2StreamError(f"stream closed: {err}") from err
        except h2.exceptions.ProtocolError as err:
            raise H2StreamError(f"HTTP/2 protocol error: {err}") from err
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            try:
                self.stream.write(data)
            except (OSError, ConnectionError) as err:
                self._terminate(err)

    async def _drain(self) -> None:
        try:
            await self.stream.drain()
        except (OSError, ConnectionError) as err:
            self._terminate(err)
            raise H2StreamError(str(err)) from err

    def _ack(self, stream_id: int, flow: int) -> None:
        if flow and not self.closed.done():
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.acknowledge_received_data(flow, stream_id)
                self._flush()

    def _window(self, stream_id: int) -> int:
        try:
            window = self.h2.local_flow_control_window(stream_id)
        except h2.exceptions.StreamClosedError as err:
            raise H2StreamError(f"stream {stream_id} closed") from err
        return min(window, self.h2.max_outbound_frame_size)

    async def _wait_window(self) -> None:
        if self.closed.done():
            raise H2StreamError("HTTP/2 connection closed")
        if self._window_waiter is None or self._window_waiter.done():
            self._window_waiter = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._window_waiter, self.closed], return_when=asyncio.FIRST_COMPLETED)

    def _window_opened(self) -> None:
        if self._window_waiter is not None and not self._window_waiter.done():
            self._window_waiter.set_result(None)

    def _forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)

    # -- reading
    async def _read_loop(self) -> None:
        error: BaseException | None = None
        try:
            while not self.closed.done():
                data = await self.stream.read()
                if not data:
                    break
                self._receive(data)
        except (OSError, ConnectionError, h2.exceptions.ProtocolError) as err:
            error = err
        except Exception as err:  # a transport error type we do not know: still end cleanly
            error = err
        finally:
            self._terminate(error)

    def _receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            self._flush()  # our GOAWAY
            raise err
        for event in events:
            self._dispatch(event)
        self._flush()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            stream = H2Stream(self, sid)
            self.streams[sid] = stream
            stream.headers.set_result(_headers(event.headers))
            stream.headers_ended = event.stream_ended is not None
            if self._on_request is not None:
                self.requests += 1
                task = asyncio.ensure_future(self._on_request(stream))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        sid = getattr(event, "stream_id", 0)
        found = self.streams.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived):
            if found is not None and not found.headers.done():
                found.headers.set_result(_headers(event.headers))
        elif isinstance(event, h2.events.TrailersReceived):
            if found is not None:
                found.trailers = _headers(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if found is None:
                self._ack(sid, event.flow_controlled_length)
            else:
                found._chunks.append((bytes(event.data), event.flow_controlled_length))
                found._wake()
        elif isinstance(event, h2.events.StreamEnded):
            if found is not None:
                found.remote_ended = True
                found._wake()
                if found.local_ended:
                    self._forget(found)
        elif isinstance(event, h2.events.StreamReset):
            if found is not None:
                found._fail(H2StreamError(f"stream {sid} reset by peer (code {event.error_code})"))
                self._forget(found)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_opened()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway_received = True
            last = event.last_stream_id if event.last_stream_id is not None else 0
            for stream in list(self.streams.values()):
                if self.client and stream.stream_id > last:
                    stream._fail(H2StreamError("refused by GOAWAY"))
                    self._forget(stream)

    def _terminate(self, error: BaseException | None) -> None:
        if self.closed.done():
            return
        reason = H2StreamError(f"HTTP/2 connection lost: {error}" if error else "connection closed")
        for stream in list(self.streams.values()):
            stream._fail(reason)
        self.streams.clear()
        self.closed.set_result(None)
        self._window_opened()
        with contextlib.suppress(Exception):
            self.stream.abort() if error else self.stream.close()

    def close(self) -> None:
        """GOAWAY and close (streams still open fail)."""
        if self.closed.done():
            return
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.close_connection()
            self._flush()
        self._terminate(None)
        if self._reader is not None:
            self._reader.cancel()

    async def wait_idle(self) -> None:
        """Until every request task has finished (server side)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))


class _H2Sink:
    """`ResponseSink` for a server stream."""

    def __init__(self, stream: H2Stream) -> None:
        self._stream = stream
        self.started = False
        self.status = 0

    async def start(self, status: int, headers: Headers, *, end_stream: bool = False) -> None:
        self.started = True
        self.status = status
        out = [(":status", str(status))]
        out.extend((k, v) for k, v in headers if not k.startswith(":"))
        await self._stream.send_headers(out, end_stream=end_stream)

    async def data(self, chunk: bytes) -> None:
        if chunk:
            await self._stream.send_data(chunk)

    async def end(self, trailers: Headers | None = None) -> None:
        await self._stream.end(trailers)

    def abort(self) -> None:
        self._stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)


Handler = Callable[[InboundRequest, ResponseSink], Awaitable[None]]


def request_from_headers(stream: H2Stream, headers: Headers) -> InboundRequest:
    pseudo = {k: v for k, v in headers if k.startswith(":")}
    regular = [(k, v) for k, v in headers if not k.startswith(":")]
    return InboundRequest(
        method=pseudo.get(":method", ""),
        target=pseudo.get(":path", ""),
        authority=pseudo.get(":authority"),
        scheme=pseudo.get(":scheme", "http"),
        headers=regular,
        body=stream,
        protocol="HTTP/2",
        has_body=not stream.headers_ended,
    )


async def serve_http2(
    stream: ByteStream,
    handler: Handler,
    *,
    preface: bytes = b"",
    draining: Callable[[], bool] = lambda: False,
    register: Callable[[H2Conn], None] | None = None,
) -> H2Conn:
    """Serve an HTTP/2 connection until it closes; each request runs `handler` in its own task."""

    async def on_request(h2s: H2Stream) -> None:
        sink = _H2Sink(h2s)
        try:
            request = request_from_headers(h2s, h2s.headers.result())
            await handler(request, sink)
        except (H2StreamError, OSError) as err:
            log.debug("HTTP/2 stream %d ended: %s", h2s.stream_id, err)
        except Exception:
            log.exception("HTTP/2 request handler failed")
            h2s.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        finally:
            if not (h2s.local_ended and h2s.remote_ended) and not h2s.failed:
                if not h2s.local_ended:
                    h2s.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
                else:
                    h2s.reset(h2.errors.ErrorCodes.NO_ERROR)  # we answered; stop the upload
            if draining() and not conn.streams and not conn._tasks - {asyncio.current_task()}:
                conn.close()

    conn = H2Conn(stream, client=False, on_request=on_request)
    if register is not None:
        register(conn)
    await conn.start(preface)
    await conn.closed
    await conn.wait_idle()
    return conn

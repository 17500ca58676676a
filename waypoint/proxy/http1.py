"""HTTP/1.1 over a `ByteStream` with h11: the downstream server loop and the upstream client.

Owns message framing only. `serve_http1` reads requests one at a time (keep-alive, no pipelining
beyond what h11 buffers), hands each to the request handler with a streaming body and a
`ResponseSink`, and closes when either side asks to or the proxy drains (``Connection: close`` on
the last response). `H1Client` sends one request at a time over one upstream connection and says
whether the connection can be reused; the upstream pool keeps reusable ones per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import h11

from waypoint.proxy.exchange import Headers, InboundRequest, ResponseSink, UpstreamResponse
from waypoint.proxy.streams import ByteStream

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 * 1024
# Unread request body we still swallow to keep a connection alive after an early answer.
MAX_DISCARD = 256 * 1024

Handler = Callable[[InboundRequest, ResponseSink], Awaitable[None]]


class HttpProtocolError(Exception):
    """The peer broke HTTP/1.1 framing."""


def _decode(headers: list[tuple[bytes, bytes]]) -> Headers:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]


def _encode(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]


async def _next_event(conn: h11.Connection, stream: ByteStream) -> object:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as err:
            raise HttpProtocolError(str(err)) from err
        if event is not h11.NEED_DATA:
            return event
        data = await stream.read()
        conn.receive_data(data)  # b"" marks EOF


class _RequestBody:
    """The body of the current downstream request, pulled from the connection on demand."""

    def __init__(self, conn: h11.Connection, stream: ByteStream) -> None:
        self._conn = conn
        self._stream = stream
        self.done = False
        self.trailers: Headers = []

    async def read(self) -> bytes:
        while not self.done:
            event = await _next_event(self._conn, self._stream)
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
                self.trailers = _decode(list(event.headers))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpProtocolError("client closed the connection inside a request body")
        return b""


class _Sink:
    """`ResponseSink` writing h11 events."""

    def __init__(self, conn: h11.Connection, stream: ByteStream, closing: bool) -> None:
        self._conn = conn
        self._stream = stream
        self._closing = closing
        self.started = False
        self.finished = False
        self.status = 0

    def _send(self, event: h11.Event) -> None:
        data = self._conn.send(event)
        if data:
            self._stream.write(data)

    async def start(self, status: int, headers: Headers, *, end_stream: bool = False) -> None:
        out = [(k, v) for k, v in headers if k not in ("connection", "keep-alive")]
        no_length = not any(k == "content-length" for k, _ in out)
        if end_stream and no_length and status >= 200 and status not in (204, 304):
            out.append(("content-length", "0"))
        if self._closing:
            out.append(("connection", "close"))
        self.started = True
        self.status = status
        self._send(h11.Response(status_code=status, headers=_encode(out)))
        if end_stream:
            await self.end()
        else:
            await self._stream.drain()

    async def data(self, chunk: bytes) -> None:
        if chunk:
            self._send(h11.Data(data=chunk))
            await self._stream.drain()

    async def end(self, trailers: Headers | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        # HTTP/1.1 trailers need chunked framing and are almost never used: dropped.
        self._send(h11.EndOfMessage())
        await self._stream.drain()

    def abort(self) -> None:
        self._stream.abort()


async def serve_http1(
    stream: ByteStream,
    handler: Handler,
    *,
    draining: Callable[[], bool] = lambda: False,
    idle_timeout: float = 300.0,
) -> int:
    """Serve requests until the connection closes; returns the number of requests handled."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    served = 0
    try:
        while True:
            try:
                async with asyncio.timeout(idle_timeout):
                    event = await _next_event(conn, stream)
            except HttpProtocolError as err:
                await _bad_request(conn, stream, str(err))
                return served
            except TimeoutError:
                return served
            if isinstance(event, h11.ConnectionClosed):
                return served
            if not isinstance(event, h11.Request):
                return served
            headers = _decode(list(event.headers))
            has_body = any(
                (k == "content-length" and v.strip() not in ("", "0")) or k == "transfer-encoding"
                for k, v in headers
            )
            body = _RequestBody(conn, stream)
            if not has_body:
                body.done = True
                end = await _next_event(conn, stream)  # the (empty) EndOfMessage
                if not isinstance(end, h11.EndOfMessage):
                    return served
            closing = draining()
            sink = _Sink(conn, stream, closing)
            request = InboundRequest(
                method=event.method.decode("latin-1"),
                target=event.target.decode("latin-1"),
                authority=None,
                scheme="http",
                headers=headers,
                body=body,
                protocol="HTTP/1.1",
                has_body=has_body,
            )
            served += 1
            await handler(request, sink)
            if not sink.finished:
                return served  # the handler aborted mid-response
            if not body.done and not await _discard_body(body):
                return served
            if closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return served
            conn.start_next_cycle()
    except (OSError, HttpProtocolError, h11.LocalProtocolError) as err:
        log.debug("HTTP/1.1 downstream connection ended: %s", err)
        return served
    finally:
        with contextlib.suppress(Exception):
            stream.close()


async def _discard_body(body: _RequestBody) -> bool:
    total = 0
    while chunk := await body.read():
        total += len(chunk)
        if total > MAX_DISCARD:
            return False
    return True


async def _bad_request(conn: h11.Connection, stream: ByteStream, reason: str) -> None:
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    text = f"bad request: {reason}\n".encode()
    with contextlib.suppress(h11.LocalProtocolError, OSError):
        stream.write(
            conn.send(
                h11.Response(
                    status_code=400,
                    headers=[
                        (b"content-type", b"text/plain"),
                        (b"content-length", str(len(text)).encode()),
                        (b"connection", b"close"),
                    ],
                )
            )
            or b""
        )
        stream.write(conn.send(h11.Data(data=text)) or b"")
        stream.write(conn.send(h11.EndOfMessage()) or b"")
        await stream.drain()


class _ResponseBody:
    def __init__(self, client: H1Client) -> None:
        self._client = client
        self.done = False
        self.trailers: Headers = []

    async def read(self) -> bytes:
        while not self.done:
            event = await _next_event(self._client.conn, self._client.stream)
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
                self.trailers = _decode(list(event.headers))
            else:
                raise HttpProtocolError(f"upstream closed inside a response body ({event!r})")
        return b""


class H1Client:
    """One upstream HTTP/1.1 connection; `request` is used by one caller at a time."""

    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.broken = False
        self.requests = 0

    @property
    def reusable(self) -> bool:
        return (
            not self.broken
            and self.conn.our_state is h11.IDLE
            and self.conn.their_state is h11.IDLE
            and not getattr(self.stream, "closed", False)
        )

    def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.stream.write(data)

    async def request(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send a request and return once the response head arrived (body streams on demand).

        `headers` must carry ``host``; without ``content-length`` a body goes chunked.
        """
        self.requests += 1
        out = list(headers)
        if body is not None and not any(k == "content-length" for k, _ in out):
            out.append(("transfer-encoding", "chunked"))
        try:
            self._send(h11.Request(method=method, target=target, headers=_encode(out)))
            await self.stream.drain()
        except BaseException:
            self.broken = True
            raise
        sender: asyncio.Task[None] | None = None
        if body is None:
            self._send(h11.EndOfMessage())
        else:
            sender = asyncio.ensure_future(self._send_body(body))
        try:
            while True:
                event = await _next_event(self.conn, self.stream)
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                raise HttpProtocolError(f"upstream closed before a response ({event!r})")
        except BaseException:
            self.broken = True
            if sender is not None:
                sender.cancel()
            raise
        response_body = _ResponseBody(self)

        def release(complete: bool) -> None:
            if sender is not None and not sender.done():
                sender.cancel()
                self.broken = True
            if not complete or not response_body.done:
                self.broken = True
            if self.broken:
                self.stream.abort()
                return
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            else:
                self.broken = True
                self.stream.abort()

        return UpstreamResponse(
            status=event.status_code,
            headers=_decode(list(event.headers)),
            body=response_body,
            release=release,
        )

    async def _send_body(self, body: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in body:
                if chunk:
                    self._send(h11.Data(data=chunk))
                    await self.stream.drain()
            self._send(h11.EndOfMessage())
            await self.stream.drain()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.debug("upstream HTTP/1.1 request body failed: %s", err)
            self.broken = True
            self.stream.abort()

    def close(self) -> None:
        self.broken = True
        self.stream.close()

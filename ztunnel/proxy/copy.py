"""Bidirectional copy: TCP socket <-> HBONE stream, TCP <-> TCP, and asyncio streams <-> HBONE.

Owns the byte pump of a proxied connection: adaptive read buffers (1 KiB, growing x16 to 16 KiB and
256 KiB while reads fill them, shrinking when they do not), backpressure (a direction stops reading
when its sink holds more than a cap: the TCP transport's high-water mark, the HBONE stream's send cap,
or the HBONE receive window, which is only re-opened once the TCP sink took the bytes), half-close in
both directions (EOF becomes END_STREAM and END_STREAM becomes ``write_eof``), error propagation (a
reset becomes an abort and vice versa) and byte counts. Callback-driven (asyncio BufferedProtocol), so
no task or coroutine runs per chunk.

Each read gets a fresh buffer because the bytes are handed on without copying (the HBONE core keeps a
reference to large payloads until the TLS layer takes them).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import cast

from ztunnel.hbone.connection import Buffer
from ztunnel.proxy.h2io import SEND_BUFFER_CAP, HboneStream

MIN_BUFFER = 1024
MAX_BUFFER = 256 * 1024
_GROWTH = 16
# TCP transport write buffer high-water mark: above it the source direction pauses.
TCP_HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class CopyResult:
    """What a splice moved. ``a`` is the first argument (the TCP side), ``b`` the second."""

    a_to_b: int
    b_to_a: int
    duration: float
    error: str | None = None


class _End:
    """One side of a splice: a source of bytes for its peer and a sink for the peer's bytes."""

    peer: _End
    count = 0
    eof_in = False
    eof_out = False

    def __init__(self, splice: _Splice) -> None:
        self.splice = splice

    def send(self, data: memoryview) -> None:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def pause_input(self) -> None:
        raise NotImplementedError

    def resume_input(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError


class _TcpEnd(_End, asyncio.BufferedProtocol):
    def __init__(self, splice: _Splice) -> None:
        super().__init__(splice)
        self.transport: asyncio.Transport | None = None
        self._size = MIN_BUFFER
        self._buf = bytearray()
        self._paused_by_peer = False
        self._writing_paused = False
        self._early: list[memoryview] = []  # bytes from the peer before our transport existed
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = t = cast(asyncio.Transport, transport)
        t.set_write_buffer_limits(high=TCP_HIGH_WATER)
        for data in self._early:
            t.write(data)
        self._early.clear()
        if self.eof_out and t.can_write_eof():
            t.write_eof()

    def get_buffer(self, sizehint: int) -> bytearray:
        self._buf = bytearray(self._size)
        return self._buf

    def buffer_updated(self, nbytes: int) -> None:
        size = self._size
        if nbytes == size and size < MAX_BUFFER:
            self._size = min(size * _GROWTH, MAX_BUFFER)
        elif nbytes * _GROWTH * 2 < size:
            self._size = max(size // _GROWTH, MIN_BUFFER)
        self.count += nbytes
        self.peer.send(memoryview(self._buf)[:nbytes])

    def eof_received(self) -> bool:
        self.eof_in = True
        self.peer.send_eof()
        self.splice.check()
        return True

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.peer.pause_input()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self.peer.resume_input()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if exc is not None or not (self.eof_in and self.eof_out):
            self.splice.fail(
                self, f"TCP connection lost: {exc}" if exc else "TCP connection closed"
            )

    # splice side
    @property
    def writable(self) -> bool:
        return not self._writing_paused

    def send(self, data: memoryview) -> None:
        if self.transport is None:
            self._early.append(data)
        elif not self.transport.is_closing():
            self.transport.write(data)

    def send_eof(self) -> None:
        self.eof_out = True
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()
        self.splice.check()

    def pause_input(self) -> None:
        if self.transport is not None and not self._paused_by_peer:
            self._paused_by_peer = True
            self.transport.pause_reading()

    def resume_input(self) -> None:
        if self.transport is not None and self._paused_by_peer:
            self._paused_by_peer = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def finish(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _HboneEnd(_End):
    def __init__(self, splice: _Splice, stream: HboneStream) -> None:
        super().__init__(splice)
        self.stream = stream
        self._unacked = 0
        self._paused = False
        stream.on_writable = self._on_writable

    # receiver protocol (push mode)
    def data_received(self, data: memoryview) -> None:
        self.count += len(data)
        peer = self.peer
        peer.send(data)
        if isinstance(peer, _TcpEnd) and not peer.writable:
            self._unacked += len(data)  # re-open the window only once the TCP sink drains
        else:
            self.stream.ack(len(data))

    def eof_received(self) -> None:
        self.eof_in = True
        self.peer.send_eof()
        self.splice.check()

    def stream_reset(self, exc: BaseException) -> None:
        self.splice.fail(self, str(exc))

    def _on_writable(self) -> None:
        self.peer.resume_input()

    # splice side
    def send(self, data: memoryview) -> None:
        if self.stream.done:
            return
        self.stream.write(data)
        if self.stream.send_buffered >= SEND_BUFFER_CAP:
            self.peer.pause_input()

    def send_eof(self) -> None:
        self.eof_out = True
        self.stream.write_eof()
        self.splice.check()

    def pause_input(self) -> None:
        self._paused = True

    def resume_input(self) -> None:
        self._paused = False
        if self._unacked:
            n, self._unacked = self._unacked, 0
            self.stream.ack(n)

    def abort(self) -> None:
        if not self.stream.done:
            self.stream.reset()

    def finish(self) -> None:
        pass  # both directions ended: the stream closed itself


class _Splice:
    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = None
        self.ends: list[_End] = []

    def join(self, a: _End, b: _End) -> None:
        a.peer, b.peer = b, a
        self.ends = [a, b]

    def check(self) -> None:
        if all(e.eof_in and e.eof_out for e in self.ends) and not self.done.done():
            self.done.set_result(None)

    def fail(self, end: _End, reason: str) -> None:
        if self.done.done():
            return
        self.error = reason
        for e in self.ends:
            if e is not end:
                e.abort()
        self.done.set_result(None)


async def _run(splice: _Splice, a: _End, b: _End, started: float) -> CopyResult:
    try:
        await splice.done
    except asyncio.CancelledError:
        a.abort()
        b.abort()
        raise
    if splice.error is None:
        a.finish()
        b.finish()
    for end in (a, b):
        if isinstance(end, _TcpEnd):
            try:
                await asyncio.wait_for(asyncio.shield(end.lost), 5.0)
            except TimeoutError:
                end.abort()
    return CopyResult(
        a_to_b=a.count, b_to_a=b.count, duration=time.monotonic() - started, error=splice.error
    )


async def _connect(end: _TcpEnd, sock: socket.socket) -> None:
    # Ends are joined before this: reading starts as soon as the transport exists.
    await asyncio.get_running_loop().connect_accepted_socket(lambda: end, sock)


async def splice_socket_hbone(sock: socket.socket, stream: HboneStream) -> CopyResult:
    """Copy between a connected TCP socket (``a``) and an established HBONE stream (``b``)."""
    started = time.monotonic()
    splice = _Splice()
    hbone = _HboneEnd(splice, stream)
    tcp = _TcpEnd(splice)
    splice.join(tcp, hbone)
    try:
        await _connect(tcp, sock)
    except BaseException:
        stream.reset()
        raise
    stream.set_receiver(hbone)  # after the TCP transport exists: buffered data goes there
    return await _run(splice, tcp, hbone, started)


async def splice_sockets(a: socket.socket, b: socket.socket) -> CopyResult:
    """Copy between two connected TCP sockets."""
    started = time.monotonic()
    splice = _Splice()
    end_a, end_b = _TcpEnd(splice), _TcpEnd(splice)
    splice.join(end_a, end_b)
    await _connect(end_a, a)
    await _connect(end_b, b)
    return await _run(splice, end_a, end_b, started)


async def splice_streams_hbone(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: HboneStream
) -> CopyResult:
    """Copy between asyncio streams (``a``) and an HBONE stream (``b``); the slower, generic path."""
    started = time.monotonic()
    counts = [0, 0]

    async def a_to_b() -> None:
        size = MIN_BUFFER
        while True:
            data: Buffer = await reader.read(size)
            if not data:
                stream.write_eof()
                return
            counts[0] += len(data)
            if len(data) == size:
                size = min(size * _GROWTH, MAX_BUFFER)
            stream.write(data)
            await stream.drain()

    async def b_to_a() -> None:
        while True:
            data = await stream.read()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            counts[1] += len(data)
            writer.write(data)
            await writer.drain()

    error: str | None = None
    tasks = [asyncio.ensure_future(a_to_b()), asyncio.ensure_future(b_to_a())]
    try:
        for fut in asyncio.as_completed(tasks):
            await fut
    except Exception as err:
        error = str(err) or type(err).__name__
        stream.reset()
        writer.transport.abort()
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
    return CopyResult(
        a_to_b=counts[0], b_to_a=counts[1], duration=time.monotonic() - started, error=error
    )

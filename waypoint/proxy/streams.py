"""The byte-stream seam of the waypoint shell: one interface over HBONE tunnels and TCP sockets.

Owns `ByteStream` (what the HTTP/1.1, HTTP/2 and TCP layers read and write), its adapters for an
HBONE stream (`HboneByteStream`) and for asyncio streams (`AsyncioByteStream`), `PrefixedStream`
(puts back the bytes protocol detection peeked at) and `pump`, a one-direction copy with
backpressure. Keeping the HTTP layers on this interface lets them run over an inbound tunnel, an
upstream HBONE stream or a plain socket alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from ztunnel.proxy.h2io import HboneStream, TunnelError

READ_SIZE = 64 * 1024


class ByteStream(Protocol):
    async def read(self, max_bytes: int = -1) -> bytes:
        """Next bytes; b"" at end of stream. Raises ConnectionError/TunnelError on a reset."""
        ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Wait until buffered outbound data fell below the stream's cap."""
        ...

    def write_eof(self) -> None: ...

    def abort(self) -> None:
        """Tear the stream down now (RST_STREAM / TCP abort)."""
        ...

    def close(self) -> None:
        """Orderly close once queued data is sent."""
        ...


class HboneByteStream:
    """An established HBONE tunnel as a `ByteStream`."""

    def __init__(self, stream: HboneStream) -> None:
        self.stream = stream

    async def read(self, max_bytes: int = -1) -> bytes:
        return await self.stream.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.stream.write(data)

    async def drain(self) -> None:
        await self.stream.drain()

    def write_eof(self) -> None:
        self.stream.write_eof()

    def abort(self) -> None:
        if not self.stream.done:
            self.stream.reset()

    def close(self) -> None:
        self.stream.write_eof()

    @property
    def closed(self) -> bool:
        return self.stream.done


class AsyncioByteStream:
    """An asyncio reader/writer pair (a TCP connection, or our end of a socketpair)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, max_bytes: int = -1) -> bytes:
        return await self.reader.read(READ_SIZE if max_bytes < 0 else max_bytes)

    def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("write on a closed connection")
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def write_eof(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            with contextlib.suppress(OSError):
                self.writer.write_eof()

    def abort(self) -> None:
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()


class PrefixedStream:
    """A `ByteStream` that first returns `prefix` (bytes already read while sniffing)."""

    def __init__(self, prefix: bytes, inner: ByteStream) -> None:
        self._prefix = prefix
        self.inner = inner

    async def read(self, max_bytes: int = -1) -> bytes:
        if self._prefix:
            if 0 <= max_bytes < len(self._prefix):
                out, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
                return out
            out, self._prefix = self._prefix, b""
            return out
        return await self.inner.read(max_bytes)

    def write(self, data: bytes) -> None:
        self.inner.write(data)

    async def drain(self) -> None:
        await self.inner.drain()

    def write_eof(self) -> None:
        self.inner.write_eof()

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


async def pump(source: ByteStream, sink: ByteStream) -> int:
    """Copy `source` to `sink` until EOF (then half-close `sink`); returns the byte count."""
    total = 0
    while True:
        data = await source.read(READ_SIZE)
        if not data:
            sink.write_eof()
            return total
        total += len(data)
        sink.write(data)
        await sink.drain()


async def splice(a: ByteStream, b: ByteStream) -> tuple[int, int]:
    """Copy both ways until both directions ended; (a->b bytes, b->a bytes). Errors abort both."""
    ab = asyncio.ensure_future(pump(a, b))
    ba = asyncio.ensure_future(pump(b, a))
    try:
        await asyncio.gather(ab, ba)
    except (OSError, TunnelError, asyncio.CancelledError):
        a.abort()
        b.abort()
        ab.cancel()
        ba.cancel()
        raise
    finally:
        a.close()
        b.close()
    return ab.result(), ba.result()

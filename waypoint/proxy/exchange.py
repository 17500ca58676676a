"""Protocol-neutral request/response plumbing shared by the HTTP/1.1 and HTTP/2 shells.

Owns `Body` (a readable message body with optional trailers), `ResponseSink` (how the request
handler answers the downstream client, whatever its protocol), `UpstreamResponse`, the header
hygiene helpers (hop-by-hop removal) and `ReplayBody`, which records a request body up to a limit so
a retry or a mirror can send it again (Envoy's retry buffer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

Headers = list[tuple[str, str]]

# RFC 9110 §7.6.1 connection-specific fields, never forwarded (HTTP/2 forbids them outright).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "http2-settings",
    }
)


def end_to_end(headers: Headers, *, keep_te_trailers: bool = False) -> Headers:
    """Headers without hop-by-hop fields (and the ones `Connection` names)."""
    named = {
        token.strip().lower()
        for k, v in headers
        if k == "connection"
        for token in v.split(",")
        if token.strip()
    }
    out: Headers = []
    for k, v in headers:
        if k in HOP_BY_HOP or k in named:
            # gRPC needs "te: trailers" end to end on HTTP/2.
            if keep_te_trailers and k == "te" and v.strip().lower() == "trailers":
                out.append((k, "trailers"))
            continue
        out.append((k, v))
    return out


class Body(Protocol):
    async def read(self) -> bytes:
        """Next chunk; b"" once the body ended."""
        ...

    @property
    def trailers(self) -> Headers:
        """Trailers (HTTP/2, gRPC), known once `read` returned b""."""
        ...


class EmptyBody:
    trailers: Headers = []

    async def read(self) -> bytes:
        return b""


class BytesBody:
    """A body from bytes already in memory."""

    def __init__(self, data: bytes = b"", trailers: Headers | None = None) -> None:
        self._data = data
        self.trailers = list(trailers or [])

    async def read(self) -> bytes:
        data, self._data = self._data, b""
        return data


class ResponseSink(Protocol):
    """How the handler answers downstream. Call order: start, data*, end (or abort)."""

    @property
    def started(self) -> bool: ...

    async def start(self, status: int, headers: Headers, *, end_stream: bool = False) -> None: ...

    async def data(self, chunk: bytes) -> None: ...

    async def end(self, trailers: Headers | None = None) -> None: ...

    def abort(self) -> None: ...


@dataclass(slots=True, kw_only=True)
class InboundRequest:
    """One request as the downstream sent it (before normalisation)."""

    method: str
    target: str
    authority: str | None
    scheme: str
    headers: Headers
    """Lower-case names; no pseudo-headers; for HTTP/1.1 ``host`` is among them."""
    body: Body
    protocol: str
    """``HTTP/1.1`` or ``HTTP/2``."""
    has_body: bool = True
    """False when the request is known to have no body (then `body` is empty)."""


@dataclass(slots=True, kw_only=True)
class UpstreamResponse:
    status: int
    headers: Headers
    body: Body
    release: Callable[[bool], None] = field(default=lambda _complete: None)
    """Call once done: True when the body was read to its end (the connection may be reused)."""


class ReplayBody:
    """A request body that can be iterated again while it fit into `limit` bytes."""

    def __init__(self, source: Body, limit: int = 1024 * 1024) -> None:
        self._source = source
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.overflowed = False
        self.finished = False
        self.consumed = 0
        """Bytes pulled from the source so far."""

    @property
    def trailers(self) -> Headers:
        return self._source.trailers

    @property
    def replayable(self) -> bool:
        return not self.overflowed

    @property
    def recorded(self) -> bytes | None:
        """The whole body when it was read to the end and fit the limit."""
        return b"".join(self._chunks) if self.finished and not self.overflowed else None

    async def iterate(self) -> AsyncIterator[bytes]:
        """Recorded chunks first, then the rest of the source (recording it while it fits)."""
        if self.overflowed:
            raise RuntimeError("request body no longer replayable")
        for chunk in list(self._chunks):
            yield chunk
        while not self.finished:
            chunk = await self._source.read()
            if not chunk:
                self.finished = True
                return
            self.consumed += len(chunk)
            if not self.overflowed:
                if self._size + len(chunk) <= self._limit:
                    self._chunks.append(chunk)
                    self._size += len(chunk)
                else:
                    self.overflowed = True
                    self._chunks.clear()
            yield chunk

    async def read_all(self) -> bytes | None:
        """Read the rest into memory; None when it exceeds the limit."""
        async for _ in self.iterate():
            if self.overflowed:
                return None
        return self.recorded

"""Pool of outbound HBONE connections (ztunnel ``proxy/pool.rs`` semantics).

Owns client connections keyed by (source identity, expected destination identities, source IP,
destination address): at most ``max_streams_per_connection`` (100) streams per connection and never more
than the server's MAX_CONCURRENT_STREAMS; one dial per key at a time (concurrent callers wait for it
instead of storming the server); connections that received GOAWAY are never reused; connections idle for
``idle_timeout`` are closed. Sockets come from a pluggable ``connector`` coroutine (so a colleague can
create them in a pod netns with SO_MARK); the TLS client context comes from ``client_context``, which
may be a coroutine (a certificate fetched on demand); the server's SPIFFE identity is checked against
the expected identities right after the TLS handshake, before the first byte of HTTP/2 is written.
``connect`` opens a stream the server refused unprocessed (REFUSED_STREAM, or above a GOAWAY's
last-stream-id, e.g. from a draining ztunnel) once more on another connection (RFC 9113 §8.7).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ztunnel.hbone.connection import HboneClientConnection
from ztunnel.hbone.guard import DEFAULT_LIMITS, Limits
from ztunnel.hbone.settings import CLIENT_SETTINGS, H2Settings
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import verify_server_identity
from ztunnel.proxy.h2io import (
    HboneProtocol,
    HboneStatusError,
    HboneStream,
    StreamRefusedError,
    TunnelError,
)
from ztunnel.proxy.socket_factory import configure_stream, tcp_socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = [
    "HbonePool",
    "HboneStatusError",
    "PoolKey",
    "PoolStatistics",
    "StreamRefusedError",
    "TunnelError",
    "tcp_connector",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolKey:
    """What makes two tunnels share a connection (ztunnel ``WorkloadKey``)."""

    src_identity: SpiffeId
    dst_identities: frozenset[SpiffeId]
    src_ip: IPAddress | None
    dst_ip: IPAddress
    dst_port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolStatistics:
    connections: int
    streams: int
    connections_opened: int
    dial_failures: int
    refused_retries: int = 0
    """Tunnels the server refused unprocessed (REFUSED_STREAM, GOAWAY) and we opened again."""


Connector = Callable[[PoolKey], Awaitable[socket.socket]]
ClientContext = Callable[[SpiffeId], ssl.SSLContext | Awaitable[ssl.SSLContext]]
"""The TLS client context for a source identity; may be async (e.g. fetches the certificate)."""


async def tcp_connector(key: PoolKey) -> socket.socket:
    """Default connector: a plain non-blocking TCP connection (NODELAY, keepalive) to the key's
    destination."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if key.dst_ip.version == 6 else socket.AF_INET
    sock = tcp_socket(family)
    sock.setblocking(False)
    configure_stream(sock)
    try:
        await loop.sock_connect(sock, (str(key.dst_ip), key.dst_port))
    except BaseException:
        sock.close()
        raise
    return sock


class HbonePool:
    """Open tunnels with ``await pool.connect(key, authority)``; close with ``await pool.close()``."""

    def __init__(
        self,
        *,
        client_context: ClientContext,
        connector: Connector = tcp_connector,
        max_streams_per_connection: int = 100,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        settings: H2Settings = CLIENT_SETTINGS,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._client_context = client_context
        self._connector = connector
        self._max_streams = max_streams_per_connection
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._settings = settings
        self._limits = limits
        self._conns: dict[PoolKey, list[HboneProtocol]] = {}
        self._connecting: dict[PoolKey, asyncio.Future[None]] = {}
        self._idle: dict[HboneProtocol, asyncio.TimerHandle] = {}
        self._opened = 0
        self._dial_failures = 0
        self._refused_retries = 0
        self._closed = False

    async def connect(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Open a tunnel and wait for the 200; raises HboneStatusError for other statuses,
        PeerIdentityError for a wrong server identity, OSError/TimeoutError for dial failures.

        A tunnel the server refused without processing it (RST_STREAM REFUSED_STREAM, or above the
        last-stream-id of a GOAWAY, e.g. a draining ztunnel) is opened once more on another
        connection: nothing of the application was sent yet (RFC 9113 §8.7). A second refusal
        raises StreamRefusedError."""
        extra = list(headers)
        stream = await self._open(key, authority, extra, avoid=None)
        try:
            await stream.established
        except StreamRefusedError:
            self._refused_retries += 1
            stream = await self._open(key, authority, extra, avoid=stream.proto)
            await stream.established
        return stream

    async def open(
        self, key: PoolKey, authority: str, headers: Iterable[tuple[str, str]] = ()
    ) -> HboneStream:
        """Send the CONNECT without waiting for the answer (await ``stream.established``).

        No retry here: use ``connect`` for the transparent retry of refused streams."""
        return await self._open(key, authority, list(headers), avoid=None)

    async def _open(
        self,
        key: PoolKey,
        authority: str,
        headers: list[tuple[str, str]],
        *,
        avoid: HboneProtocol | None,
    ) -> HboneStream:
        # ``avoid``: the connection that just refused a stream is not asked again.
        while True:
            if self._closed:
                raise TunnelError("pool is closed")
            for proto in self._conns.get(key, ()):
                if proto is not avoid and self._usable(proto):
                    return self._open_on(proto, authority, headers)
            pending = self._connecting.get(key)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            await self._dial_for(key)

    def _usable(self, proto: HboneProtocol) -> bool:
        conn = proto.conn
        assert isinstance(conn, HboneClientConnection)
        return (
            not proto.closed.done()
            and not conn.closed
            and conn.available_streams > 0
            and len(proto.streams) < self._max_streams
        )

    def _open_on(
        self, proto: HboneProtocol, authority: str, headers: list[tuple[str, str]]
    ) -> HboneStream:
        idle = self._idle.pop(proto, None)
        if idle is not None:
            idle.cancel()
        stream = proto.open_stream(authority, headers)
        stream.closed.add_done_callback(lambda _: self._stream_done(proto))
        return stream

    async def _dial_for(self, key: PoolKey) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._connecting[key] = fut
        try:
            proto = await self._dial(key)
        except BaseException as err:
            self._dial_failures += 1
            fut.set_exception(err if isinstance(err, Exception) else TunnelError("dial cancelled"))
            fut.exception()  # waiters re-raise it; do not warn when there are none
            raise
        finally:
            del self._connecting[key]
        self._opened += 1
        self._conns.setdefault(key, []).append(proto)
        proto.closed.add_done_callback(lambda _: self._remove(key, proto))
        fut.set_result(None)

    async def _dial(self, key: PoolKey) -> HboneProtocol:
        loop = asyncio.get_running_loop()
        # The context first: no socket is held open while a certificate is being fetched.
        ctx = self._client_context(key.src_identity)
        # asyncio.timeout, not wait_for: wait_for wraps the awaitable in an extra Task per dial.
        if inspect.isawaitable(ctx):
            async with asyncio.timeout(self._connect_timeout):
                ctx = await ctx
        async with asyncio.timeout(self._connect_timeout):
            sock = await self._connector(key)
        # Whatever socket the connector made: small writes must not wait for Nagle.
        configure_stream(sock)
        conn = HboneClientConnection(now=loop.time(), settings=self._settings, limits=self._limits)
        expected = key.dst_identities
        proto = HboneProtocol(conn, loop, verify=lambda obj: verify_server_identity(obj, expected))
        try:
            await loop.create_connection(
                lambda: proto,
                sock=sock,
                ssl=ctx,
                # An IP literal: Python sends no SNI for it (HBONE uses none).
                server_hostname=str(key.dst_ip),
                ssl_handshake_timeout=self._limits.handshake_timeout,
            )
            await proto.ready  # raises PeerIdentityError before any HTTP/2 byte was written
        except BaseException:
            sock.close()
            if proto.transport is not None:
                proto.transport.abort()
            raise
        return proto

    def _stream_done(self, proto: HboneProtocol) -> None:
        if proto.streams or proto.closed.done() or self._closed:
            return
        if proto not in self._idle:
            self._idle[proto] = proto.loop.call_later(self._idle_timeout, proto.close)

    def _remove(self, key: PoolKey, proto: HboneProtocol) -> None:
        conns = self._conns.get(key)
        if conns is not None and proto in conns:
            conns.remove(proto)
            if not conns:
                del self._conns[key]
        idle = self._idle.pop(proto, None)
        if idle is not None:
            idle.cancel()

    def connections(self, key: PoolKey) -> list[HboneProtocol]:
        """Live connections of a key (for tests and the admin dump)."""
        return list(self._conns.get(key, ()))

    def statistics(self) -> PoolStatistics:
        protos = [p for conns in self._conns.values() for p in conns]
        return PoolStatistics(
            connections=len(protos),
            streams=sum(len(p.streams) for p in protos),
            connections_opened=self._opened,
            dial_failures=self._dial_failures,
            refused_retries=self._refused_retries,
        )

    async def close(self) -> None:
        """Close every connection (GOAWAY) and refuse new tunnels."""
        self._closed = True
        protos = [p for conns in self._conns.values() for p in conns]
        for proto in protos:
            proto.close()
        if protos:
            await asyncio.wait([p.closed for p in protos], timeout=2.0)
        for proto in protos:
            if proto.transport is not None and not proto.closed.done():
                proto.transport.abort()

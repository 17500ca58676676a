"""The HBONE listener (port 15008): mTLS accept, CONNECT dispatch, tunnel lifecycle, drain.

Owns accepting connections (TLS context fetched per connection, so certificate rotation applies to new
connections), checking that the client's SPIFFE identity is in our trust domain before any frame is
read, handing each well-formed CONNECT to ``on_connect`` (which decides policy and dials upstream; the
core already answered malformed ones with 400, with no callback and no dial), sending 200 only after
the callback accepted, copying bytes (or handing the stream itself to an ``AcceptStream`` handler),
reporting per-tunnel bytes and duration (``TunnelStats``, naming its request and handle), and draining
(GOAWAY, let tunnels finish until a deadline, then close). A reset stream cancels its callback, so a
dial in progress is abandoned.

Listener hardening (reliability.md §6): a global connection cap checked at accept (TLS handshakes in
progress count, so a slowloris cannot hold more than the cap) and a per-source-identity cap checked
right after the identity is verified, both closing at once beyond the cap (decisions in
``guard.ConnectionCaps``); the TLS handshake timeout (``Limits.handshake_timeout``); and an abort
``ListenerLimits.close_grace`` seconds after the core ended a connection, so a peer that never reads
its GOAWAY cannot pin the socket and its queued output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ztunnel.hbone.authority import Authority
from ztunnel.hbone.connection import HboneServerConnection
from ztunnel.hbone.errors import ErrorCodes, HboneError
from ztunnel.hbone.events import ConnectionTerminated, Event, StreamReset, TunnelRequested
from ztunnel.hbone.guard import (
    DEFAULT_LIMITS,
    DEFAULT_LISTENER_LIMITS,
    ConnectionCaps,
    Limits,
    ListenerLimits,
)
from ztunnel.hbone.settings import SERVER_SETTINGS, H2Settings
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import verify_client_identity
from ztunnel.proxy.copy import CopyResult, splice_socket_hbone, splice_streams_hbone
from ztunnel.proxy.h2io import HboneProtocol, HboneStream
from ztunnel.proxy.socket_factory import configure_stream, tcp_socket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Policy passed and the upstream is connected: a socket, or an asyncio reader/writer pair."""

    sock: socket.socket | None = None
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (e.g. baggage describing the destination)."""

    def __post_init__(self) -> None:
        if (self.sock is None) == (self.reader is None or self.writer is None):
            raise ValueError("Accept needs either sock or both reader and writer")


class ConnectionCapError(HboneError):
    """A connection was refused because a listener connection cap is reached."""


StreamHandler = Callable[[HboneStream], Awaitable[None]]


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptStream:
    """Policy passed; the application serves the tunnel itself (e.g. the waypoint's HTTP parser).

    The server answers 200, then awaits ``handler(stream)`` with the :class:`HboneStream` (read /
    write / write_eof on it; no socketpair and no copy). When the handler returns, our direction is
    half-closed (if it was not) and the peer gets ``linger`` seconds to end its side before the
    stream is reset; if the handler raises, the stream is reset at once."""

    handler: StreamHandler
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers (e.g. baggage describing the destination)."""
    linger: float = 5.0

    def __post_init__(self) -> None:
        if not callable(self.handler):
            raise ValueError("AcceptStream.handler must be an async callable taking the stream")
        if self.linger < 0:
            raise ValueError(f"AcceptStream.linger must be >= 0, got {self.linger}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject:
    """Refuse the tunnel with ``status`` (400 bad target, 401 policy, 503 no upstream)."""

    status: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelStats:
    """Reported once per tunnel when it ends."""

    authority: Authority
    peer_identity: SpiffeId | None
    status: int
    """200, the reject status, or 0 if the tunnel ended before an answer."""
    bytes_from_client: int
    bytes_to_client: int
    duration: float
    error: str | None
    tunnel: TunnelHandle | None = field(default=None, compare=False)
    """The handle of the tunnel these figures belong to (``request.tunnel``)."""
    request: TunnelRequest | None = field(default=None, compare=False)
    """The request ``on_connect`` was given for this tunnel."""


class TunnelHandle:
    """Lets the owner close a tunnel later (e.g. a policy change denies it now)."""

    def __init__(self, stream: HboneStream) -> None:
        self._stream = stream
        self._task: asyncio.Task[None] | None = None
        self.accepted = False

    def close(self) -> None:
        """Abort the tunnel: cancel the decision/dial, or reset the stream (closing upstream)."""
        if not self.accepted and self._task is not None:
            self._task.cancel()
        elif not self._stream.done:
            self._stream.reset()


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRequest:
    """What ``on_connect`` gets. ``headers`` (baggage, forwarded, traceparent) are informational
    only: identity is ``peer_identity``, from the TLS certificate."""

    authority: Authority
    headers: tuple[tuple[str, str], ...]
    peer_identity: SpiffeId | None
    peer_address: object
    local_address: object
    tunnel: TunnelHandle = field(compare=False)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


OnConnect = Callable[[TunnelRequest], Awaitable[Accept | AcceptStream | Reject]]


class HboneServer:
    """Serve HBONE on a listening socket (or host/port)."""

    def __init__(
        self,
        *,
        ssl_context: Callable[[], ssl.SSLContext],
        trust_domain: str,
        on_connect: OnConnect,
        on_tunnel_closed: Callable[[TunnelStats], None] | None = None,
        settings: H2Settings = SERVER_SETTINGS,
        limits: Limits = DEFAULT_LIMITS,
        listener_limits: ListenerLimits = DEFAULT_LISTENER_LIMITS,
    ) -> None:
        self._ssl_context = ssl_context
        self._trust_domain = trust_domain
        self._on_connect = on_connect
        self._on_tunnel_closed = on_tunnel_closed
        self._settings = settings
        self._limits = limits
        self._listen: socket.socket | None = None
        # Remembered at start: the listening socket is closed by drain/close, the address is not.
        self._bound: tuple[str, int] | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._protocols: set[HboneProtocol] = set()
        self._tasks: dict[tuple[HboneProtocol, int], asyncio.Task[None]] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._accepted: set[tuple[HboneProtocol, int]] = (
            set()
        )  # answered 200: a reset stops the copy
        self.connections_accepted = 0
        self.handshake_failures = 0
        self.caps = ConnectionCaps(listener_limits)
        self._identity_of: dict[HboneProtocol, SpiffeId] = {}
        self.guard_trips: Counter[str] = Counter()
        """Connections the core ended for a peer's misbehaviour, by reason (GOAWAY sent)."""

    @property
    def connections_rejected_global(self) -> int:
        """Connections closed at accept because the global cap was reached."""
        return self.caps.rejected_global

    @property
    def connections_rejected_identity(self) -> int:
        """Connections closed after the handshake because their identity was at its cap."""
        return self.caps.rejected_identity

    @property
    def connections_open(self) -> int:
        """Connections holding a slot of the global cap (handshakes in progress included)."""
        return self.caps.connections

    def counters(self) -> dict[str, int]:
        """Listener counters for metrics export (monotonic except ``connections_open``)."""
        return {
            "connections_accepted": self.connections_accepted,
            "handshake_failures": self.handshake_failures,
            "connections_rejected_global": self.caps.rejected_global,
            "connections_rejected_identity": self.caps.rejected_identity,
            "connections_open": self.caps.connections,
            "guard_trips": sum(self.guard_trips.values()),
        }

    @property
    def address(self) -> tuple[str, int]:
        """Where the server listens (or listened, after drain/close)."""
        assert self._bound is not None, "server not started"
        return self._bound

    async def start(
        self, sock: socket.socket | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        """Start accepting on ``sock`` (already listening) or on a new socket bound to host:port."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = tcp_socket(family)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
        sock.setblocking(False)
        self._listen = sock
        host_port = sock.getsockname()[:2]
        self._bound = (host_port[0], host_port[1])
        self._accept_task = asyncio.get_running_loop().create_task(
            self._accept_loop(sock), name="hbone-accept"
        )

    async def _accept_loop(self, listen: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listen)
            except OSError as err:
                log.warning("HBONE accept failed: %s", err)
                await asyncio.sleep(0.05)
                continue
            if not self.caps.admit_connection():
                # Beyond the global cap: close before spending a TLS handshake on it.
                log.debug("HBONE connection cap %d reached", self.caps.limits.max_connections)
                conn.close()
                continue
            # NODELAY: without it the 200 and the first bytes wait for the peer's delayed ACK
            # (~40 ms). asyncio would only set it for a listener made with proto=IPPROTO_TCP.
            configure_stream(conn)
            task = loop.create_task(self._handshake(conn), name="hbone-handshake")
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        conn = HboneServerConnection(now=now, settings=self._settings, limits=self._limits)
        proto: HboneProtocol

        def verify(obj: ssl.SSLObject) -> SpiffeId:
            identity = verify_client_identity(obj, self._trust_domain)
            # In connection_made, before any HTTP/2 byte: an identity at its cap costs no frame.
            if not self.caps.admit_identity(identity):
                raise ConnectionCapError(
                    f"client identity {identity} already holds "
                    f"{self.caps.limits.max_connections_per_identity} connections"
                )
            self._identity_of[proto] = identity
            return identity

        proto = HboneProtocol(conn, loop, verify=verify, on_event=self._on_event)
        # connection_lost follows every connection_made, so this releases every admitted identity.
        proto.closed.add_done_callback(lambda _: self._release_identity(proto))
        established = False
        try:
            ctx = self._ssl_context()
            await loop.connect_accepted_socket(
                lambda: proto,
                sock,
                ssl=ctx,
                ssl_handshake_timeout=self._limits.handshake_timeout,
            )
            await proto.ready
            established = True
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, Exception) as err:
            self.handshake_failures += 1
            log.info("HBONE handshake/identity check failed: %s", err)
            sock.close()
            return
        finally:
            if not established:
                self.caps.release_connection()
                if proto.transport is None:
                    sock.close()  # cancelled before the transport took the socket
                elif not proto.closed.done():
                    proto.transport.abort()
        self.connections_accepted += 1
        self._protocols.add(proto)
        proto.closed.add_done_callback(lambda _: self._on_closed(proto))

    def _on_closed(self, proto: HboneProtocol) -> None:
        self._protocols.discard(proto)
        self.caps.release_connection()

    def _release_identity(self, proto: HboneProtocol) -> None:
        identity = self._identity_of.pop(proto, None)
        if identity is not None:
            self.caps.release_identity(identity)

    def _abort_if_open(self, proto: HboneProtocol) -> None:
        if proto.transport is not None and not proto.closed.done():
            log.info("HBONE peer did not take its GOAWAY within the close grace: aborting")
            proto.transport.abort()

    # ---------------------------------------------------------------- events
    def _on_event(self, proto: HboneProtocol, event: Event) -> None:
        if isinstance(event, TunnelRequested):
            stream = proto.add_stream(event.stream_id)
            handle = TunnelHandle(stream)
            task = proto.loop.create_task(
                self._serve(proto, stream, event, handle), name=f"hbone-tunnel-{event.stream_id}"
            )
            handle._task = task
            self._tasks[(proto, event.stream_id)] = task
        elif isinstance(event, StreamReset):
            pending = self._tasks.get((proto, event.stream_id))
            if pending is not None and (proto, event.stream_id) not in self._accepted:
                pending.cancel()  # Rapid Reset: abandon the decision / dial in progress
        elif isinstance(event, ConnectionTerminated):
            for (p, _sid), task in list(self._tasks.items()):
                if p is proto and (p, _sid) not in self._accepted:
                    task.cancel()
            if not event.remote:
                if event.error_code != ErrorCodes.NO_ERROR:
                    self.guard_trips[event.reason] += 1
                # The GOAWAY waits in the transport; a peer that never reads would keep it (and
                # the socket) forever. close() is graceful, so abort after a grace period.
                proto.loop.call_later(self.caps.limits.close_grace, self._abort_if_open, proto)

    async def _serve(
        self,
        proto: HboneProtocol,
        stream: HboneStream,
        event: TunnelRequested,
        handle: TunnelHandle,
    ) -> None:
        sid = event.stream_id
        conn = proto.conn
        assert isinstance(conn, HboneServerConnection)
        started = time.monotonic()
        status = 0
        error: str | None = None
        result: CopyResult | None = None
        decision: Accept | AcceptStream | Reject | None = None
        transport = proto.transport
        request = TunnelRequest(
            authority=event.authority,
            headers=event.headers,
            peer_identity=proto.peer_identity,
            peer_address=transport.get_extra_info("peername") if transport else None,
            local_address=transport.get_extra_info("sockname") if transport else None,
            tunnel=handle,
        )
        try:
            decision = await self._on_connect(request)
            if isinstance(decision, Reject):
                status = decision.status
                error = decision.reason or None
                conn.reject(sid, decision.status)
                proto.forget(stream)
                proto.flush()
                return
            conn.accept(sid, decision.headers)  # raises if the stream was reset meanwhile
            self._accepted.add((proto, sid))
            handle.accepted = True
            status = 200
            if not stream.established.done():
                stream.established.set_result(())
            proto.flush()
            if isinstance(decision, AcceptStream):
                error = await _run_handler(decision, stream)
            elif decision.sock is not None:
                result = await splice_socket_hbone(decision.sock, stream)
            else:
                assert decision.reader is not None
                assert decision.writer is not None
                result = await splice_streams_hbone(decision.reader, decision.writer, stream)
            if result is not None:
                error = result.error
        except asyncio.CancelledError:
            error = "cancelled (stream reset or tunnel closed)"
            _close_upstream(decision)
            if not stream.done:
                stream.reset()
        except HboneError as err:
            error = str(err)
            _close_upstream(decision)
        except Exception as err:
            log.exception("HBONE on_connect failed for %s", event.authority)
            error = f"{type(err).__name__}: {err}"
            _close_upstream(decision)
            if status == 0 and conn.is_open(sid):
                status = 503
                with contextlib.suppress(HboneError):
                    conn.reject(sid, 503)
                proto.flush()
        finally:
            self._tasks.pop((proto, sid), None)
            self._accepted.discard((proto, sid))
            conn.release(sid)
            if conn.goaway_sent and conn.held_streams == 0:
                proto.close()
            if self._on_tunnel_closed is not None:
                self._on_tunnel_closed(
                    TunnelStats(
                        authority=event.authority,
                        peer_identity=proto.peer_identity,
                        status=status,
                        bytes_from_client=result.b_to_a if result else stream.bytes_received,
                        bytes_to_client=result.a_to_b if result else stream.bytes_sent,
                        duration=time.monotonic() - started,
                        error=error,
                        tunnel=handle,
                        request=request,
                    )
                )

    # ---------------------------------------------------------------- shutdown
    async def drain(self, timeout: float = 10.0) -> None:
        """Stop accepting, GOAWAY every connection, wait for tunnels until ``timeout``, close."""
        self._stop_accepting()
        for proto in list(self._protocols):
            proto.conn.drain()
            proto.flush()
            conn = proto.conn
            assert isinstance(conn, HboneServerConnection)
            if conn.held_streams == 0:
                proto.close()
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        await self.close()

    def _stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self._listen is not None:
            self._listen.close()

    async def close(self) -> None:
        """Close everything now."""
        self._stop_accepting()
        for task in list(self._tasks.values()) + list(self._handshakes):
            task.cancel()
        for proto in list(self._protocols):
            proto.close()
        waits = [p.closed for p in self._protocols]
        tasks = list(self._tasks.values()) + list(self._handshakes)
        if waits or tasks:
            await asyncio.wait([*waits, *tasks], timeout=2.0)
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.abort()


async def _run_handler(decision: AcceptStream, stream: HboneStream) -> str | None:
    """Run an AcceptStream handler to completion; returns the error to report, if any."""
    try:
        await decision.handler(stream)
    except HboneError as err:
        if not stream.done:
            stream.reset()
        return str(err)
    except Exception as err:
        log.exception("HBONE stream handler failed")
        if not stream.done:
            stream.reset()
        return f"{type(err).__name__}: {err}"
    if stream.done:
        return None
    stream.write_eof()  # queued data goes first
    try:
        await asyncio.wait_for(asyncio.shield(stream.closed), decision.linger)
    except TimeoutError:
        stream.reset()
        return f"peer did not end the stream within {decision.linger} s of the handler returning"
    return None


def _close_upstream(decision: Accept | AcceptStream | Reject | None) -> None:
    if isinstance(decision, Accept):
        if decision.sock is not None:
            decision.sock.close()
        elif decision.writer is not None:
            decision.writer.close()

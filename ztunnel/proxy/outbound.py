"""Outbound proxy (15001): a captured connection from a local pod, carried where routing says.

Owns the outbound connection life cycle shared by the capture listener and the SOCKS5 listener:
original destination -> ``ztunnel.state.routing.route_outbound`` -> one of

* ``Hbone``: a tunnel through the pool, TLS with the *source pod's* certificate, the server checked
  against the expected identities, ``CONNECT <authority>``; bytes spliced with half-close;
* ``Passthrough``: plain TCP to the original destination (never for a destination known to be HBONE);
* ``Deny`` / ``NoHealthyUpstream``: the client connection is closed.

Every connection is tracked (config_dump), counted (reporter ``source``) and access-logged once at
close. Also owns ``Listener``, the accept loop every per-workload listener uses (stops at once on
drain; each connection is a task the drain waits for).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from ztunnel.accesslog import AccessEntry
from ztunnel.identity.manager import CertificateUnavailable
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError
from ztunnel.identity.tls import PeerIdentityError
from ztunnel.metrics import Reporter, ResponseFlags, TrafficLabels, traffic_labels
from ztunnel.proxy.connections import ProxyContext
from ztunnel.proxy.copy import CopyResult, splice_socket_hbone, splice_sockets
from ztunnel.proxy.h2io import HboneStatusError, HboneStream
from ztunnel.proxy.pool import PoolKey
from ztunnel.proxy.socket_factory import (
    Endpoint,
    SocketFactory,
    configure_stream,
    family_of,
    local_endpoint,
    original_destination,
    peer_endpoint,
)
from ztunnel.state.model import IPAddress, Service, Workload
from ztunnel.state.routing import Deny, Hbone, NoHealthyUpstream, Passthrough, route_outbound

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket], Awaitable[None]]


class Listener:
    """Accepts on a listening socket and runs ``handler`` per connection as a drain-tracked task."""

    def __init__(self, ctx: ProxyContext, sock: socket.socket, handler: Handler, name: str) -> None:
        self.ctx = ctx
        self.sock = sock
        self.handler = handler
        self.name = name
        self._task: asyncio.Task[None] | None = None
        self.connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> Endpoint:
        return local_endpoint(self.sock)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._accept(), name=self.name)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as err:
                if self.sock.fileno() < 0:
                    return
                log.warning("%s: accept failed: %s", self.name, err)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            configure_stream(conn)
            task = loop.create_task(self._run(conn), name=f"{self.name}-conn")
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)
            self.ctx.drain.track(task)

    async def _run(self, conn: socket.socket) -> None:
        try:
            await self.handler(conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:
            log.exception("%s: connection handler failed", self.name)
            conn.close()

    def stop_accepting(self) -> None:
        """Close the listening socket now (drain or workload removal)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.sock.close()

    async def close(self) -> None:
        """Stop accepting and abort every connection of this listener."""
        self.stop_accepting()
        tasks = list(self.connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)


@dataclass(frozen=True, slots=True)
class _Own:
    """Values derived from the proxy's workload: built once per workload object, not per connection."""

    workload: Workload
    identity: SpiffeId
    identity_str: str
    baggage: str


LABEL_CACHE_SIZE = 256


class Outbound:
    """Outbound handling for one local workload (the capture listener and SOCKS5 use it)."""

    def __init__(self, ctx: ProxyContext, workload: Workload, factory: SocketFactory) -> None:
        self.ctx = ctx
        self.workload = workload  # the app replaces it when the workload changes
        self.factory = factory
        self._own_cache: _Own | None = None
        # (id(destination), id(service), mtls) -> (destination, service, labels); the objects are
        # kept so an id is never reused while cached, and compared with ``is`` on a hit.
        self._label_cache: dict[tuple[int, int, bool], tuple[object, object, TrafficLabels]] = {}

    def _own(self) -> _Own:
        own = self._own_cache
        w = self.workload
        if own is None or own.workload is not w:
            identity = w.identity()
            own = self._own_cache = _Own(w, identity, str(identity), _baggage(w))
            self._label_cache.clear()
        return own

    async def handle_captured(self, client: socket.socket) -> None:
        """15001: the original destination comes from the socket (SO_ORIGINAL_DST / local addr)."""
        await self.proxy(client, original_destination(client))

    async def proxy(
        self,
        client: socket.socket,
        dst: Endpoint,
        *,
        on_ready: Callable[[bool, str], Awaitable[None]] | None = None,
    ) -> None:
        """Route and carry ``client`` to ``dst``. ``on_ready(ok, reason)`` runs once the upstream is
        connected (or refused), before any byte flows (SOCKS5 sends its reply there)."""
        ctx = self.ctx
        started = time.monotonic()
        src = peer_endpoint(client)
        source = self.workload
        entry_base = AccessEntry(
            direction="outbound",
            src_addr=str(src),
            src_workload=source.name,
            src_namespace=source.namespace,
            src_identity=self._own().identity_str,
            dst_addr=str(dst),
        )

        def ms() -> int:
            return int((time.monotonic() - started) * 1000)

        async def refuse(reason: str, labels: TrafficLabels | None, flags: ResponseFlags) -> None:
            if on_ready is not None:
                with contextlib.suppress(OSError):
                    await on_ready(False, reason)
            client.close()
            entry = replace(entry_base, duration_ms=ms(), error=reason)
            if labels is None:
                ctx.access_log.write(entry)
                log.info("outbound %s -> %s refused: %s", src, dst, reason)
            else:
                ctx.finish(labels=labels, entry=entry, opened=False, flags=flags)

        if dst.port in ctx.illegal_ports and (dst.ip.is_loopback or dst.ip in source.addresses):
            await refuse(
                f"self-call to {dst}: port {dst.port} is one of ztunnel's own",
                None,
                ResponseFlags.NONE,
            )
            return
        decision = route_outbound(ctx.store, source, dst.ip, dst.port, ctx.rng)
        if isinstance(decision, Deny):
            await refuse(decision.reason, None, ResponseFlags.NONE)
            return
        if isinstance(decision, NoHealthyUpstream):
            labels = self._labels(None, decision.service, mtls=False)
            await refuse(f"no healthy upstream: {decision.reason}", labels, ResponseFlags.CONNECT)
            return
        if isinstance(decision, Passthrough):
            await self._passthrough(client, dst, decision, entry_base, started, on_ready, refuse)
            return
        await self._hbone(client, decision, entry_base, started, on_ready, refuse)

    # -- plain TCP ---------------------------------------------------------------------------

    async def _passthrough(
        self,
        client: socket.socket,
        dst: Endpoint,
        decision: Passthrough,
        entry_base: AccessEntry,
        started: float,
        on_ready: Callable[[bool, str], Awaitable[None]] | None,
        refuse: Callable[[str, TrafficLabels | None, ResponseFlags], Awaitable[None]],
    ) -> None:
        ctx = self.ctx
        target = Endpoint(decision.addr.ip, decision.addr.port)
        labels = self._labels(
            decision.destination_workload, decision.destination_service, mtls=False
        )
        try:
            upstream = await self._dial(target)
        except OSError as err:
            await refuse(f"connect to {target} failed: {err}", labels, ResponseFlags.CONNECT)
            return
        ctx.metrics.connection_opened(labels)
        if on_ready is not None:
            await on_ready(True, "")
        task = asyncio.current_task()
        tracked = ctx.tracker.register(
            direction="outbound",
            src=entry_base.src_addr,
            dst=str(target),
            local_workload=self.workload.uid,
            close=lambda _reason: _cancel_current(task),
        )
        result: CopyResult | None = None
        try:
            result = await splice_sockets(client, upstream)
        finally:
            ctx.tracker.unregister(tracked)
            self._record(
                labels,
                _with(
                    replace(
                        entry_base,
                        dst_addr=str(target),
                        dst_service=_svc(decision.destination_service),
                        dst_workload=_name(decision.destination_workload),
                        dst_namespace=_ns(decision.destination_workload),
                    ),
                    result,
                    started,
                ),
                ResponseFlags.NONE,
            )

    async def _dial(self, target: Endpoint) -> socket.socket:
        family = family_of(target.ip)
        sock = self.factory.upstream(family, source=self._source_ip(target.ip))
        try:
            async with asyncio.timeout(self.ctx.connect_timeout):  # no extra Task, unlike wait_for
                await asyncio.get_running_loop().sock_connect(sock, target.sockaddr())
        except BaseException:
            sock.close()
            raise
        return sock

    def _source_ip(self, dst_ip: IPAddress) -> IPAddress | None:
        """Loopback mode: bind upstream sockets to the pod's IP so peers see its address."""
        if not self.ctx.loopback:
            return None  # in-pod: the socket lives in the pod netns and gets its IP anyway
        for ip in self.workload.addresses:
            if ip.version == dst_ip.version:
                return ip
        return None

    # -- HBONE --------------------------------------------------------------------------------

    async def _hbone(
        self,
        client: socket.socket,
        decision: Hbone,
        entry_base: AccessEntry,
        started: float,
        on_ready: Callable[[bool, str], Awaitable[None]] | None,
        refuse: Callable[[str, TrafficLabels | None, ResponseFlags], Awaitable[None]],
    ) -> None:
        ctx = self.ctx
        own = self._own()
        expected = _identities(decision.expected_identities)
        dest = decision.destination_workload
        target = decision.target_workload
        labels = self._labels(target or dest, decision.destination_service, mtls=True)
        base = replace(
            entry_base,
            dst_addr=str(decision.connect_addr),
            dst_hbone_addr=str(decision.authority),
            dst_service=_svc(decision.destination_service),
            dst_workload=_name(target or dest),
            dst_namespace=_ns(target or dest),
            dst_identity=labels.destination_principal,
        )
        key = PoolKey(
            src_identity=own.identity,
            dst_identities=expected,
            src_ip=self._source_ip(decision.connect_addr.ip) or _first(self.workload.addresses),
            dst_ip=decision.connect_addr.ip,
            dst_port=decision.connect_addr.port,
        )
        headers = [
            (
                "forwarded",
                f'for="{entry_base.src_addr}"'
                + (
                    f";host={decision.destination_service.hostname}"
                    if decision.destination_service
                    else ""
                ),
            ),
            ("traceparent", _traceparent()),
        ]
        if own.baggage:
            headers.append(("baggage", own.baggage))
        stream: HboneStream | None = None
        try:
            stream = await ctx.pool.connect(key, str(decision.authority), headers)
        except HboneStatusError as err:
            flags = ResponseFlags.DENY if err.status == 401 else ResponseFlags.CONNECT
            await self._refuse_hbone(
                base,
                started,
                labels,
                on_ready,
                client,
                f"HBONE CONNECT rejected with status {err.status}",
                flags,
            )
            return
        except CertificateUnavailable as err:  # the pool's client context: no source certificate
            await self._refuse_hbone(
                base, started, labels, on_ready, client, str(err), ResponseFlags.IDENTITY_ERROR
            )
            return
        except PeerIdentityError as err:
            await self._refuse_hbone(
                base, started, labels, on_ready, client, str(err), ResponseFlags.TLS_FAILURE
            )
            return
        except ssl.SSLError as err:
            await self._refuse_hbone(
                base,
                started,
                labels,
                on_ready,
                client,
                f"TLS handshake failed: {err}",
                ResponseFlags.TLS_FAILURE,
            )
            return
        except (OSError, TimeoutError, Exception) as err:
            await self._refuse_hbone(
                base,
                started,
                labels,
                on_ready,
                client,
                f"HBONE to {decision.connect_addr} failed: {type(err).__name__}: {err}",
                ResponseFlags.CONNECT,
            )
            return
        ctx.metrics.connection_opened(labels)
        if on_ready is not None:
            try:
                await on_ready(True, "")
            except OSError:
                stream.reset()
                client.close()
                return
        live = stream
        tracked = ctx.tracker.register(
            direction="outbound",
            src=entry_base.src_addr,
            dst=str(decision.connect_addr),
            hbone_target=str(decision.authority),
            local_workload=self.workload.uid,
            close=lambda _reason: live.reset(),
        )
        result: CopyResult | None = None
        try:
            result = await splice_socket_hbone(client, stream)
        finally:
            ctx.tracker.unregister(tracked)
            self._record(
                labels,
                _with(base, result, started),
                ResponseFlags.NONE,
            )

    async def _refuse_hbone(
        self,
        base: AccessEntry,
        started: float,
        labels: TrafficLabels,
        on_ready: Callable[[bool, str], Awaitable[None]] | None,
        client: socket.socket,
        reason: str,
        flags: ResponseFlags,
    ) -> None:
        if on_ready is not None:
            with contextlib.suppress(OSError):
                await on_ready(False, reason)
        client.close()
        entry = _with(base, None, started, error=reason)
        self.ctx.finish(labels=labels, entry=entry, opened=False, flags=flags)

    # -- telemetry -----------------------------------------------------------------------------

    def _labels(
        self, destination: Workload | None, service: object, *, mtls: bool
    ) -> TrafficLabels:
        """Labels for this workload to ``destination`` (whose identity is the principal with mTLS).
        Cached: the same few pairs recur on every connection."""
        own = self._own()
        key = (id(destination), id(service), mtls)
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is destination and hit[1] is service:
            return hit[2]
        labels = traffic_labels(
            reporter=Reporter.SOURCE,
            source=own.workload,
            source_identity=own.identity if mtls else None,
            destination=destination,
            destination_identity=destination.identity() if mtls and destination else None,
            service=service if isinstance(service, Service) else None,
            mtls=mtls,
        )
        if len(self._label_cache) >= LABEL_CACHE_SIZE:
            self._label_cache.clear()  # destinations come and go with config: keep it bounded
        self._label_cache[key] = (destination, service, labels)
        return labels

    def _record(self, labels: TrafficLabels, entry: AccessEntry, flags: ResponseFlags) -> None:
        self.ctx.finish(labels=labels, entry=entry, opened=True, flags=flags)


def _with(
    base: AccessEntry, result: CopyResult | None, started: float, *, error: str | None = None
) -> AccessEntry:
    if result is None:
        return replace(base, duration_ms=_ms(started), error=error or "cancelled")
    return replace(
        base,
        bytes_sent=result.a_to_b,
        bytes_recv=result.b_to_a,
        duration_ms=_ms(started),
        error=error if error is not None else result.error,
    )


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


@functools.lru_cache(maxsize=1024)
def _identities(uris: tuple[str, ...]) -> frozenset[SpiffeId]:
    """The parseable SPIFFE IDs of ``uris`` (cached: the same few sets recur per connection)."""
    out: list[SpiffeId] = []
    for uri in uris:
        with contextlib.suppress(SpiffeIdError):
            out.append(SpiffeId.parse(uri))
    return frozenset(out)


def _traceparent() -> str:
    """A fresh W3C traceparent (trace id 16 bytes, span id 8): one getrandom call, not two."""
    ids = secrets.token_hex(24)
    return f"00-{ids[:32]}-{ids[32:]}-00"


def _baggage(w: Workload) -> str:
    kind = w.workload_type.value.lower()
    fields = [
        ("k8s.cluster.name", w.cluster_id),
        ("k8s.namespace.name", w.namespace),
        (f"k8s.{kind}.name", w.workload_name or w.name),
        ("service.name", w.canonical_name),
        ("service.version", w.canonical_revision),
        ("cloud.region", w.locality.region),
        ("cloud.availability_zone", w.locality.zone),
    ]
    return ",".join(f"{k}={v}" for k, v in fields if v)


def _first(addresses: tuple[IPAddress, ...]) -> IPAddress | None:
    return addresses[0] if addresses else None


def _svc(service: object) -> str | None:
    hostname = getattr(service, "hostname", None)
    return hostname if isinstance(hostname, str) else None


def _name(w: Workload | None) -> str | None:
    return w.name if w is not None else None


def _ns(w: Workload | None) -> str | None:
    return w.namespace if w is not None else None


def _cancel_current(task: asyncio.Task[object] | None) -> None:
    if task is not None:
        task.cancel()

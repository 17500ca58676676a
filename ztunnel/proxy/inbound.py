"""Inbound HBONE proxy (15008): the decisions around each CONNECT the HBONE server receives.

Owns ``on_connect`` for one local pod's ``HboneServer`` (which presents the pod's certificate and has
already checked the client's trust domain), in Istio's order:

1. ``ztunnel.state.inbound.resolve_inbound_hbone``: authority must be ``ip:port`` of this pod (400),
   a known local workload on a legal port (503);
2. the connection is registered with the tracker *before* the policy check (a policy change racing
   the upstream connect is then seen by the re-check), then ``authz`` decides: denied -> ``401``;
3. the app is dialled spoofing the client's IP (IP_TRANSPARENT + IP_FREEBIND, bound to the client IP,
   port 0; a plain connect when client and app share the IP) -> ``503`` on failure;
4. only then ``200``; the server splices bytes. At the end one access-log line and the metrics
   (reporter ``destination``); a connection closed by a later policy change is flagged ``DENY``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, replace

from ztunnel.accesslog import AccessEntry
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.metrics import Reporter, ResponseFlags, TrafficLabels, traffic_labels
from ztunnel.proxy.connections import ProxyContext, TrackedConnection
from ztunnel.proxy.hbone_server import Accept, Reject, TunnelHandle, TunnelRequest, TunnelStats
from ztunnel.proxy.socket_factory import Endpoint, SocketFactory, family_of, parse_ip
from ztunnel.state.authz import ConnectionAttrs
from ztunnel.state.inbound import InboundReject, resolve_inbound_hbone
from ztunnel.state.model import IPAddress, Workload

log = logging.getLogger(__name__)

LABEL_CACHE_SIZE = 256


@dataclass(eq=False, kw_only=True)
class _Tunnel:
    """Per-tunnel bookkeeping between ``on_connect`` and ``on_closed``."""

    started: float
    labels: TrafficLabels
    entry: AccessEntry
    tracked: TrackedConnection | None = None
    flags: ResponseFlags = ResponseFlags.NONE
    error: str | None = None
    counted_open: bool = False


def ip_of(address: object) -> IPAddress | None:
    """The IP of a socket address tuple as asyncio reports it (None if it is not one)."""
    if isinstance(address, tuple) and address:
        try:
            return parse_ip(address[0])
        except (ValueError, TypeError):
            return None
    return None


def _fmt(address: object) -> str:
    ip = ip_of(address)
    if ip is None or not isinstance(address, tuple):
        return str(address)
    return str(Endpoint(ip, int(address[1])))


class InboundHbone:
    """``on_connect`` / ``on_closed`` for the HBONE server of one local workload."""

    def __init__(self, ctx: ProxyContext, workload: Workload, factory: SocketFactory) -> None:
        self.ctx = ctx
        self.workload = workload  # the app replaces it when the workload changes
        self.factory = factory
        # Keyed by the tunnel's handle: the request carries it, and so do the closing stats.
        self._tunnels: dict[TunnelHandle, _Tunnel] = {}
        # Per-connection values that only change with the workloads involved (rebuilt on change).
        self._cached_for: Workload | None = None
        self._identity_str = ""
        self._label_cache: dict[tuple[int, SpiffeId | None], tuple[object, TrafficLabels]] = {}

    def _refresh(self) -> None:
        if self._cached_for is not self.workload:
            self._cached_for = self.workload
            self._identity_str = str(self.workload.identity())
            self._label_cache.clear()

    async def on_connect(self, request: TunnelRequest) -> Accept | Reject:
        ctx = self.ctx
        self._refresh()
        peer_ip = ip_of(request.peer_address)
        local_ip = ip_of(request.local_address)
        peer_identity = request.peer_identity
        source = ctx.source_by_ip(peer_ip) if peer_ip is not None else None
        tunnel = _Tunnel(
            started=time.monotonic(),
            labels=self._labels(source, peer_identity),
            entry=AccessEntry(
                direction="inbound",
                src_addr=_fmt(request.peer_address),
                src_workload=source.name if source else None,
                src_namespace=source.namespace if source else None,
                src_identity=str(peer_identity) if peer_identity else None,
                # As ztunnel: inbound dst.addr is the app address the tunnel targets.
                dst_addr=str(request.authority),
                dst_hbone_addr=str(request.authority),
                dst_workload=self.workload.name,
                dst_namespace=self.workload.namespace,
                dst_identity=self._identity_str,
            ),
        )
        self._tunnels[request.tunnel] = tunnel
        if peer_ip is None or local_ip is None:
            return self._reject(tunnel, 400, "connection addresses unknown", ResponseFlags.CONNECT)
        decision = resolve_inbound_hbone(
            ctx.store, ctx.local_by_ip, str(request.authority), local_ip
        )
        if isinstance(decision, InboundReject):
            return self._reject(tunnel, decision.status, decision.reason, ResponseFlags.CONNECT)
        destination = decision.destination_workload or decision.local_workload
        target = Endpoint(decision.target.ip, decision.target.port)
        attrs = ConnectionAttrs(
            source_ip=peer_ip,
            source_identity=peer_identity,
            destination=destination,
            destination_ip=target.ip,
            destination_port=target.port,
        )
        # Register first, check second: a policy change from here on is seen by the re-check.
        tracked = ctx.tracker.register(
            direction="inbound",
            src=tunnel.entry.src_addr,
            dst=str(target),
            hbone_target=str(request.authority),
            local_workload=self.workload.uid,
            attrs=attrs,
            close=lambda _reason: request.tunnel.close(),
        )
        tunnel.tracked = tracked
        verdict = ctx.tracker.check(tracked)
        if not verdict.allowed:
            ctx.tracker.unregister(tracked)
            if verdict.missing_policies:
                ctx.metrics.unknown_policy_denied(verdict.missing_policies)
            log.info("inbound %s -> %s denied: %s", tunnel.entry.src_addr, target, verdict.reason)
            return self._reject(tunnel, 401, f"policy denied: {verdict.reason}", ResponseFlags.DENY)
        try:
            upstream = await self._dial(peer_ip, target)
        except OSError as err:
            ctx.tracker.unregister(tracked)
            return self._reject(
                tunnel, 503, f"connect to {target} failed: {err}", ResponseFlags.CONNECT
            )
        if tracked.denied_reason is not None:
            # A policy change during the dial denies it now: never answer 200.
            upstream.close()
            ctx.tracker.unregister(tracked)
            return self._reject(
                tunnel, 401, f"policy denied: {tracked.denied_reason}", ResponseFlags.DENY
            )
        ctx.metrics.connection_opened(tunnel.labels)
        tunnel.counted_open = True
        return Accept(sock=upstream)

    async def _dial(self, client_ip: IPAddress, target: Endpoint) -> socket.socket:
        return await dial_spoofed(self.ctx, self.factory, client_ip, target)

    def _reject(self, tunnel: _Tunnel, status: int, reason: str, flags: ResponseFlags) -> Reject:
        tunnel.flags = flags
        tunnel.error = reason
        return Reject(status=status, reason=reason)

    def on_closed(self, stats: TunnelStats) -> None:
        tunnel = self._tunnels.pop(stats.tunnel, None) if stats.tunnel is not None else None
        if tunnel is None:
            log.warning("HBONE tunnel to %s closed without bookkeeping", stats.authority)
            return
        ctx = self.ctx
        flags = tunnel.flags
        error = tunnel.error or stats.error
        if tunnel.tracked is not None:
            ctx.tracker.unregister(tunnel.tracked)
            if tunnel.tracked.denied_reason is not None:
                flags = ResponseFlags.DENY
                error = f"authorization policy late rejection: {tunnel.tracked.denied_reason}"
        entry = replace(
            tunnel.entry,
            bytes_sent=stats.bytes_from_client,
            bytes_recv=stats.bytes_to_client,
            duration_ms=int((time.monotonic() - tunnel.started) * 1000),
            error=error,
        )
        ctx.finish(labels=tunnel.labels, entry=entry, opened=tunnel.counted_open, flags=flags)

    def _labels(self, source: Workload | None, peer: SpiffeId | None) -> TrafficLabels:
        # Cached per (source workload object, peer identity): the object is kept and compared
        # with ``is``, so a replaced workload (new object) gets fresh labels.
        key = (id(source), peer)
        hit = self._label_cache.get(key)
        if hit is not None and hit[0] is source:
            return hit[1]
        labels = traffic_labels(
            reporter=Reporter.DESTINATION,
            source=source,
            source_identity=peer,
            destination=self.workload,
            destination_identity=self.workload.identity(),
            service=None,
            mtls=True,
        )
        if len(self._label_cache) >= LABEL_CACHE_SIZE:
            self._label_cache.clear()  # sources come and go: keep it bounded
        self._label_cache[key] = (source, labels)
        return labels


async def dial_spoofed(
    ctx: ProxyContext, factory: SocketFactory, client_ip: IPAddress, target: Endpoint
) -> socket.socket:
    """Connect to the app at ``target`` with the client's IP as source (a plain connect when they
    share the IP or the address family differs)."""
    spoof = client_ip != target.ip and client_ip.version == target.ip.version
    sock = factory.upstream(family_of(target.ip), source=client_ip if spoof else None, spoof=spoof)
    try:
        async with asyncio.timeout(ctx.connect_timeout):  # no extra Task, unlike wait_for
            await asyncio.get_running_loop().sock_connect(sock, target.sockaddr())
    except TimeoutError as err:
        sock.close()
        raise OSError(f"timed out after {ctx.connect_timeout}s") from err
    except BaseException:
        sock.close()
        raise
    return sock

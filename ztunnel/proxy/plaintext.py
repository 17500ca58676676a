"""Inbound plaintext proxy (15006): a non-mesh client's connection to a local pod, under policy.

Owns the life cycle of a connection captured on 15006: the original destination (SO_ORIGINAL_DST, or
the TPROXY local address) must be a local workload on a legal port
(``ztunnel.state.inbound.resolve_inbound_plaintext``); the connection is tracked, then authorized
*without an identity* (only IP/port/namespace-free matches can allow it); a denial closes the client
connection (flag ``DENY``); otherwise the app is dialled spoofing the client's IP and bytes are
spliced. Telemetry: reporter ``destination``, ``connection_security_policy`` ``unknown``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from ztunnel.accesslog import AccessEntry
from ztunnel.metrics import Reporter, ResponseFlags, traffic_labels
from ztunnel.proxy.connections import ProxyContext
from ztunnel.proxy.copy import CopyResult, splice_sockets
from ztunnel.proxy.inbound import dial_spoofed
from ztunnel.proxy.socket_factory import (
    Endpoint,
    SocketFactory,
    original_destination,
    peer_endpoint,
)
from ztunnel.state.authz import ConnectionAttrs
from ztunnel.state.inbound import InboundReject, resolve_inbound_plaintext
from ztunnel.state.model import Workload

log = logging.getLogger(__name__)

OriginalDst = Callable[[socket.socket], Endpoint]


class InboundPlaintext:
    """15006 handling for one local workload; ``original_dst`` is injectable for loopback tests."""

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        factory: SocketFactory,
        *,
        original_dst: OriginalDst = original_destination,
    ) -> None:
        self.ctx = ctx
        self.workload = workload
        self.factory = factory
        self.original_dst = original_dst

    async def handle(self, client: socket.socket) -> None:
        ctx = self.ctx
        started = time.monotonic()
        src = peer_endpoint(client)
        dst = self.original_dst(client)
        source = ctx.source_by_ip(src.ip)
        labels = traffic_labels(
            reporter=Reporter.DESTINATION,
            source=source,
            source_identity=None,
            destination=self.workload,
            destination_identity=self.workload.identity(),
            service=None,
            mtls=False,
        )
        entry = AccessEntry(
            direction="inbound",
            src_addr=str(src),
            src_workload=source.name if source else None,
            src_namespace=source.namespace if source else None,
            dst_addr=str(dst),
            dst_workload=self.workload.name,
            dst_namespace=self.workload.namespace,
            dst_identity=str(self.workload.identity()),
        )

        def refuse(reason: str, flags: ResponseFlags) -> None:
            client.close()
            done = replace(entry, duration_ms=_ms(started), error=reason)
            ctx.finish(labels=labels, entry=done, opened=False, flags=flags)

        decision = resolve_inbound_plaintext(ctx.local_by_ip, dst.ip, dst.port)
        if isinstance(decision, InboundReject):
            refuse(decision.reason, ResponseFlags.CONNECT)
            return
        if dst.port in ctx.illegal_ports:
            refuse(f"port {dst.port} is one of ztunnel's own (loop)", ResponseFlags.CONNECT)
            return
        attrs = ConnectionAttrs(
            source_ip=src.ip,
            source_identity=None,
            destination=decision.destination_workload or decision.local_workload,
            destination_ip=dst.ip,
            destination_port=dst.port,
        )
        upstream: socket.socket | None = None

        def close(_reason: str) -> None:
            # Cancelling the handler aborts the dial or both sides of the splice; it records DENY.
            if task is not None:
                task.cancel()

        task = asyncio.current_task()
        spliced = False
        tracked = ctx.tracker.register(
            direction="inbound",
            src=str(src),
            dst=str(dst),
            local_workload=self.workload.uid,
            attrs=attrs,
            close=close,
        )
        try:
            verdict = ctx.tracker.check(tracked)
            if not verdict.allowed:
                if verdict.missing_policies:
                    ctx.metrics.unknown_policy_denied(verdict.missing_policies)
                refuse(f"policy denied: {verdict.reason}", ResponseFlags.DENY)
                return
            try:
                upstream = await dial_spoofed(ctx, self.factory, src.ip, dst)
            except OSError as err:
                refuse(f"connect to {dst} failed: {err}", ResponseFlags.CONNECT)
                return
            ctx.metrics.connection_opened(labels)
            spliced = True
            result: CopyResult | None = None
            try:
                result = await splice_sockets(client, upstream)
            finally:
                flags = ResponseFlags.NONE
                error = result.error if result is not None else "cancelled"
                if tracked.denied_reason is not None:
                    flags = ResponseFlags.DENY
                    error = f"authorization policy late rejection: {tracked.denied_reason}"
                done = replace(
                    entry,
                    bytes_sent=result.a_to_b if result is not None else 0,
                    bytes_recv=result.b_to_a if result is not None else 0,
                    duration_ms=_ms(started),
                    error=error,
                )
                ctx.finish(labels=labels, entry=done, opened=True, flags=flags)
        except asyncio.CancelledError:
            if not spliced:
                if upstream is not None:
                    upstream.close()
                reason = tracked.denied_reason or "cancelled"
                refuse(f"policy denied: {reason}", ResponseFlags.DENY)
            raise
        finally:
            ctx.tracker.unregister(tracked)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)

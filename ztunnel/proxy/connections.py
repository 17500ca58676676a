"""Live-connection tracking: what is open right now, and closing what a policy change now denies.

Owns the registry of open proxied connections (inbound with their authorization attributes, outbound
for visibility) shown in ``config_dump``, and the late re-check of Istio's ``PolicyWatcher``: after
any change that can alter a verdict (the store's policy subscription: policies or workloads), every
tracked inbound connection is re-authorized against the current store and the denied ones are closed
through their ``close`` callback (flag ``DENY``).

No race with a concurrent change: a connection is registered *before* its first check, so a change
that lands between the check and the upstream connect is seen by the re-check.

No I/O here: closing is the callback's business (the proxy aborts its transports).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ztunnel.accesslog import AccessEntry, AccessLog
from ztunnel.config import ILLEGAL_PORTS
from ztunnel.metrics import Metrics, ResponseFlags, TrafficLabels
from ztunnel.state.authz import ConnectionAttrs, Verdict, authorize
from ztunnel.state.model import IPAddress, Workload
from ztunnel.state.routing import Rng
from ztunnel.state.store import StoreChange, WorkloadStore

if TYPE_CHECKING:  # the shells' types; this module itself does no I/O
    from ztunnel.drain import Drain
    from ztunnel.identity.manager import CertificateManager
    from ztunnel.proxy.pool import HbonePool

log = logging.getLogger(__name__)


@dataclass(eq=False, kw_only=True)
class TrackedConnection:
    """One open connection. ``attrs`` is set for inbound connections (re-checked on changes)."""

    id: int
    direction: str  # "inbound" | "outbound"
    src: str
    dst: str
    hbone_target: str | None
    local_workload: str  # uid of the pod this ztunnel acts for
    attrs: ConnectionAttrs | None
    close: Callable[[str], None]
    started: float = field(default_factory=time.time)
    bytes_sent: int = 0  # client to server, so far
    bytes_recv: int = 0  # server to client, so far
    denied_reason: str | None = None  # set when a policy change closed it

    def describe(self) -> dict[str, object]:
        identity = self.attrs.source_identity if self.attrs is not None else None
        return {
            "id": self.id,
            "direction": self.direction,
            "src": self.src,
            "dst": self.dst,
            "hbone_target": self.hbone_target,
            "workload": self.local_workload,
            "src_identity": str(identity) if identity is not None else None,
            "started": self.started,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
        }


class ConnectionTracker:
    """The live connections of one ztunnel; re-checks inbound ones on every policy change."""

    def __init__(
        self,
        store: WorkloadStore,
        *,
        on_late_deny: Callable[[TrackedConnection, Verdict], None] | None = None,
    ) -> None:
        self.store = store
        self.on_late_deny = on_late_deny
        self._ids = itertools.count(1)
        self._live: dict[int, TrackedConnection] = {}
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        if self._unsubscribe is None:
            self._unsubscribe = self.store.subscribe_policies(self._on_change)

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def register(
        self,
        *,
        direction: str,
        src: str,
        dst: str,
        local_workload: str,
        close: Callable[[str], None],
        attrs: ConnectionAttrs | None = None,
        hbone_target: str | None = None,
    ) -> TrackedConnection:
        conn = TrackedConnection(
            id=next(self._ids),
            direction=direction,
            src=src,
            dst=dst,
            hbone_target=hbone_target,
            local_workload=local_workload,
            attrs=attrs,
            close=close,
        )
        self._live[conn.id] = conn
        return conn

    def unregister(self, conn: TrackedConnection) -> None:
        self._live.pop(conn.id, None)

    def __len__(self) -> int:
        return len(self._live)

    def live(self) -> list[TrackedConnection]:
        return list(self._live.values())

    def snapshot(self) -> list[dict[str, object]]:
        return [c.describe() for c in self._live.values()]

    def check(self, conn: TrackedConnection) -> Verdict:
        """Authorize ``conn`` against the current store (destination workload re-read by uid)."""
        attrs = conn.attrs
        if attrs is None:
            return Verdict(allowed=True, reason="outbound connections are not re-checked")
        current = self.store.workload_by_uid(attrs.destination.uid)
        if current is None:
            return Verdict(
                allowed=False, reason=f"destination workload {attrs.destination.uid} was removed"
            )
        if current is not attrs.destination:
            attrs = replace(attrs, destination=current)
            conn.attrs = attrs
        return authorize(self.store, attrs)

    def recheck(self) -> list[TrackedConnection]:
        """Re-authorize every inbound connection; close and return the ones now denied."""
        closed: list[TrackedConnection] = []
        for conn in list(self._live.values()):
            if conn.attrs is None or conn.denied_reason is not None:
                continue
            verdict = self.check(conn)
            if verdict.allowed:
                continue
            conn.denied_reason = verdict.reason
            closed.append(conn)
            log.info(
                "closing connection %s -> %s: policy change now denies it: %s",
                conn.src,
                conn.dst,
                verdict.reason,
            )
            if self.on_late_deny is not None:
                self.on_late_deny(conn, verdict)
            try:
                conn.close(verdict.reason)
            except Exception:  # one failing close must not keep the others open
                log.exception("closing connection %d failed", conn.id)
        return closed

    def _on_change(self, change: StoreChange) -> None:
        self.recheck()


# --------------------------------------------------------------------------------------------------
# What every proxy shares
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False, kw_only=True)
class ProxyContext:
    """The services the per-workload proxies share (one per ztunnel process).

    ``local_by_ip`` maps each local workload address to its workload (the inbound checks' view of
    "this node's pods"); ``loopback`` says listeners sit on the workload's own IP in ztunnel's netns
    (tests, dedicated mode), so upstream sockets are bound to the workload IP to carry its source
    address. ``illegal_ports`` is Istio's set plus the SOCKS5 port when that listener is enabled.
    """

    store: WorkloadStore
    certs: CertificateManager
    pool: HbonePool
    metrics: Metrics
    access_log: AccessLog
    tracker: ConnectionTracker
    drain: Drain
    rng: Rng
    local_by_ip: dict[IPAddress, Workload] = field(default_factory=dict)
    loopback: bool = True
    illegal_ports: frozenset[int] = ILLEGAL_PORTS
    connect_timeout: float = 10.0

    def source_by_ip(self, ip: IPAddress) -> Workload | None:
        return self.store.workload_by_ip(ip)

    def finish(
        self,
        *,
        labels: TrafficLabels,
        entry: AccessEntry,
        opened: bool,
        flags: ResponseFlags,
    ) -> None:
        """Record a finished (or refused) connection: metrics by value, then one access-log line.

        ``opened``: the connection was counted as opened (so it is counted closed now); a refusal
        before any upstream work counts opened and closed with its flag, and as failed.
        """
        final = labels.with_flags(flags)
        if not opened:
            self.metrics.connection_opened(labels)
        # Request direction = client to server = the access log's bytes_sent.
        self.metrics.connection_closed(
            final, request_bytes=entry.bytes_sent, response_bytes=entry.bytes_recv
        )
        if flags is not ResponseFlags.NONE:
            self.metrics.connection_failed(final)
        self.access_log.write(entry)

"""Every HTTP/2 limit python-hyper/h2 does not enforce itself, in one place (reliability.md §3, §6).

Owns the per-connection budgets against Rapid Reset (CVE-2023-44487), MadeYouReset (CVE-2025-8671),
CONTINUATION floods, control-frame floods while the peer does not read (CVE-2019-9512/9515), empty-frame,
PRIORITY and WINDOW_UPDATE floods (a HAProxy-style glitch counter), stream caps (REFUSED_STREAM for the
offending stream, never a connection error that would kill a pooled connection), a lifetime stream cap
and the handshake / first-CONNECT / idle timeouts; and, per listener, the global and per-source-identity
connection caps (:class:`ListenerLimits`, :class:`ConnectionCaps`). The connection core (``connection.py``) feeds it
facts and acts on a returned :class:`GuardTrip`; the asyncio shell enforces the handshake timeout.
Pure: time is passed in, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from ztunnel.hbone.errors import ErrorCodes

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """The edge-hardened profile of the HBONE listener (reliability.md §6); tune per deployment."""

    reset_burst: int = 1000
    """Rapid Reset token bucket size: peer RST_STREAMs allowed in a burst (nghttp2)."""
    reset_refill_per_second: float = 33.0
    """Rapid Reset token refill rate."""
    max_local_error_resets: int = 1024
    """Streams we reset because the peer misbehaved (MadeYouReset), then GOAWAY (hyperium/h2)."""
    max_continuation_frames: int = 4
    """CONTINUATION frames allowed after one HEADERS."""
    max_header_block_bytes: int = 16 * KiB
    """Encoded header block (HEADERS + CONTINUATIONs), counted while buffering."""
    max_queued_control_frames: int = 1000
    """Peer-provoked control frames (PING/SETTINGS ACKs, resets) queued while the peer does not read."""
    max_queued_control_bytes: int = 1 * MiB
    """Bytes of such frames queued while the peer does not read."""
    glitch_threshold: int = 100
    """Suspicious but legal frames (empty DATA, PRIORITY, unknown types, excess WINDOW_UPDATE,
    excess PING/SETTINGS) tolerated per connection (HAProxy glitches-threshold)."""
    control_burst: int = 100
    """PING and SETTINGS frames allowed in a burst before each one counts as a glitch."""
    control_refill_per_second: float = 10.0
    max_concurrent_streams: int = 200
    """Streams in use (including ones whose upstream work is not torn down yet); more get
    REFUSED_STREAM."""
    max_lifetime_streams: int = 10_000
    """Streams per connection; the last one triggers a graceful GOAWAY."""
    handshake_timeout: float = 10.0
    """TLS handshake deadline (enforced by the shell)."""
    first_connect_timeout: float = 10.0
    """Server: the first CONNECT must arrive this soon after the handshake."""
    idle_timeout: float | None = 600.0
    """Server: close after this long without any stream (None: never)."""


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardTrip:
    """A limit was exceeded: send GOAWAY with ``error_code`` and close the connection."""

    reason: str
    error_code: int = ErrorCodes.ENHANCE_YOUR_CALM


class TokenBucket:
    """Classic token bucket with an injected clock (``now`` in seconds)."""

    __slots__ = ("_last", "_rate", "_tokens", "burst")

    def __init__(self, *, burst: int, rate: float, now: float) -> None:
        self.burst = burst
        self._rate = rate
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        """Take one token; False when the bucket is empty."""
        if now > self._last:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self._rate)
            self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Guard:
    """Per-connection counters. Each ``on_*`` method returns a :class:`GuardTrip` or None."""

    def __init__(self, limits: Limits, *, now: float) -> None:
        self.limits = limits
        self._resets = TokenBucket(
            burst=limits.reset_burst, rate=limits.reset_refill_per_second, now=now
        )
        self._control = TokenBucket(
            burst=limits.control_burst, rate=limits.control_refill_per_second, now=now
        )
        self.local_error_resets = 0
        self.glitches = 0
        self.queued_control_frames = 0
        self.queued_control_bytes = 0
        self.window_updates_received = 0
        self.data_frames_sent = 0
        self.streams_opened = 0
        self._block_frames = -1  # CONTINUATIONs seen in the header block being buffered; -1: none
        self._block_bytes = 0

    # -- Rapid Reset and MadeYouReset ------------------------------------------------------------
    def on_reset_received(self, now: float) -> GuardTrip | None:
        if self._resets.take(now):
            return None
        return GuardTrip(reason="stream reset rate exceeded (Rapid Reset)")

    def on_local_error_reset(self) -> GuardTrip | None:
        self.local_error_resets += 1
        if self.local_error_resets > self.limits.max_local_error_resets:
            return GuardTrip(reason="too many streams reset for peer errors (MadeYouReset)")
        return None

    # -- header blocks -------------------------------------------------------------------------
    @property
    def in_header_block(self) -> bool:
        return self._block_frames >= 0

    def on_headers_frame(self, length: int, end_headers: bool) -> GuardTrip | None:
        """A HEADERS (or PUSH_PROMISE) frame header was parsed; ``length`` is its declared size."""
        if length > self.limits.max_header_block_bytes:
            return GuardTrip(reason=f"header block of {length} bytes exceeds the limit")
        self._block_frames = -1 if end_headers else 0
        self._block_bytes = length
        return None

    def header_frame_too_big(self, frame_type: int, length: int) -> GuardTrip | None:
        """Stateless check of a HEADERS/PUSH_PROMISE/CONTINUATION header's declared length."""
        if frame_type == 0x1 or frame_type == 0x5:
            total = length
        elif frame_type == 0x9 and self._block_frames >= 0:
            total = self._block_bytes + length
        else:
            return None
        if total > self.limits.max_header_block_bytes:
            return GuardTrip(reason=f"header block of {total} bytes exceeds the limit")
        return None

    def on_continuation_frame(self, length: int, end_headers: bool) -> GuardTrip | None:
        if self._block_frames < 0:
            return None  # naked CONTINUATION: h2 answers it with a connection error
        self._block_frames += 1
        self._block_bytes += length
        if self._block_frames > self.limits.max_continuation_frames:
            return GuardTrip(
                reason=f"more than {self.limits.max_continuation_frames} CONTINUATIONs"
            )
        if self._block_bytes > self.limits.max_header_block_bytes:
            return GuardTrip(reason=f"header block of {self._block_bytes}+ bytes exceeds the limit")
        if end_headers:
            self._block_frames = -1
        if length == 0 and not end_headers:
            return self.on_glitch()
        return None

    # -- floods ----------------------------------------------------------------------------------
    def on_glitch(self, count: int = 1) -> GuardTrip | None:
        self.glitches += count
        if self.glitches > self.limits.glitch_threshold:
            return GuardTrip(
                reason="too many protocol glitches (empty/PRIORITY/WINDOW_UPDATE flood)"
            )
        return None

    def on_control_frame_received(self, now: float) -> GuardTrip | None:
        """PING or SETTINGS: each forces an ACK; beyond the budget each one is a glitch."""
        if self._control.take(now):
            return None
        return self.on_glitch()

    def on_window_update_received(self) -> GuardTrip | None:
        # Envoy's bound: 5 + 2 * (streams + 10 * DATA frames sent) WINDOW_UPDATEs are plausible.
        self.window_updates_received += 1
        allowed = 5 + 2 * (self.streams_opened + 10 * self.data_frames_sent)
        if self.window_updates_received > allowed:
            return self.on_glitch()
        return None

    def on_provoked_frames_queued(self, frames: int, nbytes: int) -> GuardTrip | None:
        """Frames we queue because the peer asked (ACKs, resets) while our output is not drained."""
        self.queued_control_frames += frames
        self.queued_control_bytes += nbytes
        if self.queued_control_frames > self.limits.max_queued_control_frames:
            return GuardTrip(reason="control frames pile up while the peer does not read")
        if self.queued_control_bytes > self.limits.max_queued_control_bytes:
            return GuardTrip(
                reason="queued control data exceeds the limit while the peer does not read"
            )
        return None

    def on_output_drained(self) -> None:
        self.queued_control_frames = 0
        self.queued_control_bytes = 0

    # -- streams ---------------------------------------------------------------------------------
    def admit_stream(self, in_use: int) -> bool:
        """A new inbound stream: False means refuse it (REFUSED_STREAM), the connection lives on."""
        if in_use >= self.limits.max_concurrent_streams:
            return False
        if self.streams_opened >= self.limits.max_lifetime_streams:
            return False
        self.streams_opened += 1
        return True

    @property
    def lifetime_exhausted(self) -> bool:
        return self.streams_opened >= self.limits.max_lifetime_streams


# -- per listener ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerLimits:
    """Process-level caps of one HBONE listener (reliability.md §6 edge profile, 2 cores)."""

    max_connections: int = 5_000
    """Connections at once, TLS handshakes in progress included (a slowloris holds handshakes)."""
    max_connections_per_identity: int = 500
    """Established connections per client SPIFFE identity (one workload cannot take them all)."""
    close_grace: float = 1.0
    """After the core ended a connection (GOAWAY sent), how long the peer may take to read it
    before the transport is aborted: a peer that never reads must not pin the socket."""

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(
                f"ListenerLimits.max_connections must be >= 1, got {self.max_connections}"
            )
        if self.max_connections_per_identity < 1:
            raise ValueError(
                "ListenerLimits.max_connections_per_identity must be >= 1, "
                f"got {self.max_connections_per_identity}"
            )
        if self.close_grace < 0:
            raise ValueError(f"ListenerLimits.close_grace must be >= 0, got {self.close_grace}")


DEFAULT_LISTENER_LIMITS = ListenerLimits()


class ConnectionCaps:
    """Admission of connections to one listener: a global cap checked at accept (before TLS), a
    per-identity cap checked once the peer's identity is verified (before any HTTP/2 byte).

    Counters say how often each cap refused a connection (exported as metrics by the shell)."""

    def __init__(self, limits: ListenerLimits = DEFAULT_LISTENER_LIMITS) -> None:
        self.limits = limits
        self.connections = 0
        self._per_identity: Counter[Hashable] = Counter()
        self.rejected_global = 0
        self.rejected_identity = 0

    def admit_connection(self) -> bool:
        """A TCP connection was accepted: False means close it at once (global cap)."""
        if self.connections >= self.limits.max_connections:
            self.rejected_global += 1
            return False
        self.connections += 1
        return True

    def release_connection(self) -> None:
        """A connection admitted by ``admit_connection`` ended (handshake failed or closed)."""
        if self.connections > 0:
            self.connections -= 1

    def admit_identity(self, identity: Hashable) -> bool:
        """The peer is ``identity``: False means close it at once (per-identity cap)."""
        if self._per_identity[identity] >= self.limits.max_connections_per_identity:
            self.rejected_identity += 1
            return False
        self._per_identity[identity] += 1
        return True

    def release_identity(self, identity: Hashable) -> None:
        """A connection admitted by ``admit_identity`` ended."""
        left = self._per_identity[identity] - 1
        if left > 0:
            self._per_identity[identity] = left
        else:
            del self._per_identity[identity]

    def connections_of(self, identity: Hashable) -> int:
        return self._per_identity.get(identity, 0)

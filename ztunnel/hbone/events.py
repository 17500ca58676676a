"""Events the HBONE core reports to its driver. Past-tense facts, frozen values; no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.hbone.authority import Authority


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of every HBONE event."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRequested(Event):
    """(server) A well-formed CONNECT arrived; answer with ``accept()`` or ``reject()``."""

    stream_id: int
    authority: Authority
    headers: tuple[tuple[str, str], ...]
    """Regular (non-pseudo) request headers, lower-case names. Never identity: only the TLS peer is."""

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (e.g. baggage, forwarded, traceparent), or None."""
        return next((v for k, v in self.headers if k == name), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRequestInvalid(Event):
    """(server) A malformed CONNECT was answered with 400 by the core; no decision needed."""

    stream_id: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelEstablished(Event):
    """(client) The server answered 200: data may flow both ways."""

    stream_id: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelRejected(Event):
    """(client) The server answered with a non-200 status; the stream is closed."""

    stream_id: int
    status: int
    headers: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived(Event):
    """Payload for a stream. Call ``acknowledge_data(stream_id, flow_controlled_length)`` once
    the bytes are consumed, or the peer runs out of window (this is the backpressure)."""

    stream_id: int
    data: memoryview
    flow_controlled_length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded(Event):
    """The peer half-closed the stream (END_STREAM): no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset(Event):
    """The stream is gone (RST_STREAM, sent by the peer or by us on a protocol error).

    Cancel any upstream work (e.g. a dial in progress) for it."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowUpdated(Event):
    """Send window grew; ``stream_id`` 0 means the connection (every stream may send again)."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GoAwayReceived(Event):
    """The peer sent GOAWAY: open no new streams; ours above ``last_stream_id`` were not processed
    (they also get a StreamReset with REFUSED_STREAM)."""

    error_code: int
    last_stream_id: int
    additional_data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionTerminated(Event):
    """The connection is finished: flush ``data_to_send()`` and close the transport."""

    error_code: int
    reason: str
    remote: bool

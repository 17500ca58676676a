"""Errors raised by the HBONE core and the HTTP/2 error codes it uses. Pure, no I/O."""

from __future__ import annotations

from h2.errors import ErrorCodes

__all__ = ["ErrorCodes", "HboneError", "StreamClosedError", "TooManyStreamsError"]


class HboneError(Exception):
    """Misuse of the HBONE core API (e.g. sending on a stream that is not open)."""


class StreamClosedError(HboneError):
    """The stream is unknown, already reset, or closed in the direction used."""

    def __init__(self, stream_id: int, what: str) -> None:
        super().__init__(f"stream {stream_id}: {what}")
        self.stream_id = stream_id


class TooManyStreamsError(HboneError):
    """No new stream can be opened on this connection (cap reached, or GOAWAY)."""

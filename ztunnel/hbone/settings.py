"""HTTP/2 settings of HBONE connections (DESIGN.md section 3, ztunnel reference section 3.3).

Owns the numbers both ends advertise and the keepalive cadence. Pure values, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB

DEFAULT_WINDOW: Final = 65_535  # RFC 9113 initial window before any SETTINGS / WINDOW_UPDATE
MAX_WINDOW: Final = 2**31 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Settings:
    """What one end of an HBONE connection advertises and how it keeps the connection alive."""

    stream_window: int = 4 * MiB
    """SETTINGS_INITIAL_WINDOW_SIZE: per-stream receive window."""
    connection_window: int = 16 * MiB
    """Connection receive window (4x the stream window avoids cross-stream starvation)."""
    max_frame_size: int = 1 * MiB
    """SETTINGS_MAX_FRAME_SIZE we accept; also the largest DATA frame we build."""
    max_concurrent_streams: int = 200
    """SETTINGS_MAX_CONCURRENT_STREAMS we advertise (server: 200, as ztunnel)."""
    max_header_list_size: int = 16 * KiB
    """SETTINGS_MAX_HEADER_LIST_SIZE (decoded); ztunnel allows 64 KiB, the edge profile 16 KiB."""
    header_table_size: int = 4 * KiB
    """SETTINGS_HEADER_TABLE_SIZE: HPACK dynamic table we let the peer use."""
    keepalive_interval: float = 10.0
    """Send a PING after this many seconds without receiving anything."""
    keepalive_timeout: float = 20.0
    """Declare the connection dead when a PING is unanswered for this long."""

    def __post_init__(self) -> None:
        if not 16 * KiB <= self.max_frame_size <= 16 * MiB - 1:
            raise ValueError(f"max_frame_size {self.max_frame_size} outside 16 KiB..16 MiB-1")
        for name in ("stream_window", "connection_window"):
            value = getattr(self, name)
            if not DEFAULT_WINDOW <= value <= MAX_WINDOW:
                raise ValueError(f"{name} {value} outside {DEFAULT_WINDOW}..{MAX_WINDOW}")
        if self.keepalive_interval <= 0 or self.keepalive_timeout <= 0:
            raise ValueError("keepalive interval and timeout must be positive")


SERVER_SETTINGS: Final = H2Settings()
CLIENT_SETTINGS: Final = H2Settings(max_concurrent_streams=100)

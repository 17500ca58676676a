"""HTTP/2 frame-header constants and helpers for the DATA fast path (RFC 9113 §4.1, §6). Pure."""

from __future__ import annotations

import struct
from typing import Final

# 24-bit length as 16+8 bits, type, flags, 31-bit stream id (reserved bit masked by the reader).
HEADER: Final = struct.Struct(">HBBBL")
U32: Final = struct.Struct(">L")
GOAWAY_FIXED: Final = struct.Struct(">LL")
HEADER_SIZE: Final = 9
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
PING: Final = 0x6
GOAWAY: Final = 0x7
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9

FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8

STREAM_ID_MASK: Final = 0x7FFF_FFFF


def frame_header(length: int, frame_type: int, flags: int, stream_id: int) -> bytes:
    """The 9-byte header of one frame."""
    return HEADER.pack(length >> 8, length & 0xFF, frame_type, flags, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    """A complete WINDOW_UPDATE frame."""
    return HEADER.pack(0, 4, WINDOW_UPDATE, 0, stream_id) + U32.pack(increment)


def goaway(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    """A complete GOAWAY frame."""
    return (
        frame_header(8 + len(debug), GOAWAY, 0, 0)
        + GOAWAY_FIXED.pack(last_stream_id, error_code)
        + debug
    )

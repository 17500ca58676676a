"""Build and validate HBONE CONNECT request and response header lists. Pure, no I/O.

The server runs h2 with its own header validation switched off so that a malformed request costs
one stream (400), not the whole pooled connection; this module is that validation (RFC 9113 §8.2,
§8.5): lower-case names, no connection-specific fields, no CR/LF/NUL or edge whitespace in values,
exactly one ``:method`` (CONNECT) and ``:authority``, no ``:scheme``/``:path``/``:protocol``.
``baggage``, ``forwarded`` and ``traceparent`` are carried as plain headers and never used for identity.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ztunnel.hbone.authority import Authority, AuthorityError, parse_authority

MAX_REQUEST_HEADER_BYTES = (
    8 * 1024
)  # stricter than the H2 header-list limit: CONNECT blocks are tiny
PASSED_HEADERS = ("baggage", "forwarded", "traceparent")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")

RawHeaders = Sequence[tuple[bytes, bytes]]


class RequestError(ValueError):
    """A CONNECT request is malformed; ``status`` is what to answer (always 400 here)."""

    status = 400


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectRequest:
    """A validated CONNECT: its target and its regular headers (names lower-case)."""

    authority: Authority
    headers: tuple[tuple[str, str], ...]


def validate_connect_request(raw: RawHeaders) -> ConnectRequest:
    """Check a received header list; raise :class:`RequestError` naming the first problem."""
    method: bytes | None = None
    authority: bytes | None = None
    regular: list[tuple[str, str]] = []
    size = 0
    for name, value in raw:
        size += len(name) + len(value) + 32
        if size > MAX_REQUEST_HEADER_BYTES:
            raise RequestError(f"request headers exceed {MAX_REQUEST_HEADER_BYTES} bytes")
        if _BAD_VALUE.search(value):
            raise RequestError(f"header {name!r} has a value with CR, LF, NUL or edge whitespace")
        if name.startswith(b":"):
            if regular:
                raise RequestError(f"pseudo-header {name!r} after a regular header")
            if name == b":method":
                if method is not None:
                    raise RequestError("duplicate :method")
                method = value
            elif name == b":authority":
                if authority is not None:
                    raise RequestError("duplicate :authority")
                authority = value
            else:
                raise RequestError(f"pseudo-header {name!r} is not allowed on CONNECT")
            continue
        if not _NAME.fullmatch(name):
            raise RequestError(f"header name {name!r} is not a lower-case token")
        if name in _CONNECTION_SPECIFIC:
            raise RequestError(f"connection-specific header {name!r} is not allowed in HTTP/2")
        try:
            regular.append((name.decode("ascii"), value.decode("ascii")))
        except UnicodeDecodeError:
            raise RequestError(f"header {name!r} has a non-ASCII value") from None
    if method is None:
        raise RequestError("missing :method")
    if method != b"CONNECT":
        raise RequestError(f"method {method!r} is not CONNECT")
    if authority is None:
        raise RequestError("missing :authority")
    try:
        target = parse_authority(authority)
    except AuthorityError as err:
        raise RequestError(str(err)) from None
    return ConnectRequest(authority=target, headers=tuple(regular))


def connect_request_headers(
    authority: Authority | str, extra: Iterable[tuple[str, str]] = ()
) -> list[tuple[bytes, bytes]]:
    """Header list of an HBONE CONNECT to ``authority`` plus ``extra`` (baggage, forwarded, ...).

    h2's outbound validation is off (``connection`` rule 8), so this is where a list we send is
    made valid: ``extra`` is checked by :func:`outgoing_header` (ValueError naming the header)."""
    target = authority if isinstance(authority, Authority) else parse_authority(authority)
    headers = [(b":method", b"CONNECT"), (b":authority", str(target).encode("ascii"))]
    headers.extend(outgoing_header(k, v) for k, v in extra)
    return headers


def response_headers(
    status: int, extra: Iterable[tuple[str, str]] = ()
) -> list[tuple[bytes, bytes]]:
    """Header list of a CONNECT response with ``status`` (``extra`` checked as for requests)."""
    if not 200 <= status <= 599:
        raise ValueError(f"status {status} is not a final HTTP status")
    headers = [(b":status", str(status).encode("ascii"))]
    headers.extend(outgoing_header(k, v) for k, v in extra)
    return headers


@functools.lru_cache(maxsize=1024)
def outgoing_header(name: str, value: str) -> tuple[bytes, bytes]:
    """One regular header we send, as bytes: name lower-cased, value stripped of edge blanks (what
    h2's normalisation did), then held to the rules :func:`validate_connect_request` applies to
    what we receive. Raises ValueError naming the header. Cached: the same few recur per tunnel."""
    try:
        raw_name = name.lower().encode("ascii")
        raw_value = value.strip(" \t").encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"outgoing header {name!r}: name and value must be ASCII") from None
    if not _NAME.fullmatch(raw_name):
        raise ValueError(f"outgoing header {name!r}: name is not a token (or is a pseudo-header)")
    if raw_name in _CONNECTION_SPECIFIC:
        raise ValueError(f"outgoing header {name!r}: connection-specific, not allowed in HTTP/2")
    if _BAD_VALUE.search(raw_value):
        raise ValueError(f"outgoing header {name!r}: value contains CR, LF or NUL")
    return raw_name, raw_value


def decode_headers(raw: RawHeaders) -> tuple[tuple[str, str], ...]:
    """Regular headers of a received response as text (pseudo-headers dropped)."""
    return tuple(
        (k.decode("ascii", "replace"), v.decode("ascii", "replace"))
        for k, v in raw
        if not k.startswith(b":")
    )

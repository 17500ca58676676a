"""Canonical form of an HTTP request's path, host and method, so no encoding bypasses a rule.

Routing and authorization match only what this module returns, and the shell forwards that same
form, so the backend sees exactly the request the policy judged (Envoy does the same with
``normalize_path``). Anything ambiguous is rejected with 400 rather than guessed.

Path, in this order:

1. ``#fragment`` is dropped (clients must not send it; some do), the query is split off at ``?``.
2. Every ``%`` must start a two-hex-digit escape (else 400). Escapes of RFC 3986 *unreserved*
   characters (``A-Z a-z 0-9 - . _ ~``) are decoded; other escapes keep their meaning and get
   upper-case hex (RFC 3986 §6.2.2). Raw bytes outside printable ASCII, and spaces, are 400.
3. Escaped slashes ``%2F`` / ``%5C``: `EscapedSlashes`. **Default REJECT** (400), Envoy's
   ``path_with_escaped_slashes_action: REJECT_REQUEST``. Istio's mesh default (``BASE``) keeps them
   unchanged, which lets a backend that decodes them reach ``/admin/x`` through ``/admin%2Fx``
   past a ``/admin/*`` rule; Istio's security guide recommends rejecting or decoding, and decoding
   (``DECODE_AND_MERGE_SLASHES``) is available here too.
4. A backslash becomes ``/`` (as Envoy's RFC 3986 normalisation does, Istio ``BASE``).
5. ``//`` runs merge to one ``/`` (Istio ``MERGE_SLASHES``; on by default here).
6. ``.`` and ``..`` segments resolve (RFC 3986 §5.2.4); ``..`` never climbs above ``/``.

Host: one authority only (duplicate ``Host`` or ``:authority`` ≠ ``Host`` → 400), lower-cased,
trailing dot dropped, port split off and range-checked, userinfo and odd characters → 400.
Method: must be an RFC 9110 token, upper-cased (GHSA-w44g-8m76-8gc5: ``get`` must not dodge a
``GET`` rule). Pure: no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import string
from dataclasses import dataclass

from waypoint.proxy.request import Destination, RawRequest, Request


class RequestRejectedError(ValueError):
    """The request is malformed or ambiguous; the shell answers `status` (400) without routing."""

    def __init__(self, reason: str, *, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class EscapedSlashes(enum.Enum):
    """What to do with ``%2F`` / ``%5C`` in a path."""

    REJECT = "reject"
    """400 (default)."""
    DECODE = "decode"
    """Decode to ``/`` (``%5C`` → ``\\`` → ``/``), then merge slashes as usual."""
    KEEP = "keep"
    """Leave encoded (upper-case hex); Istio ``BASE`` / ``MERGE_SLASHES`` behaviour."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NormalizationOptions:
    merge_slashes: bool = True
    escaped_slashes: EscapedSlashes = EscapedSlashes.REJECT
    max_path_length: int = 8192
    max_authority_length: int = 255

    @classmethod
    def from_istio(cls, mode: str) -> NormalizationOptions:
        """Options equal to Istio ``meshConfig.pathNormalization.normalization`` values."""
        if mode == "BASE":
            return cls(merge_slashes=False, escaped_slashes=EscapedSlashes.KEEP)
        if mode == "MERGE_SLASHES":
            return cls(merge_slashes=True, escaped_slashes=EscapedSlashes.KEEP)
        if mode == "DECODE_AND_MERGE_SLASHES":
            return cls(merge_slashes=True, escaped_slashes=EscapedSlashes.DECODE)
        raise ValueError(
            f"pathNormalization {mode!r} is not supported "
            "(use BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES; NONE is never allowed)"
        )


DEFAULT_OPTIONS = NormalizationOptions()

_HEX = frozenset(string.hexdigits)
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# Printable ASCII without space: anything else must arrive percent-encoded.
_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))
# RFC 9110 token characters (methods).
_TCHAR = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
_HOST_CHARS = frozenset(string.ascii_lowercase + string.digits + "-._")


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request-target; the fragment is dropped."""
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    return path, query


def _decode_escapes(path: str, options: NormalizationOptions) -> str:
    out: list[str] = []
    i = 0
    n = len(path)
    while i < n:
        ch = path[i]
        if ch != "%":
            if ch not in _PRINTABLE:
                raise RequestRejectedError(f"path contains a raw {ch!r} character")
            out.append(ch)
            i += 1
            continue
        hex_digits = path[i + 1 : i + 3]
        if len(hex_digits) != 2 or not set(hex_digits) <= _HEX:
            raise RequestRejectedError(f"path has a malformed percent-escape at offset {i}")
        decoded = chr(int(hex_digits, 16))
        if decoded in "/\\":
            if options.escaped_slashes is EscapedSlashes.REJECT:
                raise RequestRejectedError("path contains an escaped slash (%2F or %5C)")
            if options.escaped_slashes is EscapedSlashes.DECODE:
                out.append(decoded)
            else:
                out.append("%" + hex_digits.upper())
        elif decoded in _UNRESERVED:
            out.append(decoded)
        else:
            out.append("%" + hex_digits.upper())
        i += 3
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path, never above the root."""
    segments = path.split("/")[1:]
    stack: list[str] = []
    for seg in segments:
        if seg == "..":
            if stack:
                stack.pop()
        elif seg != ".":
            stack.append(seg)
    # A trailing "." or ".." names a directory: keep the trailing slash.
    if segments and segments[-1] in (".", ".."):
        stack.append("")
    return "/" + "/".join(stack)


def _merge_slashes(path: str) -> str:
    while "//" in path:
        path = path.replace("//", "/")
    return path


def normalize_path(path: str, options: NormalizationOptions = DEFAULT_OPTIONS) -> str:
    """Canonical form of an absolute path (no query, no fragment); raises RequestRejectedError."""
    if len(path) > options.max_path_length:
        raise RequestRejectedError(f"path longer than {options.max_path_length} characters")
    path = _decode_escapes(path, options).replace("\\", "/")
    if not path.startswith("/"):
        raise RequestRejectedError("path must start with '/' (origin-form request-target)")
    if options.merge_slashes:
        path = _merge_slashes(path)
    return _remove_dot_segments(path)


def normalize_method(method: str) -> str:
    """Upper-case method; 400 for anything that is not an RFC 9110 token."""
    if not method or len(method) > 64 or not set(method) <= _TCHAR:
        raise RequestRejectedError(f"method {method[:64]!r} is not a valid HTTP token")
    return method.upper()


def normalize_authority(
    authority: str, options: NormalizationOptions = DEFAULT_OPTIONS
) -> tuple[str, int | None]:
    """(host, port) of an authority: lower-case host without trailing dot; 400 when malformed."""
    if not authority:
        raise RequestRejectedError("empty authority")
    if len(authority) > options.max_authority_length:
        raise RequestRejectedError(f"authority longer than {options.max_authority_length}")
    if "@" in authority:
        raise RequestRejectedError("authority must not carry userinfo")
    port_text: str | None = None
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise RequestRejectedError("authority has an unterminated IPv6 literal")
        literal = authority[1:end]
        rest = authority[end + 1 :]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError as exc:
            raise RequestRejectedError(f"authority has a bad IPv6 literal {literal!r}") from exc
        host = "[" + literal.lower() + "]"
        if rest:
            if not rest.startswith(":"):
                raise RequestRejectedError("unexpected characters after the IPv6 literal")
            port_text = rest[1:]
    else:
        host, sep, tail = authority.partition(":")
        if sep:
            port_text = tail
        host = host.lower()
        if host.endswith("."):
            host = host[:-1]
        if not host or not set(host) <= _HOST_CHARS or ".." in host:
            raise RequestRejectedError(f"authority host {host[:64]!r} is not a valid host name")
    port: int | None = None
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
            raise RequestRejectedError(f"authority port {port_text[:16]!r} is not a number")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise RequestRejectedError(f"authority port {port} is out of range")
    return host, port


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def normalize_request(
    raw: RawRequest,
    destination: Destination,
    options: NormalizationOptions = DEFAULT_OPTIONS,
) -> Request:
    """The canonical `Request` of `raw`, or RequestRejectedError (400) when it is ambiguous."""
    method = normalize_method(raw.method)
    headers: list[tuple[str, str]] = []
    hosts: list[str] = []
    for name_raw, value_raw in raw.headers:
        name = _text(name_raw).lower()
        value = _text(value_raw)
        if not name or name.startswith(":") or not set(name) <= _TCHAR:
            raise RequestRejectedError(f"invalid header name {name[:64]!r}")
        if any(c in value for c in "\x00\r\n"):
            raise RequestRejectedError(f"header {name!r} contains NUL, CR or LF")
        if name == "host":
            hosts.append(value.strip())
        else:
            headers.append((name, value))
    if len(hosts) > 1:
        raise RequestRejectedError("duplicate Host header")
    candidates = [a for a in (raw.authority, hosts[0] if hosts else None) if a is not None]
    if not candidates:
        raise RequestRejectedError("request has neither :authority nor Host")
    parsed = [normalize_authority(a.strip(), options) for a in candidates]
    if len(parsed) == 2 and parsed[0] != parsed[1]:
        raise RequestRejectedError(":authority and Host disagree")
    host, port = parsed[0]
    scheme = raw.scheme.lower()
    if scheme not in ("http", "https"):
        raise RequestRejectedError(f"unsupported scheme {scheme[:16]!r}")
    path_raw, query = split_target(raw.target)
    if any(c not in _PRINTABLE for c in query):
        raise RequestRejectedError("query contains a raw non-printable or space character")
    path = normalize_path(path_raw, options)
    return Request(
        method=method,
        scheme=scheme,
        host=host,
        port=port,
        path=path,
        query=query,
        headers=tuple(headers),
        destination=destination,
    )

"""Strict parsing of the HBONE CONNECT ``:authority``: ``ip:port``, ``[v6]:port`` or ``hostname:port``.

Owns the only definition of what a tunnel target may look like on the wire. Pure: no I/O.
Istio's ztunnel accepts an IP socket address for pod/VIP targets and ``<svc-hostname>:<port>`` for
east-west gateways (double HBONE). Anything else (userinfo, zone IDs, whitespace, control characters,
signs or leading zeros in ports, out-of-range ports, stray brackets, overlong names) is rejected with
an :class:`AuthorityError` saying what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_AUTHORITY_LENGTH = 255
_PORT = re.compile(r"[1-9][0-9]{0,4}")
# RFC 1123 label: letters, digits, hyphen; not starting or ending with a hyphen.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
# Everything outside these characters can never appear in a valid authority; checked first so the
# error names the character instead of failing deep inside ipaddress.
_ALLOWED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:[]")


class AuthorityError(ValueError):
    """A ``:authority`` value is not a valid HBONE target; the message says why."""


Host = ipaddress.IPv4Address | ipaddress.IPv6Address | str


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """A parsed tunnel target. ``host`` is an IP address, or a lower-case DNS name for gateways."""

    host: Host
    port: int

    @property
    def is_hostname(self) -> bool:
        """True for ``hostname:port`` (double HBONE / gateway) targets."""
        return isinstance(self.host, str)

    def __str__(self) -> str:
        if isinstance(self.host, ipaddress.IPv6Address):
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_authority(value: str | bytes) -> Authority:
    """Parse a CONNECT ``:authority``; raise :class:`AuthorityError` naming the problem."""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise AuthorityError(f"authority {value!r} contains non-ASCII bytes") from None
    if not isinstance(value, str):
        raise AuthorityError(f"authority must be a string, got {type(value).__name__}")
    if not value:
        raise AuthorityError("authority is empty")
    if len(value) > MAX_AUTHORITY_LENGTH:
        raise AuthorityError(
            f"authority is {len(value)} characters long, the limit is {MAX_AUTHORITY_LENGTH}"
        )
    bad = next((c for c in value if c not in _ALLOWED), None)
    if bad is not None:
        what = {"@": "userinfo ('@')", "%": "percent-encoding or a zone ID ('%')"}.get(
            bad, repr(bad)
        )
        raise AuthorityError(f"authority {value!r} contains a forbidden character: {what}")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise AuthorityError(f"authority {value!r} has '[' without a matching ']'")
        literal, rest = value[1:close], value[close + 1 :]
        if not rest.startswith(":"):
            raise AuthorityError(f"authority {value!r} must be '[ipv6]:port'")
        try:
            host: Host = ipaddress.IPv6Address(literal)
        except ValueError:
            raise AuthorityError(
                f"authority {value!r}: {literal!r} is not an IPv6 address"
            ) from None
        return Authority(host=host, port=_parse_port(value, rest[1:]))
    if "[" in value or "]" in value:
        raise AuthorityError(f"authority {value!r} has a misplaced bracket")
    host_text, sep, port_text = value.rpartition(":")
    if not sep:
        raise AuthorityError(f"authority {value!r} has no port (expected host:port)")
    if ":" in host_text:
        raise AuthorityError(f"authority {value!r}: an IPv6 address must be in brackets")
    if not host_text:
        raise AuthorityError(f"authority {value!r} has an empty host")
    port = _parse_port(value, port_text)
    if host_text[0].isdigit() and host_text.rsplit(".", 1)[-1].isdigit():
        try:
            return Authority(host=ipaddress.IPv4Address(host_text), port=port)
        except ValueError:
            raise AuthorityError(
                f"authority {value!r}: {host_text!r} is not an IPv4 address"
            ) from None
    return Authority(host=_parse_hostname(value, host_text), port=port)


def _parse_port(value: str, text: str) -> int:
    if not text:
        raise AuthorityError(f"authority {value!r} has an empty port")
    if not _PORT.fullmatch(text):
        raise AuthorityError(
            f"authority {value!r}: port {text!r} must be 1-65535 in decimal without sign or leading zero"
        )
    port = int(text)
    if port > 65535:
        raise AuthorityError(f"authority {value!r}: port {port} is out of range 1-65535")
    return port


def _parse_hostname(value: str, text: str) -> str:
    name = text.lower()
    if name.endswith("."):
        name = name[:-1]
    if len(name) > 253:
        raise AuthorityError(f"authority {value!r}: hostname is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AuthorityError(f"authority {value!r}: {label!r} is not a valid DNS label")
    if labels[-1].isdigit():
        raise AuthorityError(
            f"authority {value!r}: {text!r} is neither an IP address nor a hostname"
        )
    return name

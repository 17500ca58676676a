"""The request values the L7 core decides on: what arrived (`RawRequest`) and its canonical form.

`Request` is produced only by `normalize.normalize_request`, so routing and authorization never see
an unnormalised path, host or method. `Destination` is the Service (and port) the client addressed,
known from the HBONE `:authority` the ztunnel sent. Pure values, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """The Service the request was addressed to (its VIP resolved by the shell)."""

    namespace: str
    name: str
    hostname: str
    """FQDN, e.g. ``echo.ns.svc.cluster.local``."""
    port: int
    """The Service port the client connected to (the mesh "listener" port)."""
    kind: str = "Service"
    """``Service`` or ``ServiceEntry``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RawRequest:
    """An HTTP request as parsed by h11/h2, before any normalisation."""

    method: str
    target: str
    """The request-target (HTTP/1.1, origin-form) or ``:path`` (HTTP/2), query included."""
    scheme: str = "http"
    authority: str | None = None
    """HTTP/2 ``:authority`` (or the authority of an HTTP/1.1 absolute-form target)."""
    headers: Sequence[tuple[str | bytes, str | bytes]] = ()
    """Regular header fields in arrival order; bytes are decoded as latin-1."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """A normalised request: the only form routing and authorization accept."""

    method: str
    """Upper-case RFC 9110 token."""
    scheme: str
    host: str
    """Lower-case, no trailing dot, no port; IPv6 literals keep their brackets."""
    port: int | None
    """Port given in the authority, if any."""
    path: str
    """Normalised absolute path without query or fragment."""
    query: str
    """Raw query string without the ``?`` ('' if none)."""
    headers: tuple[tuple[str, str], ...]
    """Lower-case names, arrival order, without ``host`` and pseudo-headers."""
    destination: Destination

    @property
    def authority(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path

    def header_values(self, name: str) -> list[str]:
        """All values of a header (case-insensitive name), in arrival order."""
        wanted = name.lower()
        return [v for k, v in self.headers if k == wanted]

    @property
    def is_grpc(self) -> bool:
        content_type = self.header_values("content-type")
        return bool(content_type) and content_type[0].lower().startswith("application/grpc")


def replace_headers(
    headers: tuple[tuple[str, str], ...], name: str, values: Sequence[str]
) -> tuple[tuple[str, str], ...]:
    """Headers with every `name` field replaced by `values` (appended at the end)."""
    wanted = name.lower()
    kept = tuple((k, v) for k, v in headers if k != wanted)
    return kept + tuple((wanted, v) for v in values)

"""Effects of Gateway API filters on a request: header edits, path/host rewrites, redirects.

Header modifiers apply remove, then set, then add (Envoy's remove-before-add order); names compare
case-insensitively and are emitted lower-case (HTTP/2 requires it, HTTP/1.1 does not care).
``add`` appends another field with the same name, which is equivalent to a comma-joined value.
The shell applies `apply_header_modifier` to response headers with the modifiers the routing
decision returns. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from waypoint.proxy.request import Request
from waypoint.proxy.routes import (
    HeaderModifier,
    PathModifier,
    PathModifierType,
    RequestRedirectFilter,
    URLRewriteFilter,
)

Headers = tuple[tuple[str, str], ...]

_WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def apply_header_modifier(headers: Headers, modifier: HeaderModifier) -> Headers:
    """Headers after one RequestHeaderModifier / ResponseHeaderModifier."""
    drop = {name.lower() for name in modifier.remove} | {name.lower() for name, _ in modifier.set}
    out = [(k, v) for k, v in headers if k.lower() not in drop]
    out.extend((name.lower(), value) for name, value in modifier.set)
    out.extend((name.lower(), value) for name, value in modifier.add)
    return tuple(out)


def apply_header_modifiers(headers: Headers, modifiers: Iterable[HeaderModifier]) -> Headers:
    for modifier in modifiers:
        headers = apply_header_modifier(headers, modifier)
    return headers


def replace_prefix(path: str, matched_prefix: str, replacement: str) -> str:
    """ReplacePrefixMatch: swap the matched (segment-wise) prefix, keep the rest of the path.

    ``/foo/bar`` with prefix ``/foo`` and replacement ``/xyz`` -> ``/xyz/bar``; replacement ``""``
    or ``/`` -> ``/bar``; ``/foo`` -> ``/xyz``; the trailing ``/`` of either side is ignored.
    """
    base = matched_prefix.rstrip("/")
    rest = path[len(base) :]
    result = replacement.rstrip("/") + rest
    return result or "/"


def modified_path(path: str, modifier: PathModifier | None) -> str:
    if modifier is None:
        return path
    if modifier.type == PathModifierType.REPLACE_FULL_PATH:
        return modifier.value
    return replace_prefix(path, modifier.matched_prefix, modifier.value)


def apply_url_rewrite(request: Request, rewrite: URLRewriteFilter) -> Request:
    """The request with its path and/or Host replaced (query kept)."""
    path = modified_path(request.path, rewrite.path)
    if rewrite.hostname is None:
        return dataclasses.replace(request, path=path)
    return dataclasses.replace(request, path=path, host=rewrite.hostname, port=None)


def redirect_location(request: Request, redirect: RequestRedirectFilter) -> str:
    """The ``Location`` of a RequestRedirect, per the port rules of the spec.

    Port: the filter's, else the scheme's well-known port when the scheme changes, else the port
    the client addressed (the Service port is the mesh "listener"). It is left out when it is the
    default of the resulting scheme. The query string is kept.
    """
    scheme = redirect.scheme or request.scheme
    host = redirect.hostname or request.host
    if redirect.port is not None:
        port = redirect.port
    elif redirect.scheme is not None:
        port = _WELL_KNOWN_PORTS[redirect.scheme]
    else:
        port = request.destination.port
    authority = host if _WELL_KNOWN_PORTS.get(scheme) == port else f"{host}:{port}"
    path = modified_path(request.path, redirect.path)
    query = f"?{request.query}" if request.query else ""
    return f"{scheme}://{authority}{path}{query}"

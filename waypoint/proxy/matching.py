"""Whether a normalised request satisfies a route match, and how matches rank against each other.

Precedence (Gateway API ``HTTPRouteRule.matches``), across every rule of every route attached to
the addressed Service: Exact path > longest PathPrefix > method match > most header matches > most
query-parameter matches; ties go to the oldest route (creationTimestamp), then ``namespace/name``
alphabetically, then the first rule in list order. RegularExpression paths have
implementation-specific precedence: like Istio (``sortHTTPRoutes``), after Exact and before
PathPrefix, longer patterns first. GRPCRoute: most characters in the matched service, then in the
method, then most header matches, then the same tie-breakers (hostnames are ignored in the mesh).
A smaller key is a better match. Pure: no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qsl

from waypoint.proxy.regex import Regex
from waypoint.proxy.request import Request
from waypoint.proxy.routes import (
    GRPCMethodMatch,
    GRPCRoute,
    GRPCRouteMatch,
    HeaderMatch,
    HTTPRoute,
    HTTPRouteMatch,
    MatchType,
    PathMatch,
    PathMatchType,
    QueryParamMatch,
)

MatchKey = tuple[int, ...]
RouteKey = tuple[bool, datetime, str, str]

_PATH_RANK = {
    PathMatchType.EXACT: 0,
    PathMatchType.REGULAR_EXPRESSION: 1,
    PathMatchType.PATH_PREFIX: 2,
}
_NEWEST = datetime.max


def prefix_matches(prefix: str, path: str) -> bool:
    """Segment-wise prefix: ``/abc`` matches ``/abc``, ``/abc/``, ``/abc/d``, never ``/abcd``."""
    base = prefix.rstrip("/")
    return not base or path == base or path.startswith(base + "/")


def path_matches(match: PathMatch, path: str) -> bool:
    if match.type == PathMatchType.EXACT:
        return path == match.value
    if match.type == PathMatchType.PATH_PREFIX:
        return prefix_matches(match.value, path)
    return match.regex is not None and match.regex.fullmatch(path)


def _value_matches(kind: MatchType, expected: str, regex: Regex | None, actual: str) -> bool:
    if kind == MatchType.EXACT:
        return actual == expected
    return regex is not None and regex.fullmatch(actual)


def header_matches(match: HeaderMatch, request: Request) -> bool:
    """Repeated headers are joined with ``,`` (RFC 9110 §5.3), as Envoy does for routing."""
    values = request.header_values(match.name)
    if not values:
        return False
    return _value_matches(match.type, match.value, match.regex, ",".join(values))


def query_values(query: str) -> dict[str, str]:
    """First value of each query parameter (the spec recommends the first), percent-decoded."""
    first: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        first.setdefault(name, value)
    return first


def query_matches(match: QueryParamMatch, params: dict[str, str]) -> bool:
    actual = params.get(match.name)
    return actual is not None and _value_matches(match.type, match.value, match.regex, actual)


def http_match(match: HTTPRouteMatch, request: Request, params: dict[str, str]) -> bool:
    """All conditions of one HTTPRouteMatch (ANDed)."""
    return (
        path_matches(match.path, request.path)
        and (match.method is None or match.method == request.method)
        and all(header_matches(h, request) for h in match.headers)
        and all(query_matches(q, params) for q in match.query_params)
    )


def http_match_key(match: HTTPRouteMatch) -> MatchKey:
    return (
        _PATH_RANK[match.path.type],
        -len(match.path.value),
        0 if match.method is not None else 1,
        -len(match.headers),
        -len(match.query_params),
    )


def split_grpc_path(path: str) -> tuple[str, str] | None:
    """(service, method) of a gRPC ``/package.Service/Method`` path, else None."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def _grpc_method_matches(match: GRPCMethodMatch, service: str, method: str) -> bool:
    if match.type == MatchType.EXACT:
        return (match.service is None or match.service == service) and (
            match.method is None or match.method == method
        )
    return (match.service_regex is None or match.service_regex.fullmatch(service)) and (
        match.method_regex is None or match.method_regex.fullmatch(method)
    )


def grpc_match(match: GRPCRouteMatch, request: Request) -> bool:
    if match.method is not None:
        parsed = split_grpc_path(request.path)
        if parsed is None or not _grpc_method_matches(match.method, *parsed):
            return False
    return all(header_matches(h, request) for h in match.headers)


def grpc_match_key(match: GRPCRouteMatch) -> MatchKey:
    service = match.method.service if match.method else None
    method = match.method.method if match.method else None
    return (-len(service or ""), -len(method or ""), -len(match.headers))


def route_key(route: HTTPRoute | GRPCRoute) -> RouteKey:
    """Oldest first; a route without creationTimestamp (local files) counts as newest."""
    # Naive UTC so that routes with and without timestamps compare.
    created = route.created.astimezone(UTC).replace(tzinfo=None) if route.created else _NEWEST
    return (route.created is None, created, route.namespace, route.name)

"""The routing decision: which route rule a normalised request hits and what to do with it.

`decide` returns one of:

* `Forward` - send the (rewritten) request to a chosen backend, with response-header edits,
  mirror targets, timeouts and retry policy for the shell to apply;
* `Redirect` - answer with a 3xx and ``Location``;
* `DirectResponse` - answer with an error status: 500 for an invalid backend, all-zero weights or
  an unimplemented ExtensionRef filter (Gateway API rules), 404 when routes are attached to the
  Service but none matches.

When no route is attached to the addressed Service (and port), the request goes to that Service
itself (`Forward` with ``route=None``). gRPC requests (``content-type: application/grpc*``) use the
GRPCRoutes of the Service if it has any, otherwise its HTTPRoutes; the two kinds never merge.
Randomness comes in through `RandomSource` (``random.Random`` fits): first one draw for the
weighted backend choice, then one per mirror filter, so a seeded source gives repeatable results.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from waypoint.proxy import filters as fx
from waypoint.proxy.matching import (
    MatchKey,
    RouteKey,
    grpc_match,
    grpc_match_key,
    http_match,
    http_match_key,
    query_values,
    route_key,
)
from waypoint.proxy.request import Request
from waypoint.proxy.routes import (
    CORE_GROUP,
    ISTIO_NETWORKING_GROUP,
    SERVICE_ENTRY_KIND,
    BackendRef,
    ExtensionRefFilter,
    Filter,
    GRPCRoute,
    GRPCRouteRule,
    HeaderModifier,
    HTTPRoute,
    HTTPRouteRule,
    RequestHeaderModifierFilter,
    RequestMirrorFilter,
    RequestRedirectFilter,
    ResponseHeaderModifierFilter,
    RetryPolicy,
    RouteTable,
    Timeouts,
    URLRewriteFilter,
)


class RandomSource(Protocol):
    def random(self) -> float:
        """A float in [0, 1)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleRef:
    """Which route rule decided (for logs, metrics and tests)."""

    kind: str
    route: str
    """``namespace/name``."""
    rule_index: int
    rule_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Forward:
    backend: BackendRef
    """Target Service (``port`` always set)."""
    request: Request
    """The request to send: path, host and headers already rewritten."""
    response_modifiers: tuple[HeaderModifier, ...] = ()
    """Apply in order to the upstream response headers (`filters.apply_header_modifiers`)."""
    mirrors: tuple[BackendRef, ...] = ()
    """Send a copy of the request to each (fire and forget; responses ignored)."""
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy | None = None
    rule: RuleRef | None = None
    """None when no route applied (the default: the addressed Service itself)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    status: int
    location: str
    response_modifiers: tuple[HeaderModifier, ...] = ()
    rule: RuleRef | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class DirectResponse:
    status: int
    reason: str
    rule: RuleRef | None = None


Decision = Forward | Redirect | DirectResponse

# gRPC status for a direct HTTP answer (https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md).
GRPC_STATUS_FOR_HTTP = {
    400: 13,
    401: 16,
    403: 7,
    404: 12,
    429: 14,
    500: 13,
    502: 14,
    503: 14,
    504: 14,
}
GRPC_PERMISSION_DENIED = 7


def default_backend(request: Request) -> BackendRef:
    dest = request.destination
    group = ISTIO_NETWORKING_GROUP if dest.kind == SERVICE_ENTRY_KIND else CORE_GROUP
    return BackendRef(
        group=group, kind=dest.kind, namespace=dest.namespace, name=dest.name, port=dest.port
    )


_Key = tuple[MatchKey, RouteKey, int]


def choose_weighted(weights: Sequence[int], rng: RandomSource) -> int | None:
    """Index chosen with probability weight/total; None when every weight is 0."""
    total = sum(weights)
    if total <= 0:
        return None
    point = rng.random() * total
    cumulative = 0
    for i, weight in enumerate(weights):
        cumulative += weight
        if point < cumulative:
            return i
    # Float rounding at the very top of the range: last non-zero entry.
    return max(i for i, w in enumerate(weights) if w > 0)


def _best_http(
    request: Request, routes: Sequence[HTTPRoute]
) -> tuple[HTTPRoute, HTTPRouteRule] | None:
    params = query_values(request.query)
    best: tuple[_Key, HTTPRoute, HTTPRouteRule] | None = None
    for route in routes:
        rkey = route_key(route)
        for rule in route.rules:
            for match in rule.matches:
                if not http_match(match, request, params):
                    continue
                key = (http_match_key(match), rkey, rule.index)
                if best is None or key < best[0]:
                    best = (key, route, rule)
    return None if best is None else (best[1], best[2])


def _best_grpc(
    request: Request, routes: Sequence[GRPCRoute]
) -> tuple[GRPCRoute, GRPCRouteRule] | None:
    best: tuple[_Key, GRPCRoute, GRPCRouteRule] | None = None
    for route in routes:
        rkey = route_key(route)
        for rule in route.rules:
            for match in rule.matches:
                if not grpc_match(match, request):
                    continue
                key = (grpc_match_key(match), rkey, rule.index)
                if best is None or key < best[0]:
                    best = (key, route, rule)
    return None if best is None else (best[1], best[2])


class _Effects:
    """Accumulates what a filter list does to the request."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.response: list[HeaderModifier] = []
        self.mirrors: list[RequestMirrorFilter] = []
        self.redirect: RequestRedirectFilter | None = None
        self.extension: ExtensionRefFilter | None = None

    def apply(self, filters: Sequence[Filter]) -> None:
        # In declaration order, as the spec asks ("SHOULD implement filters in the order").
        for f in filters:
            if isinstance(f, RequestHeaderModifierFilter):
                headers = fx.apply_header_modifier(self.request.headers, f.modifier)
                self.request = _with_headers(self.request, headers)
            elif isinstance(f, ResponseHeaderModifierFilter):
                self.response.append(f.modifier)
            elif isinstance(f, URLRewriteFilter):
                self.request = fx.apply_url_rewrite(self.request, f)
            elif isinstance(f, RequestMirrorFilter):
                self.mirrors.append(f)
            elif isinstance(f, RequestRedirectFilter):
                self.redirect = self.redirect or f
            else:
                self.extension = self.extension or f


def _with_headers(request: Request, headers: tuple[tuple[str, str], ...]) -> Request:
    return replace(request, headers=headers)


def _resolve_port(ref: BackendRef, request: Request) -> BackendRef:
    if ref.port is not None:
        return ref
    return replace(ref, port=request.destination.port)


def _unimplemented(effects: _Effects, ref: RuleRef) -> DirectResponse | None:
    ext = effects.extension
    if ext is None:
        return None
    reason = f"filter ExtensionRef {ext.kind}/{ext.name} is not implemented"
    return DirectResponse(status=500, reason=reason, rule=ref)


def _apply_rule(
    request: Request,
    rule: HTTPRouteRule | GRPCRouteRule,
    ref: RuleRef,
    rng: RandomSource,
    backend_valid: Callable[[BackendRef], bool] | None,
) -> Decision:
    effects = _Effects(request)
    effects.apply(rule.filters)
    unimplemented = _unimplemented(effects, ref)
    if unimplemented is not None:
        return unimplemented
    if effects.redirect is not None:
        return Redirect(
            status=effects.redirect.status_code,
            location=fx.redirect_location(request, effects.redirect),
            response_modifiers=tuple(effects.response),
            rule=ref,
        )
    if not rule.backend_refs:
        return DirectResponse(status=500, reason="route rule has no backendRefs", rule=ref)
    index = choose_weighted([b.weight for b in rule.backend_refs], rng)
    if index is None:
        return DirectResponse(status=500, reason="all backendRefs have weight 0", rule=ref)
    chosen = rule.backend_refs[index]
    if chosen.invalid is not None:
        return DirectResponse(status=500, reason=f"invalid backend: {chosen.invalid}", rule=ref)
    if backend_valid is not None and not backend_valid(chosen):
        return DirectResponse(
            status=500, reason=f"backend {chosen.namespace}/{chosen.name} not found", rule=ref
        )
    effects.apply(chosen.filters)
    unimplemented = _unimplemented(effects, ref)
    if unimplemented is not None:
        return unimplemented
    mirrors: list[BackendRef] = []
    for m in effects.mirrors:
        # One draw per mirror filter, even when it cannot fire, to keep the rng sequence stable.
        fires = rng.random() * m.denominator < m.numerator
        usable = m.backend.invalid is None and (backend_valid is None or backend_valid(m.backend))
        if fires and usable:
            mirrors.append(_resolve_port(m.backend, request))
    timeouts = rule.timeouts if isinstance(rule, HTTPRouteRule) else Timeouts()
    retry = rule.retry if isinstance(rule, HTTPRouteRule) else None
    return Forward(
        backend=_resolve_port(chosen, request),
        request=effects.request,
        response_modifiers=tuple(effects.response),
        mirrors=tuple(mirrors),
        timeouts=timeouts,
        retry=retry,
        rule=ref,
    )


def decide(
    request: Request,
    table: RouteTable,
    rng: RandomSource,
    *,
    backend_valid: Callable[[BackendRef], bool] | None = None,
) -> Decision:
    """Route `request` (already normalised) with the routes attached to its destination.

    Args:
        request: from `normalize.normalize_request`; ``request.destination`` selects the routes.
        table: the accepted routes.
        rng: randomness for weighted backends and mirror percentages.
        backend_valid: optional check that a backend Service exists; False gives 500.
    """
    dest = request.destination
    grpc_routes = table.grpc_routes_for(dest.kind, dest.namespace, dest.name, dest.port)
    if request.is_grpc and grpc_routes:
        found_grpc = _best_grpc(request, grpc_routes)
        if found_grpc is None:
            return DirectResponse(status=404, reason="no GRPCRoute rule matched")
        groute, grule = found_grpc
        ref = RuleRef(
            kind="GRPCRoute", route=groute.key, rule_index=grule.index, rule_name=grule.name
        )
        return _apply_rule(request, grule, ref, rng, backend_valid)
    http_routes = table.http_routes_for(dest.kind, dest.namespace, dest.name, dest.port)
    if not http_routes:
        return Forward(backend=default_backend(request), request=request)
    found = _best_http(request, http_routes)
    if found is None:
        return DirectResponse(status=404, reason="no HTTPRoute rule matched")
    route, rule = found
    ref = RuleRef(kind="HTTPRoute", route=route.key, rule_index=rule.index, rule_name=rule.name)
    return _apply_rule(request, rule, ref, rng, backend_valid)

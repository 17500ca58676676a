"""Typed model of Gateway API HTTPRoute and GRPCRoute, parsed and validated from object dicts.

Input is the Kubernetes object as stored by the API server or written in a YAML file (camelCase).
Validation follows the v1 CRD (OpenAPI + CEL rules of ``apis/v1/httproute_types.go`` and
``grpcroute_types.go``) plus what this waypoint supports; every problem names object, rule and
field. A route with an error is rejected as a whole (the Gateway API allows rejecting a rule, but a
half-applied route silently changes traffic); other routes are unaffected. Problems that the spec
answers at request time instead (a backend of an unsupported kind, a cross-namespace backend
without permission) keep the route and are returned as warnings; requests to such a backend get
500 (``routing.py``).

GAMMA notes: routes attach to a Service (``group: ""``, ``kind: Service``) or an Istio
ServiceEntry through ``parentRefs``, optionally narrowed by ``port``. ``hostnames`` are validated
but not used for matching (GEP-1294: mesh implementations SHOULD NOT infer behaviour from them).
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from waypoint.proxy.parsing import (
    Collector,
    ConfigError,
    Reader,
    object_identity,
    parse_duration,
    parse_timestamp,
)
from waypoint.proxy.regex import Regex, compile_regex

CORE_GROUP = ""
GATEWAY_GROUP = "gateway.networking.k8s.io"
ISTIO_NETWORKING_GROUP = "networking.istio.io"
SERVICE_KIND = "Service"
SERVICE_ENTRY_KIND = "ServiceEntry"
# (group, kind) of the parents a waypoint serves, and of the backends it can send to.
MESH_PARENT_KINDS = frozenset(
    {(CORE_GROUP, SERVICE_KIND), (ISTIO_NETWORKING_GROUP, SERVICE_ENTRY_KIND)}
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_WEIGHT = 1_000_000

_SECTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_LABELS = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_HOSTNAME = re.compile(rf"^(\*\.)?{_DNS_LABELS}$")
_PRECISE_HOSTNAME = re.compile(rf"^{_DNS_LABELS}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")
_PATH_CHARS = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})+$")
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


class PathMatchType(enum.StrEnum):
    EXACT = "Exact"
    PATH_PREFIX = "PathPrefix"
    REGULAR_EXPRESSION = "RegularExpression"


class MatchType(enum.StrEnum):
    """Type of header, query-parameter and gRPC method matches."""

    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PathMatch:
    type: PathMatchType = PathMatchType.PATH_PREFIX
    value: str = "/"
    regex: Regex | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    type: MatchType
    name: str
    """Lower-case (header names match case-insensitively)."""
    value: str
    regex: Regex | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryParamMatch:
    type: MatchType
    name: str
    """Case-sensitive, as the spec requires."""
    value: str
    regex: Regex | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteMatch:
    path: PathMatch = field(default_factory=PathMatch)
    headers: tuple[HeaderMatch, ...] = ()
    query_params: tuple[QueryParamMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GRPCMethodMatch:
    type: MatchType = MatchType.EXACT
    service: str | None = None
    method: str | None = None
    service_regex: Regex | None = None
    method_regex: Regex | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GRPCRouteMatch:
    method: GRPCMethodMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderModifier:
    """Body of RequestHeaderModifier / ResponseHeaderModifier; names keep the user's case."""

    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class PathModifierType(enum.StrEnum):
    REPLACE_FULL_PATH = "ReplaceFullPath"
    REPLACE_PREFIX_MATCH = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathModifier:
    type: PathModifierType
    value: str
    matched_prefix: str = "/"
    """For ReplacePrefixMatch: the rule's single PathPrefix match value."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestHeaderModifierFilter:
    modifier: HeaderModifier


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseHeaderModifierFilter:
    modifier: HeaderModifier


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRedirectFilter:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True, kw_only=True)
class URLRewriteFilter:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendRef:
    """A backendRef (or a mirror target). `invalid` says why requests to it get 500."""

    group: str = CORE_GROUP
    kind: str = SERVICE_KIND
    namespace: str
    name: str
    port: int | None = None
    weight: int = 1
    filters: tuple[Filter, ...] = ()
    invalid: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestMirrorFilter:
    backend: BackendRef
    numerator: int = 100
    denominator: int = 100
    """Mirror `numerator`/`denominator` of requests (``percent: p`` is p/100)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtensionRefFilter:
    """A custom filter; none are implemented, so matching requests get 500 (as the spec says)."""

    group: str
    kind: str
    name: str


Filter = (
    RequestHeaderModifierFilter
    | ResponseHeaderModifierFilter
    | RequestRedirectFilter
    | URLRewriteFilter
    | RequestMirrorFilter
    | ExtensionRefFilter
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds; None = not set (shell default), 0.0 = explicitly disabled."""

    request: float | None = None
    backend_request: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int | None = None
    codes: tuple[int, ...] = ()
    backoff: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentRef:
    group: str
    kind: str
    namespace: str
    name: str
    port: int | None = None
    section_name: str | None = None

    @property
    def is_mesh(self) -> bool:
        return (self.group, self.kind) in MESH_PARENT_KINDS


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRouteRule:
    index: int
    name: str | None = None
    matches: tuple[HTTPRouteMatch, ...] = (HTTPRouteMatch(),)
    filters: tuple[Filter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GRPCRouteRule:
    index: int
    name: str | None = None
    matches: tuple[GRPCRouteMatch, ...] = (GRPCRouteMatch(),)
    filters: tuple[Filter, ...] = ()
    backend_refs: tuple[BackendRef, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPRoute:
    namespace: str
    name: str
    created: datetime | None = None
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[HTTPRouteRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class GRPCRoute:
    namespace: str
    name: str
    created: datetime | None = None
    parent_refs: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[GRPCRouteRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ParseOptions:
    allow_cross_namespace_backends: bool = False
    """Without ReferenceGrant support, a backend in another namespace is RefNotPermitted unless
    this is set (then every cross-namespace reference is trusted)."""


DEFAULT_PARSE_OPTIONS = ParseOptions()


class _Ctx:
    def __init__(self, namespace: str, errors: Collector, warnings: Collector, opts: ParseOptions):
        self.namespace = namespace
        self.errors = errors
        self.warnings = warnings
        self.opts = opts


def _check_path_value(r: Reader, key: str, value: str) -> None:
    """The CEL rules for Exact / PathPrefix values."""
    problems = [
        (not value.startswith("/"), "must be an absolute path starting with '/'"),
        ("//" in value, "must not contain '//'"),
        ("/./" in value, "must not contain '/./'"),
        ("/../" in value, "must not contain '/../'"),
        ("%2f" in value.lower(), "must not contain '%2F'"),
        ("#" in value, "must not contain '#'"),
        (value.endswith(("/..", "/.")), "must not end with '/..' or '/.'"),
        (not _PATH_CHARS.match(value), "contains characters not allowed in a path"),
    ]
    for bad, message in problems:
        if bad:
            r.error(key, f"{value!r} {message}")
            return


def _regex(r: Reader, key: str, pattern: str) -> Regex | None:
    try:
        return compile_regex(pattern)
    except ValueError as exc:
        r.error(key, str(exc))
        return None


def _parse_path_match(r: Reader) -> PathMatch:
    kind = r.enum("type", tuple(PathMatchType), default=PathMatchType.PATH_PREFIX)
    value = r.text("value")
    value = "/" if value is None else value
    r.finish()
    if kind is None:
        return PathMatch()
    if kind == PathMatchType.REGULAR_EXPRESSION:
        return PathMatch(type=PathMatchType(kind), value=value, regex=_regex(r, "value", value))
    _check_path_value(r, "value", value)
    return PathMatch(type=PathMatchType(kind), value=value)


def _parse_header_matches(parent: Reader, key: str) -> tuple[HeaderMatch, ...]:
    out: list[HeaderMatch] = []
    seen: set[str] = set()
    for r in parent.objects(key, max_items=16):
        kind = r.enum("type", tuple(MatchType), default=MatchType.EXACT)
        name = r.text("name", required=True, max_len=256)
        value = r.text("value", required=True, max_len=4096)
        r.finish()
        if name is not None and not _HEADER_NAME.match(name):
            r.error("name", f"{name!r} is not a valid header name")
            continue
        if kind is None or name is None or value is None:
            continue
        # Spec: only the first entry with an equivalent (case-insensitive) name counts.
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        regex = _regex(r, "value", value) if kind == MatchType.REGULAR_EXPRESSION else None
        out.append(HeaderMatch(type=MatchType(kind), name=name.lower(), value=value, regex=regex))
    return tuple(out)


def _parse_query_matches(parent: Reader) -> tuple[QueryParamMatch, ...]:
    out: list[QueryParamMatch] = []
    seen: set[str] = set()
    for r in parent.objects("queryParams", max_items=16):
        kind = r.enum("type", tuple(MatchType), default=MatchType.EXACT)
        name = r.text("name", required=True, max_len=256)
        value = r.text("value", required=True, max_len=1024)
        r.finish()
        if kind is None or name is None or value is None or name in seen:
            continue
        seen.add(name)
        regex = _regex(r, "value", value) if kind == MatchType.REGULAR_EXPRESSION else None
        out.append(QueryParamMatch(type=MatchType(kind), name=name, value=value, regex=regex))
    return tuple(out)


def _parse_http_match(r: Reader) -> HTTPRouteMatch:
    path_reader = r.sub("path")
    path = _parse_path_match(path_reader) if path_reader else PathMatch()
    headers = _parse_header_matches(r, "headers")
    query = _parse_query_matches(r)
    method = r.enum("method", HTTP_METHODS)
    r.finish()
    return HTTPRouteMatch(path=path, headers=headers, query_params=query, method=method)


def _parse_grpc_match(r: Reader) -> GRPCRouteMatch:
    method: GRPCMethodMatch | None = None
    m = r.sub("method")
    if m is not None:
        kind = m.enum("type", tuple(MatchType), default=MatchType.EXACT)
        service = m.text("service") or None
        name = m.text("method") or None
        m.finish()
        if service is None and name is None:
            m.error("", "one or both of 'service' or 'method' must be specified")
        elif kind == MatchType.EXACT:
            if service is not None and not _GRPC_SERVICE.match(service):
                m.error("service", f"{service!r} is not a valid gRPC service name")
            if name is not None and not _GRPC_METHOD.match(name):
                m.error("method", f"{name!r} is not a valid gRPC method name")
            method = GRPCMethodMatch(type=MatchType.EXACT, service=service, method=name)
        elif kind == MatchType.REGULAR_EXPRESSION:
            method = GRPCMethodMatch(
                type=MatchType.REGULAR_EXPRESSION,
                service=service,
                method=name,
                service_regex=_regex(m, "service", service) if service is not None else None,
                method_regex=_regex(m, "method", name) if name is not None else None,
            )
    headers = _parse_header_matches(r, "headers")
    r.finish()
    return GRPCRouteMatch(method=method, headers=headers)


def _parse_header_modifier(r: Reader) -> HeaderModifier:
    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        seen: set[str] = set()
        for item in r.objects(key, max_items=16):
            name = item.text("name", required=True, max_len=256)
            value = item.text("value", required=True, max_len=4096)
            item.finish()
            if name is None or value is None:
                continue
            if not _HEADER_NAME.match(name):
                item.error("name", f"{name!r} is not a valid header name")
            elif name.lower() in seen:
                item.error("name", f"header {name!r} is listed twice")
            seen.add(name.lower())
            out.append((name, value))
        return tuple(out)

    set_ = pairs("set")
    add = pairs("add")
    remove = tuple(r.strings("remove", max_items=16, max_len=256))
    for i, name in enumerate(remove):
        if not _HEADER_NAME.match(name):
            r.errors.add(f"{r.at('remove')}[{i}]", f"{name!r} is not a valid header name")
    r.finish()
    return HeaderModifier(set=set_, add=add, remove=remove)


def _parse_path_modifier(r: Reader) -> PathModifier | None:
    kind = r.enum("type", tuple(PathModifierType))
    full = r.text("replaceFullPath")
    prefix = r.text("replacePrefixMatch")
    r.finish()
    if kind is None:
        if not r.has("type"):
            r.error("type", "required field is missing")
        return None
    if kind == PathModifierType.REPLACE_FULL_PATH:
        if prefix is not None:
            r.error("replacePrefixMatch", "must not be set when type is ReplaceFullPath")
        if full is None:
            r.error("replaceFullPath", "must be specified when type is ReplaceFullPath")
            return None
        if not full.startswith("/"):
            r.error("replaceFullPath", f"{full!r} must start with '/'")
        return PathModifier(type=PathModifierType.REPLACE_FULL_PATH, value=full)
    if full is not None:
        r.error("replaceFullPath", "must not be set when type is ReplacePrefixMatch")
    if prefix is None:
        r.error("replacePrefixMatch", "must be specified when type is ReplacePrefixMatch")
        return None
    if prefix and not prefix.startswith("/"):
        r.error("replacePrefixMatch", f"{prefix!r} must be empty or start with '/'")
    return PathModifier(type=PathModifierType.REPLACE_PREFIX_MATCH, value=prefix)


def _parse_backend_object(r: Reader, ctx: _Ctx, *, weighted: bool) -> BackendRef | None:
    """A BackendObjectReference (mirror) or BackendRef (with weight); filters parsed by caller."""
    group = r.text("group", max_len=253)
    group = CORE_GROUP if group is None else group
    kind = r.text("kind", max_len=63) or SERVICE_KIND
    name = r.text("name", required=True, max_len=253)
    namespace = r.text("namespace", max_len=63) or ctx.namespace
    port = r.integer("port", low=1, high=65535)
    weight = r.integer("weight", low=0, high=MAX_WEIGHT, default=1) if weighted else 1
    if name is None or weight is None:
        return None
    if (group, kind) == (CORE_GROUP, SERVICE_KIND) and port is None:
        r.error("port", "must be set for a Service reference")
        return None
    invalid: str | None = None
    if (group, kind) not in MESH_PARENT_KINDS:
        invalid = f"InvalidKind: backend kind {group or 'core'}/{kind} is not supported"
    elif namespace != ctx.namespace and not ctx.opts.allow_cross_namespace_backends:
        invalid = f"RefNotPermitted: backend {namespace}/{name} is in another namespace"
    if invalid is not None:
        ctx.warnings.add(r.path, invalid)
    return BackendRef(
        group=group,
        kind=kind,
        namespace=namespace,
        name=name,
        port=port,
        weight=weight,
        invalid=invalid,
    )


_HTTP_FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
    "ExtensionRef": "extensionRef",
}
_GRPC_FILTER_TYPES = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "ExtensionRef",
)
_UNSUPPORTED_FILTERS = {"CORS": "cors", "ExternalAuth": "externalAuth"}


def _parse_filter(r: Reader, ctx: _Ctx, allowed: tuple[str, ...]) -> Filter | None:
    kind = r.text("type", required=True)
    if kind is None:
        return None
    if kind in _UNSUPPORTED_FILTERS:
        r.raw(_UNSUPPORTED_FILTERS[kind])
        r.error("type", f"filter type {kind} is not supported by this waypoint")
        return None
    if kind not in allowed:
        r.error("type", f"unsupported filter type {kind!r} (supported here: {', '.join(allowed)})")
        return None
    key = _HTTP_FILTER_FIELDS[kind]
    for other_type, other_key in _HTTP_FILTER_FIELDS.items():
        if other_type != kind and r.has(other_key):
            r.raw(other_key)
            r.error(other_key, f"must not be set when type is {kind}")
    body = r.sub(key)
    r.finish()
    if body is None:
        r.error(key, f"must be specified for filter type {kind}")
        return None
    result: Filter | None = None
    if kind == "RequestHeaderModifier":
        result = RequestHeaderModifierFilter(modifier=_parse_header_modifier(body))
    elif kind == "ResponseHeaderModifier":
        result = ResponseHeaderModifierFilter(modifier=_parse_header_modifier(body))
    elif kind == "RequestRedirect":
        scheme = body.enum("scheme", ("http", "https"))
        hostname = body.text("hostname", max_len=253)
        if hostname is not None and not _PRECISE_HOSTNAME.match(hostname):
            body.error("hostname", f"{hostname!r} is not a precise host name")
        path_reader = body.sub("path")
        path = _parse_path_modifier(path_reader) if path_reader else None
        port = body.integer("port", low=1, high=65535)
        code = body.raw("statusCode")
        if code is None:
            code = 302
        elif code not in REDIRECT_CODES or isinstance(code, bool):
            body.error(
                "statusCode", f"unsupported value {code!r} (supported: 301, 302, 303, 307, 308)"
            )
            code = 302
        body.finish()
        result = RequestRedirectFilter(
            scheme=scheme, hostname=hostname, path=path, port=port, status_code=code
        )
    elif kind == "URLRewrite":
        hostname = body.text("hostname", max_len=253)
        if hostname is not None and not _PRECISE_HOSTNAME.match(hostname):
            body.error("hostname", f"{hostname!r} is not a precise host name")
        path_reader = body.sub("path")
        path = _parse_path_modifier(path_reader) if path_reader else None
        body.finish()
        result = URLRewriteFilter(hostname=hostname, path=path)
    elif kind == "RequestMirror":
        ref_reader = body.sub("backendRef", required=True)
        backend = _parse_backend_object(ref_reader, ctx, weighted=False) if ref_reader else None
        if ref_reader is not None:
            ref_reader.finish()
        percent = body.integer("percent", low=0, high=100)
        fraction = body.sub("fraction")
        numerator, denominator = (100, 100) if percent is None else (percent, 100)
        if fraction is not None:
            if percent is not None:
                body.error("fraction", "only one of percent or fraction may be set")
            num = fraction.integer("numerator", low=0, high=2**31 - 1, required=True)
            den = fraction.integer("denominator", low=1, high=2**31 - 1, default=100)
            fraction.finish()
            if num is not None and den is not None:
                if num > den:
                    fraction.error("numerator", "must not be greater than denominator")
                numerator, denominator = num, den
        body.finish()
        if backend is not None:
            result = RequestMirrorFilter(
                backend=backend, numerator=numerator, denominator=denominator
            )
    else:  # ExtensionRef
        group = body.text("group", max_len=253)
        ext_kind = body.text("kind", required=True, max_len=63)
        ext_name = body.text("name", required=True, max_len=253)
        body.finish()
        if ext_kind is not None and ext_name is not None:
            result = ExtensionRefFilter(group=group or "", kind=ext_kind, name=ext_name)
    return result


def _parse_filters(
    parent: Reader, ctx: _Ctx, allowed: tuple[str, ...]
) -> tuple[tuple[Filter, ...], list[str]]:
    """Filters plus their declared types in order (for the combination rules)."""
    filters: list[Filter] = []
    types: list[str] = []
    for r in parent.objects("filters", max_items=16):
        kind = r.data.get("type")
        f = _parse_filter(r, ctx, allowed)
        if f is not None:
            filters.append(f)
        if isinstance(kind, str):
            types.append(kind)
    path = parent.at("filters")
    if "RequestRedirect" in types and "URLRewrite" in types:
        parent.errors.add(path, "may specify either RequestRedirect or URLRewrite, but not both")
    for kind in sorted(set(types)):
        if kind not in ("RequestMirror", "ExtensionRef") and types.count(kind) > 1:
            parent.errors.add(path, f"{kind} filter cannot be repeated")
    return tuple(filters), types


def _with_prefix(filters: tuple[Filter, ...], prefix: str) -> tuple[Filter, ...]:
    """Record the rule's PathPrefix on ReplacePrefixMatch modifiers (needed at request time)."""
    out: list[Filter] = []
    for f in filters:
        if (
            isinstance(f, RequestRedirectFilter | URLRewriteFilter)
            and f.path is not None
            and f.path.type == PathModifierType.REPLACE_PREFIX_MATCH
        ):
            f = dataclasses.replace(f, path=dataclasses.replace(f.path, matched_prefix=prefix))
        out.append(f)
    return tuple(out)


def _uses_prefix_rewrite(filters: Iterable[Filter]) -> bool:
    return any(
        isinstance(f, RequestRedirectFilter | URLRewriteFilter)
        and f.path is not None
        and f.path.type == PathModifierType.REPLACE_PREFIX_MATCH
        for f in filters
    )


def _parse_backend_refs(
    parent: Reader, ctx: _Ctx, allowed_filters: tuple[str, ...]
) -> list[tuple[BackendRef, Reader]]:
    out: list[tuple[BackendRef, Reader]] = []
    for r in parent.objects("backendRefs", max_items=16):
        ref = _parse_backend_object(r, ctx, weighted=True)
        filters, _ = _parse_filters(r, ctx, allowed_filters)
        r.finish()
        if ref is not None:
            out.append((dataclasses.replace(ref, filters=filters), r))
    return out


def _parse_timeouts(r: Reader) -> Timeouts:
    values: dict[str, float | None] = {}
    for key in ("request", "backendRequest"):
        text = r.text(key, max_len=64)
        values[key] = None
        if text is not None:
            try:
                values[key] = parse_duration(text)
            except ValueError as exc:
                r.error(key, str(exc))
    r.finish()
    request, backend = values["request"], values["backendRequest"]
    if request and backend and backend > request:
        r.error("backendRequest", "must not be greater than the request timeout")
    return Timeouts(request=request, backend_request=backend)


def _parse_retry(r: Reader) -> RetryPolicy:
    attempts = r.integer("attempts", low=0, high=100)
    codes: list[int] = []
    for i, code in enumerate(r.array("codes", max_items=64)):
        if isinstance(code, bool) or not isinstance(code, int) or not 400 <= code <= 599:
            r.errors.add(f"{r.at('codes')}[{i}]", f"{code!r} is not an HTTP status in 400-599")
        else:
            codes.append(code)
    backoff_text = r.text("backoff", max_len=64)
    backoff: float | None = None
    if backoff_text is not None:
        try:
            backoff = parse_duration(backoff_text)
        except ValueError as exc:
            r.error("backoff", str(exc))
    r.finish()
    return RetryPolicy(attempts=attempts, codes=tuple(codes), backoff=backoff)


def _parse_rule_name(r: Reader, names: set[str]) -> str | None:
    name = r.text("name", max_len=253)
    if name is not None:
        if not _SECTION_NAME.match(name):
            r.error("name", f"{name!r} is not a valid rule name (lower-case RFC 1123 label)")
        elif name in names:
            r.error("name", f"rule name {name!r} must be unique within the route")
        names.add(name)
    return name


def _check_prefix_rewrite(
    r: Reader, filters: Iterable[Filter], matches: tuple[HTTPRouteMatch, ...], where: str
) -> str | None:
    """ReplacePrefixMatch needs exactly one PathPrefix match; returns that prefix."""
    if not _uses_prefix_rewrite(filters):
        return None
    if len(matches) != 1 or matches[0].path.type != PathMatchType.PATH_PREFIX:
        r.error(
            "matches",
            f"when using ReplacePrefixMatch ({where}), exactly one PathPrefix match must be specified",
        )
        return None
    return matches[0].path.value


def _parse_http_rule(r: Reader, index: int, ctx: _Ctx, names: set[str]) -> HTTPRouteRule:
    name = _parse_rule_name(r, names)
    matches = tuple(_parse_http_match(m) for m in r.objects("matches", max_items=64))
    if not r.has("matches"):
        matches = (HTTPRouteMatch(),)
    filters, types = _parse_filters(r, ctx, tuple(_HTTP_FILTER_FIELDS))
    backend_filters = (
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "URLRewrite",
        "RequestMirror",
        "ExtensionRef",
    )
    backends = _parse_backend_refs(r, ctx, backend_filters)
    if backends and "RequestRedirect" in types:
        r.error("filters", "RequestRedirect filter must not be used together with backendRefs")
    prefix = _check_prefix_rewrite(r, filters, matches, "rule filter")
    if prefix is not None:
        filters = _with_prefix(filters, prefix)
    refs: list[BackendRef] = []
    for ref, ref_reader in backends:
        backend_prefix = _check_prefix_rewrite(
            ref_reader, ref.filters, matches, "backendRef filter"
        )
        if backend_prefix is not None:
            ref = dataclasses.replace(ref, filters=_with_prefix(ref.filters, backend_prefix))
        refs.append(ref)
    timeouts_reader = r.sub("timeouts")
    timeouts = _parse_timeouts(timeouts_reader) if timeouts_reader else Timeouts()
    retry_reader = r.sub("retry")
    retry = _parse_retry(retry_reader) if retry_reader else None
    r.finish()
    return HTTPRouteRule(
        index=index,
        name=name,
        matches=matches,
        filters=filters,
        backend_refs=tuple(refs),
        timeouts=timeouts,
        retry=retry,
    )


def _parse_grpc_rule(r: Reader, index: int, ctx: _Ctx, names: set[str]) -> GRPCRouteRule:
    name = _parse_rule_name(r, names)
    matches = tuple(_parse_grpc_match(m) for m in r.objects("matches", max_items=64))
    if not r.has("matches"):
        matches = (GRPCRouteMatch(),)
    filters, _ = _parse_filters(r, ctx, _GRPC_FILTER_TYPES)
    backend_filters = (
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "RequestMirror",
        "ExtensionRef",
    )
    refs = [ref for ref, _ in _parse_backend_refs(r, ctx, backend_filters)]
    r.finish()
    return GRPCRouteRule(
        index=index, name=name, matches=matches, filters=filters, backend_refs=tuple(refs)
    )


def _parse_parent_refs(spec: Reader, namespace: str) -> tuple[ParentRef, ...]:
    out: list[ParentRef] = []
    for r in spec.objects("parentRefs", max_items=32):
        group = r.text("group", max_len=253)
        group = GATEWAY_GROUP if group is None else group
        kind = r.text("kind", max_len=63) or "Gateway"
        name = r.text("name", required=True, max_len=253)
        ns = r.text("namespace", max_len=63) or namespace
        port = r.integer("port", low=1, high=65535)
        section = r.text("sectionName", max_len=253)
        r.finish()
        if name is not None:
            out.append(
                ParentRef(
                    group=group, kind=kind, namespace=ns, name=name, port=port, section_name=section
                )
            )
    return tuple(out)


def _parse_hostnames(spec: Reader) -> tuple[str, ...]:
    hostnames = spec.strings("hostnames", max_items=16, max_len=253)
    for i, h in enumerate(hostnames):
        if not _HOSTNAME.match(h):
            spec.errors.add(f"{spec.at('hostnames')}[{i}]", f"{h!r} is not a valid hostname")
    return tuple(hostnames)


def _route_header(obj: Any, kind: str) -> tuple[str, str, Collector, Collector, datetime | None]:
    namespace, name, errors = object_identity(obj, kind)
    warnings = Collector(kind, namespace, name)
    created = None
    if isinstance(obj, Mapping) and isinstance(obj.get("metadata"), Mapping):
        created = parse_timestamp(
            obj["metadata"].get("creationTimestamp"), "metadata.creationTimestamp", errors
        )
    return namespace, name, errors, warnings, created


def _spec_reader(obj: Any, errors: Collector) -> Reader | None:
    if not isinstance(obj, Mapping):
        return None
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        errors.add("spec", "required field is missing or not an object")
        return None
    return Reader(spec, "spec", errors)


def parse_http_route(
    obj: Any, options: ParseOptions = DEFAULT_PARSE_OPTIONS
) -> tuple[HTTPRoute, list[ConfigError]]:
    """One HTTPRoute and its warnings; raises InvalidObjectError listing every error."""
    namespace, name, errors, warnings, created = _route_header(obj, "HTTPRoute")
    spec = _spec_reader(obj, errors)
    rules: list[HTTPRouteRule] = []
    parents: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    if spec is not None:
        ctx = _Ctx(namespace, errors, warnings, options)
        parents = _parse_parent_refs(spec, namespace)
        hostnames = _parse_hostnames(spec)
        names: set[str] = set()
        rules = [
            _parse_http_rule(r, i, ctx, names)
            for i, r in enumerate(spec.objects("rules", max_items=16))
        ]
        if not spec.has("rules"):
            rules = [HTTPRouteRule(index=0)]
        total = sum(len(rule.matches) for rule in rules)
        if total > 128:
            spec.error("rules", f"{total} matches in total; at most 128 are allowed")
        spec.finish()
    errors.raise_if_any()
    route = HTTPRoute(
        namespace=namespace,
        name=name,
        created=created,
        parent_refs=parents,
        hostnames=hostnames,
        rules=tuple(rules),
    )
    return route, warnings.errors


def parse_grpc_route(
    obj: Any, options: ParseOptions = DEFAULT_PARSE_OPTIONS
) -> tuple[GRPCRoute, list[ConfigError]]:
    """One GRPCRoute and its warnings; raises InvalidObjectError listing every error."""
    namespace, name, errors, warnings, created = _route_header(obj, "GRPCRoute")
    spec = _spec_reader(obj, errors)
    rules: list[GRPCRouteRule] = []
    parents: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    if spec is not None:
        ctx = _Ctx(namespace, errors, warnings, options)
        parents = _parse_parent_refs(spec, namespace)
        hostnames = _parse_hostnames(spec)
        names: set[str] = set()
        rules = [
            _parse_grpc_rule(r, i, ctx, names)
            for i, r in enumerate(spec.objects("rules", max_items=16))
        ]
        if not spec.has("rules"):
            rules = [GRPCRouteRule(index=0)]
        spec.finish()
    errors.raise_if_any()
    route = GRPCRoute(
        namespace=namespace,
        name=name,
        created=created,
        parent_refs=parents,
        hostnames=hostnames,
        rules=tuple(rules),
    )
    return route, warnings.errors


# ---------------------------------------------------------------------------------------------
# Route table: routes indexed by the mesh parent they attach to
# ---------------------------------------------------------------------------------------------

_ParentKey = tuple[str, str, str]  # (kind, namespace, name)
R = TypeVar("R", HTTPRoute, GRPCRoute)


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Accepted routes, indexed by parent Service so a lookup is O(1) in the number of routes."""

    http: tuple[HTTPRoute, ...] = ()
    grpc: tuple[GRPCRoute, ...] = ()
    _http_index: Mapping[_ParentKey, tuple[tuple[HTTPRoute, int | None], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )
    _grpc_index: Mapping[_ParentKey, tuple[tuple[GRPCRoute, int | None], ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def build(cls, http: Iterable[HTTPRoute] = (), grpc: Iterable[GRPCRoute] = ()) -> RouteTable:
        http_t, grpc_t = tuple(http), tuple(grpc)
        return cls(http_t, grpc_t, _index(http_t), _index(grpc_t))

    def http_routes_for(self, kind: str, namespace: str, name: str, port: int) -> list[HTTPRoute]:
        """HTTPRoutes attached to the Service (any port, or this `port`)."""
        return _lookup(self._http_index, kind, namespace, name, port)

    def grpc_routes_for(self, kind: str, namespace: str, name: str, port: int) -> list[GRPCRoute]:
        return _lookup(self._grpc_index, kind, namespace, name, port)


def _index(
    routes: tuple[R, ...],
) -> dict[_ParentKey, tuple[tuple[R, int | None], ...]]:
    index: dict[_ParentKey, list[tuple[R, int | None]]] = {}
    for route in routes:
        for parent in route.parent_refs:
            if parent.is_mesh:
                index.setdefault((parent.kind, parent.namespace, parent.name), []).append(
                    (route, parent.port)
                )
    return {k: tuple(v) for k, v in index.items()}


def _lookup(
    index: Mapping[_ParentKey, tuple[tuple[R, int | None], ...]],
    kind: str,
    namespace: str,
    name: str,
    port: int,
) -> list[R]:
    out: list[R] = []
    for route, parent_port in index.get((kind, namespace, name), ()):
        if (parent_port is None or parent_port == port) and all(r is not route for r in out):
            out.append(route)
    return out

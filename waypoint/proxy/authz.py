"""L7 authorization at the waypoint: Istio AuthorizationPolicy (``security.istio.io/v1``).

Which policies apply (Istio's waypoint rules, waypoint.md §B3):

* ``targetRefs`` to this waypoint's ``Gateway`` (policy in the Gateway's namespace);
* ``targetRefs`` to the addressed ``Service`` / ``ServiceEntry`` (policy in its namespace);
* ``targetRefs`` to the ``GatewayClass`` of the waypoint (policy in the root namespace; mesh-wide
  defaults such as default-deny);
* namespace-wide (no selector, no targetRefs) policies of the destination namespace and root
  namespace **only** with ``enforce_namespace_policies`` (Istio's
  ``ENABLE_LAYERED_WAYPOINT_AUTHORIZATION_POLICIES``, default off: ztunnel enforces those);
* ``selector`` policies never (ztunnel's job).

Evaluation: any matching DENY denies; else, if any ALLOW applies, one must match; else allow.
A policy without rules never matches (so an ALLOW ``{}`` denies everything it applies to). Rules OR;
``from``/``to``/``when`` AND; entries of ``from`` (and of ``to``) OR; in a source/operation every set
field must hold, a field holds if any value matches and no ``not`` value matches. Patterns: exact,
``x*`` prefix, ``*x`` suffix, ``*`` non-empty presence; identities compare as exact strings, never
through regexes (CVE-2026-39350). Hosts compare case-insensitively without the port (unless the
pattern has one); methods upper-case (the request is upper-cased too); paths are the normalised path
without the query.

Repeated request headers (CVE-2026-26308: joined values dodged a DENY): each value is checked on
its own; a DENY condition holds if **any** value satisfies it, an ALLOW condition only if **all** do.

Fail closed: an invalid or unsupported (CUSTOM) policy is reported and replaced by a deny-all
policy for its scope, because dropping it could only widen access. AUDIT policies never change a
decision and are dropped with an error. Pure: no I/O.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from waypoint.proxy.parsing import (
    Collector,
    ConfigError,
    InvalidObjectError,
    Reader,
    object_identity,
)
from waypoint.proxy.request import Destination, Request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ROOT_NAMESPACE = "istio-system"
DEFAULT_WAYPOINT_CLASS = "istio-waypoint"
_GATEWAY_GROUP = "gateway.networking.k8s.io"


class Action(enum.StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"


class PatternKind(enum.Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(frozen=True, slots=True)
class Pattern:
    kind: PatternKind
    value: str

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "*":
            return cls(PatternKind.PRESENCE, "")
        if text.startswith("*"):
            return cls(PatternKind.SUFFIX, text[1:])
        if text.endswith("*"):
            return cls(PatternKind.PREFIX, text[:-1])
        return cls(PatternKind.EXACT, text)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.kind is PatternKind.EXACT:
            return value == self.value
        if self.kind is PatternKind.PREFIX:
            return value.startswith(self.value)
        if self.kind is PatternKind.SUFFIX:
            return value.endswith(self.value)
        return value != ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StringField:
    """One policy field and its ``not`` form."""

    values: tuple[Pattern, ...] = ()
    not_values: tuple[Pattern, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.values and not self.not_values

    def holds(self, value: str | None) -> bool:
        if self.values and not any(p.matches(value) for p in self.values):
            return False
        return not any(p.matches(value) for p in self.not_values)


@dataclass(frozen=True, slots=True, kw_only=True)
class IPField:
    values: tuple[IPNetwork, ...] = ()
    not_values: tuple[IPNetwork, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.values and not self.not_values

    def holds(self, value: IPAddress | None) -> bool:
        def inside(net: IPNetwork) -> bool:
            return value is not None and value.version == net.version and value in net

        if self.values and not any(inside(n) for n in self.values):
            return False
        return not any(inside(n) for n in self.not_values)


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    principals: StringField = field(default_factory=StringField)
    request_principals: StringField = field(default_factory=StringField)
    namespaces: StringField = field(default_factory=StringField)
    ip_blocks: IPField = field(default_factory=IPField)
    remote_ip_blocks: IPField = field(default_factory=IPField)


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    hosts: StringField = field(default_factory=StringField)
    ports: StringField = field(default_factory=StringField)
    methods: StringField = field(default_factory=StringField)
    paths: StringField = field(default_factory=StringField)


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    key: str
    strings: StringField = field(default_factory=StringField)
    ips: IPField = field(default_factory=IPField)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    target_refs: tuple[TargetRef, ...] = ()
    has_selector: bool = False
    invalid: str | None = None
    """Set on fail-closed placeholders: why the real policy was rejected (it then denies all)."""
    scope_unknown: bool = False
    """The placeholder could not even read its targetRefs: it covers its whole namespace."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointScope:
    """Identity of this waypoint, for deciding which policies apply."""

    namespace: str
    name: str
    """The waypoint Gateway's name."""
    gateway_class: str = DEFAULT_WAYPOINT_CLASS
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    enforce_namespace_policies: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzContext:
    """Request attributes for policy evaluation."""

    request: Request
    source_principal: str | None = None
    """Verified peer SPIFFE ID (``spiffe://td/ns/n/sa/s``), None for no identity."""
    source_ip: IPAddress | None = None
    remote_ip: IPAddress | None = None
    """Original client IP (``remoteIpBlocks``, ``remote.ip``); defaults to `source_ip`."""
    destination_ip: IPAddress | None = None
    request_principal: str | None = None
    """JWT ``iss/sub`` when a RequestAuthentication validated one (none is implemented yet)."""
    jwt_claims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sni: str | None = None

    @property
    def principal(self) -> str | None:
        """The peer identity as Istio policies spell it: without ``spiffe://``."""
        p = self.source_principal
        if p is None:
            return None
        return p[len("spiffe://") :] if p.startswith("spiffe://") else p

    @property
    def namespace(self) -> str | None:
        """Namespace from a well-formed ``td/ns/<ns>/sa/<sa>`` identity, else None."""
        principal = self.principal
        if principal is None:
            return None
        parts = principal.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2]:
            return parts[2]
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzDecision:
    allowed: bool
    policy: str | None = None
    """``namespace/name`` of the deciding policy (the DENY that matched, or the one ALLOW)."""
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Applicability and evaluation
# ---------------------------------------------------------------------------------------------


def applies(policy: AuthorizationPolicy, scope: WaypointScope, dest: Destination) -> bool:
    """Whether this waypoint enforces `policy` for a request addressed to `dest`."""
    if policy.scope_unknown:
        return policy.namespace in (dest.namespace, scope.namespace)
    if policy.has_selector:
        return False
    if not policy.target_refs:
        return scope.enforce_namespace_policies and policy.namespace in (
            dest.namespace,
            scope.root_namespace,
        )
    for ref in policy.target_refs:
        if ref.kind == "Gateway" and ref.group == _GATEWAY_GROUP:
            if ref.name == scope.name and policy.namespace == scope.namespace:
                return True
        elif ref.kind == "GatewayClass" and ref.group == _GATEWAY_GROUP:
            if ref.name == scope.gateway_class and policy.namespace == scope.root_namespace:
                return True
        elif (
            ref.kind == dest.kind
            and ref.name == dest.name
            and policy.namespace == dest.namespace
            and ref.group == ("" if dest.kind == "Service" else "networking.istio.io")
        ):
            return True
    return False


def _aggregate(results: Iterable[bool], action: Action) -> bool:
    # DENY: any value may trigger it; ALLOW: every value must qualify (fail closed either way).
    return any(results) if action is Action.DENY else all(results)


def _source_holds(src: Source, ctx: AuthzContext) -> bool:
    remote = ctx.remote_ip if ctx.remote_ip is not None else ctx.source_ip
    return (
        src.principals.holds(ctx.principal)
        and src.request_principals.holds(ctx.request_principal)
        and src.namespaces.holds(ctx.namespace)
        and src.ip_blocks.holds(ctx.source_ip)
        and src.remote_ip_blocks.holds(remote)
    )


def _host_holds(hosts: StringField, request: Request) -> bool:
    port = request.port if request.port is not None else request.destination.port
    with_port = f"{request.host}:{port}"

    def one(p: Pattern) -> bool:
        # A pattern naming a port compares against host:port, otherwise the bare host.
        has_port = ":" in p.value and not p.value.endswith("]")
        return p.matches(with_port if has_port else request.host)

    if hosts.values and not any(one(p) for p in hosts.values):
        return False
    return not any(one(p) for p in hosts.not_values)


def _operation_holds(op: Operation, ctx: AuthzContext) -> bool:
    req = ctx.request
    return (
        _host_holds(op.hosts, req)
        and op.ports.holds(str(req.destination.port))
        and op.methods.holds(req.method)
        and op.paths.holds(req.path)
    )


def _condition_holds(cond: Condition, ctx: AuthzContext, action: Action) -> bool:
    key = cond.key
    remote = ctx.remote_ip if ctx.remote_ip is not None else ctx.source_ip
    if key == "source.ip":
        return cond.ips.holds(ctx.source_ip)
    if key == "remote.ip":
        return cond.ips.holds(remote)
    if key == "destination.ip":
        return cond.ips.holds(ctx.destination_ip)
    if key == "source.principal":
        return cond.strings.holds(ctx.principal)
    if key == "source.namespace":
        return cond.strings.holds(ctx.namespace)
    if key == "request.auth.principal":
        return cond.strings.holds(ctx.request_principal)
    if key == "destination.port":
        return cond.strings.holds(str(ctx.request.destination.port))
    if key == "connection.sni":
        return cond.strings.holds(ctx.sni)
    values: list[str]
    if key.startswith("request.headers["):
        values = ctx.request.header_values(key[len("request.headers[") : -1])
    elif key.startswith("request.auth.claims["):
        values = list(ctx.jwt_claims.get(key[len("request.auth.claims[") : -1], ()))
    elif key == "request.auth.audiences":
        values = list(ctx.jwt_claims.get("aud", ()))
    else:  # request.auth.presenter (the only other key the parser accepts)
        values = list(ctx.jwt_claims.get("azp", ()))
    if not values:
        return cond.strings.holds(None)
    return _aggregate((cond.strings.holds(v) for v in values), action)


def _rule_matches(rule: Rule, ctx: AuthzContext, action: Action) -> bool:
    return (
        (not rule.sources or any(_source_holds(s, ctx) for s in rule.sources))
        and (not rule.operations or any(_operation_holds(o, ctx) for o in rule.operations))
        and all(_condition_holds(c, ctx, action) for c in rule.conditions)
    )


def policy_matches(policy: AuthorizationPolicy, ctx: AuthzContext) -> bool:
    if policy.invalid is not None:
        return True
    return any(_rule_matches(rule, ctx, policy.action) for rule in policy.rules)


def evaluate(
    policies: Iterable[AuthorizationPolicy], ctx: AuthzContext, scope: WaypointScope
) -> AuthzDecision:
    """DENY first, then ALLOW (if any ALLOW applies one must match), else allow."""
    dest = ctx.request.destination
    relevant = sorted((p for p in policies if applies(p, scope, dest)), key=lambda p: p.key)
    for policy in relevant:
        if (policy.action is Action.DENY or policy.invalid is not None) and policy_matches(
            policy, ctx
        ):
            reason = (
                f"policy {policy.key} is invalid (fail closed): {policy.invalid}"
                if policy.invalid is not None
                else f"denied by {policy.key}"
            )
            return AuthzDecision(allowed=False, policy=policy.key, reason=reason)
    allows = [p for p in relevant if p.action is Action.ALLOW]
    if not allows:
        return AuthzDecision(allowed=True, reason="no ALLOW policy applies")
    for policy in allows:
        if policy_matches(policy, ctx):
            return AuthzDecision(allowed=True, policy=policy.key, reason=f"allowed by {policy.key}")
    names = ", ".join(p.key for p in allows)
    return AuthzDecision(
        allowed=False, policy=None, reason=f"ALLOW policies exist ({names}), none matched"
    )


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------

_IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
_STRING_KEYS = frozenset(
    {
        "source.principal",
        "source.namespace",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.port",
        "connection.sni",
    }
)


def _check_pattern(r: Reader, key: str, index: int, text: str) -> bool:
    """Only ``*``, ``*x``, ``x*`` and ``x`` (no other ``*``) are Istio string patterns."""
    where = f"{r.at(key)}[{index}]"
    if not text:
        r.errors.add(where, "empty string is not a valid pattern")
        return False
    core = text[1:] if text.startswith("*") else text[:-1] if text.endswith("*") else text
    if text != "*" and "*" in core:
        r.errors.add(where, f"{text!r}: '*' is allowed only once, at the start or the end")
        return False
    return True


def _string_field(
    r: Reader, key: str, not_key: str, *, lower: bool = False, upper: bool = False
) -> StringField:
    def read(k: str) -> tuple[Pattern, ...]:
        out: list[Pattern] = []
        for i, text in enumerate(r.strings(k, max_len=1024)):
            if k in ("paths", "notPaths") and ("{" in text or "}" in text):
                r.errors.add(f"{r.at(k)}[{i}]", f"{text!r}: path templates are not supported")
                continue
            if not _check_pattern(r, k, i, text):
                continue
            text = text.lower() if lower else text.upper() if upper else text
            out.append(Pattern.parse(text))
        return tuple(out)

    return StringField(values=read(key), not_values=read(not_key))


def _port_field(r: Reader, key: str, not_key: str) -> StringField:
    def read(k: str) -> tuple[Pattern, ...]:
        out: list[Pattern] = []
        for i, text in enumerate(r.strings(k, max_len=8)):
            if not text.isdigit() or not 0 <= int(text) <= 65535:
                r.errors.add(f"{r.at(k)}[{i}]", f"{text!r} is not a port number")
                continue
            out.append(Pattern(PatternKind.EXACT, str(int(text))))
        return tuple(out)

    return StringField(values=read(key), not_values=read(not_key))


def _networks(r: Reader, key: str, texts: list[str]) -> tuple[IPNetwork, ...]:
    out: list[IPNetwork] = []
    for i, text in enumerate(texts):
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            r.errors.add(f"{r.at(key)}[{i}]", f"{text!r} is not an IP address or CIDR block")
    return tuple(out)


def _ip_field(r: Reader, key: str, not_key: str) -> IPField:
    return IPField(
        values=_networks(r, key, r.strings(key, max_len=64)),
        not_values=_networks(r, not_key, r.strings(not_key, max_len=64)),
    )


def _parse_source(r: Reader) -> Source:
    src = Source(
        principals=_string_field(r, "principals", "notPrincipals"),
        request_principals=_string_field(r, "requestPrincipals", "notRequestPrincipals"),
        namespaces=_string_field(r, "namespaces", "notNamespaces"),
        ip_blocks=_ip_field(r, "ipBlocks", "notIpBlocks"),
        remote_ip_blocks=_ip_field(r, "remoteIpBlocks", "notRemoteIpBlocks"),
    )
    r.finish()
    return src


def _parse_operation(r: Reader) -> Operation:
    op = Operation(
        hosts=_string_field(r, "hosts", "notHosts", lower=True),
        ports=_port_field(r, "ports", "notPorts"),
        methods=_string_field(r, "methods", "notMethods", upper=True),
        paths=_string_field(r, "paths", "notPaths"),
    )
    r.finish()
    return op


def _parse_condition(r: Reader) -> Condition | None:
    key = r.text("key", required=True, max_len=256)
    if key is None:
        r.raw("values")
        r.raw("notValues")
        r.finish()
        return None
    bracketed = (key.startswith(("request.headers[", "request.auth.claims["))) and key.endswith("]")
    if key in _IP_KEYS:
        cond = Condition(key=key, ips=_ip_field(r, "values", "notValues"))
    elif key in _STRING_KEYS or bracketed:
        if bracketed and key.index("[") + 1 == len(key) - 1:
            r.error("key", f"{key!r} names no header or claim")
        if key == "destination.port":
            cond = Condition(key=key, strings=_port_field(r, "values", "notValues"))
        else:
            cond = Condition(key=key, strings=_string_field(r, "values", "notValues"))
    else:
        r.error("key", f"unsupported condition key {key!r}")
        r.raw("values")
        r.raw("notValues")
        r.finish()
        return None
    if cond.strings.empty and cond.ips.empty:
        r.error("values", "one of values or notValues must be set")
    r.finish()
    return cond


def _parse_rule(r: Reader) -> Rule:
    sources: list[Source] = []
    for entry in r.objects("from", max_items=64):
        src = entry.sub("source", required=True)
        entry.finish()
        if src is not None:
            sources.append(_parse_source(src))
    operations: list[Operation] = []
    for entry in r.objects("to", max_items=64):
        op = entry.sub("operation", required=True)
        entry.finish()
        if op is not None:
            operations.append(_parse_operation(op))
    conditions = [c for c in (_parse_condition(w) for w in r.objects("when", max_items=64)) if c]
    r.finish()
    return Rule(sources=tuple(sources), operations=tuple(operations), conditions=tuple(conditions))


_TARGET_GROUPS = {
    "Gateway": _GATEWAY_GROUP,
    "GatewayClass": _GATEWAY_GROUP,
    "Service": "",
    "ServiceEntry": "networking.istio.io",
}


def _parse_target_refs(spec: Reader) -> tuple[TargetRef, ...]:
    refs: list[TargetRef] = []
    entries = list(spec.objects("targetRefs", max_items=16))
    single = spec.sub("targetRef")
    if single is not None:
        entries.append(single)
    for r in entries:
        group = r.text("group", max_len=253) or ""
        kind = r.text("kind", required=True, max_len=63)
        name = r.text("name", required=True, max_len=253)
        namespace = r.text("namespace", max_len=63)
        r.finish()
        if namespace and namespace != spec.errors.namespace:
            r.error("namespace", "must be the policy's own namespace")
        expected_group = _TARGET_GROUPS.get(kind or "")
        if kind is not None and expected_group is None:
            r.error("kind", f"unsupported targetRef kind {kind!r}")
        elif kind is not None and group != expected_group:
            # A wrong group would make the policy silently apply nowhere: reject instead.
            r.error("group", f"{kind} targetRefs need group {expected_group!r}, got {group!r}")
        if kind is not None and name is not None:
            refs.append(TargetRef(group=group, kind=kind, name=name))
    return tuple(refs)


def parse_authorization_policy(obj: Any) -> AuthorizationPolicy:
    """One policy; raises InvalidObjectError with every problem (AUDIT and CUSTOM included);
    `fail_closed_placeholder` builds what to enforce instead."""
    namespace, name, errors = object_identity(obj, "AuthorizationPolicy")
    spec_raw = obj.get("spec") if isinstance(obj, Mapping) else None
    spec = Reader(spec_raw if isinstance(spec_raw, Mapping) else {}, "spec", errors)
    if spec_raw is not None and not isinstance(spec_raw, Mapping):
        errors.add("spec", "must be an object")
    has_selector = spec.sub("selector") is not None
    target_refs = _parse_target_refs(spec)
    if has_selector and target_refs:
        spec.error("targetRefs", "selector and targetRefs are mutually exclusive")
    action_text = spec.text("action") or "ALLOW"
    spec.raw("provider")
    rules = [_parse_rule(r) for r in spec.objects("rules", max_items=512)]
    spec.finish()
    if action_text == "AUDIT":
        errors.add("spec.action", "AUDIT is not supported at the waypoint; the policy is ignored")
    elif action_text not in ("ALLOW", "DENY"):
        errors.add(
            "spec.action",
            f"{action_text!r} is not supported at the waypoint (ALLOW or DENY only)",
        )
    errors.raise_if_any()
    return AuthorizationPolicy(
        namespace=namespace,
        name=name,
        action=Action(action_text),
        rules=tuple(rules),
        target_refs=target_refs,
        has_selector=has_selector,
    )


def fail_closed_placeholder(obj: Any, errors: list[ConfigError]) -> AuthorizationPolicy | None:
    """The deny-all stand-in for a rejected policy, in the rejected policy's own scope.

    None for AUDIT policies (they cannot deny anything) and for selector policies (ztunnel's).
    """
    namespace, name, _ = object_identity(obj, "AuthorizationPolicy")
    spec = obj.get("spec") if isinstance(obj, Mapping) else None
    spec = spec if isinstance(spec, Mapping) else {}
    if spec.get("action") == "AUDIT":
        return None
    scratch = Collector("AuthorizationPolicy", namespace, name)
    refs = _parse_target_refs(Reader(spec, "spec", scratch))
    has_selector = spec.get("selector") is not None
    if has_selector and not spec.get("targetRefs") and not spec.get("targetRef"):
        return None
    scope_unknown = bool(scratch.errors) or (has_selector and bool(refs))
    reason = "; ".join(e.message if not e.field else f"{e.field}: {e.message}" for e in errors)
    return AuthorizationPolicy(
        namespace=namespace,
        name=name,
        action=Action.DENY,
        rules=(),
        target_refs=refs,
        invalid=reason or "invalid policy",
        scope_unknown=scope_unknown,
    )


def parse_authorization_policies(
    objects: Iterable[Any],
) -> tuple[list[AuthorizationPolicy], list[ConfigError]]:
    """Accepted policies (plus fail-closed placeholders for rejected ones) and the errors."""
    policies: list[AuthorizationPolicy] = []
    errors: list[ConfigError] = []
    seen: set[str] = set()
    for obj in objects:
        try:
            policy = parse_authorization_policy(obj)
        except InvalidObjectError as exc:
            errors.extend(exc.errors)
            placeholder = fail_closed_placeholder(obj, exc.errors)
            if placeholder is not None and placeholder.key not in seen:
                seen.add(placeholder.key)
                policies.append(placeholder)
            continue
        if policy.key in seen:
            errors.append(
                ConfigError(
                    kind="AuthorizationPolicy",
                    namespace=policy.namespace,
                    name=policy.name,
                    field="metadata.name",
                    message="duplicate object; the first one is used",
                )
            )
            continue
        seen.add(policy.key)
        policies.append(policy)
    return policies, errors

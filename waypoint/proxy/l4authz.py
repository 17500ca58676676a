"""Authorization of non-HTTP (TCP pass-through) streams at the waypoint, from the same L7 policies.

A TCP stream has no method, path, host or headers, so rules that name them cannot be checked.
Istio's rule for a TCP filter chain: an ALLOW rule with HTTP-only attributes never matches (fail
closed: it cannot be proven), a DENY rule with HTTP-only attributes is applied without them (fail
closed: it denies more, never less). Attributes that exist at L4 (principals, namespaces, source
IPs, destination ports, ``source.*``/``destination.*`` conditions) keep their meaning. This module
rewrites the policies accordingly and evaluates them with `authz.evaluate`. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from waypoint.proxy.authz import (
    Action,
    AuthorizationPolicy,
    AuthzContext,
    AuthzDecision,
    Operation,
    Rule,
    StringField,
    WaypointScope,
    evaluate,
)
from waypoint.proxy.request import Destination, Request

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_L4_CONDITIONS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "destination.ip",
        "source.principal",
        "source.namespace",
        "destination.port",
        "connection.sni",
    }
)


def _http_only(op: Operation) -> bool:
    return not (op.hosts.empty and op.methods.empty and op.paths.empty)


def _rule_has_http(rule: Rule) -> bool:
    return (
        any(_http_only(op) for op in rule.operations)
        or any(c.key not in _L4_CONDITIONS for c in rule.conditions)
        or any(not s.request_principals.empty for s in rule.sources)
    )


def _strip_http(rule: Rule) -> Rule:
    ops = tuple(
        dataclasses.replace(op, hosts=StringField(), methods=StringField(), paths=StringField())
        for op in rule.operations
    )
    conditions = tuple(c for c in rule.conditions if c.key in _L4_CONDITIONS)
    sources = tuple(dataclasses.replace(s, request_principals=StringField()) for s in rule.sources)
    return dataclasses.replace(rule, operations=ops, conditions=conditions, sources=sources)


def l4_policy(policy: AuthorizationPolicy) -> AuthorizationPolicy:
    """The policy as it applies to a TCP stream."""
    if policy.invalid is not None:
        return policy
    if policy.action is Action.DENY:
        rules = tuple(_strip_http(r) for r in policy.rules)
    else:
        rules = tuple(r for r in policy.rules if not _rule_has_http(r))
    return dataclasses.replace(policy, rules=rules)


def evaluate_tcp(
    policies: Iterable[AuthorizationPolicy],
    *,
    destination: Destination,
    scope: WaypointScope,
    source_principal: str | None,
    source_ip: IPAddress | None,
    destination_ip: IPAddress | None,
) -> AuthzDecision:
    """DENY first, then ALLOW, over the L4 view of the policies."""
    # A stand-in request: after rewriting, no rule looks at method, path, host or headers.
    request = Request(
        method="CONNECT",
        scheme="http",
        host=destination.hostname,
        port=destination.port,
        path="/",
        query="",
        headers=(),
        destination=destination,
    )
    ctx = AuthzContext(
        request=request,
        source_principal=source_principal,
        source_ip=source_ip,
        destination_ip=destination_ip,
    )
    return evaluate((l4_policy(p) for p in policies), ctx, scope)

"""L4 authorization: may this connection reach this workload? (Istio semantics, ztunnel.md section 6.)

Policy set for a destination workload: GLOBAL policies, NAMESPACE policies of its namespace, and the
policies it references (WORKLOAD_SELECTOR). Order: any matching DENY denies; if no ALLOW applies the
connection is allowed; otherwise an ALLOW must match. ``dry_run`` policies never change the verdict;
their matches and the verdict they would give are reported.

Deliberate difference from ztunnel (reliability.md section 8): a policy the workload references but the
store does not know *denies* (ztunnel skips it), and the verdict names it so the caller can count it.

Matching (ztunnel ``rbac.rs``): a policy without rules never matches; rules OR, clauses AND, matches
OR; an empty match is skipped; a clause without matches matches. Inside a match each populated field
type must pass, where any positive value passing and no ``not_`` value passing is a pass. Principals
are compared without ``spiffe://``, the namespace comes from the peer identity (never from an IP
lookup), service accounts never match without an identity. String matches are plain comparisons,
never regular expressions built from identities.

Pure: cost is proportional to the policies that apply to the workload.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ztunnel.identity.spiffe import SpiffeId
from ztunnel.state.model import (
    Action,
    Authorization,
    IPAddress,
    IPNetwork,
    Match,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)
from ztunnel.state.store import WorkloadStore

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionAttrs:
    """What L4 policy sees of a connection.

    ``destination_port`` is the real target port (the app's), never 15008; ``source_identity`` is the
    peer's SPIFFE identity for HBONE and ``None`` for plaintext.
    """

    source_ip: IPAddress
    source_identity: SpiffeId | None
    destination: Workload
    destination_ip: IPAddress
    destination_port: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The decision, why, and which policy (``ns/name``) decided it, if one did.

    ``missing_policies`` lists referenced policies the store does not know (each denies; count them).
    ``dry_run_matched`` lists dry-run policies that matched; ``shadow_allowed`` is the verdict the
    policies would give if the dry-run ones were enforced.
    """

    allowed: bool
    reason: str
    policy: str | None = None
    missing_policies: tuple[str, ...] = ()
    dry_run_matched: tuple[str, ...] = ()
    shadow_allowed: bool = True


def authorize(store: WorkloadStore, attrs: ConnectionAttrs) -> Verdict:
    """Evaluate the policies that apply to ``attrs.destination``."""
    policies, missing = store.policies_for(attrs.destination)
    return evaluate(policies, attrs, missing=missing)


def evaluate(
    policies: Iterable[Authorization], attrs: ConnectionAttrs, *, missing: Sequence[str] = ()
) -> Verdict:
    """Evaluate a given policy set (``authorize`` without the store lookup)."""
    ordered = sorted(policies, key=lambda p: p.key)  # deterministic "denied by" in reasons
    enforced = [p for p in ordered if not p.dry_run]
    dry = [p for p in ordered if p.dry_run]
    allowed, reason, decider = _decide(enforced, attrs)
    shadow_allowed = allowed
    dry_matched: tuple[str, ...] = ()
    if dry:
        dry_matched = tuple(p.key for p in dry if policy_matches(p, attrs))
        shadow_allowed, _, _ = _decide(ordered, attrs)
    if missing:
        # Fail closed: the policy may have been meant to deny this very connection.
        names = ", ".join(missing)
        return Verdict(
            allowed=False,
            reason=f"workload {attrs.destination.uid} references unknown policy {names}",
            policy=missing[0],
            missing_policies=tuple(missing),
            dry_run_matched=dry_matched,
            shadow_allowed=False,
        )
    return Verdict(
        allowed=allowed,
        reason=reason,
        policy=decider,
        dry_run_matched=dry_matched,
        shadow_allowed=shadow_allowed,
    )


def _decide(
    policies: Sequence[Authorization], attrs: ConnectionAttrs
) -> tuple[bool, str, str | None]:
    for p in policies:
        if p.action is Action.DENY and policy_matches(p, attrs):
            return False, f"explicitly denied by {p.key}", p.key
    allows = [p for p in policies if p.action is Action.ALLOW]
    if not allows:
        return True, "no allow policies apply", None
    for p in allows:
        if policy_matches(p, attrs):
            return True, f"allowed by {p.key}", p.key
    reason = "allow policies exist, but none allowed"
    l7_only = [p.key for p in allows if p.l7_rules_dropped and not p.rules]
    if l7_only:
        reason += f" ({', '.join(l7_only)} had only L7 rules, which L4 cannot enforce)"
    return False, reason, None


def policy_matches(policy: Authorization, attrs: ConnectionAttrs) -> bool:
    """Whether any rule of ``policy`` matches the connection (a policy without rules never does)."""
    facts = _Facts(attrs)
    for rule in policy.rules:
        if all(_clause_matches(clause.matches, facts) for clause in rule.clauses):
            return True
    return False


class _Facts:
    """The connection attributes in the forms matching needs, computed once per policy."""

    __slots__ = ("attrs", "dst_ip", "namespace", "principal", "src_ip")

    def __init__(self, attrs: ConnectionAttrs) -> None:
        self.attrs = attrs
        self.src_ip = _unmap(attrs.source_ip)
        self.dst_ip = _unmap(attrs.destination_ip)
        identity = attrs.source_identity
        self.principal: str | None = identity.principal if identity is not None else None
        self.namespace = identity.namespace if identity is not None else ""


def _clause_matches(matches: Sequence[Match], facts: _Facts) -> bool:
    if not matches:
        return True
    # Empty matches are skipped; a clause of only empty matches therefore does not match.
    return any(not m.is_empty() and _match(m, facts) for m in matches)


def _match(m: Match, f: _Facts) -> bool:
    port = f.attrs.destination_port
    identity = f.attrs.source_identity
    return (
        _field(m.destination_ips, m.not_destination_ips, lambda n: _in(f.dst_ip, n))
        and _field(m.source_ips, m.not_source_ips, lambda n: _in(f.src_ip, n))
        and _field(m.destination_ports, m.not_destination_ports, lambda p: p == port)
        and _field(m.service_accounts, m.not_service_accounts, lambda s: _sa(s, identity))
        and _field(m.principals, m.not_principals, lambda s: _principal(s, f.principal))
        and _field(m.namespaces, m.not_namespaces, lambda s: s.matches(f.namespace))
    )


def _field(positive: Sequence[_T], negative: Sequence[_T], check: Callable[[_T], bool]) -> bool:
    if positive and not any(check(v) for v in positive):
        return False
    return not any(check(v) for v in negative)


def _in(ip: IPAddress, net: IPNetwork) -> bool:
    return ip.version == net.version and ip in net


def _sa(match: ServiceAccountMatch, identity: SpiffeId | None) -> bool:
    return (
        identity is not None
        and identity.namespace == match.namespace
        and identity.service_account == match.service_account
    )


def _principal(match: StringMatch, principal: str | None) -> bool:
    # Without an identity there is no principal: not even an empty-string exact match passes.
    return principal is not None and match.matches(principal)


def _unmap(ip: IPAddress) -> IPAddress:
    # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; policies are written with IPv4 CIDRs.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip

"""L4 authorization: evaluation order, scopes, match semantics (ztunnel rbac.rs), deliberate differences."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ztunnel.state.builders import ip, policy, store_of, wl
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.state.authz import ConnectionAttrs, authorize, evaluate, policy_matches
from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
)

DST = wl("server", "10.0.0.2", ns="prod", authorization_policies=("prod/selected",))
CLIENT_ID = SpiffeId("cluster.local", "frontend", "web")


def attrs(identity=CLIENT_ID, src="10.0.0.1", port=8080, dst=DST, dst_ip="10.0.0.2"):
    return ConnectionAttrs(
        source_ip=ip(src), source_identity=identity, destination=dst,
        destination_ip=ip(dst_ip), destination_port=port,
    )  # fmt: skip


def exact(v):
    return StringMatch(kind=StringMatchKind.EXACT, value=v)


def prefix(v):
    return StringMatch(kind=StringMatchKind.PREFIX, value=v)


def suffix(v):
    return StringMatch(kind=StringMatchKind.SUFFIX, value=v)


PRESENT = StringMatch(kind=StringMatchKind.PRESENCE)


def net(text):
    return ipaddress.ip_network(text)


# ---- single-match semantics: (match, identity, src, port, expected) ----
MATCH_CASES = [
    ("ns-exact", Match(namespaces=(exact("frontend"),)), CLIENT_ID, "10.0.0.1", 8080, True),
    ("ns-exact-other", Match(namespaces=(exact("prod"),)), CLIENT_ID, "10.0.0.1", 8080, False),
    ("ns-prefix", Match(namespaces=(prefix("front"),)), CLIENT_ID, "10.0.0.1", 8080, True),
    ("ns-suffix", Match(namespaces=(suffix("end"),)), CLIENT_ID, "10.0.0.1", 8080, True),
    ("ns-presence-plaintext", Match(namespaces=(PRESENT,)), None, "10.0.0.1", 8080, False),
    ("not-ns", Match(not_namespaces=(exact("frontend"),)), CLIENT_ID, "10.0.0.1", 8080, False),
    ("not-ns-other", Match(not_namespaces=(exact("x"),)), CLIENT_ID, "10.0.0.1", 8080, True),
    (
        "principal-no-scheme",
        Match(principals=(exact("cluster.local/ns/frontend/sa/web"),)),
        CLIENT_ID,
        "10.0.0.1",
        1,
        True,
    ),
    (
        "principal-with-scheme-never",
        Match(principals=(exact("spiffe://cluster.local/ns/frontend/sa/web"),)),
        CLIENT_ID,
        "10.0.0.1",
        1,
        False,
    ),
    ("principal-suffix", Match(principals=(suffix("/sa/web"),)), CLIENT_ID, "10.0.0.1", 1, True),
    ("principal-presence", Match(principals=(PRESENT,)), CLIENT_ID, "10.0.0.1", 1, True),
    ("principal-presence-plaintext", Match(principals=(PRESENT,)), None, "10.0.0.1", 1, False),
    ("principal-empty-exact-plaintext", Match(principals=(exact(""),)), None, "10.0.0.1", 1, False),
    (
        "not-principal-presence-plaintext",
        Match(not_principals=(PRESENT,)),
        None,
        "10.0.0.1",
        1,
        True,
    ),
    (
        "not-principal-presence-mtls",
        Match(not_principals=(PRESENT,)),
        CLIENT_ID,
        "10.0.0.1",
        1,
        False,
    ),
    (
        "sa",
        Match(service_accounts=(ServiceAccountMatch(namespace="frontend", service_account="web"),)),
        SpiffeId("other.td", "frontend", "web"),
        "10.0.0.1",
        1,
        True,
    ),
    (
        "sa-plaintext",
        Match(service_accounts=(ServiceAccountMatch(namespace="frontend", service_account="web"),)),
        None,
        "10.0.0.1",
        1,
        False,
    ),
    (
        "not-sa",
        Match(
            not_service_accounts=(ServiceAccountMatch(namespace="frontend", service_account="web"),)
        ),
        CLIENT_ID,
        "10.0.0.1",
        1,
        False,
    ),
    ("src-cidr", Match(source_ips=(net("10.0.0.0/24"),)), None, "10.0.0.77", 1, True),
    ("src-cidr-miss", Match(source_ips=(net("10.0.1.0/24"),)), None, "10.0.0.77", 1, False),
    (
        "src-cidr-v4-mapped",
        Match(source_ips=(net("10.0.0.0/24"),)),
        None,
        "::ffff:10.0.0.77",
        1,
        True,
    ),
    ("src-cidr-v6-vs-v4", Match(source_ips=(net("::/0"),)), None, "10.0.0.77", 1, False),
    ("not-src-cidr", Match(not_source_ips=(net("10.0.0.0/8"),)), None, "10.0.0.77", 1, False),
    ("dst-cidr", Match(destination_ips=(net("10.0.0.2/32"),)), None, "10.9.9.9", 1, True),
    ("not-dst-cidr", Match(not_destination_ips=(net("10.0.0.0/30"),)), None, "10.9.9.9", 1, False),
    ("port", Match(destination_ports=(80, 8080)), None, "10.0.0.1", 8080, True),
    ("port-miss", Match(destination_ports=(80,)), None, "10.0.0.1", 8080, False),
    ("not-port", Match(not_destination_ports=(9999,)), None, "10.0.0.1", 8080, True),
    ("not-port-hit", Match(not_destination_ports=(8080,)), None, "10.0.0.1", 8080, False),
    (
        "all-fields-and",
        Match(namespaces=(exact("frontend"),), destination_ports=(80,)),
        CLIENT_ID,
        "10.0.0.1",
        8080,
        False,
    ),
    (
        "positive-and-negative",
        Match(source_ips=(net("10.0.0.0/8"),), not_source_ips=(net("10.0.0.0/24"),)),
        None,
        "10.0.0.1",
        1,
        False,
    ),
]


@pytest.mark.parametrize(
    ("match", "identity", "src", "port", "expected"),
    [c[1:] for c in MATCH_CASES],
    ids=[c[0] for c in MATCH_CASES],
)
def test_match_semantics(match, identity, src, port, expected):
    p = policy("p", match)
    assert policy_matches(p, attrs(identity=identity, src=src, port=port)) is expected


def test_structure_semantics():
    hit = Match(destination_ports=(8080,))
    miss = Match(destination_ports=(1,))
    empty = Match()

    def rules(*rs):
        return Authorization(
            name="p",
            namespace="prod",
            rules=tuple(Rule(clauses=tuple(Clause(matches=m) for m in r)) for r in rs),
        )

    a = attrs()
    assert not policy_matches(rules(), a), "no rules never matches"
    assert policy_matches(rules([()]), a), "a clause without matches matches"
    assert policy_matches(rules([]), a), "a rule without clauses matches"
    assert not policy_matches(rules([(empty,)]), a), "an empty match is skipped"
    assert policy_matches(rules([(empty, hit)]), a)
    assert policy_matches(rules([(miss, hit)]), a), "matches OR"
    assert not policy_matches(rules([(hit,), (miss,)]), a), "clauses AND"
    assert policy_matches(rules([(miss,)], [(hit,)]), a), "rules OR"


ALLOW_8080 = policy("allow-8080", Match(destination_ports=(8080,)), ns="prod")
DENY_FRONTEND = policy(
    "deny-frontend", Match(namespaces=(exact("frontend"),)), ns="prod", action=Action.DENY
)
ALLOW_OTHER = policy("allow-other", Match(destination_ports=(1,)), ns="prod")


@pytest.mark.parametrize(
    ("policies", "identity", "allowed", "reason"),
    [
        ((), CLIENT_ID, True, "no allow policies apply"),
        ((ALLOW_8080,), CLIENT_ID, True, "allowed by prod/allow-8080"),
        ((ALLOW_OTHER,), CLIENT_ID, False, "allow policies exist, but none allowed"),
        ((DENY_FRONTEND,), CLIENT_ID, False, "explicitly denied by prod/deny-frontend"),
        ((DENY_FRONTEND, ALLOW_8080), CLIENT_ID, False, "explicitly denied by prod/deny-frontend"),
        ((DENY_FRONTEND, ALLOW_8080), None, True, "allowed by prod/allow-8080"),
        ((DENY_FRONTEND, ALLOW_OTHER), None, False, "allow policies exist, but none allowed"),
        ((ALLOW_OTHER, ALLOW_8080), CLIENT_ID, True, "allowed by prod/allow-8080"),
    ],
    ids=[
        "none",
        "allow-match",
        "allow-miss",
        "deny",
        "deny-beats-allow",
        "deny-miss-allow",
        "deny-miss-allow-miss",
        "any-allow",
    ],
)
def test_order(policies, identity, allowed, reason):
    v = evaluate(policies, attrs(identity=identity))
    assert (v.allowed, v.reason) == (allowed, reason)


def test_scopes_select_policies():
    global_deny = policy(
        "g",
        Match(destination_ports=(8080,)),
        ns="istio-system",
        scope=Scope.GLOBAL,
        action=Action.DENY,
    )
    other_ns = policy("o", Match(destination_ports=(8080,)), ns="other", action=Action.DENY)
    selected = policy(
        "selected",
        Match(destination_ports=(8080,)),
        ns="prod",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
    )
    unreferenced = policy(
        "unref",
        Match(destination_ports=(8080,)),
        ns="prod",
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
    )
    ns_allow = policy("ns-allow", Match(destination_ports=(1,)), ns="prod")

    assert (
        authorize(store_of(DST, other_ns, unreferenced, selected), attrs()).reason
        == "explicitly denied by prod/selected"
    )
    assert authorize(
        store_of(DST, other_ns, unreferenced, selected.__class__(name="x", namespace="prod")),
        attrs(),
    ).missing_policies == ("prod/selected",)
    plain = wl("plain", "10.0.0.3", ns="prod")
    assert authorize(store_of(plain, global_deny), attrs(dst=plain)).policy == "istio-system/g"
    assert authorize(store_of(plain, other_ns, unreferenced), attrs(dst=plain)).allowed
    v = authorize(
        store_of(
            DST,
            ns_allow,
            other_ns,
            unreferenced,
            policy("selected", ns="prod", scope=Scope.WORKLOAD_SELECTOR),
        ),
        attrs(),
    )
    assert not v.allowed
    assert v.reason == "allow policies exist, but none allowed"


def test_unknown_referenced_policy_denies_and_is_reported():
    v = authorize(store_of(DST), attrs())
    assert not v.allowed
    assert v.missing_policies == ("prod/selected",)
    assert "unknown policy prod/selected" in v.reason


def test_allow_with_only_l7_rules_denies():
    l7 = Authorization(
        name="http-only",
        namespace="prod",
        scope=Scope.NAMESPACE,
        action=Action.ALLOW,
        l7_rules_dropped=True,
    )
    v = evaluate([l7], attrs())
    assert not v.allowed
    assert "prod/http-only had only L7 rules" in v.reason


def test_dry_run_never_changes_verdict():
    dry_deny = policy(
        "dry-deny", Match(destination_ports=(8080,)), ns="prod", action=Action.DENY, dry_run=True
    )
    dry_allow = policy("dry-allow", Match(destination_ports=(1,)), ns="prod", dry_run=True)
    v = evaluate([dry_deny], attrs())
    assert v.allowed
    assert v.dry_run_matched == ("prod/dry-deny",)
    assert not v.shadow_allowed
    v = evaluate([dry_allow], attrs())
    assert v.allowed
    assert v.dry_run_matched == ()
    assert not v.shadow_allowed
    v = evaluate([dry_allow, ALLOW_8080], attrs())
    assert v.allowed
    assert v.shadow_allowed


IDS = st.builds(
    SpiffeId,
    st.sampled_from(["cluster.local", "td"]),
    st.sampled_from(["frontend", "prod", "a"]),
    st.sampled_from(["web", "default"]),
)
STRS = st.builds(
    StringMatch,
    kind=st.sampled_from(list(StringMatchKind)),
    value=st.sampled_from(["", "front", "prod", "web", "cluster.local/ns/prod/sa/web", "/sa/web"]),
)
MATCHES = st.builds(
    Match,
    namespaces=st.lists(STRS, max_size=2).map(tuple),
    not_namespaces=st.lists(STRS, max_size=1).map(tuple),
    principals=st.lists(STRS, max_size=2).map(tuple),
    not_principals=st.lists(STRS, max_size=1).map(tuple),
    destination_ports=st.lists(st.sampled_from([80, 8080]), max_size=2).map(tuple),
    not_destination_ports=st.lists(st.sampled_from([80, 8080]), max_size=1).map(tuple),
    source_ips=st.lists(
        st.sampled_from([net("10.0.0.0/8"), net("10.0.0.1/32"), net("::/0")]), max_size=2
    ).map(tuple),
)


@given(
    matches=st.lists(MATCHES, max_size=3),
    identity=st.one_of(st.none(), IDS),
    port=st.sampled_from([80, 8080, 9]),
)
def test_property_deny_allow_duality(matches, identity, port):
    a = attrs(identity=identity, port=port)
    allow = policy("p", *matches, ns="prod")
    deny = policy("p", *matches, ns="prod", action=Action.DENY)
    matched = policy_matches(allow, a)
    # The same rules as DENY deny exactly when as ALLOW they allow (ALLOW alone: else denied).
    assert evaluate([allow], a).allowed is matched
    assert evaluate([deny], a).allowed is (not matched)
    # Adding a DENY can only remove access; adding a dry-run policy never changes the verdict.
    assert not (evaluate([allow, deny], a).allowed and not evaluate([allow], a).allowed)
    dry = policy("dry", *matches, ns="prod", action=Action.DENY, dry_run=True)
    assert evaluate([allow, dry], a).allowed is evaluate([allow], a).allowed
    if identity is None:
        for m in matches:
            if m.principals and not m.is_empty():
                assert not policy_matches(policy("q", Match(principals=m.principals)), a)

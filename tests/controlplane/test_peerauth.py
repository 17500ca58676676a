"""PeerAuthentication -> L4 DENY policies and per-workload keys, as istiod's ambient index does."""

from __future__ import annotations

from typing import Any

import pytest

from tests.controlplane import objects as o
from waypoint.controlplane import peerauth
from waypoint.controlplane.peerauth import PeerAuthError, parse_peer_authentication
from ztunnel.state.model import Action, Clause, Match, Rule, Scope, StringMatch, StringMatchKind

ROOT = "istio-system"
STATIC = f"{ROOT}/istio_converted_static_strict"
CONVERTED = "shop/converted_peer_authentication_wl"
NO_ID = Match(not_principals=(StringMatch(kind=StringMatchKind.PRESENCE),))
APP = {"app": "web"}


def mesh(mode: str) -> dict[str, Any]:
    return o.peer_auth("mesh", ROOT, mtls={"mode": mode})


def ns(mode: str) -> dict[str, Any]:
    return o.peer_auth("ns", "shop", mtls={"mode": mode})


def wl(mode: str | None, ports: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"selector": {"matchLabels": APP}}
    if mode:
        spec["mtls"] = {"mode": mode}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return o.peer_auth("wl", "shop", **spec)


def keys_and_policies(*objs: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    pas = [parse_peer_authentication(x) for x in objs]
    keys = peerauth.workload_policy_keys(ROOT, peerauth.select_for_workload(pas, ROOT, "shop", APP))
    return keys, peerauth.convert_all(ROOT, pas)


@pytest.mark.parametrize(
    ("objs", "keys"),
    [
        ((), []),
        ((mesh("STRICT"),), [STATIC]),
        ((mesh("PERMISSIVE"),), []),
        ((ns("STRICT"),), [STATIC]),
        ((mesh("STRICT"), ns("PERMISSIVE")), []),
        ((mesh("STRICT"), ns("UNSET")), [STATIC]),
        ((mesh("PERMISSIVE"), wl("STRICT")), [STATIC]),
        ((mesh("STRICT"), wl("DISABLE")), []),
        ((wl("STRICT", {"8080": "PERMISSIVE"}),), [CONVERTED]),
        ((wl("PERMISSIVE", {"9090": "STRICT"}),), [CONVERTED]),
        ((mesh("STRICT"), wl(None, {"8080": "PERMISSIVE"})), [CONVERTED]),
        ((wl(None, {"9090": "STRICT"}),), [CONVERTED]),
    ],
    ids=[
        "none",
        "mesh-strict",
        "mesh-permissive",
        "namespace-strict",
        "namespace-overrides-mesh",
        "namespace-unset-inherits",
        "workload-strict",
        "workload-disable",
        "workload-strict-port-permissive",
        "workload-permissive-port-strict",
        "unset-under-strict-port-permissive",
        "unset-port-strict",
    ],
)
def test_workload_keys(objs: tuple[dict[str, Any], ...], keys: list[str]) -> None:
    got, policies = keys_and_policies(*objs)
    assert got == keys
    for key in got:
        assert key in policies  # every key a workload lists is sent


def test_static_policy_sent_whenever_any_peer_authentication_exists() -> None:
    _, policies = keys_and_policies(mesh("PERMISSIVE"))
    static = policies[STATIC]
    assert (static.scope, static.action) == (Scope.WORKLOAD_SELECTOR, Action.DENY)
    assert static.rules == (Rule(clauses=(Clause(matches=(NO_ID,)),)),)
    assert keys_and_policies()[1] == {}


def test_strict_with_permissive_port_exempts_that_port() -> None:
    _, policies = keys_and_policies(wl("STRICT", {"8080": "PERMISSIVE"}))
    pol = policies[CONVERTED]
    assert pol.action is Action.DENY
    # Deny plaintext unless the destination port is 8080.
    assert pol.rules == (
        Rule(
            clauses=(
                Clause(matches=(NO_ID,)),
                Clause(matches=(Match(not_destination_ports=(8080,)),)),
            )
        ),
    )


def test_strict_ports_get_one_rule_each() -> None:
    _, policies = keys_and_policies(wl("PERMISSIVE", {"9090": "STRICT", "9091": "STRICT"}))
    assert policies[CONVERTED].rules == tuple(
        Rule(
            clauses=(
                Clause(
                    matches=(
                        Match(
                            not_principals=(StringMatch(kind=StringMatchKind.PRESENCE),),
                            destination_ports=(port,),
                        ),
                    )
                ),
            )
        )
        for port in (9090, 9091)
    )


def test_unset_workload_under_strict_namespace_merges_strictness() -> None:
    _, policies = keys_and_policies(ns("STRICT"), wl(None, {"8080": "PERMISSIVE"}))
    assert policies[CONVERTED].rules == (
        Rule(
            clauses=(
                Clause(matches=(Match(not_destination_ports=(8080,)),)),
                Clause(matches=(NO_ID,)),
            )
        ),
    )


def test_oldest_namespace_policy_wins() -> None:
    older = o.peer_auth("a", "shop", created="2025-01-01T00:00:00Z", mtls={"mode": "STRICT"})
    newer = o.peer_auth("b", "shop", created="2026-01-01T00:00:00Z", mtls={"mode": "PERMISSIVE"})
    assert keys_and_policies(newer, older)[0] == [STATIC]


def test_other_namespaces_policies_do_not_apply() -> None:
    other = o.peer_auth("x", "other", mtls={"mode": "STRICT"})
    assert keys_and_policies(other)[0] == []


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"mtls": {"mode": "SOMETIMES"}}, "spec.mtls.mode"),
        ({"portLevelMtls": {"http": {"mode": "STRICT"}}}, "spec.portLevelMtls key 'http'"),
        ({"portLevelMtls": {"0": {"mode": "STRICT"}}}, "spec.portLevelMtls key 0"),
    ],
    ids=["bad-mode", "named-port", "port-zero"],
)
def test_bad_peer_authentication_names_the_field(spec: dict[str, Any], where: str) -> None:
    with pytest.raises(PeerAuthError, match="PeerAuthentication shop/bad") as err:
        parse_peer_authentication(o.peer_auth("bad", "shop", **spec))
    assert where in str(err.value)

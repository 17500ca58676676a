"""WorkloadStore: indexes, atomic replace, keyed updates, subscribers; a Hypothesis state machine."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.ztunnel.state.builders import ip, policy, skey, store_of, svc, wl
from ztunnel.state.model import Scope, Visibility, Workload
from ztunnel.state.store import StoreChange, StoreError, WorkloadStore


def test_lookups():
    a = wl("a", "10.0.0.1", "fd00::1", node="n1", services={skey("s"): {}})
    b = wl("b", "10.0.0.2", node="n1", network="net2")
    s = svc("s", "10.96.0.1", {80: 8080})
    g = policy("g", ns="istio-system", scope=Scope.GLOBAL)
    n = policy("n", ns="default")
    sel = policy("sel", ns="default", scope=Scope.WORKLOAD_SELECTOR)
    store = store_of(a, b, s, g, n, sel)
    assert store.workload_by_ip(ip("fd00::1")) is a
    assert store.workload_by_ip(ip("10.0.0.2")) is None
    assert store.workload_by_ip(ip("10.0.0.2"), "net2") is b
    assert store.workload_by_uid(a.uid) is a
    assert store.service_by_vip(ip("10.96.0.1")) is s
    assert store.service_by_key(skey("s")) is s
    assert store.endpoints(skey("s")) == (a,)
    assert store.workloads_on_node("n1") == (a, b)
    assert store.policies_in_namespace("") == (g,)
    assert store.policies_in_namespace("default") == (n,)
    assert store.policy("default/sel") is sel
    assert store.version == 1


def test_vip_preference_and_visibility():
    mine = svc("x", "10.96.0.9", {80: 80}, ns="mine")
    theirs = svc("x", "10.96.0.9", {80: 80}, ns="theirs", canonical=True)
    private = svc("p", "10.96.0.8", {80: 80}, ns="priv", visibility=Visibility.NAMESPACE)
    store = store_of(mine, theirs, private)
    assert store.service_by_vip(ip("10.96.0.9"), client_namespace="mine") is mine
    assert store.service_by_vip(ip("10.96.0.9"), client_namespace="other") is theirs
    assert store.service_by_vip(ip("10.96.0.8"), client_namespace="other") is None
    assert store.service_by_vip(ip("10.96.0.8"), client_namespace="priv") is private


def test_replace_all_rejects_duplicates_and_keeps_old():
    store = store_of(wl("a", "10.0.0.1"))
    with pytest.raises(StoreError, match=r"share address /10\.0\.0\.1"):
        store.replace_all([wl("b", "10.0.0.1"), wl("c", "10.0.0.1")], [], [])
    with pytest.raises(StoreError, match="duplicate policy"):
        store.replace_all([], [], [policy("p"), policy("p")])
    assert [w.name for w in store.workloads()] == ["a"]
    assert store.version == 1


def test_keyed_updates_reindex():
    store = WorkloadStore()
    store.upsert_workload(wl("a", "10.0.0.1", node="n1", services={skey("s"): {}}))
    store.upsert_workload(wl("a", "10.0.0.5", node="n2"))
    assert store.workload_by_ip(ip("10.0.0.1")) is None
    moved = store.workload_by_ip(ip("10.0.0.5"))
    assert moved is not None
    assert moved.name == "a"
    assert store.endpoints(skey("s")) == ()
    assert store.workloads_on_node("n1") == ()
    assert store.remove_workload("Kubernetes//Pod/default/a")
    assert not store.remove_workload("Kubernetes//Pod/default/a")
    store.upsert_service(svc("s", "10.96.0.1", {80: 80}))
    store.upsert_service(svc("s", "10.96.0.2", {80: 80}))
    assert store.service_by_vip(ip("10.96.0.1")) is None
    assert store.remove_service(skey("s"))
    store.upsert_policy(policy("p", scope=Scope.NAMESPACE))
    store.upsert_policy(policy("p", scope=Scope.GLOBAL))
    assert store.policies_in_namespace("default") == ()
    assert len(store.policies_in_namespace("")) == 1
    assert store.remove_policy("default/p")
    assert store.version == 9


def test_subscribers():
    store = WorkloadStore()
    seen: list[StoreChange] = []
    policy_seen: list[StoreChange] = []
    unsub = store.subscribe(seen.append)
    store.subscribe_policies(policy_seen.append)

    def broken(change):
        raise RuntimeError("subscriber bug")

    store.subscribe(broken)
    store.upsert_service(svc("s", "10.96.0.1", {80: 80}))
    store.upsert_policy(policy("p"))
    store.upsert_workload(wl("a", "10.0.0.1"))
    assert [c.version for c in seen] == [1, 2, 3]
    assert [c.version for c in policy_seen] == [2, 3], "service changes cannot change a verdict"
    unsub()
    store.remove_policy("default/p")
    assert len(seen) == 3
    assert [c.version for c in policy_seen] == [2, 3, 4]


def test_policies_for_is_scoped():
    w = wl("a", "10.0.0.1", authorization_policies=("default/sel", "default/missing"))
    store = store_of(
        w,
        policy("sel", scope=Scope.WORKLOAD_SELECTOR),
        policy("other-sel", scope=Scope.WORKLOAD_SELECTOR),
        policy("ns"),
        policy("elsewhere", ns="other"),
        policy("g", ns="istio-system", scope=Scope.GLOBAL),
    )
    found, missing = store.policies_for(w)
    assert sorted(p.key for p in found) == ["default/ns", "default/sel", "istio-system/g"]
    assert missing == ("default/missing",)


NAMES = st.sampled_from(["a", "b", "c"])
IPS = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"])


class StoreMachine(RuleBasedStateMachine):
    """Keyed updates must leave the indexes equal to a rebuild from the same objects."""

    def __init__(self):
        super().__init__()
        self.store = WorkloadStore()
        self.model: dict[str, Workload] = {}

    @rule(
        name=NAMES,
        addr=IPS,
        svc_name=st.sampled_from(["s1", "s2"]),
        node=st.sampled_from(["n1", "n2"]),
    )
    def upsert(self, name, addr, svc_name, node):
        # Keep IPs unique like a consistent control plane would.
        for uid, other in list(self.model.items()):
            if str(other.addresses[0]) == addr and other.name != name:
                self.store.remove_workload(uid)
                del self.model[uid]
        w = wl(name, addr, node=node, services={skey(svc_name): {}})
        self.store.upsert_workload(w)
        self.model[w.uid] = w

    @rule(name=NAMES)
    def remove(self, name):
        uid = f"Kubernetes//Pod/default/{name}"
        assert self.store.remove_workload(uid) == (uid in self.model)
        self.model.pop(uid, None)

    @invariant()
    def indexes_match_rebuild(self):
        fresh = store_of(*self.model.values())
        for addr in ["10.0.0.1", "10.0.0.2", "10.0.0.3"]:
            assert self.store.workload_by_ip(ip(addr)) == fresh.workload_by_ip(ip(addr))
        for s in ["s1", "s2"]:
            assert self.store.endpoints(skey(s)) == fresh.endpoints(skey(s))
        for n in ["n1", "n2"]:
            assert self.store.workloads_on_node(n) == fresh.workloads_on_node(n)


TestStoreMachine = StoreMachine.TestCase

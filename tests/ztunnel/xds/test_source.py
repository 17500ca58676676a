"""XdsSource against a real WorkloadStore, without a network: what each push does to the store."""

from __future__ import annotations

import dataclasses

import pytest

from tests.ztunnel.state.builders import policy, skey, svc, wl
from ztunnel.sources.xds import XdsSource
from ztunnel.state.model import Match, Scope
from ztunnel.state.store import StoreChange, WorkloadStore
from ztunnel.xds import convert, protos
from ztunnel.xds.gen.workloadapi import workload_pb2 as wpb

ADDR = protos.ADDRESS_TYPE_URL
AUTHZ = protos.AUTHORIZATION_TYPE_URL


def push(*values, version="1"):
    """added-map for on_resources: name -> (version, message), as the session hands it over."""
    out = {}
    for value in values:
        msg = (
            convert.authorization_to_proto(value)
            if hasattr(value, "action")
            else convert.address_to_proto(value)
        )
        out[convert.resource_name(value)] = (version, msg)
    return out


@pytest.fixture
def store():
    return WorkloadStore()


def test_ready_after_first_push_of_every_type(store):
    fired = []
    source = XdsSource(store, on_ready=lambda: fired.append(True))
    assert not source.ready
    source.on_resources(ADDR, push(wl("a", "10.0.0.1")), [])
    assert not source.ready
    # A push with a rejected resource still counts: one bad resource must not block startup.
    bad = {"ns/bad": ("1", wpb.Address())}
    assert source.on_resources(AUTHZ, bad, [])
    assert source.ready
    assert fired == [True]
    source.on_resources(AUTHZ, {}, [])
    assert fired == [True]


async def test_wait_ready(store):
    source = XdsSource(store)
    source.on_resources(ADDR, {}, [])
    source.on_resources(AUTHZ, {}, [])
    await source.wait_ready(1)


def test_applies_good_and_rejects_bad_in_one_push(store):
    source = XdsSource(store)
    a, s = wl("a", "10.0.0.1", services={skey("s"): {}}), svc("s", "10.96.0.1", {80: 8080})
    added = push(a, s)
    bad_uid = "Kubernetes//Pod/default/bad"
    added[bad_uid] = ("1", wpb.Address(workload=wpb.Workload(uid=bad_uid, addresses=[b"12345"])))
    rejected = source.on_resources(ADDR, added, [])
    assert set(rejected) == {bad_uid}
    assert "addresses[0]: 5 bytes is not an IPv4 or IPv6 address" in rejected[bad_uid]
    assert store.workload_by_uid(a.uid) == a
    assert store.endpoints(s.key) == (a,)
    assert store.workload_by_uid(bad_uid) is None
    assert source.counters.workloads_applied == 1
    assert source.counters.services_applied == 1
    assert source.counters.rejected == 1
    assert bad_uid in source.rejections


def test_rejected_update_keeps_last_good_state(store):
    source = XdsSource(store)
    a = wl("a", "10.0.0.1")
    source.on_resources(ADDR, push(a), [])
    broken = wpb.Address(workload=convert.workload_to_proto(a))
    broken.workload.tunnel_protocol = wpb.LEGACY_ISTIO_MTLS
    rejected = source.on_resources(ADDR, {a.uid: ("2", broken)}, [])
    assert "LEGACY_ISTIO_MTLS is not supported" in rejected[a.uid]
    assert store.workload_by_uid(a.uid) == a
    # Fixed later: applies and the rejection is forgotten.
    a2 = dataclasses.replace(a, addresses=(wl("x", "10.0.0.2").addresses[0],))
    assert source.on_resources(ADDR, push(a2, version="3"), []) == {}
    assert store.workload_by_uid(a.uid) == a2
    assert not source.rejections


def test_name_must_be_the_key(store):
    source = XdsSource(store)
    a, s, p = wl("a", "10.0.0.1"), svc("s", "10.96.0.1", {80: 80}), policy("p", Match())
    added = {
        "wrong-uid": push(a)[a.uid],
        "default/s": push(s)[s.key],
    }
    rejected = source.on_resources(ADDR, added, [])
    assert rejected["wrong-uid"] == (
        f"resource name 'wrong-uid' does not match its workload uid {a.uid!r}"
    )
    assert "service key <namespace>/<hostname>" in rejected["default/s"]
    rejected = source.on_resources(AUTHZ, {"p": push(p)[p.key]}, [])
    assert "policy key <namespace>/<name> 'default/p'" in rejected["p"]
    assert not store.workloads()
    assert not store.services()
    assert not store.policies()


def test_wrong_message_type_is_rejected(store):
    source = XdsSource(store)
    p = policy("p", Match())
    rejected = source.on_resources(ADDR, {"x": push(p)[p.key]}, [])
    assert rejected == {"x": "expected istio.workload.Address, got Authorization"}


def test_removals_by_name(store):
    source = XdsSource(store)
    a, s = wl("a", "10.0.0.1"), svc("s", "10.96.0.1", {80: 8080})
    p = policy("p", Match(destination_ports=(80,)), scope=Scope.NAMESPACE)
    source.on_resources(ADDR, push(a, s), [])
    source.on_resources(AUTHZ, push(p), [])
    seen: list[StoreChange] = []
    store.subscribe_policies(seen.append)
    source.on_resources(ADDR, {}, [a.uid, s.key])
    source.on_resources(AUTHZ, {}, [p.key])
    assert not store.workloads()
    assert not store.services()
    assert not store.policies()
    assert source.counters.removed == 3
    assert [c.policies for c in seen] == [False, True]  # workload removal, then the policy


def test_removal_of_a_name_never_recorded_tries_workload_then_service(store):
    s = svc("s", "10.96.0.1", {80: 8080})
    store.upsert_service(s)
    XdsSource(store).on_resources(ADDR, {}, [s.key])
    assert store.service_by_key(s.key) is None


def test_unhandled_type_url():
    with pytest.raises(ValueError, match="cannot handle type URL"):
        XdsSource(WorkloadStore(), type_urls=["type.googleapis.com/envoy.Cluster"])
    source = XdsSource(WorkloadStore(), type_urls=[ADDR])
    assert "not handled" in source.on_resources(AUTHZ, {}, [])["*"]

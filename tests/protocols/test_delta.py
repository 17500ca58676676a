"""The sans-IO server core: snapshot versions and per-client delta subscriptions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.protocols.helpers import workload
from waypoint.controlplane.delta import Snapshot, Subscription
from ztunnel.xds import protos

ADDR = protos.ADDRESS_TYPE_URL


def req(sub=(), unsub=(), irv=None, nonce=""):
    return protos.DeltaDiscoveryRequest(
        type_url=ADDR,
        resource_names_subscribe=sub,
        resource_names_unsubscribe=unsub,
        initial_resource_versions=irv or {},
        response_nonce=nonce,
    )


def snap(**ips) -> Snapshot:
    s = Snapshot()
    s.set(ADDR, {name: workload(name, ip)[1] for name, ip in ips.items()}, replace=True)
    return s


def sync(sub: Subscription, s: Snapshot, visible=lambda _n: True):
    send, removed = sub.delta(s.entries(ADDR), visible)
    sub.commit(send, removed, s.generation(ADDR))
    return sorted(e.name for e in send), sorted(removed)


def test_versions_are_content_hashes_and_unchanged_sets_are_no_change():
    a = snap(a="10.0.0.1")
    b = snap(a="10.0.0.1")
    assert a.entries(ADDR)["a"].version == b.entries(ADDR)["a"].version
    assert not a.set(ADDR, {"a": workload("a", "10.0.0.1")[1]}, replace=False)
    assert a.set(ADDR, {"a": workload("a", "10.0.0.2")[1]}, replace=False)
    assert a.generation(ADDR) == 2


def test_set_rejects_wrong_message_type_without_changing_anything():
    s = snap(a="10.0.0.1")
    with pytest.raises(TypeError, match=r"'b': message istio\.security\.Authorization"):
        s.set(ADDR, {"c": workload("c", "10.0.0.3")[1], "b": protos.Authorization()}, replace=False)
    assert list(s.entries(ADDR)) == ["a"]


def test_wildcard_initial_then_deltas():
    s = snap(a="10.0.0.1", b="10.0.0.2")
    sub = Subscription(ADDR)
    sub.apply_request(req())
    assert sub.wildcard
    assert sync(sub, s) == (["a", "b"], [])
    assert sync(sub, s) == ([], [])
    s.set(ADDR, {"a": workload("a", "10.0.0.9")[1]}, replace=False)
    s.remove(ADDR, ["b"])
    assert sync(sub, s) == (["a"], ["b"])


def test_resume_with_initial_resource_versions_sends_only_changes():
    old = snap(a="10.0.0.1", b="10.0.0.2", c="10.0.0.3")
    known = {n: e.version for n, e in old.entries(ADDR).items()}
    new = snap(a="10.0.0.1", b="10.0.0.22", d="10.0.0.4")
    sub = Subscription(ADDR)
    sub.apply_request(req(irv=known))
    assert sync(sub, new) == (["b", "d"], ["c"])


def test_explicit_subscriptions_missing_names_and_unsubscribe():
    s = snap(a="10.0.0.1", b="10.0.0.2")
    sub = Subscription(ADDR)
    sub.apply_request(req(sub=["a", "zz"]))
    assert not sub.wildcard
    assert sync(sub, s) == (["a"], ["zz"])  # a missing name is reported removed
    sub.apply_request(req(sub=["a"]))  # re-subscribing must resend even if unchanged
    assert sync(sub, s) == (["a"], [])
    sub.apply_request(req(unsub=["a"]))
    assert sync(sub, s) == ([], [])
    sub.apply_request(req(sub=["*"]))
    assert sync(sub, s) == (["a", "b"], [])
    sub.apply_request(req(unsub=["*"]))
    assert sync(sub, s) == ([], ["a", "b"])


def test_filter_hides_and_reveals():
    s = snap(a="10.0.0.1", b="10.0.0.2")
    sub = Subscription(ADDR)
    sub.apply_request(req())
    assert sync(sub, s, lambda n: n == "a") == (["a"], [])
    assert sync(sub, s, lambda n: n == "b") == (["b"], ["a"])


@given(
    steps=st.lists(
        st.dictionaries(
            st.sampled_from("abcdef"), st.sampled_from(["10.0.0.1", "10.0.0.2"]), max_size=6
        ),
        min_size=1,
        max_size=6,
    )
)
def test_client_view_converges_to_snapshot(steps):
    s = Snapshot()
    sub = Subscription(ADDR)
    sub.apply_request(req())
    view: dict[str, str] = {}
    for state in steps:
        s.set(ADDR, {n: workload(n, ip)[1] for n, ip in state.items()}, replace=True)
        send, removed = sub.delta(s.entries(ADDR), lambda _n: True)
        sub.commit(send, removed, s.generation(ADDR))
        for e in send:
            view[e.name] = e.version
        for n in removed:
            del view[n]  # never asked to remove something it does not have
        assert view == {n: e.version for n, e in s.entries(ADDR).items()}

"""XdsServer -> real gRPC on 127.0.0.1 -> XdsClient -> XdsSource -> WorkloadStore equals the model."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Callable

import pytest

from tests.ztunnel.state.builders import policy, skey, svc, wl, wp_host
from waypoint.controlplane.xds_server import NackRecord, XdsServer
from ztunnel.sources.xds import XdsSource
from ztunnel.state.model import Action, Match, Scope, StringMatch, StringMatchKind
from ztunnel.state.store import StoreChange, WorkloadStore
from ztunnel.xds import convert, protos
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.gen.workloadapi import workload_pb2 as wpb
from ztunnel.xds.session import NodeInfo

ADDR = protos.ADDRESS_TYPE_URL
AUTHZ = protos.AUTHORIZATION_TYPE_URL
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def model():
    workloads = [
        wl("a", "10.1.0.1", services={skey("web"): {80: 8080}}, node="n1",
           authorization_policies=("default/only-a",)),
        wl("b", "10.1.0.2", "fd00::2", services={skey("web"): {}}, node="n2",
           waypoint=wp_host("wp")),
        wl("wp", "10.1.0.3", native_tunnel=True),
    ]  # fmt: skip
    services = [
        svc("web", "10.96.0.10", {80: 8080}),
        svc("wp", "10.96.0.11", {15008: 15008}),
    ]
    policies = [
        policy("deny-9999", Match(destination_ports=(9999,)), action=Action.DENY),
        policy(
            "only-a",
            Match(principals=(StringMatch(kind=StringMatchKind.PRESENCE),)),
            scope=Scope.WORKLOAD_SELECTOR,
        ),
    ]
    return workloads, services, policies


def by_key(values):
    return sorted(values, key=convert.resource_name)


async def changed(store: WorkloadStore, predicate: Callable[[], bool], timeout: float = 5.0):
    """Wait until a store change makes ``predicate`` true (no polling: the store notifies)."""
    event = asyncio.Event()
    unsubscribe = store.subscribe(lambda _change: event.set())
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                event.clear()
                await event.wait()
    finally:
        unsubscribe()


@pytest.fixture
async def plane():
    """A served model and a connected client feeding a store: (server, source, store, client)."""
    nacks: asyncio.Queue[NackRecord] = asyncio.Queue()
    server = XdsServer(on_nack=nacks.put_nowait)
    workloads, services, policies = model()
    for type_url, resources in convert.model_to_resources(workloads, services, policies).items():
        server.set_resources(type_url, resources)
    port = await server.start("127.0.0.1:0")
    store = WorkloadStore()
    source = XdsSource(store)
    client = XdsClient(
        XdsClientConfig(
            address=f"127.0.0.1:{port}",
            node=NodeInfo(instance_ip="10.0.0.1", pod_name="ztunnel-x", namespace="istio-system"),
            channel_args=OWN_CONNECTION,
        ),
        source,
    )
    task = asyncio.create_task(client.run())
    try:
        await source.wait_ready(5)
        yield server, source, store, client, nacks
    finally:
        await client.close()
        await asyncio.wait_for(task, 5)
        await server.stop(0)


async def test_store_equals_the_served_model(plane):
    _server, source, store, client, _nacks = plane
    workloads, services, policies = model()
    assert by_key(store.workloads()) == by_key(workloads)
    assert by_key(store.services()) == by_key(services)
    assert by_key(store.policies()) == by_key(policies)
    assert [w.name for w in store.endpoints(skey("web"))] == ["a", "b"]
    assert store.workload_by_ip(ipaddress.ip_address("fd00::2")).name == "b"
    assert client.ready
    assert source.ready
    assert source.counters.rejected == 0


async def test_update_and_removal_propagate(plane):
    server, _source, store, _client, _nacks = plane
    workloads, services, _ = model()
    moved = dataclasses.replace(workloads[0], addresses=(ipaddress.ip_address("10.1.0.9"),))
    server.set_resources(ADDR, convert.model_to_resources([moved])[ADDR])
    await changed(store, lambda: store.workload_by_uid(moved.uid) == moved)
    assert store.workload_by_ip(ipaddress.ip_address("10.1.0.1")) is None

    server.remove(ADDR, [services[1].key, workloads[2].uid])
    await changed(
        store,
        lambda: (
            store.service_by_key(services[1].key) is None
            and store.workload_by_uid(workloads[2].uid) is None
        ),
    )
    assert store.service_by_key(services[0].key) == services[0]


async def test_bad_resource_is_nacked_while_good_ones_apply(plane):
    server, source, store, client, nacks = plane
    good = wl("c", "10.1.0.4")
    bad_uid = "Kubernetes//Pod/default/bad"
    bad = wpb.Address(workload=wpb.Workload(uid=bad_uid, namespace="default", addresses=[b"12345"]))
    legacy = wpb.Address(workload=convert.workload_to_proto(wl("legacy", "10.1.0.5")))
    legacy.workload.tunnel_protocol = wpb.LEGACY_ISTIO_MTLS
    server.set_resources(
        ADDR,
        {**convert.model_to_resources([good])[ADDR], bad_uid: bad, legacy.workload.uid: legacy},
    )
    nack = await asyncio.wait_for(nacks.get(), 5)
    assert nack.type_url == ADDR
    assert f"{bad_uid}: workload {bad_uid!r}: addresses[0]: 5 bytes is not an IPv4 or IPv6" in (
        nack.message
    )
    assert "tunnel_protocol: LEGACY_ISTIO_MTLS is not supported" in nack.message
    assert store.workload_by_uid(good.uid) == good
    assert store.workload_by_uid(bad_uid) is None
    assert bad_uid not in client.session.known_versions(ADDR)
    assert source.counters.rejected == 2


async def test_policy_subscribers_fire_on_a_policy_change(plane):
    server, _source, store, _client, _nacks = plane
    _, _, policies = model()
    fired: asyncio.Queue[StoreChange] = asyncio.Queue()
    store.subscribe_policies(fired.put_nowait)
    tightened = dataclasses.replace(
        policies[0], rules=policy("x", Match(destination_ports=(22,))).rules
    )
    server.set_resources(AUTHZ, convert.model_to_resources(policies=[tightened])[AUTHZ])
    change = await asyncio.wait_for(fired.get(), 5)
    assert change.policies
    assert store.policy(tightened.key) == tightened

    server.remove(AUTHZ, [policies[1].key])
    change = await asyncio.wait_for(fired.get(), 5)
    assert change.policies
    assert store.policy(policies[1].key) is None


async def test_state_is_kept_while_disconnected(plane):
    server, _source, store, client, _nacks = plane
    before = (by_key(store.workloads()), by_key(store.services()), by_key(store.policies()))
    await server.stop(0)
    async with asyncio.timeout(5):
        while client.connected:
            await asyncio.sleep(0.01)
    assert (by_key(store.workloads()), by_key(store.services()), by_key(store.policies())) == before

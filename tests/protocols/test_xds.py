"""Delta xDS over real gRPC on 127.0.0.1: our client against our server."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.protocols.helpers import Recorder, node, policy, wait_until, workload
from waypoint.controlplane.xds_server import XdsServer
from ztunnel.xds import protos
from ztunnel.xds.client import XdsClient, XdsClientConfig

ADDR = protos.ADDRESS_TYPE_URL
AUTHZ = protos.AUTHORIZATION_TYPE_URL
# gRPC shares TCP connections between channels to one target; a real fleet has one each.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


@pytest.fixture
async def xds_running():
    srv = XdsServer()
    port = await srv.start("127.0.0.1:0")
    try:
        yield srv, port
    finally:
        await srv.stop(0)


@pytest.fixture
async def start_client():
    started: list[tuple[XdsClient, asyncio.Task[None]]] = []

    async def start(port: int, handler: Recorder, **kw) -> XdsClient:
        cfg = XdsClientConfig(address=f"127.0.0.1:{port}", node=kw.pop("node", node()), **kw)
        client = XdsClient(cfg, handler)
        started.append((client, asyncio.create_task(client.run())))
        return client

    yield start
    for client, _task in started:
        await client.close()
    await asyncio.wait_for(asyncio.gather(*(t for _, t in started)), 5)


def seed(server: XdsServer) -> None:
    server.set_resources(ADDR, dict([workload("a", "10.1.0.1"), workload("b", "10.1.0.2")]))
    server.set_resources(AUTHZ, dict([policy("deny-9999")]))


async def test_initial_sync_then_delta_then_removal(xds_running, start_client):
    server, port = xds_running
    seed(server)
    rec = Recorder()
    client = await start_client(port, rec)
    await client.wait_ready(3)
    a_uid, _ = workload("a", "10.1.0.1")
    b_uid, _ = workload("b", "10.1.0.2")
    assert rec.names(ADDR) == {a_uid, b_uid}
    assert rec.names(AUTHZ) == {"default/deny-9999"}
    assert client.session.known_versions(ADDR) == server.versions(ADDR)

    # A change sends only the changed resource.
    calls_before = len(rec.calls)
    server.set_resources(ADDR, dict([workload("a", "10.1.0.9")]))
    await rec.wait_for(lambda: len(rec.calls) > calls_before)
    type_url, added, removed = rec.calls[-1]
    assert (type_url, list(added), removed) == (ADDR, [a_uid], [])
    changed = added[a_uid][1]
    assert isinstance(changed, protos.Address)
    assert changed.workload.addresses == [bytes([10, 1, 0, 9])]

    # Setting an identical resource is not a change: nothing is pushed.
    server.set_resources(ADDR, dict([workload("b", "10.1.0.2")]))
    # Removal.
    server.remove(ADDR, [b_uid])
    await rec.wait_for(lambda: b_uid not in rec.names(ADDR))
    assert rec.calls[-1] == (ADDR, {}, [b_uid])
    assert len(rec.calls) == calls_before + 2
    await wait_until(lambda: server.acks >= 4)
    assert not server.nacks


async def test_bad_resource_is_nacked_while_good_ones_apply(xds_running, start_client):
    server, port = xds_running
    server.set_resources(ADDR, dict([workload("good", "10.1.0.1")]))
    server.set_resources(AUTHZ, {})
    rec = Recorder(reject=lambda name, _msg: "bad address" if "bad" in name else None)
    client = await start_client(port, rec)
    await client.wait_ready(3)

    good2, bad1, bad2 = (
        workload(n, f"10.1.0.{i}") for i, n in enumerate(["good2", "bad1", "bad2"], 2)
    )
    server.set_resources(ADDR, dict([good2, bad1, bad2]))
    await wait_until(lambda: len(server.nacks) == 1)
    nack = server.nacks[0]
    assert nack.type_url == ADDR
    assert (
        nack.node_id == "ztunnel~10.0.0.1~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    )
    assert nack.message == f"{bad1[0]}: bad address; {bad2[0]}: bad address"
    assert good2[0] in rec.names(ADDR)
    # The rejected resources are not remembered, so a resumed stream asks for them again.
    assert bad1[0] not in client.session.known_versions(ADDR)
    assert good2[0] in client.session.known_versions(ADDR)


async def test_resume_after_server_restart_sends_only_changes(start_client):
    first = XdsServer()
    port = await first.start("127.0.0.1:0")
    a, b, c = workload("a", "10.1.0.1"), workload("b", "10.1.0.2"), workload("c", "10.1.0.3")
    rec = Recorder()
    try:
        first.set_resources(ADDR, dict([a, b, c]))
        first.set_resources(AUTHZ, dict([policy("p1")]))
        client = await start_client(port, rec)
        await client.wait_ready(3)
    finally:
        await first.stop(0)
    # While disconnected the last known state stays.
    await wait_until(lambda: not client.connected)
    assert rec.names(ADDR) == {a[0], b[0], c[0]}

    second = XdsServer()
    a2, d = workload("a", "10.1.0.11"), workload("d", "10.1.0.4")
    second.set_resources(ADDR, dict([a2, b, d]))  # a changed, c gone, d new, b same
    second.set_resources(AUTHZ, dict([policy("p1")]))  # unchanged
    calls_before = len(rec.calls)
    await second.start(f"127.0.0.1:{port}")
    try:
        await rec.wait_for(lambda: rec.names(ADDR) == {a[0], b[0], d[0]}, timeout=5)
        await wait_until(lambda: client.connections == 2)
        resumed = [call for call in rec.calls[calls_before:] if call[1] or call[2]]
        assert resumed == [(ADDR, {a[0]: resumed[0][1][a[0]], d[0]: resumed[0][1][d[0]]}, [c[0]])]
        assert set(resumed[0][1]) == {a[0], d[0]}
    finally:
        await second.stop(0)


async def test_metadata_and_filter_per_client(start_client, tmp_path):
    def only_own_node(client, type_url, name):
        if type_url != ADDR:
            return True
        return name.endswith(client.node.metadata["NODE_NAME"])

    server = XdsServer(resource_filter=only_own_node)
    port = await server.start("127.0.0.1:0")
    try:
        server.set_resources(
            ADDR, dict([workload("pod-n1", "10.1.0.1"), workload("pod-n2", "10.1.0.2")])
        )
        server.set_resources(AUTHZ, {})
        token = tmp_path / "istio-token"
        token.write_text("tok-123\n")
        rec = Recorder()
        client = await start_client(port, rec, node=node(node_name="n2"), token_path=token)
        await client.wait_ready(3)
        assert rec.names(ADDR) == {"Kubernetes//Pod/default/pod-n2"}
        (info,) = server.clients
        assert info.metadata["authorization"] == "Bearer tok-123"
        assert info.metadata["clusterid"] == "Kubernetes"
        assert info.node.metadata["NAME"] == "ztunnel-abc"
        assert info.node.metadata["INSTANCE_IPS"] == "10.0.0.1"
        assert info.node.metadata["CLUSTER_ID"] == "Kubernetes"
    finally:
        await server.stop(0)


async def test_unreadable_token_is_reported_and_retried(xds_running, start_client, tmp_path):
    server, port = xds_running
    seed(server)
    token = tmp_path / "missing-token"
    client = await start_client(port, Recorder(), token_path=token)
    await wait_until(lambda: client.last_error is not None)
    assert str(token) in client.last_error
    token.write_text("now-present")
    await client.wait_ready(20)  # the backoff doubles from 10 ms; a few retries at most


async def test_two_hundred_clients_get_a_change_within_one_second(xds_running, start_client):
    server, port = xds_running
    seed(server)
    recorders = [Recorder() for _ in range(200)]
    clients = [
        await start_client(port, rec, node=node(pod=f"zt-{i}"), channel_args=OWN_CONNECTION)
        for i, rec in enumerate(recorders)
    ]
    await asyncio.wait_for(asyncio.gather(*(c.wait_ready() for c in clients)), 20)

    assert len({info.peer for info in server.clients}) == 200  # 200 TCP connections
    uid, msg = workload("new", "10.1.9.9")
    started = time.monotonic()
    server.set_resources(ADDR, {uid: msg})

    def has_new(rec: Recorder):
        return lambda: uid in rec.names(ADDR)

    await asyncio.wait_for(
        asyncio.gather(*(rec.wait_for(has_new(rec)) for rec in recorders)),
        5,
    )
    elapsed = time.monotonic() - started
    print(f"200 clients got the change in {elapsed * 1000:.0f} ms")
    assert elapsed < 1.0, f"200 clients took {elapsed:.2f} s"

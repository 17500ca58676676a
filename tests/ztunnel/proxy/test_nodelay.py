"""Latency regressions: TCP_NODELAY on every HBONE socket, spare upstream sockets in a pod netns, the
metrics label fast paths and the per-workload caches of the proxies.

Without NODELAY the server's 200 + first bytes sat behind Nagle until the client's delayed ACK
(~40 ms p99); asyncio only sets it for sockets made with ``proto=IPPROTO_TCP``, so each place that
makes or accepts a socket is checked here, including one given a proto-0 socket.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import threading
import time

import pytest

from tests.ztunnel.proxy.hbone_fixtures import Lab, make_lab, roundtrip
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.metrics import LABEL_NAMES, Metrics, ResponseFlags, TrafficLabels
from ztunnel.proxy.h2io import HboneProtocol
from ztunnel.proxy.hbone_server import HboneServer
from ztunnel.proxy.inbound import InboundHbone
from ztunnel.proxy.outbound import Outbound
from ztunnel.proxy.outbound import _identities as outbound_identities
from ztunnel.proxy.pool import HbonePool, PoolKey, tcp_connector
from ztunnel.proxy.socket_factory import (
    DefaultSocketFactory,
    Endpoint,
    NetnsSocketFactory,
    SocketSetupError,
    tcp_socket,
)
from ztunnel.state.model import TunnelProtocol, Workload

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


def nodelay(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def keepalive(sock) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)


def transport_socket(proto: HboneProtocol):
    assert proto.transport is not None
    return proto.transport.get_extra_info("socket")


def server_sockets(server: HboneServer) -> list:
    return [transport_socket(p) for p in server._protocols]


async def one_tunnel(lab: Lab) -> None:
    stream = await lab.pool.connect(lab.key, lab.authority)
    assert len(await roundtrip(stream, b"ping")) == 32 + 4


async def restart_server_on(lab: Lab, listener: socket.socket) -> None:
    """Serve the lab's tunnels from ``listener`` instead of the socket ``start`` made."""
    await lab.server.close()
    lab.server._listen = None
    await lab.server.start(listener)


def proto0_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0: asyncio skips NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


@pytest.mark.parametrize(
    "listener",
    [
        proto0_listener,
        lambda: DefaultSocketFactory().listener(Endpoint(LOOPBACK, 0)),
        None,
    ],
    ids=["proto-0-listener", "factory-listener", "server-own-listener"],
)
async def test_accepted_15008_socket_has_nodelay_and_keepalive(listener):
    lab = await make_lab()
    try:
        if listener is not None:
            await restart_server_on(lab, listener())
        await one_tunnel(lab)
        socks = server_sockets(lab.server)
        assert socks, "the server kept no connection"
        for sock in socks:
            assert nodelay(sock) == 1
            assert keepalive(sock) == 1
    finally:
        await lab.close()


async def proto0_connector(key: PoolKey) -> socket.socket:
    """A connector that forgets NODELAY: the pool must still set it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (str(key.dst_ip), key.dst_port))
    return sock


@pytest.mark.parametrize(
    "connector", [tcp_connector, proto0_connector], ids=["tcp_connector", "proto-0-connector"]
)
async def test_pool_connections_have_nodelay(connector):
    lab = await make_lab()
    pool = HbonePool(client_context=lab.pool._client_context, connector=connector)
    try:
        stream = await pool.connect(lab.key, lab.authority)
        assert len(await roundtrip(stream, b"ping")) == 36
        (proto,) = pool.connections(lab.key)
        sock = transport_socket(proto)
        assert nodelay(sock) == 1
        assert keepalive(sock) == 1
    finally:
        await pool.close()
        await lab.close()


def test_factory_sockets_are_made_with_ipproto_tcp():
    factory = DefaultSocketFactory()
    with (
        factory.listener(Endpoint(LOOPBACK, 0)) as listener,
        factory.upstream(socket.AF_INET) as upstream,
        tcp_socket(socket.AF_INET6) as v6,
    ):
        assert listener.proto == upstream.proto == v6.proto == socket.IPPROTO_TCP
        assert nodelay(upstream) == 1


# ------------------------------------------------------------------ spare sockets in a pod netns


@pytest.fixture
def same_netns(monkeypatch):
    """NetnsSocketFactory whose helper thread stays in our own netns (setns needs root): the
    spare-socket machinery runs for real, only the namespace switch is skipped."""
    monkeypatch.setattr(NetnsSocketFactory, "_enter", lambda self: None)
    made: list[NetnsSocketFactory] = []

    def make(**kwargs) -> NetnsSocketFactory:
        factory = NetnsSocketFactory("/proc/self/ns/net", **kwargs)
        made.append(factory)
        return factory

    yield make
    for factory in made:
        factory.close()


def wait_for_spares(factory: NetnsSocketFactory, family, n: int) -> None:
    deadline = time.monotonic() + 5
    while factory.spare_count(family) < n:
        assert time.monotonic() < deadline, f"only {factory.spare_count(family)}/{n} spares"
        time.sleep(0.005)


def test_listener_fills_spares_and_upstream_takes_one_without_a_thread_hop(same_netns):
    factory = same_netns(spare=3)
    with factory.listener(Endpoint(LOOPBACK, 0)) as listener:
        wait_for_spares(factory, socket.AF_INET, 3)

        def no_hop(_make):
            raise AssertionError("upstream waited for the helper thread")

        factory._run = no_hop
        upstream = factory.upstream(socket.AF_INET, source=LOOPBACK, spoof=True)
        with upstream:
            assert upstream.getsockname()[0] == "127.0.0.1"  # bound on the caller's thread
            assert upstream.proto == socket.IPPROTO_TCP
            assert nodelay(upstream) == 1
            assert keepalive(upstream) == 1
            assert not upstream.getblocking()
            upstream.setblocking(True)
            upstream.settimeout(5)
            upstream.connect(listener.getsockname())
        wait_for_spares(factory, socket.AF_INET, 3)  # refilled in the background
        assert factory.spare_count(socket.AF_INET) == 3


def test_empty_pool_falls_back_to_the_helper_thread(same_netns):
    factory = same_netns(spare=0)
    with factory.upstream(socket.AF_INET, source=LOOPBACK) as sock:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert nodelay(sock) == 1
    assert factory.spare_count(socket.AF_INET) == 0


def test_first_dial_of_a_family_fills_its_spares(same_netns):
    factory = same_netns(spare=2)
    assert factory.spare_count(socket.AF_INET6) == 0
    factory.upstream(socket.AF_INET6).close()
    wait_for_spares(factory, socket.AF_INET6, 2)


def test_bind_failure_of_a_spare_is_a_clear_error_and_closes_it(same_netns):
    factory = same_netns(spare=1)
    factory.upstream(socket.AF_INET).close()
    wait_for_spares(factory, socket.AF_INET, 1)
    spare = factory._spares[socket.AF_INET][0]
    with pytest.raises(
        SocketSetupError, match=r"cannot bind upstream socket to source 192\.0\.2\.1"
    ):
        factory.upstream(socket.AF_INET, source=ipaddress.IPv4Address("192.0.2.1"))
    assert spare.fileno() == -1


def test_close_closes_the_spares(same_netns):
    factory = same_netns(spare=2)
    factory.upstream(socket.AF_INET).close()
    wait_for_spares(factory, socket.AF_INET, 2)
    spares = list(factory._spares[socket.AF_INET])
    factory.close()
    assert all(s.fileno() == -1 for s in spares)
    assert factory.spare_count(socket.AF_INET) == 0


def test_missing_netns_makes_no_spares_and_names_the_namespace(tmp_path):
    factory = NetnsSocketFactory(str(tmp_path / "gone"), spare=2)
    try:
        for _ in range(2):
            with pytest.raises(SocketSetupError, match="gone"):
                factory.upstream(socket.AF_INET)
        assert factory.spare_count(socket.AF_INET) == 0
        assert not any(factory._refilling.values())
    finally:
        factory.close()


def test_failed_refill_stops_refilling_until_a_dial_works_again(same_netns):
    factory = same_netns(spare=2)
    real = factory._make_unbound
    failing = True

    def make(family):
        if failing and threading.current_thread() is not threading.main_thread():
            raise OSError(errno.EMFILE, "Too many open files")
        return real(family)

    factory._make_unbound = make
    factory._run = lambda fn: fn()  # blocking path: this thread
    factory.upstream(socket.AF_INET).close()
    deadline = time.monotonic() + 5
    while factory._refilling.get(socket.AF_INET):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert socket.AF_INET in factory._broken
    assert factory.spare_count(socket.AF_INET) == 0
    factory._refill(socket.AF_INET)  # broken: asks the helper for nothing
    assert not factory._refilling.get(socket.AF_INET)
    failing = False
    factory.upstream(socket.AF_INET).close()
    wait_for_spares(factory, socket.AF_INET, 2)
    assert socket.AF_INET not in factory._broken


def test_negative_spare_is_refused():
    with pytest.raises(ValueError, match="spare must be >= 0"):
        NetnsSocketFactory("/proc/self/ns/net", spare=-1)


# ------------------------------------------------------------------ metrics fast paths


def labels(**kw) -> TrafficLabels:
    return TrafficLabels(reporter="source", source_workload="a", destination_workload="b", **kw)


def test_label_values_in_exposition_order_and_flags_replace_only_the_flag():
    base = labels()
    assert list(base.values()) == list(LABEL_NAMES)
    assert base.ordered() == tuple(base.values().values())
    denied = base.with_flags(ResponseFlags.DENY)
    assert denied.response_flags == "DENY"
    assert {k: v for k, v in denied.values().items() if k != "response_flags"} == {
        k: v for k, v in base.values().items() if k != "response_flags"
    }
    assert base.with_flags(ResponseFlags.NONE) is base


def test_cached_children_count_per_label_set():
    m = Metrics()
    a, b = labels(), labels().with_flags(ResponseFlags.CONNECT)
    for _ in range(3):
        m.connection_opened(a)
    m.connection_closed(a, request_bytes=5, response_bytes=0)
    m.connection_failed(b)
    assert m.value("istio_tcp_connections_opened_total", a.values()) == 3
    assert m.value("istio_tcp_connections_closed_total", a.values()) == 1
    assert m.value("istio_tcp_received_bytes_total", a.values()) == 5
    assert m.value("istio_tcp_sent_bytes_total", a.values()) == 0
    assert b"istio_tcp_sent_bytes_total{" not in m.render()  # no child made for zero bytes
    assert m.value("istio_tcp_connections_failed_total", b.values()) == 1
    assert m.value("istio_tcp_connections_failed_total", a.values()) == 0


# ------------------------------------------------------------------ per-workload caches


def workload(name: str, sa: str, revision: str = "") -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=sa,
        addresses=(ipaddress.ip_address("10.0.0.1"),),
        tunnel_protocol=TunnelProtocol.HBONE,
        canonical_name=f"{name}-app",
        canonical_revision=revision,
        cluster_id="Kubernetes",
    )


def test_outbound_caches_follow_a_replaced_workload():
    out = Outbound(ctx=None, workload=workload("client", "a"), factory=None)  # type: ignore[arg-type]
    dest = workload("server", "s")
    first = out._labels(dest, None, mtls=True)
    assert out._labels(dest, None, mtls=True) is first  # cached
    assert first.destination_principal == "spiffe://cluster.local/ns/default/sa/s"
    assert out._labels(dest, None, mtls=False).source_principal == "unknown"
    assert "service.name=client-app" in out._own().baggage
    out.workload = workload("client", "b", revision="v2")  # the app swaps the object on change
    again = out._labels(dest, None, mtls=True)
    assert again.source_principal == "spiffe://cluster.local/ns/default/sa/b"
    assert again.source_version == "v2"
    assert out._own().identity_str == "spiffe://cluster.local/ns/default/sa/b"
    assert "service.version=v2" in out._own().baggage
    # An equal-looking but new destination object is not served from the cache by id.
    other = workload("server", "s2")
    assert out._labels(other, None, mtls=True).destination_principal.endswith("/sa/s2")


def test_inbound_labels_cached_per_source_and_peer():
    inbound = InboundHbone(ctx=None, workload=workload("server", "s"), factory=None)  # type: ignore[arg-type]
    inbound._refresh()
    src = workload("client", "a")
    peer = SpiffeId("cluster.local", "default", "a")
    first = inbound._labels(src, peer)
    assert inbound._labels(src, peer) is first
    assert inbound._labels(src, None).source_principal == "unknown"
    inbound.workload = workload("server", "s-new")
    inbound._refresh()
    assert inbound._identity_str.endswith("/sa/s-new")
    assert inbound._labels(src, peer).destination_principal.endswith("/sa/s-new")


def test_expected_identities_parsed_once_and_bad_ones_dropped():
    uris = ("spiffe://cluster.local/ns/a/sa/b", "not-a-spiffe-id")
    ids = outbound_identities(uris)
    assert ids == frozenset({SpiffeId("cluster.local", "a", "b")})
    assert outbound_identities(uris) is ids

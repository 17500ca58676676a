"""API additions: AcceptStream (the handler gets the HboneStream), TunnelStats.tunnel/request, and an
async client-context provider for HbonePool."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from tests.ztunnel.proxy.hbone_fixtures import (
    CLIENT_ID,
    LOOPBACK,
    SERVER_ID,
    TD,
    roundtrip,
)
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.h2io import HboneStream, TunnelError
from ztunnel.proxy.hbone_server import (
    AcceptStream,
    HboneServer,
    Reject,
    TunnelRequest,
    TunnelStats,
)
from ztunnel.proxy.pool import HbonePool, PoolKey


class StreamLab:
    """An HBONE server whose decision is an AcceptStream(handler) chosen per test."""

    def __init__(self, handler, **accept_kwargs) -> None:
        self.ca = LocalCa.generate(TD)
        self.client_cert = self.ca.issue(CLIENT_ID)
        self.server_cert = self.ca.issue(SERVER_ID)
        self.handler = handler
        self.accept_kwargs = accept_kwargs
        self.requests: list[TunnelRequest] = []
        self.stats: list[TunnelStats] = []
        self.closed = asyncio.Event()
        self.server = HboneServer(
            ssl_context=lambda: server_context(self.server_cert),
            trust_domain=TD,
            on_connect=self.on_connect,
            on_tunnel_closed=self.on_closed,
        )
        self.pool = HbonePool(client_context=lambda _i: client_context(self.client_cert))

    async def on_connect(self, request: TunnelRequest) -> AcceptStream | Reject:
        self.requests.append(request)
        if request.authority.port == 1:
            return Reject(status=401, reason="denied")
        return AcceptStream(
            handler=self.handler, headers=(("x-served-by", "test"),), **self.accept_kwargs
        )

    def on_closed(self, stats: TunnelStats) -> None:
        self.stats.append(stats)
        self.closed.set()

    @property
    def key(self) -> PoolKey:
        return PoolKey(
            src_identity=CLIENT_ID,
            dst_identities=frozenset({SERVER_ID}),
            src_ip=LOOPBACK,
            dst_ip=LOOPBACK,
            dst_port=self.server.address[1],
        )

    async def __aenter__(self) -> StreamLab:
        await self.server.start(host="127.0.0.1", port=0)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()
        await self.server.close()


async def upper_echo(stream: HboneStream) -> None:
    while data := await stream.read():
        stream.write(data.upper())
        await stream.drain()


@pytest.mark.timeout(20)
async def test_accept_stream_hands_the_stream_to_the_handler_and_reports_stats():
    async with StreamLab(upper_echo) as lab:
        stream = await lab.pool.connect(lab.key, "10.0.0.9:80")
        assert await stream.established == (("x-served-by", "test"),)
        assert await asyncio.wait_for(roundtrip(stream, b"hello waypoint"), 10) == b"HELLO WAYPOINT"
        await asyncio.wait_for(lab.closed.wait(), 5)
        (stats,) = lab.stats
        (request,) = lab.requests
        assert stats.status == 200
        assert stats.error is None
        assert stats.bytes_from_client == stats.bytes_to_client == len(b"hello waypoint")
        assert stats.request is request
        assert stats.tunnel is request.tunnel
        assert stats.peer_identity == CLIENT_ID


@pytest.mark.timeout(20)
async def test_stats_of_a_rejected_tunnel_name_its_request():
    async with StreamLab(upper_echo) as lab:
        with pytest.raises(Exception, match="401"):
            await lab.pool.connect(lab.key, "10.0.0.9:1")
        await asyncio.wait_for(lab.closed.wait(), 5)
        (stats,) = lab.stats
        assert stats.status == 401
        assert stats.request is lab.requests[0]
        assert stats.tunnel is lab.requests[0].tunnel


@pytest.mark.timeout(20)
async def test_handler_error_resets_the_stream():
    async def broken(stream: HboneStream) -> None:
        await stream.readexactly(3)
        raise RuntimeError("parser exploded")

    async with StreamLab(broken) as lab:
        stream = await lab.pool.connect(lab.key, "10.0.0.9:80")
        stream.write(b"abc")
        with pytest.raises(TunnelError):
            await asyncio.wait_for(stream.read(), 5)
        await asyncio.wait_for(lab.closed.wait(), 5)
        assert "parser exploded" in (lab.stats[0].error or "")


@pytest.mark.timeout(20)
async def test_handler_return_half_closes_then_resets_after_linger():
    async def one_answer(stream: HboneStream) -> None:
        stream.write(b"bye")  # returns without reading: the peer keeps its side open

    async with StreamLab(one_answer, linger=0.2) as lab:
        stream = await lab.pool.connect(lab.key, "10.0.0.9:80")
        assert await asyncio.wait_for(stream.readexactly(3), 5) == b"bye"
        assert await asyncio.wait_for(stream.read(), 5) == b""  # END_STREAM after the data
        await asyncio.wait_for(lab.closed.wait(), 5)  # the client never ended: reset at linger
        assert "did not end the stream" in (lab.stats[0].error or "")
        await asyncio.wait_for(stream.closed, 5)


def test_accept_stream_validates_its_arguments():
    with pytest.raises(ValueError, match="handler"):
        AcceptStream(handler=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="linger"):
        AcceptStream(handler=upper_echo, linger=-1)


@pytest.mark.timeout(20)
async def test_pool_accepts_an_async_client_context_provider():
    async with StreamLab(upper_echo) as lab:
        fetched: list[SpiffeId] = []

        async def provider(identity: SpiffeId) -> ssl.SSLContext:
            fetched.append(identity)
            await asyncio.sleep(0.01)  # e.g. a CSR to the CA
            return client_context(lab.client_cert)

        pool = HbonePool(client_context=provider)
        try:
            streams = await asyncio.gather(
                *(pool.connect(lab.key, "10.0.0.9:80") for _ in range(5))
            )
            answers = await asyncio.gather(
                *(roundtrip(s, b"x%d" % i) for i, s in enumerate(streams))
            )
            assert answers == [b"X%d" % i for i in range(5)]
            assert fetched == [CLIENT_ID]  # one connection, one fetch
        finally:
            await pool.close()


async def test_address_is_still_known_after_close() -> None:
    # Callers log or report the listener's address after a drain; the socket is closed by then.
    import ssl

    from ztunnel.proxy.hbone_server import HboneServer

    async def on_connect(request):  # never called
        raise AssertionError

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server = HboneServer(
        ssl_context=lambda: context, trust_domain="cluster.local", on_connect=on_connect
    )
    await server.start(host="127.0.0.1", port=0)
    before = server.address
    await server.drain(timeout=0.1)
    assert server.address == before

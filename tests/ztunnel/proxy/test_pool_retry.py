"""HbonePool.connect retries a stream the server refused unprocessed, once, on another connection.

RFC 9113 §8.7: RST_STREAM(REFUSED_STREAM) and streams above a GOAWAY's last-stream-id were not
processed, so the CONNECT can be sent again. This is what keeps a client whole while the old ztunnel
drains during a restart.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.ztunnel.proxy.hbone_fixtures import make_lab, roundtrip
from ztunnel.hbone.connection import HboneServerConnection
from ztunnel.hbone.guard import Limits
from ztunnel.hbone.settings import SERVER_SETTINGS
from ztunnel.proxy.pool import StreamRefusedError


def server_conns(lab):
    return [p for p in lab.server._protocols if isinstance(p.conn, HboneServerConnection)]


@pytest.mark.timeout(20)
async def test_stream_above_goaway_last_stream_id_is_retried_on_a_new_connection():
    lab = await make_lab()
    try:
        first = await lab.pool.connect(lab.key, lab.authority)
        (proto,) = server_conns(lab)
        # The server starts draining just before our next CONNECT arrives: the GOAWAY (last
        # stream 1) goes out together with the refusal of stream 3.
        proto.conn.drain()
        stream = await asyncio.wait_for(lab.pool.connect(lab.key, lab.authority), 10)
        assert stream.proto is not first.proto
        assert (await roundtrip(stream, b"retried"))[32:] == b"deirter"
        stats = lab.pool.statistics()
        assert stats.refused_retries == 1
        assert stats.connections_opened == 2
        assert lab.calls == 2  # the refused CONNECT never reached on_connect: no upstream dial
        assert (await roundtrip(first, b"old"))[32:] == b"dlo"  # the draining one still works
    finally:
        await lab.close()


@pytest.mark.timeout(20)
async def test_refused_stream_reset_is_retried_on_another_connection():
    # The server admits one stream per connection but advertises 200: the second CONNECT on the
    # same connection is refused with RST_STREAM(REFUSED_STREAM), the connection lives on.
    lab = await make_lab(limits=Limits(max_concurrent_streams=1), settings=SERVER_SETTINGS)
    try:
        first = await lab.pool.connect(lab.key, lab.authority)
        second = await asyncio.wait_for(lab.pool.connect(lab.key, lab.authority), 10)
        assert second.proto is not first.proto
        assert not first.proto.conn.goaway_received
        answers = await asyncio.gather(roundtrip(first, b"one"), roundtrip(second, b"two"))
        assert [a[32:] for a in answers] == [b"eno", b"owt"]
        assert lab.pool.statistics().refused_retries == 1
    finally:
        await lab.close()


@pytest.mark.timeout(20)
async def test_second_refusal_is_raised():
    lab = await make_lab(limits=Limits(max_concurrent_streams=0))
    try:
        with pytest.raises(StreamRefusedError, match="refused"):
            await asyncio.wait_for(lab.pool.connect(lab.key, lab.authority), 10)
        stats = lab.pool.statistics()
        assert stats.refused_retries == 1
        assert stats.connections_opened == 2
        assert lab.calls == 0
    finally:
        await lab.close()


@pytest.mark.timeout(60)
async def test_no_tunnel_lost_while_server_connections_drain_under_load():
    # Restarts in miniature: clients keep opening tunnels while waves of GOAWAYs hit the server's
    # connections (each closed once idle). As in a restart, a wave drains the connections that
    # already existed at the previous wave; the ones dialled since (where retries go) are left
    # alone until the next-but-one wave. Without the retry, CONNECTs in flight during a wave fail.
    lab = await make_lab()
    stop = asyncio.Event()

    async def drainer() -> None:
        previous: list = []
        while not stop.is_set():
            await asyncio.sleep(0.05)
            for proto in previous:
                proto.conn.drain()
                proto.flush()
                if proto.conn.held_streams == 0:
                    proto.close()
            previous = server_conns(lab)

    async def client(i: int) -> bytes:
        await asyncio.sleep((i % 100) * 0.004)
        stream = await lab.pool.connect(lab.key, lab.authority)
        return await roundtrip(stream, b"%d" % i)

    task = asyncio.ensure_future(drainer())
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(client(i) for i in range(300)), return_exceptions=True), 45
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        for i, answer in enumerate(results):
            assert isinstance(answer, bytes)
            assert answer[32:] == (b"%d" % i)[::-1]
        assert lab.pool.statistics().connections_opened > 1
    finally:
        stop.set()
        await task
        await lab.close()

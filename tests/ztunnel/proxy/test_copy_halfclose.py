"""copy.splice_sockets: half-close both ways and byte counts under churn, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import socket

import pytest

uvloop = pytest.importorskip("uvloop")


async def _one(listen_port: int, i: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", listen_port)
    payload = bytes([i % 256]) * (1 + i * 97 % 20000)
    writer.write(payload)
    writer.write_eof()  # half-close: the reply must still arrive
    data = await reader.read()
    assert data == payload[::-1]
    writer.close()


async def _churn(n: int) -> None:
    from ztunnel.proxy.copy import splice_sockets

    async def upstream(reader, writer):
        data = await reader.read()
        writer.write(data[::-1])
        writer.write_eof()
        await writer.drain()
        writer.close()

    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    up_port = up.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    results = []

    async def relay(reader, writer):
        sock = writer.transport.get_extra_info("socket").dup()
        writer.transport.abort()
        client = socket.socket(fileno=sock.detach()) if hasattr(sock, "detach") else sock
        client.setblocking(False)
        upstream_sock = socket.socket()
        upstream_sock.setblocking(False)
        await loop.sock_connect(upstream_sock, ("127.0.0.1", up_port))
        results.append(await splice_sockets(client, upstream_sock))

    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(256)
    listen.setblocking(False)

    async def accept_loop():
        while True:
            c, _ = await loop.sock_accept(listen)
            tasks.append(loop.create_task(_relay_sock(c)))

    async def _relay_sock(c):
        upstream_sock = socket.socket()
        upstream_sock.setblocking(False)
        await loop.sock_connect(upstream_sock, ("127.0.0.1", up_port))
        results.append(await splice_sockets(c, upstream_sock))

    tasks: list[asyncio.Task[None]] = []
    acceptor = loop.create_task(accept_loop())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(_one(listen.getsockname()[1], i) for i in range(n))), 30
        )
        for _ in range(100):
            if len(results) == n:
                break
            await asyncio.sleep(0.01)
        assert len(results) == n
        assert all(r.error is None for r in results), [r.error for r in results if r.error]
        assert sum(r.a_to_b for r in results) == sum(1 + i * 97 % 20000 for i in range(n))
    finally:
        acceptor.cancel()
        listen.close()
        up.close()
    del relay


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_half_close_under_churn(loop_name):
    factory = uvloop.new_event_loop if loop_name == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        for _ in range(3):
            runner.run(_churn(150))

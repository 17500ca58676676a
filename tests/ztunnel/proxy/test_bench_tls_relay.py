"""Regression: the benchmark's plain-TLS baseline relay loses no byte sent while it dials upstream.

This was the cause of the 512 MiB ``python -m bench hbone_loopback`` stall: bytes that arrived during
the relay's upstream dial went into an already-emptied buffer and were never forwarded, so the sink
waited forever for the announced length. The dial is slowed down here to make the race certain.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from bench.hbone_loopback import _tls_relay
from tests.ztunnel.proxy.hbone_fixtures import CLIENT_ID, SERVER_ID, TD
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.tls import client_context, server_context


async def counting_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    want = struct.unpack(">Q", await reader.readexactly(8))[0]
    total = 0
    while total < want and (data := await reader.read(1 << 20)):
        total += len(data)
    writer.write(struct.pack(">Q", total))
    await writer.drain()
    writer.close()


@pytest.mark.timeout(30)
async def test_bytes_sent_during_upstream_dial_are_forwarded():
    ca = LocalCa.generate(TD)
    loop = asyncio.get_running_loop()
    sink = await asyncio.start_server(counting_sink, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]

    async def slow_dial(which: str) -> socket.socket:
        assert which == "s"
        await asyncio.sleep(0.3)  # the client keeps sending meanwhile
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", sink_port))
        return sock

    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(1)
    listen.setblocking(False)
    relays: list[asyncio.Task[None]] = []

    async def accept_one() -> None:
        client, _ = await loop.sock_accept(listen)
        await _tls_relay(client, server_context(ca.issue(SERVER_ID)), slow_dial)

    relays.append(asyncio.ensure_future(accept_one()))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            listen.getsockname()[1],
            ssl=client_context(ca.issue(CLIENT_ID)),
            server_hostname="127.0.0.1",
        )
        total = 16 * 1024 * 1024
        writer.write(b"s" + struct.pack(">Q", total))
        chunk = os.urandom(1 << 20)
        for _ in range(total // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        got = struct.unpack(">Q", await asyncio.wait_for(reader.readexactly(8), 20))[0]
        assert got == total
        writer.close()
    finally:
        for task in relays:
            task.cancel()
        listen.close()
        sink.close()
        await sink.wait_closed()

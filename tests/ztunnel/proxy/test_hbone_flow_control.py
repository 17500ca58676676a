"""Flow control over real TLS on 127.0.0.1: no window deadlock, bounded memory with slow ends.

Regression for the "512 MiB benchmark stall" investigation: the stall was in the benchmark's TLS
baseline relay (see test_bench_tls_relay.py), but these tests pin down that the HBONE data path itself
cannot deadlock on window accounting (tiny windows and frames, so thousands of WINDOW_UPDATE round
trips happen in a few seconds, on one stream and on several sharing one connection window) and that a
slow consumer at either end makes bytes wait in bounded buffers, never pile up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import psutil
import pytest

from tests.ztunnel.proxy.hbone_fixtures import Lab, echo_upstream, make_lab
from ztunnel.hbone.settings import H2Settings, MiB
from ztunnel.identity.tls import client_context
from ztunnel.proxy.copy import MAX_BUFFER, TCP_HIGH_WATER
from ztunnel.proxy.h2io import SEND_BUFFER_CAP, HboneStream
from ztunnel.proxy.pool import HbonePool

TINY = H2Settings(stream_window=65_535, connection_window=65_535, max_frame_size=16_384)


def tiny_pool(lab: Lab, settings: H2Settings = TINY) -> HbonePool:
    certs = lab.certs  # type: ignore[attr-defined]
    return HbonePool(client_context=lambda ident: client_context(certs[ident]), settings=settings)


async def pump_through(stream: HboneStream, payload: bytes, piece: int = 256 * 1024) -> bytes:
    """Write ``payload`` (with backpressure) while reading the echo; returns what came back."""

    async def writer() -> None:
        for i in range(0, len(payload), piece):
            stream.write(payload[i : i + piece])
            await stream.drain()
        stream.write_eof()

    async def reader() -> bytes:
        got = bytearray()
        while data := await stream.read():
            got += data
        return bytes(got)

    _, echoed = await asyncio.gather(writer(), reader())
    return echoed


@pytest.mark.timeout(60)
async def test_tiny_windows_large_echo_single_stream_completes():
    lab = await make_lab(echo_upstream, settings=TINY)
    pool = tiny_pool(lab)
    try:
        stream = await pool.connect(lab.key, lab.authority)
        payload = os.urandom(12 * MiB)
        echoed = await asyncio.wait_for(pump_through(stream, payload), 45)
        assert len(echoed) == len(payload)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    finally:
        await pool.close()
        await lab.close()


@pytest.mark.timeout(60)
async def test_tiny_connection_window_shared_by_streams_completes():
    # The connection window equals one stream's: streams starve each other unless a connection-level
    # WINDOW_UPDATE wakes every blocked stream.
    lab = await make_lab(echo_upstream, settings=TINY)
    pool = tiny_pool(lab)
    try:
        streams = [await pool.connect(lab.key, lab.authority) for _ in range(4)]
        assert len({s.proto for s in streams}) == 1
        payloads = [os.urandom(2 * MiB + i * 7919) for i in range(len(streams))]
        echoed = await asyncio.wait_for(
            asyncio.gather(*(pump_through(s, p) for s, p in zip(streams, payloads, strict=True))),
            45,
        )
        for got, want in zip(echoed, payloads, strict=True):
            assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()
    finally:
        await pool.close()
        await lab.close()


async def fast_producer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream that answers a decimal byte count with that many bytes, as fast as TCP takes them."""
    want = int((await reader.readline()).decode())
    block = bytes(MAX_BUFFER)
    try:
        while want > 0:
            n = min(want, len(block))
            writer.write(block[:n])
            want -= n
            await writer.drain()
        writer.write_eof()
        await reader.read()
    finally:
        writer.close()


async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream that reads slowly and finally answers how many bytes it got."""
    total = 0
    while data := await reader.read(64 * 1024):
        total += len(data)
        await asyncio.sleep(0.0005)
    writer.write(f"{total}\n".encode())
    await writer.drain()
    writer.close()


def server_side_buffered(lab: Lab) -> int:
    """Bytes the HBONE server holds for sending (stream queues plus TLS transport buffers)."""
    total = 0
    for proto in lab.server._protocols:
        total += sum(s.send_buffered for s in proto.streams.values())
        if proto.transport is not None:
            total += proto.transport.get_write_buffer_size()
    return total


def client_side_buffered(stream: HboneStream) -> int:
    """Bytes received but not read yet plus bytes queued for sending, on the client stream."""
    transport = stream.proto.transport
    queued = transport.get_write_buffer_size() if transport is not None else 0
    return sum(len(c) for c in stream._recv) + stream.send_buffered + queued


@pytest.mark.timeout(90)
async def test_slow_reader_long_download_memory_bounded():
    total = 96 * MiB
    lab = await make_lab(fast_producer)
    rss = psutil.Process()
    try:
        stream = await lab.pool.connect(lab.key, lab.authority)
        stream.write(f"{total}\n".encode())
        window = 4 * MiB  # the client's advertised stream window (CLIENT_SETTINGS)
        got = 0
        peak_client = peak_server = 0
        rss_start = rss.memory_info().rss
        peak_rss = rss_start

        async def download() -> None:
            nonlocal got, peak_client, peak_server, peak_rss
            pause_at = 8 * MiB
            while data := await stream.read(256 * 1024):
                got += len(data)
                if got >= pause_at:
                    # The slow reader: stop for a while so the producer runs into the window.
                    pause_at += 8 * MiB
                    await asyncio.sleep(0.05)
                    peak_client = max(peak_client, client_side_buffered(stream))
                    peak_server = max(peak_server, server_side_buffered(lab))
                    peak_rss = max(peak_rss, rss.memory_info().rss)

        await asyncio.wait_for(download(), 75)
        assert got == total
        assert peak_client >= window // 2, "the reader was never slow enough to test backpressure"
        # Unread bytes never exceed the window we advertised; the sender holds at most its send
        # cap plus one read buffer and what TLS has not written yet (bounded by the window too).
        assert peak_client <= window
        assert peak_server <= SEND_BUFFER_CAP + MAX_BUFFER + window + TCP_HIGH_WATER
        assert peak_rss - rss_start < 64 * MiB, "memory grew with the amount transferred"
    finally:
        await lab.close()


@pytest.mark.timeout(90)
async def test_slow_upstream_long_upload_memory_bounded():
    total = 64 * MiB
    lab = await make_lab(slow_sink)
    rss = psutil.Process()
    try:
        stream = await lab.pool.connect(lab.key, lab.authority)
        block = bytes(1 * MiB)
        rss_start = rss.memory_info().rss
        peak_rss = rss_start
        peak_client = 0

        async def upload() -> bytes:
            nonlocal peak_rss, peak_client
            for _ in range(total // len(block)):
                stream.write(block)
                peak_client = max(peak_client, stream.send_buffered)
                await stream.drain()
                peak_rss = max(peak_rss, rss.memory_info().rss)
            stream.write_eof()
            return await stream.readexactly(len(f"{total}\n"))

        answer = await asyncio.wait_for(upload(), 75)
        assert int(answer) == total
        # drain() returns below the cap, so at most the cap plus one write is queued; the slow
        # sink made the writer wait (the queue was not always sent at once).
        assert SEND_BUFFER_CAP <= peak_client < SEND_BUFFER_CAP + len(block)
        assert peak_rss - rss_start < 64 * MiB, "memory grew with the amount transferred"
    finally:
        await lab.close()

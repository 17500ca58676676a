"""Write coalescing and the per-connection caches of the L4 fast path (bench.lab_bench measures them).

Writes of many tunnels in one loop iteration leave as one TLS write (one record, one syscall), in
order; a synchronous flush (close, reset) still sends everything queued first; the direct write
path queues only what the windows refuse; socket-address parsing is cached but still strict."""

from __future__ import annotations

import asyncio
import ipaddress
import re

import pytest

from tests.ztunnel.proxy.hbone_fixtures import echo_upstream, make_lab
from ztunnel.hbone import frames as fr
from ztunnel.proxy.inbound import ip_of
from ztunnel.proxy.socket_factory import parse_ip


def record_writes(proto) -> list[bytes]:
    writes: list[bytes] = []
    original = proto.transport.write

    def write(data) -> None:
        writes.append(bytes(data))
        original(data)

    proto.transport.write = write
    return writes


def frames_of(blob: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos + fr.HEADER_SIZE <= len(blob):
        hi, lo, ftype, _flags, _sid = fr.HEADER.unpack_from(blob, pos)
        length = hi << 8 | lo
        out.append((ftype, blob[pos + fr.HEADER_SIZE : pos + fr.HEADER_SIZE + length]))
        pos += fr.HEADER_SIZE + length
    return out


async def read_exactly(stream, n: int) -> bytes:
    return await asyncio.wait_for(stream.readexactly(n), 5)


async def test_writes_of_one_iteration_share_one_tls_write_and_keep_order():
    lab = await make_lab(echo_upstream)
    try:
        streams = [await lab.pool.connect(lab.key, lab.authority) for _ in range(8)]
        (proto,) = lab.pool.connections(lab.key)
        await asyncio.sleep(0.05)  # let set-up traffic (acks, settings) settle
        writes = record_writes(proto)
        for i, stream in enumerate(streams):
            stream.write(b"a%d" % i)
            stream.write(b"b%d" % i)
        assert writes == []  # nothing left synchronously: it waits for the end of the iteration
        answers = await asyncio.gather(*(read_exactly(s, 4) for s in streams))
        assert answers == [b"a%db%d" % (i, i) for i in range(8)]
        data_writes = [w for w in writes if any(t == fr.DATA for t, _p in frames_of(w))]
        assert len(data_writes) == 1  # 16 frames of 8 tunnels: one TLS write
        assert len([t for t, _p in frames_of(data_writes[0]) if t == fr.DATA]) == 16
    finally:
        await lab.close()


async def test_close_flushes_queued_data_before_the_goaway():
    lab = await make_lab(echo_upstream)
    try:
        stream = await lab.pool.connect(lab.key, lab.authority)
        (proto,) = lab.pool.connections(lab.key)
        writes = record_writes(proto)
        stream.write(b"last words")
        proto.close()  # synchronous: the deferred flush must not lose the DATA frame
        kinds = [(ftype, payload) for ftype, payload in frames_of(b"".join(writes))]
        data_at = next(i for i, (t, p) in enumerate(kinds) if t == fr.DATA and p == b"last words")
        goaway_at = next(i for i, (t, _p) in enumerate(kinds) if t == fr.GOAWAY)
        assert data_at < goaway_at
        await asyncio.wait_for(proto.closed, 5)
    finally:
        await lab.close()


async def test_direct_write_queues_only_what_the_window_refuses():
    lab = await make_lab(echo_upstream)
    try:
        stream = await lab.pool.connect(lab.key, lab.authority)
        conn = stream.proto.conn
        window = conn.send_window(stream.stream_id)
        payload = bytes(range(256)) * ((window + 4096) // 256 + 1)
        stream.write(payload)
        assert stream.send_buffered == len(payload) - window  # the remainder waits for acks
        got = await asyncio.wait_for(stream.readexactly(len(payload)), 20)
        assert got == payload
        assert stream.send_buffered == 0
    finally:
        await lab.close()


def test_write_after_reset_raises():
    async def run() -> None:
        lab = await make_lab(echo_upstream)
        try:
            stream = await lab.pool.connect(lab.key, lab.authority)
            stream.reset()
            with pytest.raises(Exception, match="reset"):
                stream.write(b"x")
        finally:
            await lab.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("10.1.2.3", 80), ipaddress.IPv4Address("10.1.2.3")),
        (("::ffff:10.1.2.3", 80, 0, 0), ipaddress.IPv4Address("10.1.2.3")),
        (("fd00::1", 80, 0, 0), ipaddress.IPv6Address("fd00::1")),
        (("not-an-ip", 80), None),
        (("10.1.2.300", 80), None),
        ((["unhashable"], 80), None),
        ("/tmp/unix.sock", None),
        ((), None),
    ],
    ids=["v4", "v4-mapped", "v6", "name", "bad-octet", "unhashable", "unix", "empty"],
)
def test_ip_of_is_cached_and_still_strict(address, expected):
    assert ip_of(address) == expected
    assert ip_of(address) == expected  # second time from the cache: same answer


def test_parse_ip_caches_and_never_caches_errors():
    assert parse_ip("10.9.9.9") is parse_ip("10.9.9.9")
    for _ in range(2):
        with pytest.raises(ValueError):
            parse_ip("10.9.9")


def test_traceparent_is_w3c_shaped_and_fresh():
    from ztunnel.proxy.outbound import _traceparent

    values = {_traceparent() for _ in range(50)}
    assert len(values) == 50
    for value in values:
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", value)

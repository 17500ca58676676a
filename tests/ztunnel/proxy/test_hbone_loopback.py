"""HBONE over real TLS on 127.0.0.1: pooled tunnels, identities, integrity, rotation."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl

import pytest

from tests.ztunnel.proxy.hbone_fixtures import (
    CLIENT2_ID,
    CLIENT_ID,
    SERVER_ID,
    TD,
    make_lab,
    roundtrip,
)
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import PeerIdentityError, client_context
from ztunnel.proxy.h2io import HboneStatusError
from ztunnel.proxy.pool import HbonePool


async def test_single_tunnel_roundtrip():
    lab = await make_lab()
    try:
        stream = await lab.pool.connect(
            lab.key, lab.authority, [("baggage", "k8s.namespace.name=ns-a")]
        )
        payload = os.urandom(3 * 1024 * 1024 + 17)
        answer = await asyncio.wait_for(roundtrip(stream, payload), 10)
        assert answer[:32] == hashlib.sha256(payload).digest()
        assert answer[32:] == payload[::-1]
        await asyncio.sleep(0.05)
        (stats,) = lab.stats
        assert stats.status == 200
        assert stats.bytes_from_client == len(payload)
        assert stats.bytes_to_client == len(payload) + 32
        assert stats.peer_identity == CLIENT_ID
        assert lab.requests[0].header("baggage") == "k8s.namespace.name=ns-a"
    finally:
        await lab.close()


async def test_thousand_concurrent_streams_pooled_sha256_both_ways():
    lab = await make_lab()
    try:

        async def one(i: int):
            key = lab.key_for(CLIENT_ID if i % 2 else CLIENT2_ID)
            stream = await lab.pool.connect(key, lab.authority)
            proto = stream.proto
            payload = os.urandom(1000 + (i * 37) % 5000)
            answer = await roundtrip(stream, payload)
            assert answer[:32] == hashlib.sha256(payload).digest(), i
            assert answer[32:] == payload[::-1], i
            return key.src_identity, proto

        max_streams: dict[int, int] = {}

        async def watch():
            while True:
                for k in (lab.key_for(CLIENT_ID), lab.key_for(CLIENT2_ID)):
                    for p in lab.pool.connections(k):
                        max_streams[id(p)] = max(max_streams.get(id(p), 0), len(p.streams))
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 45)
        watcher.cancel()
        identities_per_conn: dict[int, set[SpiffeId]] = {}
        for ident, proto in results:
            identities_per_conn.setdefault(id(proto), set()).add(ident)
        assert all(len(ids) == 1 for ids in identities_per_conn.values())
        assert max(max_streams.values()) <= 100
        assert len(identities_per_conn) >= 4  # > 100 concurrent streams per identity need more
        # server saw each connection's client identity consistently
        assert {r.peer_identity for r in lab.requests} == {CLIENT_ID, CLIENT2_ID}
        assert lab.dials == 1000
    finally:
        await lab.close()


async def test_wrong_server_identity_rejected_before_payload():
    lab = await make_lab()
    try:
        wrong = lab.key_for(CLIENT_ID, expected=(SpiffeId(TD, "ns-b", "someone-else"),))
        with pytest.raises(PeerIdentityError):
            await lab.pool.connect(wrong, lab.authority)
        await asyncio.sleep(0.05)
        assert lab.calls == 0
        assert lab.dials == 0
        assert lab.pool.statistics().connections == 0
    finally:
        await lab.close()


async def test_client_from_other_trust_domain_rejected():
    lab = await make_lab()
    other_ca = LocalCa.generate("other.domain")
    foreign = other_ca.issue(SpiffeId("other.domain", "ns-a", "sa"))
    # trust our roots too, so only the trust-domain check can reject it
    pool = HbonePool(client_context=lambda _ident: _ctx_trusting(foreign, lab.ca))
    try:
        with pytest.raises(Exception):  # noqa: B017 -- TLS alert or closed connection
            await asyncio.wait_for(_open_and_send(pool, lab), 5)
        assert lab.calls == 0
        assert lab.dials == 0
    finally:
        await pool.close()
        await lab.close()


async def _open_and_send(pool, lab):
    stream = await pool.connect(lab.key, lab.authority)
    return await roundtrip(stream, b"x")


def _ctx_trusting(cert, ca):
    ctx = client_context(cert)
    ctx.load_verify_locations(cadata=ca.roots_pem().decode())
    return ctx


async def test_client_without_certificate_rejected():
    lab = await make_lab()

    def bare(_ident):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=lab.ca.roots_pem().decode())
        ctx.set_alpn_protocols(["h2"])
        return ctx

    pool = HbonePool(client_context=bare)
    try:
        with pytest.raises(Exception):  # noqa: B017 -- TLS alert or closed connection
            await asyncio.wait_for(_open_and_send(pool, lab), 5)
        assert lab.calls == 0
        assert lab.dials == 0
    finally:
        await pool.close()
        await lab.close()


async def test_non_200_is_typed_error():
    lab = await make_lab()
    try:
        with pytest.raises(HboneStatusError) as info:
            await lab.pool.connect(lab.key, "127.0.0.1:1")
        assert info.value.status == 503
        # the connection survives a rejected stream
        stream = await lab.pool.connect(lab.key, lab.authority)
        assert (await roundtrip(stream, b"abc"))[32:] == b"cba"
        assert lab.pool.statistics().connections_opened == 1
    finally:
        await lab.close()


async def test_one_dial_under_concurrent_demand():
    lab = await make_lab()
    try:
        streams = await asyncio.gather(
            *(lab.pool.connect(lab.key, lab.authority) for _ in range(50))
        )
        assert lab.pool.statistics().connections_opened == 1
        await asyncio.gather(*(roundtrip(s, b"x") for s in streams))
    finally:
        await lab.close()


async def test_goaway_connection_not_reused_and_drain_finishes_streams():
    lab = await make_lab()
    try:
        stream = await lab.pool.connect(lab.key, lab.authority)
        first = stream.proto
        stream.write(b"before drain ")
        drain = asyncio.ensure_future(lab.server.drain(timeout=5))
        await asyncio.sleep(0.05)
        stream.write(b"after")
        stream.write_eof()
        data = b""
        while chunk := await stream.read():
            data += chunk
        assert data[32:] == b"before drain after"[::-1]
        await drain
    finally:
        await lab.close()
    assert first.closed.done()


async def test_certificate_rotation_with_open_streams():
    lab = await make_lab()
    try:
        streams = [await lab.pool.connect(lab.key, lab.authority) for _ in range(5)]
        for s in streams:
            s.write(b"part1-")
        # new certificate, same identity; then a root rotation with a fresh server cert
        lab.server_cert["cert"] = lab.ca.issue(SERVER_ID)
        lab.ca.rotate_root()
        lab.server_cert["cert"] = lab.ca.issue(SERVER_ID)
        # a new client (fresh cert chained to the new root, trusting both roots) connects fine
        new_cert = lab.ca.issue(CLIENT_ID)
        pool2 = HbonePool(client_context=lambda _i: client_context(new_cert))
        try:
            s2 = await pool2.connect(lab.key, lab.authority)
            assert (await roundtrip(s2, b"new"))[32:] == b"wen"
        finally:
            await pool2.close()
        for s in streams:
            s.write(b"part2")
            s.write_eof()
        for s in streams:
            data = b""
            while chunk := await s.read():
                data += chunk
            assert data[32:] == b"part1-part2"[::-1]
    finally:
        await lab.close()

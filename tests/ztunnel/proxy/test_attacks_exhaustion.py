"""Slowloris, stream exhaustion and connection caps over real TLS (reliability.md §7 test 12).

* A TLS handshake that never completes (silent, or a ClientHello trickled byte by byte) is closed at
  the handshake timeout; a TLS session that never sends a CONNECT at the first-CONNECT timeout (both
  injected as ~0.5 s through ``Limits``).
* More streams than MAX_CONCURRENT_STREAMS at once: the extra ones get REFUSED_STREAM, the connection
  lives on and the admitted tunnels complete.
* The global connection cap (handshakes in progress included) and the per-identity cap close
  connections beyond them at once and count them; another identity still connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import pytest
from hyperframe.frame import DataFrame

from tests.ztunnel.proxy.hbone_fixtures import CLIENT_ID
from tests.ztunnel.proxy.test_attacks_kit import (
    REFUSED_STREAM,
    Attacker,
    legit_roundtrip,
    make_attack_lab,
    wait_for,
)
from ztunnel.hbone.guard import Limits, ListenerLimits
from ztunnel.identity.tls import client_context

TIMEOUT = 0.5


def _client_hello(lab) -> bytes:
    """The first flight of a real TLS 1.3 client (ClientHello), from an in-memory SSLObject."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = client_context(lab.certs[CLIENT_ID]).wrap_bio(incoming, outgoing, server_hostname=None)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True
    return data == b""


async def _tcp(lab) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lab.port))
    return sock


@pytest.mark.parametrize("trickle", [False, True], ids=["silent", "trickled-client-hello"])
async def test_stalled_tls_handshake_closed_at_timeout(trickle: bool):
    lab = await make_attack_lab(limits=Limits(handshake_timeout=TIMEOUT))
    loop = asyncio.get_running_loop()
    sock = await _tcp(lab)
    try:
        started = loop.time()
        closed = False
        if trickle:
            hello = _client_hello(lab)
            for byte in hello[:40]:  # 1 byte every 50 ms: 2 s worth, far beyond the timeout
                try:
                    await loop.sock_sendall(sock, bytes([byte]))
                except OSError:
                    closed = True
                    break
                if await _closed_by_server(sock, 0.05):
                    closed = True
                    break
        else:
            closed = await _closed_by_server(sock, 3)
        elapsed = loop.time() - started
        assert closed, "stalled handshake not closed"
        assert TIMEOUT * 0.8 <= elapsed <= TIMEOUT + 1.0, elapsed
        await wait_for(lambda: lab.server.handshake_failures == 1, what="failure counted")
        assert lab.server.connections_open == 0
        assert lab.calls == 0
        await legit_roundtrip(lab)
    finally:
        sock.close()
        await lab.close()


@pytest.mark.parametrize("preface", [True, False], ids=["preface-no-connect", "no-preface"])
async def test_no_connect_after_tls_closed_at_first_connect_timeout(preface: bool):
    lab = await make_attack_lab(limits=Limits(first_connect_timeout=TIMEOUT))
    loop = asyncio.get_running_loop()
    try:
        att = await Attacker.connect(lab, preface=preface)
        started = loop.time()
        assert await att.wait_closed(3), "idle TLS session not closed"
        elapsed = loop.time() - started
        assert elapsed <= TIMEOUT + 1.0, elapsed
        if preface:
            assert att.goaway is not None
            assert b"first-CONNECT" in att.goaway.additional_data
        await wait_for(lambda: lab.server.connections_open == 0, what="slot released")
        assert lab.calls == 0
        await legit_roundtrip(lab)  # a connection that does CONNECT in time is fine
    finally:
        await lab.close()


async def test_streams_beyond_max_concurrent_refused_connection_survives():
    limit = 200  # the edge profile's (and ztunnel's) MAX_CONCURRENT_STREAMS
    extra = 50
    lab = await make_attack_lab()
    try:
        att = await Attacker.connect(lab)
        sids = [att.open_stream(lab.echo_authority) for _ in range(limit + extra)]
        await att.drain()

        def answered(a):
            return len(a.statuses().keys() | a.resets().keys()) >= len(sids)

        assert await att.until(answered, 10)
        ok = sorted(sid for sid, st in att.statuses().items() if st == "200")
        refused = sorted(sid for sid, code in att.resets().items() if code == REFUSED_STREAM)
        assert len(ok) == limit
        assert len(refused) == extra
        assert set(ok) | set(refused) == set(sids)
        assert lab.calls == limit  # refused streams never reach on_connect or dial
        # The admitted tunnels all complete on the same connection.
        for sid in ok:
            att.send(DataFrame(sid, data=b"ping-%d" % sid, flags=["END_STREAM"]))
        await att.drain()

        def ended(a):
            return {f.stream_id for f in a.frames if "END_STREAM" in f.flags} >= set(ok)

        assert await att.until(ended, 10)
        echoed: dict[int, bytes] = {}
        for f in att.frames:
            if isinstance(f, DataFrame):
                echoed[f.stream_id] = echoed.get(f.stream_id, b"") + f.data
        assert all(echoed[sid] == b"ping-%d" % sid for sid in ok)
        assert att.goaway is None
        assert not att.eof
        # Slots are free again: new streams are admitted on the surviving connection.
        await wait_for(lambda: len(lab.stats) == limit, 5, "tunnels to finish")
        more = [att.open_stream(lab.echo_authority) for _ in range(5)]
        await att.drain()
        assert await att.until(lambda a: set(more) <= a.statuses().keys(), 5)
        assert {att.statuses()[sid] for sid in more} == {"200"}
    finally:
        await lab.close()


async def test_global_connection_cap_counts_handshakes_and_closes_at_once():
    lab = await make_attack_lab(listener_limits=ListenerLimits(max_connections=3))
    held: list[socket.socket] = []
    try:
        held.append(await _tcp(lab))  # a handshake in progress holds a slot (slowloris)
        attackers = [await Attacker.connect(lab) for _ in range(2)]
        await wait_for(lambda: lab.server.connections_open == 3, what="three slots taken")
        extra = await _tcp(lab)
        held.append(extra)
        assert await _closed_by_server(extra, 2), "connection beyond the global cap not closed"
        assert lab.server.connections_rejected_global == 1
        assert lab.server.counters()["connections_rejected_global"] == 1
        with pytest.raises((ConnectionError, OSError, ssl.SSLError, TimeoutError)):
            await Attacker.connect(lab)  # a TLS client sees the close during its handshake
        assert lab.server.connections_rejected_global == 2
        # Free a slot: a legitimate client gets in.
        attackers[0].close()
        await wait_for(lambda: lab.server.connections_open == 2, what="slot released")
        await legit_roundtrip(lab)
        assert lab.server.connections_open == 3
    finally:
        for s in held:
            s.close()
        await lab.close()


async def test_per_identity_cap_closes_before_any_frame():
    lab = await make_attack_lab(listener_limits=ListenerLimits(max_connections_per_identity=2))
    try:
        first = [await Attacker.connect(lab) for _ in range(2)]
        await wait_for(lambda: lab.server.caps.connections_of(CLIENT_ID) == 2, what="2 admitted")
        over = await Attacker.connect(lab)  # TLS 1.3: the client finishes before the server checks
        over.open_stream(lab.echo_authority)
        await over.drain()
        assert await over.wait_closed(3), "connection beyond the identity cap not closed"
        assert over.frames == []  # not even the server's SETTINGS
        assert lab.server.connections_rejected_identity == 1
        assert lab.calls == 0
        await legit_roundtrip(lab)  # another identity is not affected
        # Closing one of the identity's connections frees its slot.
        first[0].close()
        await wait_for(lambda: lab.server.caps.connections_of(CLIENT_ID) == 1, what="released")
        again = await Attacker.connect(lab)
        sid = again.open_stream(lab.echo_authority)
        await again.drain()
        assert await again.until(lambda a: sid in a.statuses(), 5)
        assert again.statuses()[sid] == "200"
    finally:
        await lab.close()

"""Hostile clients over real TLS: malformed CONNECT corpus (no upstream dial), Rapid Reset flood."""

from __future__ import annotations

import asyncio
import ipaddress

import h2.config
import h2.connection
import h2.events

from tests.ztunnel.proxy.hbone_fixtures import CLIENT_ID, make_lab, roundtrip
from ztunnel.identity.tls import client_context

_BAD_AUTHORITIES = [
    "",
    "10.0.0.1",
    "10.0.0.1:",
    "10.0.0.1:0",
    "10.0.0.1:65536",
    "10.0.0.1:99999",
    "10.0.0.1:+80",
    "10.0.0.1:-1",
    "10.0.0.1:08",
    "10.0.0.1:8a",
    "10.0.0.1: 80",
    " 10.0.0.1:80",
    "10.0.0.1:80 ",
    "user@10.0.0.1:80",
    "user:pw@10.0.0.1:80",
    "[::1]",
    "[::1:80",
    "::1:80",
    "[::1]80",
    "[fe80::1%eth0]:80",
    "10.0.0.1%00:80",
    "10.0.0.1:80/x",
    "10.0.0.1:80?q",
    "10.0.0.1:80#f",
    "[10.0.0.1]:80",
    "[]:80",
    "10.0.0.256:80",
    "010.0.0.1:80",
    "1.2.3:80",
    "-bad.example:80",
    "bad-.example:80",
    "a..b:80",
    "a" * 64 + ".example:80",
    ("a." * 130) + "b:80",
    "10.0.0.1:80:80",
    "[::1]:80:80",
    "ünicode:80",
    "ho st:80",
    "tab\t:80",
    "10.0.0.1:٨٠",
]
_BAD_AUTHORITIES += [
    f"10.0.0.1:{p}" for p in ("00080", "1e3", "0x50", "80.0", "\u06f8\u06f0", "\u0660")
]
_BAD_AUTHORITIES += [f"10.0.0.1:80{c}" for c in ("\x00", "\r", "\n", "\x7f", "%20", "\x01")]
_BAD_AUTHORITIES += ["[::1]]:80", "[[::1]:80", "[::g]:80", "1.2.3.4.5:80", "localhost", ":80"]
_BAD_AUTHORITIES += [f"[::1]:{p}" for p in ("0", "65536", "+1", "", "01", "a")]
_BAD_AUTHORITIES += [f"host{c}name:80" for c in "!$&'()*,;=_~`^{}|\\\"<>"]


def corpus() -> list[list[tuple[str, str]]]:
    good_auth = "127.0.0.1:9"
    cases: list[list[tuple[str, str]]] = []
    for method in ("GET", "POST", "connect", "CONNECTX", "PUT", "OPTIONS", "HEAD", "DELETE"):
        cases.append(
            [(":method", method), (":authority", good_auth), (":scheme", "https"), (":path", "/")]
        )
    cases.append([(":method", "CONNECT"), (":authority", good_auth), (":path", "/")])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), (":scheme", "https")])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), (":protocol", "websocket")])
    cases.append([(":method", "CONNECT")])
    cases.append([(":authority", good_auth)])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), (":authority", good_auth)])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), ("connection", "close")])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), ("Upper", "x")])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), ("x", "a" * 9000)])
    cases.append([(":method", "CONNECT"), (":authority", good_auth), ("x", " padded")])
    cases.append([(":method", "CONNECT"), ("x", "1"), (":authority", good_auth)])
    for auth in _BAD_AUTHORITIES:
        cases.append([(":method", "CONNECT"), (":authority", auth)])
    return cases


async def _raw_client(lab):
    """A raw h2 client over real mTLS (validation off, so it can send anything)."""
    ctx = client_context(lab.certs[CLIENT_ID])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", lab.server.address[1], ssl=ctx, server_hostname="127.0.0.1"
    )
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    conn.initiate_connection()
    writer.write(conn.data_to_send())
    return reader, writer, conn


async def test_malformed_corpus_gets_400_or_reset_and_never_dials():
    cases = corpus()
    assert len(cases) >= 100
    lab = await make_lab()
    try:
        reader, writer, conn = await _raw_client(lab)
        outcome: dict[int, str] = {}
        sids = []
        for headers in cases:
            sid = conn.get_next_available_stream_id()
            raw = [(k.encode(), v.encode("utf-8")) for k, v in headers]
            conn.send_headers(sid, raw, end_stream=False)
            sids.append(sid)
        writer.write(conn.data_to_send())
        await writer.drain()
        while len(outcome) < len(sids):
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, f"connection closed; outcomes so far {len(outcome)}"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    outcome.setdefault(ev.stream_id, dict(ev.headers)[b":status"].decode())
                elif isinstance(ev, h2.events.StreamReset):
                    outcome.setdefault(ev.stream_id, "reset")
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    raise AssertionError(f"GOAWAY {ev}")
            writer.write(conn.data_to_send())
        assert set(outcome.values()) <= {"400", "reset"}, outcome
        assert lab.calls == 0
        assert lab.dials == 0
        writer.close()
        # the connection-level limit: an oversized header block costs the connection (GOAWAY)
    finally:
        await lab.close()


async def test_rapid_reset_flood_goaway_while_legit_stream_completes():
    lab = await make_lab()
    lab.decide_delay = 0.01
    try:
        legit = await lab.pool.connect(lab.key, lab.authority)
        legit.write(b"legit-")
        reader, writer, conn = await _raw_client(lab)
        got_goaway = None
        for i in range(10_000):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(
                sid, [(b":method", b"CONNECT"), (b":authority", lab.authority.encode())]
            )
            conn.reset_stream(sid)
            if i % 200 == 199:
                writer.write(conn.data_to_send())
                await writer.drain()
        writer.write(conn.data_to_send())
        await writer.drain()
        while got_goaway is None:
            data = await asyncio.wait_for(reader.read(65536), 10)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ConnectionTerminated):
                    got_goaway = ev
        assert got_goaway is not None
        assert got_goaway.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        writer.close()
        legit.write(b"done")
        legit.write_eof()
        data = b""
        while chunk := await legit.read():
            data += chunk
        assert data[32:] == b"legit-done"[::-1]
        assert lab.dials <= 1 + 1000 + 50  # dials only for decided, still-open streams
    finally:
        await lab.close()


async def test_pool_reconnects_after_server_goaway():
    lab = await make_lab()
    try:
        s1 = await lab.pool.connect(lab.key, lab.authority)
        assert (await roundtrip(s1, b"a"))[32:] == b"a"
        for proto in list(lab.server._protocols):
            proto.conn.drain()
            proto.flush()
        await asyncio.sleep(0.05)
        s2 = await lab.pool.connect(lab.key, lab.authority)
        assert s2.proto is not s1.proto
        assert lab.pool.statistics().connections_opened == 2
    finally:
        await lab.close()


_ = ipaddress

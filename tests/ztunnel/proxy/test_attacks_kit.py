"""Shared kit of the HBONE attack battery (reliability.md §7 tests 7-14); holds no tests.

* :class:`AttackLab`: a real-TLS :class:`HboneServer` on loopback with two upstreams -- ``echo`` (for
  the legitimate client) and ``sentinel`` (an upstream that notices at once when the proxy closes its
  socket) -- counting ``on_connect`` calls and upstream dials, plus a pool for a legitimate client.
* :class:`Attacker`: a raw HTTP/2 client over mTLS that writes hand-made hyperframe frames (HPACK with
  its own encoder) and parses what the server answers, frame by frame.
* :func:`rss` / :func:`legit_roundtrip`: the measurements every attack test makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import hpack
import psutil
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.ztunnel.proxy.hbone_fixtures import CLIENT2_ID, CLIENT_ID, LOOPBACK, SERVER_ID, TD
from ztunnel.identity.ca import LocalCa, WorkloadCertificate
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.hbone_server import Accept, HboneServer, Reject, TunnelRequest, TunnelStats
from ztunnel.proxy.pool import HbonePool, PoolKey

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7
_PROC = psutil.Process(os.getpid())


def rss() -> int:
    """Resident set size of this process (server and attacker both live in it)."""
    gc.collect()
    return int(_PROC.memory_info().rss)


class Sentinel:
    """Upstream that counts live connections and notices a closed socket within ~50 ms.

    It writes a byte every ``tick`` seconds (a write to a socket the proxy closed fails) and
    discards what it reads; a half-close from the proxy is not mistaken for a close."""

    def __init__(self, tick: float = 0.05, lifetime: float = 15.0) -> None:
        self.tick = tick
        self.lifetime = lifetime
        self.opened = 0
        self.closed = 0

    @property
    def live(self) -> int:
        return self.opened - self.closed

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        try:
            for _ in range(int(self.lifetime / self.tick)):  # bounded: never outlives a test
                writer.write(b".")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(65536), self.tick):
                        await asyncio.sleep(self.tick)  # EOF: keep probing for the close
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed += 1
            writer.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


@dataclass
class AttackLab:
    ca: LocalCa
    server: HboneServer
    pool: HbonePool
    certs: dict[SpiffeId, WorkloadCertificate]
    sentinel: Sentinel
    upstreams: list[asyncio.Server]
    echo_port: int = 0
    sentinel_port: int = 0
    calls: int = 0
    dials: int = 0
    decide_delay: float = 0.0
    requests: list[TunnelRequest] = field(default_factory=list)
    stats: list[TunnelStats] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.server.address[1]

    @property
    def echo_authority(self) -> str:
        return f"127.0.0.1:{self.echo_port}"

    @property
    def sentinel_authority(self) -> str:
        return f"127.0.0.1:{self.sentinel_port}"

    def key(self, src: SpiffeId = CLIENT_ID) -> PoolKey:
        return PoolKey(
            src_identity=src,
            dst_identities=frozenset({SERVER_ID}),
            src_ip=LOOPBACK,
            dst_ip=LOOPBACK,
            dst_port=self.port,
        )

    async def on_connect(self, request: TunnelRequest) -> Accept | Reject:
        self.calls += 1
        self.requests.append(request)
        if self.decide_delay:
            await asyncio.sleep(self.decide_delay)
        port = request.authority.port
        if port not in (self.echo_port, self.sentinel_port):
            return Reject(status=503, reason="no such upstream")
        sock = socket.socket()
        sock.setblocking(False)
        self.dials += 1
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            return Reject(status=503, reason="upstream refused")
        except BaseException:
            sock.close()
            raise
        return Accept(sock=sock)

    async def close(self) -> None:
        await self.pool.close()
        await self.server.close()
        for up in self.upstreams:
            up.close()
        for up in self.upstreams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(up.wait_closed(), 2)


async def make_attack_lab(**server_kwargs) -> AttackLab:
    ca = LocalCa.generate(TD)
    sentinel = Sentinel()
    echo_srv = await asyncio.start_server(echo, "127.0.0.1", 0)
    sent_srv = await asyncio.start_server(sentinel.handler, "127.0.0.1", 0)
    certs = {CLIENT_ID: ca.issue(CLIENT_ID), CLIENT2_ID: ca.issue(CLIENT2_ID)}
    server_cert = ca.issue(SERVER_ID)
    box: list[AttackLab] = []

    async def on_connect(request: TunnelRequest) -> Accept | Reject:
        return await box[0].on_connect(request)

    server = HboneServer(
        ssl_context=lambda: server_context(server_cert),
        trust_domain=TD,
        on_connect=on_connect,
        on_tunnel_closed=lambda s: box[0].stats.append(s),
        **server_kwargs,
    )
    await server.start(host="127.0.0.1", port=0)
    pool = HbonePool(client_context=lambda ident: client_context(certs[ident]))
    lab = AttackLab(
        ca=ca,
        server=server,
        pool=pool,
        certs=certs,
        sentinel=sentinel,
        upstreams=[echo_srv, sent_srv],
        echo_port=echo_srv.sockets[0].getsockname()[1],
        sentinel_port=sent_srv.sockets[0].getsockname()[1],
    )
    box.append(lab)
    return lab


async def legit_roundtrip(lab: AttackLab, payload: bytes = b"legit", timeout: float = 5.0) -> None:
    """A well-behaved client's tunnel through the pool must work (echoed byte for byte)."""

    async def run() -> None:
        stream = await lab.pool.connect(lab.key(CLIENT2_ID), lab.echo_authority)
        stream.write(payload)
        stream.write_eof()
        got = b""
        while chunk := await stream.read():
            got += chunk
        assert got == payload

    await asyncio.wait_for(run(), timeout)


async def wait_for(predicate, timeout: float = 3.0, what: str = "condition") -> None:
    """Poll ``predicate`` (cheap, in-process state) every 10 ms until true or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Attacker:
    """A raw HTTP/2 peer over mTLS: sends whatever frames it is given, parses the answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._buf = bytearray()
        self.frames: list[Frame] = []
        self.header_blocks: list[tuple[int, list[tuple[str, str]]]] = []
        self.goaway: GoAwayFrame | None = None
        self.eof = False
        self.next_sid = 1

    @classmethod
    async def connect(
        cls,
        lab: AttackLab,
        cert: WorkloadCertificate | None = None,
        *,
        rcvbuf: int | None = None,
        preface: bool = True,
    ) -> Attacker:
        ctx = client_context(cert or lab.certs[CLIENT_ID])
        sock = socket.socket()
        if rcvbuf is not None:  # before connect, so the window scale stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", lab.port))
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(sock=sock, ssl=ctx, server_hostname=""), 5
        )
        att = cls(reader, writer)
        if preface:
            att.send_raw(PREFACE + SettingsFrame(0).serialize())
        return att

    # ------------------------------------------------------------------ sending
    def send_raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send(self, *frames: Frame) -> None:
        self.send_raw(b"".join(f.serialize() for f in frames))

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            await asyncio.wait_for(self.writer.drain(), 5)

    def block(self, headers: Sequence[tuple[str, str]]) -> bytes:
        return self.encoder.encode([(k.encode(), v.encode()) for k, v in headers])

    def connect_headers(
        self, authority: str, extra: Iterable[tuple[str, str]] = ()
    ) -> list[tuple[str, str]]:
        return [(":method", "CONNECT"), (":authority", authority), *extra]

    def open_stream(
        self,
        authority: str,
        extra: Iterable[tuple[str, str]] = (),
        *,
        headers: Sequence[tuple[str, str]] | None = None,
    ) -> int:
        sid = self.next_sid
        self.next_sid += 2
        block = self.block(
            headers if headers is not None else self.connect_headers(authority, extra)
        )
        self.send(HeadersFrame(sid, data=block, flags=["END_HEADERS"]))
        return sid

    # ------------------------------------------------------------------ receiving
    async def read_some(self, timeout: float) -> bool:
        """Read once and parse; False at EOF (or on a reset), or if nothing came in time."""
        if self.eof:
            return False
        try:
            data = await asyncio.wait_for(self.reader.read(1 << 20), timeout)
        except TimeoutError:
            return False
        except (ConnectionError, OSError, ssl.SSLError):
            data = b""
        if not data:
            self.eof = True
            return False
        self._buf += data
        self._parse()
        return True

    def _parse(self) -> None:
        while len(self._buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                return
            frame.parse_body(memoryview(bytes(self._buf[9 : 9 + length])))
            del self._buf[: 9 + length]
            if isinstance(frame, HeadersFrame):  # the server never sends CONTINUATIONs
                with contextlib.suppress(Exception):
                    decoded = [(str(k), str(v)) for k, v in self.decoder.decode(frame.data)]
                    self.header_blocks.append((frame.stream_id, decoded))
            if isinstance(frame, GoAwayFrame) and self.goaway is None:
                self.goaway = frame
            self.frames.append(frame)

    async def until(self, predicate, timeout: float = 5.0) -> bool:
        """Read until ``predicate(self)`` holds, EOF, or ``timeout``; returns predicate's value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            left = deadline - loop.time()
            if left <= 0 or self.eof:
                return bool(predicate(self))
            await self.read_some(left)
        return True

    async def wait_goaway(self, timeout: float = 5.0) -> GoAwayFrame | None:
        await self.until(lambda a: a.goaway is not None, timeout)
        return self.goaway

    async def wait_closed(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (EOF or reset)."""
        await self.until(lambda a: a.eof, timeout)
        return self.eof

    def statuses(self) -> dict[int, str]:
        """The ``:status`` the server answered on each stream."""
        out: dict[int, str] = {}
        for sid, decoded in self.header_blocks:
            status = dict(decoded).get(":status")
            if status is not None:
                out.setdefault(sid, status)
        return out

    def resets(self) -> dict[int, int]:
        return {f.stream_id: f.error_code for f in self.frames if isinstance(f, RstStreamFrame)}

    def data_streams(self) -> set[int]:
        return {f.stream_id for f in self.frames if isinstance(f, DataFrame)}

    def close(self) -> None:
        self.writer.transport.abort()

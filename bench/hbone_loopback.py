"""Loopback benchmark: plain TCP relay vs plain TLS relay vs HBONE, in one run, with ratios to TLS.

Topology per path (server side in a child process, client side in this one, so each uses a core):
    client --(TCP | TLS | HBONE over mTLS)--> relay --TCP--> upstream (sink or echo, child process)
Measures single-stream throughput (bytes pushed through, acknowledged by the upstream's count) and
the rate of 1 KiB request/response exchanges from many concurrent persistent streams (HBONE: one
client pool, streams multiplexed on pooled connections). Compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing as mp
import socket
import ssl
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ztunnel.hbone.authority import Authority
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.copy import splice_sockets
from ztunnel.proxy.hbone_server import Accept, HboneServer, Reject, TunnelRequest
from ztunnel.proxy.pool import HbonePool, PoolKey

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "bench", "server")
CLIENT_ID = SpiffeId(TD, "bench", "client")
CHUNK = 1024 * 1024
MSG = 1024


def _install_loop(name: str) -> None:
    if name == "uvloop":
        import uvloop

        uvloop.install()  # type: ignore[attr-defined,unused-ignore]


# ------------------------------------------------------------------ server process
async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # 8-byte length, then that many bytes; answers the count (TLS streams cannot half-close).
    want = struct.unpack(">Q", await reader.readexactly(8))[0]
    total = 0
    while total < want and (data := await reader.read(1 << 20)):
        total += len(data)
    writer.write(struct.pack(">Q", total))
    await writer.drain()
    writer.close()


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # type: ignore[attr-defined]


async def _connect_upstream(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def _serve(conn: mp.connection.Connection, pems: dict[str, bytes]) -> None:
    loop = asyncio.get_running_loop()
    sink = await asyncio.start_server(_sink, "127.0.0.1", 0)
    echo = await loop.create_server(_Echo, "127.0.0.1", 0)
    ports = {"s": sink.sockets[0].getsockname()[1], "e": echo.sockets[0].getsockname()[1]}
    target: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()  # keep references: the loop holds weak ones

    async def relay(client: socket.socket) -> None:
        which = (await loop.sock_recv(client, 1)).decode()
        upstream = await _connect_upstream(ports[which])
        await splice_sockets(client, upstream)

    async def tcp_accept(listen: socket.socket, wrap: ssl.SSLContext | None) -> None:
        while True:
            client, _ = await loop.sock_accept(listen)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(_relay_any(client, wrap))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _relay_any(client: socket.socket, wrap: ssl.SSLContext | None) -> None:
        if wrap is None:
            await relay(client)
            return
        # TLS relay: terminate TLS with a protocol that forwards to the upstream transport.
        try:
            await _tls_relay(client, wrap, lambda which: _connect_upstream(ports[which]))
        except (ConnectionError, ssl.SSLError):
            client.close()  # the client went away during set-up: nothing to relay

    tcp_listen = _listener()
    tls_listen = _listener()
    ca_cert = pems["server"]
    server_cert = _load_cert(ca_cert)
    tls_ctx = server_context(server_cert)
    tasks.add(loop.create_task(tcp_accept(tcp_listen, None)))
    tasks.add(loop.create_task(tcp_accept(tls_listen, tls_ctx)))

    async def on_connect(req: TunnelRequest) -> Accept | Reject:
        port = req.authority.port
        return Accept(sock=await _connect_upstream(port))

    hbone = HboneServer(ssl_context=lambda: tls_ctx, trust_domain=TD, on_connect=on_connect)
    await hbone.start(host="127.0.0.1", port=0)
    target.update(
        tcp=tcp_listen.getsockname()[1],
        tls=tls_listen.getsockname()[1],
        hbone=hbone.address[1],
        **ports,
    )
    conn.send(target)
    await loop.run_in_executor(None, conn.recv)


def _listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    s.setblocking(False)
    return s


class _Fwd(asyncio.Protocol):
    """Forwards everything it receives to the ``attach``-ed peer transport; mirrors pause/resume
    and EOF. Until attached it buffers and stops reading, so nothing sent before the relay has
    dialled its upstream is lost (the bug behind the 512 MiB stall: bytes that arrived during the
    dial were appended to an already-emptied buffer and never forwarded)."""

    def __init__(self, *, tls: bool = False) -> None:
        self.peer: asyncio.Transport | None = None
        self.t: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.tls = tls
        self.first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
            return
        self.early.append(data)
        if self.t is not None:
            self.t.pause_reading()  # backpressure while there is nowhere to forward to
        if not self.first.done():
            self.first.set_result(None)

    def attach(self, peer: asyncio.Transport) -> None:
        """Start forwarding to ``peer``: buffered bytes first, in order, then resume reading."""
        for data in self.early:
            if data:
                peer.write(data)
        self.early.clear()
        self.peer = peer
        if self.t is not None and not self.t.is_closing():
            self.t.resume_reading()

    def eof_received(self) -> bool:
        if self.peer is not None and self.peer.can_write_eof():
            self.peer.write_eof()
        return not self.tls  # returning True means nothing for TLS transports (and warns)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()
        if not self.first.done():
            self.first.set_exception(ConnectionError("client closed before the first byte"))
            self.first.exception()


Dial = Callable[[str], Awaitable[socket.socket]]


async def _tls_relay(client: socket.socket, ctx: ssl.SSLContext, dial: Dial) -> None:
    """Baseline: terminate TLS, read the 1-byte upstream selector, dial it, forward both ways."""
    loop = asyncio.get_running_loop()
    down = _Fwd(tls=True)
    await loop.connect_accepted_socket(lambda: down, client, ssl=ctx)
    await down.first
    which = down.early[0][:1].decode()
    down.early[0] = down.early[0][1:]
    up = _Fwd()
    await loop.connect_accepted_socket(lambda: up, await dial(which))
    assert up.t is not None
    assert down.t is not None
    up.attach(down.t)
    down.attach(up.t)


def _load_cert(blob: bytes):  # pickled WorkloadCertificate
    import pickle

    return pickle.loads(blob)


def _server_main(conn: mp.connection.Connection, pems: dict[str, bytes], loop_name: str) -> None:
    _install_loop(loop_name)
    asyncio.run(_serve(conn, pems))


# ------------------------------------------------------------------ client side
async def _throughput_plain(port: int, total: int, ctx: ssl.SSLContext | None) -> float:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
    )
    chunk = bytes(CHUNK)
    start = time.perf_counter()
    writer.write(b"s" + struct.pack(">Q", total))
    for _ in range(total // CHUNK):
        writer.write(chunk)
        await writer.drain()
    got = struct.unpack(">Q", await reader.readexactly(8))[0]
    elapsed = time.perf_counter() - start
    assert got == total, (got, total)
    writer.close()
    return elapsed


async def _throughput_hbone(pool: HbonePool, key: PoolKey, sink: int, total: int) -> float:
    stream = await pool.connect(key, f"127.0.0.1:{sink}")
    chunk = bytes(CHUNK)
    start = time.perf_counter()
    stream.write(struct.pack(">Q", total))
    for _ in range(total // CHUNK):
        stream.write(chunk)
        await stream.drain()
    got = struct.unpack(">Q", await stream.readexactly(8))[0]
    elapsed = time.perf_counter() - start
    assert got == total, (got, total)
    return elapsed


async def _rate(open_one, workers: int, seconds: float) -> float:
    msg = b"q" * MSG
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        read, write = await open_one()
        while time.perf_counter() < stop:
            write(msg)
            got = 0
            while got < MSG:
                got += len(await read(MSG - got))
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return count / (time.perf_counter() - start)


async def _phase(what: str, coro: Coroutine[Any, Any, float], timeout: float) -> float:
    """Run one measurement with a deadline; progress goes to stderr so a stall names its phase."""
    started = time.perf_counter()
    print(f"  {what} ...", end="", file=sys.stderr, flush=True)
    try:
        value = await asyncio.wait_for(coro, timeout)
    except TimeoutError:
        print(" STALLED", file=sys.stderr, flush=True)
        raise SystemExit(
            f"benchmark phase '{what}' made no progress within {timeout:.0f} s"
        ) from None
    print(f" {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return value


async def _client(
    ports: dict[str, int], cert, server_ctx_cert, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    ctx = client_context(cert)
    results: dict[str, dict[str, float]] = {}
    pool = HbonePool(client_context=lambda _i: ctx)
    key = PoolKey(
        src_identity=CLIENT_ID,
        dst_identities=frozenset({SERVER_ID}),
        src_ip=None,
        dst_ip=ipaddress.IPv4Address("127.0.0.1"),
        dst_port=ports["hbone"],
    )
    total = args.mib * 1024 * 1024

    async def plain_open(port: int, tls: bool):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=ctx if tls else None,
            server_hostname="127.0.0.1" if tls else None,
        )
        writer.write(b"e")
        return reader.read, writer.write

    async def hbone_open():
        stream = await pool.connect(
            key, str(Authority(host=ipaddress.IPv4Address("127.0.0.1"), port=ports["e"]))
        )
        return stream.read, stream.write

    for name in ("tcp", "tls", "hbone"):
        if name == "hbone":
            coro = _throughput_hbone(pool, key, ports["s"], total)
        else:
            coro = _throughput_plain(ports[name], total, ctx if name == "tls" else None)
        secs = await _phase(f"{name} throughput", coro, args.phase_timeout)
        gbps = total * 8 / secs / 1e9
        if name == "hbone":
            coro = _rate(hbone_open, args.workers, args.seconds)
        else:
            coro = _rate(
                lambda n=name: plain_open(ports[n], n == "tls"), args.workers, args.seconds
            )
        rate = await _phase(f"{name} request rate", coro, args.phase_timeout + args.seconds)
        results[name] = {"gbps": gbps, "rps": rate}
    await pool.close()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench hbone_loopback")
    parser.add_argument("--mib", type=int, default=512, help="single-stream payload (MiB)")
    parser.add_argument("--workers", type=int, default=64, help="concurrent request streams")
    parser.add_argument("--seconds", type=float, default=3.0, help="request-rate duration")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument(
        "--phase-timeout", type=float, default=60.0, help="seconds before a phase counts as stalled"
    )
    args = parser.parse_args(argv)
    import pickle

    ca = LocalCa.generate(TD)
    server_cert = ca.issue(SERVER_ID)
    client_cert = ca.issue(CLIENT_ID)
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(
        target=_server_main,
        args=(child, {"server": pickle.dumps(server_cert)}, args.loop),
        daemon=True,
    )
    proc.start()
    try:
        if not parent.poll(30):
            raise SystemExit("benchmark server did not start")
        ports = parent.recv()
        _install_loop(args.loop)
        results = asyncio.run(_client(ports, client_cert, server_cert, args))
    finally:
        parent.send("stop")
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    tls = results["tls"]
    print(
        f"loop={args.loop} payload={args.mib} MiB workers={args.workers} duration={args.seconds}s"
    )
    print(f"{'path':<8}{'Gbit/s':>10}{'x TLS':>8}{'req/s':>12}{'x TLS':>8}")
    for name, r in results.items():
        print(
            f"{name:<8}{r['gbps']:>10.2f}{r['gbps'] / tls['gbps']:>8.2f}"
            f"{r['rps']:>12.0f}{r['rps'] / tls['rps']:>8.2f}"
        )
    return 0

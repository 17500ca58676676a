"""Tiny unmodified "applications" the lab runs inside pods: they know nothing about the mesh.

``python -m e2e.lab.apps http --port 8080 [--fail-first N]``: an HTTP/1.1 server that answers every
request with ``hello from <pod>; you are <peer ip>:<port>; request <n>`` (so a test sees the source
address the server saw and how many requests this server got) and echoes a POST body's length; with
``--fail-first N`` its first N requests get ``503`` (the flaky upstream of the retry test).
``python -m e2e.lab.apps echo --port 9000``: a TCP echo server (bench, restart test).
``python -m e2e.lab.apps grpc --port 9090``: a grpcio server of ``echo.Echo`` with ``Unary`` (bytes in,
``<pod>:<bytes>`` out) and ``Chat`` (bidirectional stream, one reply per message) -- generic
handlers, so no generated code is needed. The servers print ``ready`` on stdout once listening, so
callers await that instead of sleeping, and exit on SIGTERM.

``python -m e2e.lab.apps grpc-client --target HOST:PORT [--calls N] [--messages M]``: a plain grpcio
client (run inside a pod): N unary calls, then one Chat with M messages sent and read interleaved;
prints JSON ``{"unary": [pod...], "chat": [reply...], "errors": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

GRPC_SERVICE = "echo.Echo"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-app/1"
    # Headers and body are two writes: without TCP_NODELAY the body waits for a delayed ACK (40 ms).
    disable_nagle_algorithm = True
    name = os.environ.get("POD_NAME", "pod")
    fail_first = 0
    _count = 0
    _lock = threading.Lock()

    def _answer(self, extra: str = "") -> None:
        host, port = self.client_address[:2]
        with self._lock:
            type(self)._count += 1
            n = self._count
        if n <= self.fail_first:
            body = f"{self.name}: failing request {n} on purpose\n".encode()
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        body = f"hello from {self.name}; you are {host}:{port}; request {n}{extra}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Peer", f"{host}:{port}")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        got = self.rfile.read(n) if n else b""
        self._answer(f"; got {len(got)} bytes")

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"{self.client_address[0]} {format % args}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def serve_http(port: int, fail_first: int = 0) -> None:
    _Handler.fail_first = fail_first
    server = _Server(("0.0.0.0", port), _Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        server.serve_forever(poll_interval=0.2)
    server.server_close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve_echo(port: int) -> None:
    server = await asyncio.start_server(_echo, "0.0.0.0", port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


def serve_grpc(port: int) -> None:
    import grpc

    name = os.environ.get("POD_NAME", "pod").encode()

    def unary(request: bytes, _context: Any) -> bytes:
        return name + b":" + request

    def chat(requests: Iterator[bytes], _context: Any) -> Iterator[bytes]:
        for message in requests:
            yield name + b":" + message

    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                GRPC_SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Chat": grpc.stream_stream_rpc_method_handler(chat),
                },
            ),
        )
    )
    server.add_insecure_port(f"0.0.0.0:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop(grace=1).wait(timeout=2)


def grpc_client(target: str, calls: int, messages: int, timeout: float) -> dict[str, Any]:
    import grpc

    out: dict[str, Any] = {"unary": [], "chat": [], "errors": []}
    with grpc.insecure_channel(target) as channel:
        unary = channel.unary_unary(f"/{GRPC_SERVICE}/Unary")
        for i in range(calls):
            try:
                reply: bytes = unary(f"hi{i}".encode(), timeout=timeout)
            except grpc.RpcError as err:
                out["errors"].append(f"Unary: {err.code().name}: {err.details()}")
                continue
            pod, _, text = reply.partition(b":")
            if text != f"hi{i}".encode():
                out["errors"].append(f"Unary: reply {reply!r} to hi{i}")
            out["unary"].append(pod.decode())
        # Bidirectional: each reply is read before the next message is sent (true streaming).
        outbox: queue.Queue[bytes | None] = queue.Queue()

        def requests() -> Iterator[bytes]:
            while (item := outbox.get(timeout=timeout)) is not None:
                yield item

        chat = channel.stream_stream(f"/{GRPC_SERVICE}/Chat")
        try:
            replies = chat(requests(), timeout=timeout)
            for i in range(messages):
                outbox.put(f"m{i}".encode())
                out["chat"].append(next(replies).decode())
            outbox.put(None)
            rest = list(replies)
            if rest:
                out["errors"].append(f"Chat: unexpected extra replies {rest!r}")
        except grpc.RpcError as err:
            out["errors"].append(f"Chat: {err.code().name}: {err.details()}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.lab.apps")
    parser.add_argument("kind", choices=["http", "echo", "grpc", "grpc-client"])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--fail-first", type=int, default=0, help="http: 503 for the first N")
    parser.add_argument("--target", help="grpc-client: HOST:PORT")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--messages", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(None)
    if args.kind == "http":
        serve_http(args.port, args.fail_first)
    elif args.kind == "grpc":
        serve_grpc(args.port)
    elif args.kind == "grpc-client":
        if not args.target:
            parser.error("grpc-client needs --target HOST:PORT")
        result = grpc_client(args.target, args.calls, args.messages, args.timeout)
        print(json.dumps(result))
        return 1 if result["errors"] else 0
    else:
        asyncio.run(_serve_echo(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

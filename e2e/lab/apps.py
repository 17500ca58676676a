"""Tiny unmodified "applications" the lab runs inside pods: they know nothing about the mesh.

``python -m e2e.lab.apps http --port 8080``: an HTTP/1.1 server that answers every request with
``hello from <pod>; you are <peer ip>:<port>`` (so a test sees the source address the server saw) and
echoes a POST body's length; ``python -m e2e.lab.apps echo --port 9000``: a TCP echo server (bench,
restart test). Both print ``ready`` on stdout once listening, so callers await that instead of
sleeping, and exit on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lab-app/1"
    name = os.environ.get("POD_NAME", "pod")

    def _answer(self, extra: str = "") -> None:
        host, port = self.client_address[:2]
        body = f"hello from {self.name}; you are {host}:{port}{extra}\n".encode()
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


def serve_http(port: int) -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.lab.apps")
    parser.add_argument("kind", choices=["http", "echo"])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(None)
    if args.kind == "http":
        serve_http(args.port)
    else:
        asyncio.run(_serve_echo(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small request/response load generator and connection holder, run inside a lab pod.

``python -m bench.lab_load rr --host H --port P --conns 16 --seconds 3 --size 64``: each connection
sends ``size`` bytes and waits for them to come back (an echo server), as fast as it can; prints JSON
``{"requests", "seconds", "rps", "p50_us", "p99_us", "errors"}``.

``python -m bench.lab_load connect --host H --port P --conns 16 --seconds 3 --size 64``: like ``rr`` but
every request is a new TCP connection (connect, one exchange, close): the per-connection cost.

``python -m bench.lab_load http --host H --port P --conns 8 --seconds 3 --path /``: each connection is
an HTTP/1.1 keep-alive connection sending ``GET path`` and reading the whole response, as fast as it
can (a small ``wrk``); same JSON, where a response other than 200 counts as an error.

``python -m bench.lab_load hold --host H --port P --conns 200``: opens that many connections, does one
round trip on each, prints ``held <n>`` and keeps them open until stdin closes (RSS per connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence


async def _rr_worker(
    host: str, port: int, size: int, end: float, lat: list[float], errors: list[str]
) -> None:
    payload = b"x" * size
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        errors.append(repr(exc))
        return
    try:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            writer.write(payload)
            await reader.readexactly(size)
            lat.append(time.perf_counter() - t0)
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


async def _connect_worker(
    host: str, port: int, size: int, end: float, lat: list[float], errors: list[str]
) -> None:
    payload = b"x" * size
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            errors.append(repr(exc))
            await asyncio.sleep(0.01)  # e.g. ephemeral ports exhausted: do not spin
            continue
        try:
            writer.write(payload)
            await reader.readexactly(size)
            lat.append(time.perf_counter() - t0)
        except (OSError, asyncio.IncompleteReadError) as exc:
            errors.append(repr(exc))
        finally:
            writer.close()


async def _http_worker(
    host: str, port: int, path: str, end: float, lat: list[float], errors: list[str]
) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lab-load\r\n\r\n".encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        errors.append(repr(exc))
        return
    try:
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = _parse_head(head)
            if length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors.append(f"HTTP {status}")
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        errors.append(repr(exc))
    finally:
        writer.close()


def _parse_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head; the servers measured always send a length."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value.strip())
    raise ValueError(f"response without Content-Length: {lines[0]!r}")


async def rr(host: str, port: int, conns: int, seconds: float, size: int) -> dict[str, float]:
    return await _measure(
        lambda end, lat, errors: _rr_worker(host, port, size, end, lat, errors), conns, seconds
    )


async def connect(host: str, port: int, conns: int, seconds: float, size: int) -> dict[str, float]:
    return await _measure(
        lambda end, lat, errors: _connect_worker(host, port, size, end, lat, errors), conns, seconds
    )


async def http(host: str, port: int, conns: int, seconds: float, path: str) -> dict[str, float]:
    return await _measure(
        lambda end, lat, errors: _http_worker(host, port, path, end, lat, errors), conns, seconds
    )


Worker = Callable[[float, list[float], list[str]], Awaitable[None]]


async def _measure(worker: Worker, conns: int, seconds: float) -> dict[str, float]:
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(*(worker(end, lat, errors) for _ in range(conns)))
    took = time.perf_counter() - start
    lat.sort()

    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6 if lat else 0.0

    return {
        "requests": len(lat),
        "seconds": took,
        "rps": len(lat) / took,
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "errors": len(errors),
    }


async def hold(host: str, port: int, conns: int) -> None:
    held = []
    for _ in range(conns):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"hi")
        await reader.readexactly(2)
        held.append(writer)
    print(f"held {len(held)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab_load")
    parser.add_argument("mode", choices=["rr", "connect", "http", "hold"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--path", default="/")
    args = parser.parse_args(argv)
    if args.mode == "rr":
        print(
            json.dumps(asyncio.run(rr(args.host, args.port, args.conns, args.seconds, args.size)))
        )
    elif args.mode == "connect":
        print(
            json.dumps(
                asyncio.run(connect(args.host, args.port, args.conns, args.seconds, args.size))
            )
        )
    elif args.mode == "http":
        print(
            json.dumps(asyncio.run(http(args.host, args.port, args.conns, args.seconds, args.path)))
        )
    else:
        asyncio.run(hold(args.host, args.port, args.conns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

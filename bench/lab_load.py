"""A small request/response load generator and connection holder, run inside a lab pod.

``python -m bench.lab_load rr --host H --port P --conns 16 --seconds 3 --size 64``: each connection
sends ``size`` bytes and waits for them to come back (an echo server), as fast as it can; prints JSON
``{"requests", "seconds", "rps", "p50_us", "p99_us", "errors"}``.

``python -m bench.lab_load hold --host H --port P --conns 200``: opens that many connections, does one
round trip on each, prints ``held <n>`` and keeps them open until stdin closes (RSS per connection).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence


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


async def rr(host: str, port: int, conns: int, seconds: float, size: int) -> dict[str, float]:
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    end = start + seconds
    await asyncio.gather(*(_rr_worker(host, port, size, end, lat, errors) for _ in range(conns)))
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
    parser.add_argument("mode", choices=["rr", "hold"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.mode == "rr":
        print(
            json.dumps(asyncio.run(rr(args.host, args.port, args.conns, args.seconds, args.size)))
        )
    else:
        asyncio.run(hold(args.host, args.port, args.conns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

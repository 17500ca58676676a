"""`python -m e2e.fakekube`: run the fake API server in the foreground (for the lab and manual poking).

Owns only argument parsing and the run-until-interrupted loop; prints the URL and writes a kubeconfig.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

from e2e.fakekube.server import FakeApiServer


async def _serve(host: str, port: int, kubeconfig: Path | None, bookmark_interval: float) -> None:
    async with FakeApiServer(host=host, port=port, bookmark_interval=bookmark_interval) as server:
        print(f"fake Kubernetes API server listening on {server.url}", flush=True)
        if kubeconfig is not None:
            print(f"kubeconfig written to {server.write_kubeconfig(kubeconfig)}", flush=True)
        await asyncio.Event().wait()  # until interrupted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m e2e.fakekube", description=__doc__)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (loopback by default)"
    )
    parser.add_argument("--port", type=int, default=0, help="port (0 picks a free one)")
    parser.add_argument("--kubeconfig", type=Path, help="write a kubeconfig for the server here")
    parser.add_argument(
        "--bookmark-interval", type=float, default=1.0, help="seconds between watch bookmarks"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.kubeconfig, args.bookmark_interval))


if __name__ == "__main__":
    main()

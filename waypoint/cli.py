"""The `waypoint` command: `waypoint manager` (the cluster controller) and `waypoint proxy` (the L7 proxy).

Owns argument parsing and process wiring only. `manager` connects with `--kubeconfig PATH` (or the
in-cluster service account when omitted) and runs `WaypointManager` until SIGTERM/SIGINT. `proxy`
hands its arguments to `waypoint.proxy.cli:main`, imported lazily so the manager image does not need
the proxy's dependencies (and the other way round).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from waypoint.manager.binding import BindingTable
from waypoint.manager.render import RenderConfig


def _manager_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = RenderConfig()
    p = sub.add_parser(
        "manager", help="run the waypoint manager (Gateway API waypoints -> Deployments)"
    )
    p.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG") or None,
        help="kubeconfig file; default: in-cluster",
    )
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--proxy-image", default=defaults.image, help="image of the waypoint proxy pods")
    p.add_argument("--image-pull-policy", default=defaults.image_pull_policy)
    p.add_argument("--cluster-domain", default=defaults.cluster_domain)
    p.add_argument("--trust-domain", default=defaults.trust_domain)
    p.add_argument(
        "--no-watch-pods", action="store_true", help="skip workload bindings (no Pod watch)"
    )
    p.add_argument(
        "--binding-table", type=Path, default=None, help="write the binding table as JSON here"
    )
    p.add_argument("--log-level", default="INFO")


async def _run_manager(args: argparse.Namespace) -> int:
    from waypoint.manager.client import connect
    from waypoint.manager.controller import WaypointManager

    api = await connect(args.kubeconfig, context=args.context)
    path: Path | None = args.binding_table

    def publish(table: BindingTable) -> None:
        if path is not None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(table.to_data(), indent=2, sort_keys=True))
            tmp.replace(path)  # atomic for readers

    manager = WaypointManager(
        api,
        RenderConfig(
            image=args.proxy_image,
            image_pull_policy=args.image_pull_policy,
            cluster_domain=args.cluster_domain,
            trust_domain=args.trust_domain,
        ),
        watch_pods=not args.no_watch_pods,
        on_bindings=publish,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await manager.start()
        logging.getLogger("waypoint.manager").info("waypoint manager running")
        await stop.wait()
    finally:
        await manager.stop()
        await api.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["proxy"]:
        # Lazy: the proxy is a separate program with its own flags.
        proxy_main = importlib.import_module("waypoint.proxy.cli").main
        return int(proxy_main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(
        prog="waypoint", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _manager_parser(sub)
    sub.add_parser("proxy", help="run the waypoint L7 proxy (flags: waypoint proxy --help)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run_manager(args))


if __name__ == "__main__":
    sys.exit(main())

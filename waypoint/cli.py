"""The `waypoint` command: `waypoint manager` (controller + control plane) and `waypoint proxy` (L7 proxy).

Owns argument parsing and process wiring only. `manager` connects with `--kubeconfig PATH` (or the
in-cluster service account when omitted) and runs, in one process over one `WatchCache`:

* the control plane (`waypoint.controlplane`): delta xDS and the Istio CA on `--xds-address`,
  always, on every replica;
* the `WaypointManager`, only while this replica holds the Lease (`--leader-elect`, default on):
  waypoint objects (pods dialling `--proxy-xds-address`/`--proxy-ca-address`, announcing
  `--proxy-cluster-id`) and the CA's roots in ConfigMap `istio-ca-root-cert` of every namespace;
* the monitoring endpoint (`waypoint.manager.health`) on `--monitoring-address`.

It stops on SIGTERM/SIGINT (releasing the Lease). `run_manager(args, stop, status)` is the async
entry point tests drive in-process. `proxy` hands its arguments to `waypoint.proxy.cli:main`,
imported lazily so the manager image does not need the proxy's dependencies (and the other way
round).
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from waypoint.manager.binding import BindingTable
from waypoint.manager.render import RenderConfig

if TYPE_CHECKING:
    from waypoint.controlplane.cli import RunStatus
    from waypoint.manager.controller import WatchCache, WaypointManager
    from waypoint.manager.health import HealthServer, MetricsSnapshot


def _manager_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
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
    # What the rendered waypoint pods dial (their XDS_ADDRESS, CA_ADDRESS, CLUSTER_ID).
    p.add_argument(
        "--proxy-xds-address",
        default=defaults.xds_address,
        help="control-plane URL the waypoint pods use for xDS (their XDS_ADDRESS)",
    )
    p.add_argument(
        "--proxy-ca-address",
        default=defaults.ca_address,
        help="Istio CA URL of the waypoint pods (CA_ADDRESS); default: --proxy-xds-address",
    )
    p.add_argument(
        "--proxy-cluster-id",
        default=defaults.cluster_id,
        help="cluster id the waypoint pods announce (CLUSTER_ID)",
    )
    p.add_argument(
        "--no-watch-pods", action="store_true", help="skip workload bindings (no Pod watch)"
    )
    p.add_argument(
        "--binding-table", type=Path, default=None, help="write the binding table as JSON here"
    )
    p.add_argument(
        "--monitoring-address",
        default=f"0.0.0.0:{DEFAULT_MONITORING_PORT}",
        help="HOST:PORT of /healthz, /readyz and /metrics ('' disables)",
    )
    p.add_argument("--log-level", default="INFO")
    # Lazy: the control-plane modules pull in grpc and the generated protos.
    from waypoint.controlplane.cli import add_arguments

    add_arguments(p)
    return p


DEFAULT_MONITORING_PORT = 15014


@dataclass(slots=True)
class ManagerStatus:
    """What one `waypoint manager` runs; filled in by `run_manager` (health, metrics, tests)."""

    control: RunStatus
    cache: WatchCache | None = None
    manager: WaypointManager | None = None
    health: HealthServer | None = None

    def not_ready(self) -> str | None:
        """None when ready (caches listed, first xDS snapshot out), else why not."""
        if self.cache is None or not self.cache.synced:
            return "watch caches not synced"
        plane = self.control.plane
        if plane is not None and not (plane.ready and self.control.serving.is_set()):
            return "control plane not serving yet"
        return None

    def snapshot(self) -> MetricsSnapshot:
        from waypoint.manager.health import MetricsSnapshot

        plane, ca, manager = self.control.plane, self.control.ca, self.manager
        return MetricsSnapshot(
            leader=self.control.is_leader,
            reconciles=manager.reconciles if manager else 0,
            reconcile_errors=manager.reconcile_errors if manager else 0,
            xds_clients=len(plane.xds.clients) if plane else 0,
            xds_acks=plane.xds.acks if plane else 0,
            xds_nacks=len(plane.xds.nacks) if plane else 0,
            certificates_signed=ca.issued if ca else 0,
            certificates_refused=ca.refused if ca else 0,
            informer_relists={
                inf.rt.plural
                + (f"?{inf.label_selector}" if inf.label_selector else ""): inf.relists
                for inf in (self.cache.informers if self.cache else [])
            },
        )


def render_config(args: argparse.Namespace) -> RenderConfig:
    """The cluster-wide render settings from `waypoint manager` flags."""
    return RenderConfig(
        image=args.proxy_image,
        image_pull_policy=args.image_pull_policy,
        cluster_domain=args.cluster_domain,
        trust_domain=args.trust_domain,
        xds_address=args.proxy_xds_address,
        ca_address=args.proxy_ca_address,
        cluster_id=args.proxy_cluster_id,
    )


def _check_proxy_url(flag: str, value: str, *, optional: bool) -> str | None:
    """Why `value` is not a control-plane URL the proxy can dial (http(s)://HOST:PORT), or None."""
    if optional and not value:
        return None
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError as err:
        return f"{flag} {value!r}: {err}"
    if url.scheme not in ("http", "https") or not url.hostname or port is None:
        return f"{flag} {value!r}: expected http(s)://HOST:PORT"
    return None


async def run_manager(
    args: argparse.Namespace, stop: asyncio.Event, status: ManagerStatus | None = None
) -> int:
    """Run the whole manager process until `stop` is set (the async entry point)."""
    from waypoint.controlplane.cli import RunStatus, api_client, run
    from waypoint.manager.client import connect
    from waypoint.manager.controller import WatchCache, WaypointManager
    from waypoint.manager.health import HealthServer

    status = status if status is not None else ManagerStatus(control=RunStatus())
    api = await connect(args.kubeconfig, context=args.context)
    raw = await api_client(args.kubeconfig, args.context)
    cache = WatchCache(api)
    status.cache = cache
    path: Path | None = args.binding_table

    def publish(table: BindingTable) -> None:
        if path is not None:
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps(table.to_data(), indent=2, sort_keys=True))
            tmp.replace(path)  # atomic for readers

    manager = WaypointManager(
        api,
        render_config(args),
        watch_pods=not args.no_watch_pods,
        on_bindings=publish,
        cache=cache,  # one watch per kind, shared with the control plane
        # The leader publishes the CA's roots (ConfigMap istio-ca-root-cert) in every namespace.
        roots=lambda: status.control.roots() if status.control.roots is not None else None,
    )
    status.manager = manager
    health: HealthServer | None = None
    try:
        if args.monitoring_address:
            # Up before the caches sync: liveness answers at once, readiness says why not yet.
            health = HealthServer(ready=status.not_ready, snapshot=status.snapshot)
            port = await health.start(args.monitoring_address)
            status.health = health
            logging.getLogger("waypoint.manager").info("monitoring on port %d", port)
        cache.start()
        logging.getLogger("waypoint.manager").info("waypoint manager running")
        await run(
            args,
            api,
            raw,
            stop,
            start_controller=manager.start,
            stop_controller=manager.stop,
            cache=cache,
            status=status.control,
        )
    finally:
        await manager.stop()
        await cache.stop()
        if health is not None:
            await health.stop()
        await raw.close()
        await api.close()
    return 0


async def _run_manager(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return await run_manager(args, stop)


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `waypoint` parser and its `manager` subparser (for flag errors)."""
    parser = argparse.ArgumentParser(
        prog="waypoint", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    manager_parser = _manager_parser(sub)
    sub.add_parser("proxy", help="run the waypoint L7 proxy (flags: waypoint proxy --help)")
    return parser, manager_parser


def parse_manager_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse and check `waypoint manager ...` arguments (argv without the program name)."""
    from waypoint.controlplane.cli import check_arguments
    from waypoint.manager.health import parse_listen_address

    parser, manager_parser = build_parser()
    args = parser.parse_args(list(argv))
    check_arguments(manager_parser, args)
    for flag, value, optional in (
        ("--proxy-xds-address", args.proxy_xds_address, False),
        ("--proxy-ca-address", args.proxy_ca_address, True),
    ):
        problem = _check_proxy_url(flag, value, optional=optional)
        if problem is not None:
            manager_parser.error(problem)
    if not args.proxy_cluster_id:
        manager_parser.error("--proxy-cluster-id: empty")
    if args.monitoring_address:
        try:
            parse_listen_address(args.monitoring_address, flag="--monitoring-address")
        except ValueError as err:
            manager_parser.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["proxy"]:
        # Lazy: the proxy is a separate program with its own flags.
        proxy_main = importlib.import_module("waypoint.proxy.cli").main
        return int(proxy_main(argv[1:]) or 0)
    args = parse_manager_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run_manager(args))


if __name__ == "__main__":
    sys.exit(main())

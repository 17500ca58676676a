"""`waypoint proxy` flags: parse them, set up logging, run `WaypointApp` until SIGTERM.

Usage: ``waypoint proxy --config FILE --identity spiffe://td/ns/NS/sa/SA --ca-dir DIR
[--name GATEWAY] [--namespace NS] [--kubeconfig PATH | --kube] [--listen ADDR] [ports...]``.
The Gateway name defaults to the identity's service account and the namespace to the identity's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ztunnel.config import INBOUND_HBONE_PORT, METRICS_PORT, READINESS_PORT
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint proxy", description="the waypoint L7 proxy")
    p.add_argument(
        "--config", type=Path, required=True, help="local config file (shared with ztunnel)"
    )
    p.add_argument("--identity", required=True, help="this waypoint's SPIFFE ID")
    p.add_argument("--ca-dir", type=Path, required=True, help="local CA directory (LocalCa.save)")
    p.add_argument("--name", default=None, help="the waypoint Gateway's name")
    p.add_argument("--namespace", default=None, help="the waypoint Gateway's namespace")
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None)
    p.add_argument(
        "--kube", action="store_true", help="also watch HTTPRoute/GRPCRoute/AuthorizationPolicy"
    )
    p.add_argument("--listen", default="0.0.0.0")
    p.add_argument("--hbone-port", type=int, default=INBOUND_HBONE_PORT)
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    p.add_argument("--readiness-port", type=int, default=READINESS_PORT)
    p.add_argument(
        "--upstream-hbone-port",
        type=int,
        default=INBOUND_HBONE_PORT,
        help="HBONE port of destination pods",
    )
    p.add_argument("--drain-deadline", type=float, default=5.0)
    p.add_argument("--reload-interval", type=float, default=1.0)
    p.add_argument("--cluster-domain", default="cluster.local")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        identity = SpiffeId.parse(args.identity)
    except SpiffeIdError as err:
        print(f"waypoint proxy: --identity: {err}", file=sys.stderr)
        return 2
    from waypoint.proxy.app import AppOptions, WaypointApp

    options = AppOptions(
        config=args.config,
        identity=identity,
        ca_dir=args.ca_dir,
        gateway_name=args.name or identity.service_account,
        gateway_namespace=args.namespace or identity.namespace,
        listen=args.listen,
        hbone_port=args.hbone_port,
        metrics_port=args.metrics_port,
        readiness_port=args.readiness_port,
        kubeconfig=args.kubeconfig,
        kube=args.kube or args.kubeconfig is not None,
        drain_deadline=args.drain_deadline,
        reload_interval=args.reload_interval,
        cluster_domain=args.cluster_domain,
        upstream_hbone_port=args.upstream_hbone_port,
    )
    try:
        return asyncio.run(WaypointApp(options).run())
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        logging.getLogger("waypoint.proxy").error("waypoint proxy failed: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())

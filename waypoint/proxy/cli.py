"""`waypoint proxy` flags: parse them, set up logging, run `WaypointApp` until SIGTERM.

Two modes:

* local (lab, tests): ``waypoint proxy --config FILE --identity spiffe://td/ns/NS/sa/SA --ca-dir DIR
  [--name GATEWAY] [--namespace NS] [--kubeconfig PATH | --kube] [--listen ADDR] [ports...]``;
  the Gateway name defaults to the identity's service account and the namespace to the identity's;
* cluster (a pod of the manager's Deployment): chosen when ``XDS_ADDRESS`` (or ``--xds-address``)
  is set; everything comes from the environment the rendered Deployment sets (see
  ``waypoint.proxy.xdsview``), flags override: ``--xds-address``, ``--ca-address``,
  ``--token-path``, ``--kubeconfig``, ``--name``, ``--namespace``. The identity is the pod's own
  (``TRUST_DOMAIN``, ``POD_NAMESPACE``, ``SERVICE_ACCOUNT``); ``--config``/``--ca-dir`` are refused.

Also read from the environment (the rendered Deployment): ``CLUSTER_DOMAIN`` and
``WAYPOINT_DRAIN_SECONDS`` (defaults of ``--cluster-domain`` and ``--drain-deadline``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ztunnel.config import INBOUND_HBONE_PORT, METRICS_PORT, READINESS_PORT
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

if TYPE_CHECKING:
    from waypoint.proxy.app import AppOptions


def _float_env(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    try:
        return float(value) if value else default
    except ValueError:
        return default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint proxy", description="the waypoint L7 proxy")
    local = p.add_argument_group("local mode")
    local.add_argument("--config", type=Path, default=None, help="local config file (with ztunnel)")
    local.add_argument("--identity", default=None, help="this waypoint's SPIFFE ID")
    local.add_argument("--ca-dir", type=Path, default=None, help="local CA directory")
    cluster = p.add_argument_group("cluster mode (default from XDS_ADDRESS etc.)")
    cluster.add_argument("--xds-address", default=None, help="control plane, e.g. https://h:15012")
    cluster.add_argument("--ca-address", default=None, help="Istio CA (default: --xds-address)")
    cluster.add_argument("--token-path", default=None, help="projected token (audience istio-ca)")
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
    p.add_argument(
        "--drain-deadline", type=float, default=_float_env("WAYPOINT_DRAIN_SECONDS", 5.0)
    )
    p.add_argument("--reload-interval", type=float, default=1.0)
    p.add_argument("--cluster-domain", default=os.environ.get("CLUSTER_DOMAIN") or "cluster.local")
    p.add_argument("--log-level", default="INFO")
    return p


def build_options(args: argparse.Namespace, env: Mapping[str, str]) -> AppOptions:
    """AppOptions from parsed flags and the environment; ValueError names the flag/variable."""
    from waypoint.proxy.app import AppOptions
    from waypoint.proxy.xdsview import ClusterSettings

    common = {
        "listen": args.listen,
        "hbone_port": args.hbone_port,
        "metrics_port": args.metrics_port,
        "readiness_port": args.readiness_port,
        "kubeconfig": args.kubeconfig,
        "drain_deadline": args.drain_deadline,
        "reload_interval": args.reload_interval,
        "cluster_domain": args.cluster_domain,
        "upstream_hbone_port": args.upstream_hbone_port,
    }
    if args.xds_address or (env.get("XDS_ADDRESS") or "").strip():
        for flag, value in (("--config", args.config), ("--ca-dir", args.ca_dir)):
            if value is not None:
                raise ValueError(f"{flag}: not used in cluster mode (XDS_ADDRESS is set)")
        settings = ClusterSettings.from_env(
            env,
            {
                "XDS_ADDRESS": args.xds_address,
                "CA_ADDRESS": args.ca_address,
                "ISTIO_TOKEN_PATH": args.token_path,
                "WAYPOINT_NAME": args.name,
                "KUBECONFIG": args.kubeconfig,
            },
        )
        if args.identity is not None and args.identity != str(settings.identity):
            raise ValueError(
                f"--identity {args.identity}: cluster mode uses the pod's own identity "
                f"{settings.identity}"
            )
        return AppOptions(
            identity=settings.identity,
            gateway_name=settings.gateway_name,
            gateway_namespace=args.namespace or settings.identity.namespace,
            cluster=settings,
            kube=True,
            **common,
        )
    missing = [
        flag
        for flag, value in (
            ("--config", args.config),
            ("--identity", args.identity),
            ("--ca-dir", args.ca_dir),
        )
        if value is None
    ]
    if missing:
        raise ValueError(
            f"local mode needs {', '.join(missing)} (or set XDS_ADDRESS for cluster mode)"
        )
    try:
        identity = SpiffeId.parse(args.identity)
    except SpiffeIdError as err:
        raise ValueError(f"--identity: {err}") from None
    return AppOptions(
        config=args.config,
        identity=identity,
        ca_dir=args.ca_dir,
        gateway_name=args.name or identity.service_account,
        gateway_namespace=args.namespace or identity.namespace,
        kube=args.kube or args.kubeconfig is not None,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from waypoint.proxy.app import WaypointApp

    try:
        options = build_options(args, os.environ)
    except ValueError as err:
        print(f"waypoint proxy: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(WaypointApp(options).run())
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        logging.getLogger("waypoint.proxy").error("waypoint proxy failed: %s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``ztunnel`` command: ``run`` the proxy, or inspect a running one with ``config ...``.

``ztunnel run --config FILE [--node NAME] [--ca-dir DIR | --ca-address HOST:PORT] [--admin-port N]
[--metrics-port N] [--readiness-port N] [--placement inpod|loopback] [--log-format text|json]
[--drain-deadline SECONDS] [--no-socks5] [--log-level LEVEL] [--rules-backend auto|nft|iptables]
[--pod-retry-interval SECONDS] [--recheck-interval SECONDS]`` runs until SIGTERM/SIGINT or
``/quitquitquit`` and drains gracefully. With ``--placement inpod`` it programs each local pod's
capture rules and listens inside the pod's network namespace (root needed); every
``--recheck-interval`` seconds (default 30, 0 = off) it re-verifies them and repairs drift.

Kubernetes mode: ``ztunnel run --placement inpod`` without ``--config`` and with ``XDS_ADDRESS`` set
(or ``--xds-address``) takes its workloads over xDS, its certificates from ``CA_ADDRESS`` and the
pods of ``NODE_NAME`` from the API server (``ztunnel.kube.mode``; flags override the environment).

``ztunnel config workloads|services|policies|certificates|connections [--admin URL] [--json]``
reads ``/config_dump`` from the admin endpoint and prints a table (or the raw JSON section), in the
manner of ``istioctl ztunnel-config``. ``render_table`` is pure (tests call it directly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ztunnel import config as zc
from ztunnel.accesslog import LogFormat
from ztunnel.drain import DEFAULT_DEADLINE
from ztunnel.hbone.guard import DEFAULT_LISTENER_LIMITS, ListenerLimits

# = ztunnel.node.agent.DEFAULT_RECHECK_INTERVAL, not imported here: `ztunnel config` stays light.
DEFAULT_RECHECK_INTERVAL = 30.0

SECTIONS = ("workloads", "services", "policies", "certificates", "connections")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "scope": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: LogFormat, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The access log is already one formatted line; JSON lines are passed through unchanged.
    if fmt is LogFormat.JSON:
        access = logging.StreamHandler(sys.stderr)
        access.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("access")
        logger.handlers[:] = [access]
        logger.propagate = False


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------


def _addr(value: Any) -> str:
    return ",".join(str(a) for a in value) if isinstance(value, list) else str(value or "")


def _gateway(value: Any) -> str:
    if not isinstance(value, dict):
        return "None"
    dest = value.get("destination") or {}
    if "hostname" in dest:
        return str(dest["hostname"]).split(".")[0]
    return str(dest.get("address", "None"))


def _vips(value: Any) -> str:
    if not isinstance(value, list):
        return ""
    return ",".join(str(v.get("address", "")) for v in value if isinstance(v, dict))


def _workload_rows(dump: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    rows = [
        [
            w.get("namespace", ""),
            w.get("name", ""),
            _addr(w.get("addresses")),
            w.get("node", "") or "",
            _gateway(w.get("waypoint")),
            "HBONE" if w.get("tunnel_protocol") == "HBONE" else "TCP",
        ]
        for w in dump.get("workloads", [])
    ]
    return head, sorted(rows)


def _service_rows(dump: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"]
    members: dict[str, int] = {}
    for w in dump.get("workloads", []):
        for key in w.get("services", {}) or {}:
            members[key] = members.get(key, 0) + 1
    rows = []
    for s in dump.get("services", []):
        key = f"{s.get('namespace', '')}/{s.get('hostname', '')}"
        rows.append(
            [
                s.get("namespace", ""),
                s.get("name", ""),
                _vips(s.get("vips")),
                _gateway(s.get("waypoint")),
                str(members.get(key, 0)),
            ]
        )
    return head, sorted(rows)


def _policy_rows(dump: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]
    rows = [
        [p.get("namespace", ""), p.get("name", ""), p.get("action", ""), p.get("scope", "")]
        for p in dump.get("policies", [])
    ]
    return head, sorted(rows)


def _certificate_rows(dump: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["CERTIFICATE NAME", "STATE", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]
    rows = [
        [
            c.get("identity", ""),
            c.get("state", ""),
            c.get("serial") or "",
            c.get("not_after") or "",
            c.get("not_before") or "",
        ]
        for c in dump.get("certificates", [])
    ]
    return head, rows


def _connection_rows(dump: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["DIRECTION", "SOURCE", "DESTINATION", "HBONE TARGET", "SOURCE IDENTITY", "WORKLOAD"]
    rows = [
        [
            c.get("direction", ""),
            c.get("src", ""),
            c.get("dst", ""),
            c.get("hbone_target") or "-",
            c.get("src_identity") or "-",
            c.get("workload", ""),
        ]
        for c in dump.get("connections", [])
    ]
    return head, rows


_ROWS: dict[str, Callable[[dict[str, Any]], tuple[list[str], list[list[str]]]]] = {
    "workloads": _workload_rows,
    "services": _service_rows,
    "policies": _policy_rows,
    "certificates": _certificate_rows,
    "connections": _connection_rows,
}


def render_table(section: str, dump: dict[str, Any]) -> str:
    """A fixed-width table of one config_dump section (istioctl style: columns 3 spaces apart)."""
    head, rows = _ROWS[section](dump)
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "   ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [head, *rows]
    ]
    return "\n".join(lines) + "\n"


def fetch_dump(admin: str, timeout: float = 5.0) -> dict[str, Any]:
    url = admin.rstrip("/") + "/config_dump"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data = json.loads(resp.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not return a JSON object")
    return data


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------


def _recheck_interval(value: str) -> float:
    """``--recheck-interval``: seconds, >= 0 (0 = off)."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not seconds >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0 (0 turns rechecks off)")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ztunnel", description="ambient-mode node proxy")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument(
        "--config",
        type=Path,
        help="local config file (YAML); without it and with XDS_ADDRESS set: Kubernetes mode",
    )
    run.add_argument(
        "--node", help="this node's name (default: the file's `node`, or NODE_NAME in Kubernetes)"
    )
    ca = run.add_mutually_exclusive_group()
    ca.add_argument("--ca-dir", type=Path, help="local CA directory (LocalCa layout)")
    ca.add_argument(
        "--ca-address", help="Istio CA address (host:port; Kubernetes: overrides CA_ADDRESS)"
    )
    run.add_argument(
        "--xds-address", help="Kubernetes mode: control plane URL (overrides XDS_ADDRESS)"
    )
    run.add_argument(
        "--kubeconfig", help="Kubernetes mode: kubeconfig (default: KUBECONFIG, else in-cluster)"
    )
    run.add_argument("--admin-port", type=int, default=zc.ADMIN_PORT)
    run.add_argument("--metrics-port", type=int, default=zc.METRICS_PORT)
    run.add_argument("--readiness-port", type=int, default=zc.READINESS_PORT)
    run.add_argument("--placement", choices=["inpod", "loopback"], default="loopback")
    run.add_argument("--log-format", choices=["text", "json"], default="text")
    run.add_argument("--log-level", default="info")
    run.add_argument("--drain-deadline", type=float, default=DEFAULT_DEADLINE)
    run.add_argument("--no-socks5", action="store_true", help="no SOCKS5 listener (15080)")
    run.add_argument(
        "--max-connections",
        type=int,
        default=DEFAULT_LISTENER_LIMITS.max_connections,
        help="HBONE connections each pod's 15008 listener holds at once",
    )
    run.add_argument(
        "--max-connections-per-identity",
        type=int,
        default=DEFAULT_LISTENER_LIMITS.max_connections_per_identity,
        help="HBONE connections one source identity may hold to a pod at once",
    )
    run.add_argument(
        "--rules-backend",
        choices=["auto", "nft", "iptables"],
        default="auto",
        help="inpod: how capture rules are programmed (auto prefers nft)",
    )
    run.add_argument(
        "--pod-retry-interval",
        type=float,
        default=5.0,
        help="inpod: seconds between retries of a pod whose start failed",
    )
    run.add_argument(
        "--recheck-interval",
        type=_recheck_interval,
        default=DEFAULT_RECHECK_INTERVAL,
        help="inpod: seconds between rechecks of running pods (rules repaired, recreated netns "
        "restarted); 0 turns rechecks off",
    )

    cfg = sub.add_parser("config", help="show a running ztunnel's state")
    cfg.add_argument("section", choices=SECTIONS)
    cfg.add_argument("--admin", default=f"http://127.0.0.1:{zc.ADMIN_PORT}", help="admin URL")
    cfg.add_argument("--json", action="store_true", help="print the raw JSON section")
    return parser


def kubernetes_mode(args: argparse.Namespace, env: Mapping[str, str]) -> bool:
    """``ztunnel run`` without ``--config`` and with a control plane address = Kubernetes mode."""
    return args.config is None and bool(args.xds_address or env.get("XDS_ADDRESS"))


def _kube_pieces(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    """AppConfig fields of Kubernetes mode: xDS source, Istio CA client, pod watcher, rules."""
    from ztunnel.kube.mode import KubeModeConfig, build

    mode = build(
        KubeModeConfig.from_env(
            env,
            {
                "XDS_ADDRESS": args.xds_address,
                "CA_ADDRESS": args.ca_address,
                "NODE_NAME": args.node,
                "KUBECONFIG": args.kubeconfig,
            },
        )
    )
    return {
        "source": mode.source,
        "ca_client": mode.ca_client,
        "local_pods": mode.local_pods,
        "rules": mode.rules,
        "node": mode.config.node,
    }


async def _run(args: argparse.Namespace) -> int:
    from netfilter import Backend, InpodConfig
    from ztunnel.app import App, AppConfig, AppError, Placement

    log = logging.getLogger("ztunnel")
    kube: dict[str, Any] = {}
    if kubernetes_mode(args, os.environ):
        if args.ca_dir is not None:
            log.error(
                "start-up failed: --ca-dir is for local mode; Kubernetes mode uses CA_ADDRESS"
            )
            return 1
        try:
            kube = _kube_pieces(args, os.environ)
        except ValueError as err:
            log.error("start-up failed: %s", err)
            return 1
    elif args.config is None:
        log.error("start-up failed: give --config FILE, or set XDS_ADDRESS for Kubernetes mode")
        return 1
    elif args.ca_dir is None and args.ca_address is None:
        log.error("start-up failed: no certificate authority: give --ca-dir or --ca-address")
        return 1

    try:
        listener_limits = ListenerLimits(
            max_connections=args.max_connections,
            max_connections_per_identity=args.max_connections_per_identity,
        )
    except ValueError as err:
        log.error("bad flag: %s", err)
        return 2
    config = AppConfig(
        config_path=args.config,
        node=kube.get("node", args.node),
        ca_dir=args.ca_dir,
        ca_address=None if kube else args.ca_address,
        source=kube.get("source"),
        ca_client=kube.get("ca_client"),
        local_pods=kube.get("local_pods"),
        rules=kube.get("rules"),
        placement=Placement(args.placement),
        admin_port=args.admin_port,
        metrics_port=args.metrics_port,
        readiness_port=args.readiness_port,
        log_format=LogFormat(args.log_format),
        drain_deadline=args.drain_deadline,
        socks5=not args.no_socks5,
        inpod=InpodConfig(backend=Backend(args.rules_backend)),
        pod_retry_interval=args.pod_retry_interval,
        pod_recheck_interval=args.recheck_interval,
        listener_limits=listener_limits,
    )
    try:
        app = App(config)
        await app.start()
    except (AppError, OSError, ValueError) as err:
        log.error("start-up failed: %s", err)
        return 1
    app.install_signal_handlers()
    logging.getLogger("ztunnel").info(
        "ztunnel up: node %s, admin %s, metrics %s, readiness %s",
        app.node,
        app.url("admin"),
        app.url("metrics"),
        app.url("readiness"),
    )
    await app.wait()
    return 0


def _config(args: argparse.Namespace) -> int:
    try:
        dump = fetch_dump(args.admin)
    except (OSError, ValueError, urllib.error.URLError) as err:
        print(f"ztunnel config: cannot read {args.admin}/config_dump: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(dump.get(args.section, []), indent=2))
    else:
        sys.stdout.write(render_table(args.section, dump))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        setup_logging(LogFormat(args.log_format), args.log_level)
        return asyncio.run(_run(args))
    return _config(args)


if __name__ == "__main__":
    sys.exit(main())

"""``ambient-lab``: bring a lab up, inspect it, run commands in its pods, tear it down, run the demo.

Commands (root; the run directory defaults to the most recent lab, ``/tmp/ambient-lab/current``)::

    ambient-lab up [--spec FILE] [--run-dir DIR] [--no-ztunnel] [--json]   # also starts waypoints
    ambient-lab status [--run-dir DIR] [--json]
    ambient-lab exec POD [--run-dir DIR] -- COMMAND...
    ambient-lab down [--run-dir DIR | --all]
    ambient-lab demo

``up`` leaves the lab running (the ztunnels are their own sessions) and prints where it lives; a
failed or interrupted ``up`` (Ctrl-C, SIGTERM) removes everything it made. ``down --all`` removes
every lab recorded under the base directory, including ones whose ``up`` was killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e2e.lab.cluster import DEFAULT_BASE, DEFAULT_SPEC, STATE_FILE, Lab, LabError, down_run_dir
from e2e.lab.spec import LabSpecError
from e2e.lab.topology import TopologyError

CURRENT = DEFAULT_BASE / "current"


def _run_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if CURRENT.is_symlink() or CURRENT.exists():
        return CURRENT.resolve()
    raise LabError(f"no lab given and none recorded at {CURRENT} (use --run-dir)")


_MAIN_PID = os.getpid()


def _sigterm_as_interrupt(signum: int, _frame: object) -> None:
    # Forked helpers (pyroute2 forks per netns) inherit this handler: they must just die, never
    # unwind the parent's stack (which would run its cleanup a second time).
    if os.getpid() != _MAIN_PID:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM behaves as Ctrl-C in this process, so `up`/`demo` clean up on either."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"lab {status['prefix']}  (run dir {status['runDir']})",
        "",
        "NODE   IP             ZTUNNEL",
    ]
    for n in status["nodes"]:
        z = n["ztunnel"]
        zs = (
            "-"
            if z is None
            else f"pid {z['pid']} {'ready' if z['ready'] else 'alive' if z['alive'] else 'DEAD'}"
        )
        lines.append(f"{n['name']:<6} {n['ip']:<14} {zs}")
    lines += ["", f"{'POD':<12} {'NAMESPACE':<10} {'NODE':<5} {'IP':<13} IDENTITY"]
    for p in status["pods"]:
        ident = p["identity"] or "(outside the mesh)"
        if p.get("waypoint"):
            ident += f"  (waypoint {p['waypoint']}, not captured)"
        lines.append(f"{p['name']:<12} {p['namespace']:<10} {p['node']:<5} {p['ip']:<13} {ident}")
    if status.get("services"):
        lines += ["", f"{'SERVICE':<18} {'VIP':<12} {'WAYPOINT':<10} PORTS"]
        for s in status["services"]:
            name = f"{s['namespace']}/{s['name']}"
            lines.append(f"{name:<18} {s['vip']:<12} {s.get('waypoint') or '-':<10} {s['ports']}")
    for w in status.get("waypoints", []):
        replicas = ", ".join(
            f"{r['pod']} {r['ip']} {'ready' if r['ready'] else 'alive' if r['alive'] else 'DEAD'}"
            for r in w["replicas"]
        )
        lines += [
            "",
            f"WAYPOINT {w['namespace']}/{w['name']}  VIP {w['vip']}  {w['identity']}",
            f"  serves: {', '.join(w['services']) or '-'};  replicas: {replicas}",
        ]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    interrupt_on_sigterm()
    lab = Lab.up(
        args.spec, run_dir=Path(args.run_dir) if args.run_dir else None, ztunnel=not args.no_ztunnel
    )
    CURRENT.parent.mkdir(parents=True, exist_ok=True)
    tmp = CURRENT.with_name(f".current.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(lab.run_dir)
    tmp.replace(CURRENT)
    status = lab.status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    if not args.json:
        print(
            "\nnext: ambient-lab exec <pod> -- <command>  |  ambient-lab status  |  ambient-lab down"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = Lab.attach(_run_dir(args.run_dir))
    status = lab.status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = Lab.attach(_run_dir(args.run_dir))
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise LabError("exec: no command given (ambient-lab exec POD -- COMMAND...)")
    try:
        lab.pod(args.pod)
    except KeyError as exc:
        raise LabError(str(exc.args[0])) from None
    return subprocess.call(lab.pod_argv(args.pod, command))


def cmd_down(args: argparse.Namespace) -> int:
    dirs: list[Path]
    if args.all:
        dirs = sorted(p.parent for p in DEFAULT_BASE.glob(f"*/{STATE_FILE}"))
    else:
        dirs = [_run_dir(args.run_dir)]
    failed = 0
    for d in dirs:
        if not (d / STATE_FILE).exists():
            print(f"{d}: nothing recorded (already down)")
            continue
        problems = down_run_dir(d)
        if problems:
            failed += 1
            print(f"{d}: could not remove: {problems}", file=sys.stderr)
        else:
            print(f"{d}: down")
    if CURRENT.is_symlink() and not (CURRENT.resolve() / STATE_FILE).exists():
        CURRENT.unlink()
    return 1 if failed else 0


def cmd_demo(_args: argparse.Namespace) -> int:
    from e2e import demo

    return demo.main([])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambient-lab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab from a spec and start its ztunnels")
    up.add_argument("--spec", default=str(DEFAULT_SPEC), help="spec file (default: %(default)s)")
    up.add_argument("--run-dir", help="where state, CA, configs and logs go")
    up.add_argument(
        "--no-ztunnel", action="store_true", help="network and rules only (no ztunnel, no waypoint)"
    )
    up.add_argument("--json", action="store_true")
    up.set_defaults(fn=cmd_up)
    st = sub.add_parser("status", help="nodes, pods (IPs, identities), ztunnels")
    st.add_argument("--run-dir")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    ex = sub.add_parser("exec", help="run a command inside a pod's network namespace")
    ex.add_argument("pod")
    ex.add_argument("--run-dir")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(fn=cmd_exec)
    dn = sub.add_parser("down", help="remove the lab (also after a killed up)")
    dn.add_argument("--run-dir")
    dn.add_argument(
        "--all", action="store_true", help="every lab recorded under " + str(DEFAULT_BASE)
    )
    dn.set_defaults(fn=cmd_down)
    de = sub.add_parser("demo", help="up, traffic, a readable report, down")
    de.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("ambient-lab: needs root (network namespaces, netfilter)", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except (LabError, LabSpecError, TopologyError) as exc:
        print(f"ambient-lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ambient-lab: interrupted; everything this command made was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

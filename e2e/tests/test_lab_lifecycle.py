"""The lab leaves nothing behind: after `down`, after a failed `up`, and after an `up` that was killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.lab import topology
from e2e.lab.cluster import STATE_FILE, Lab, LabError
from e2e.lab.spec import spec_from_dict
from e2e.netns import new_run_prefix

ROOT = Path(__file__).resolve().parents[2]


LAB_NETNS = re.compile(r"^zt[0-9a-f]{4}-")


def root_state(own: str | None = None) -> dict[str, str]:
    """What the lab must never change in the root netns (and namespaces that exist).

    Other engineers' labs come and go on a shared machine: namespaces of lab runs other than
    ``own`` (the prefix of the lab under test) are left out of the comparison.
    """

    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout

    netns = [
        line
        for line in out("ip", "netns", "list").splitlines()
        if not LAB_NETNS.match(line) or (own is not None and line.startswith(f"{own}-"))
    ]
    return {
        "netns": "\n".join(sorted(netns)),
        "links": "\n".join(
            sorted(line.split("@")[0] for line in out("ip", "-o", "link", "show").splitlines())
        ),
        "rules": out("ip", "rule"),
        "routes": out("ip", "route", "show", "table", "all"),
        "iptables": "\n".join(
            line for line in out("iptables-save").splitlines() if not line.startswith("#")
        ),
        "nft": out("nft", "list", "ruleset"),
    }


def test_down_leaves_nothing(tmp_path: Path) -> None:
    before = root_state()
    lab = Lab.up(run_dir=tmp_path / "run")
    pids = [z.pid for z in lab.ztunnels.values()]
    assert topology.list_namespaces(lab.prefix)
    assert lab.down() == []
    assert topology.list_namespaces(lab.prefix) == []
    assert root_state(lab.prefix) == before
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        )
    assert not (tmp_path / "run" / STATE_FILE).exists()


def test_failed_up_cleans_up(tmp_path: Path) -> None:
    before = root_state()
    spec = spec_from_dict(
        {"nodes": [{"name": "n1"}], "pods": [{"name": "a", "node": "n1"}]}, source="t"
    )
    prefix = new_run_prefix()
    lab_python = "/nonexistent/python"  # the ztunnel cannot start: up must fail and clean
    original = Lab.ztunnel_argv

    def broken(self, node, ports, log_level):
        argv = original(self, node, ports, log_level)
        return [lab_python if a == sys.executable else a for a in argv]

    Lab.ztunnel_argv = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(LabError, match="ztunnel of node n1"):
            Lab.up(spec, run_dir=tmp_path / "run", prefix=prefix)
    finally:
        Lab.ztunnel_argv = original  # type: ignore[method-assign]
    assert root_state(prefix) == before


def test_killed_up_is_cleaned_by_down(tmp_path: Path) -> None:
    before = root_state()
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "e2e.lab.cli"]
    proc = subprocess.Popen(
        [*cli, "up", "--run-dir", str(run_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it once its ztunnels were started (namespaces and processes exist), before it returns.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = run_dir / STATE_FILE
            if state.exists() and '"pid"' in state.read_text():
                break
            time.sleep(0.01)
        else:
            pytest.fail("up never started a ztunnel")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    prefix = json.loads((run_dir / STATE_FILE).read_text())["prefix"]
    assert root_state(prefix) != before  # the killed up left its namespaces behind...
    down = subprocess.run(
        [*cli, "down", "--run-dir", str(run_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 0, down.stderr
    assert root_state(prefix) == before  # ...and down removed all of it

"""The `waypoint` command: `manager --kubeconfig` as a real process, and the lazy `proxy` hand-off."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from e2e.fakekube import FakeApiServer
from waypoint import cli

from .helpers import gateway

ROOT = Path(__file__).resolve().parents[3]


def test_proxy_subcommand_is_imported_lazily(monkeypatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("waypoint.proxy.cli")

    def main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 0

    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "waypoint.proxy.cli", fake)
    assert cli.main(["proxy", "--flag", "x"]) == 0
    assert seen == [["--flag", "x"]]


def test_manager_requires_a_subcommand(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([])
    assert "manager" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_manager_process_reconciles_and_stops_on_sigterm(tmp_path: Path) -> None:
    with FakeApiServer.running_in_thread() as server:
        server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
        obj = gateway()
        obj["metadata"].pop("uid")
        server.put_object(obj)
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        table = tmp_path / "bindings.json"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "waypoint.cli",
                "manager",
                "--kubeconfig",
                str(kubeconfig),
                "--binding-table",
                str(table),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while (
                time.monotonic() < deadline
                and server.get_object("apps/v1", "Deployment", "waypoint", "shop") is None
            ):
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
            assert server.get_object("apps/v1", "Deployment", "waypoint", "shop") is not None
            while time.monotonic() < deadline and not table.exists():
                time.sleep(0.1)
            assert json.loads(table.read_text()) == {"services": [], "workloads": []}
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

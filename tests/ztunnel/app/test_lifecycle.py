"""Start-up and shutdown: readiness, graceful drain (/quitquitquit and SIGTERM), the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from ztunnel import cli
from ztunnel.app import App
from ztunnel.identity.ca import LocalCaClient

from .harness import (
    CA,
    SocksRefused,
    app_config,
    base_config,
    get,
    mesh,
    post,
    random_prefix,
    roundtrip,
    socks_connect,
    until,
)


async def test_readiness_waits_for_certificates(tmp_path):
    prefix = random_prefix()
    path = tmp_path / "mesh.yaml"
    path.write_text(base_config(prefix))
    release = asyncio.Event()
    ca = LocalCaClient(CA, gate=release.wait)
    app = App(app_config(path, "node-b", [], ca_client=ca))
    await app.start()
    try:
        status, text = await get(app.url("readiness") + "/healthz/ready")
        assert status == 500
        assert (
            text == "not ready, pending: certificate spiffe://cluster.local/ns/default/sa/server\n"
        )
        release.set()
        await until(lambda: app.readiness.ready, 5, "certificate")
        assert await get(app.url("readiness") + "/healthz/ready") == (200, "ready\n")
    finally:
        await asyncio.wait_for(app.stop(), 10)


async def test_bad_config_at_start_is_fatal_and_names_the_field(tmp_path):
    from ztunnel.app import AppError

    path = tmp_path / "bad.yaml"
    path.write_text(base_config(random_prefix()).replace("protocol: HBONE", "protocol: HBONEX", 1))
    app = App(app_config(path, "node-a", []))
    with pytest.raises(AppError, match=r"bad.yaml: workloads\[0\] \(default/client\): protocol"):
        await app.start()


async def test_quitquitquit_drains_in_flight_streams(tmp_path):
    async with mesh(tmp_path) as m:
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"before") == b"before"
        assert await post(m.b.url("admin") + "/quitquitquit") == (200, "OK\n")
        await until(lambda: m.b.drain.draining, what="drain start")
        await asyncio.sleep(0.05)
        # Listeners are closed at once: a new connection cannot reach node-b.
        with pytest.raises(SocksRefused):
            await socks_connect(m.client_ip, m.server_ip, 8080)
        # The stream in flight keeps working until it ends on its own.
        assert await roundtrip(reader, writer, b"during drain") == b"during drain"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await asyncio.wait_for(m.b.wait(), 5)
        assert m.b.drain.duration is not None
        assert m.b.drain.duration < m.b.drain.deadline
        entries = [line for line in m.logs_b if "during" not in line]
        assert any("bytes_sent=18" in line and "error" not in line for line in entries)


async def test_drain_deadline_closes_streams_that_do_not_finish(tmp_path):
    async with mesh(tmp_path, b_overrides={"drain_deadline": 0.3}) as m:
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"x") == b"x"
        loop = asyncio.get_running_loop()
        started = loop.time()
        m.b.drain.trigger("test")
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert loop.time() - started < 2.0
        writer.close()
        await asyncio.wait_for(m.b.wait(), 5)


ROOT = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
async def test_sigterm_drains_a_ztunnel_process_and_cli_prints_tables(tmp_path, capsys):
    prefix = random_prefix()
    path = tmp_path / "mesh.yaml"
    path.write_text(base_config(prefix))
    ca_dir = tmp_path / "ca"
    CA.save(ca_dir)
    admin, metrics, ready = _free_port(), _free_port(), _free_port()
    root = ROOT
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ztunnel.cli",
        "run",
        "--config",
        str(path),
        "--node",
        "node-b",
        "--ca-dir",
        str(ca_dir),
        "--admin-port",
        str(admin),
        "--metrics-port",
        str(metrics),
        "--readiness-port",
        str(ready),
        "--drain-deadline",
        "5",
        cwd=root,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    from .harness import Echo

    echo = Echo(f"{prefix}.2", 8080)
    await echo.start()
    logs: list[str] = []
    a = App(app_config(path, "node-a", logs))
    try:

        async def ready_ok() -> None:
            while True:
                with contextlib.suppress(OSError, asyncio.TimeoutError, Exception):
                    if (await get(f"http://127.0.0.1:{ready}/healthz/ready"))[0] == 200:
                        return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(ready_ok(), 20)
        await a.start()
        await until(lambda: a.readiness.ready, 5, "node-a ready")

        reader, writer = await socks_connect(f"{prefix}.1", f"{prefix}.2", 8080)
        assert await roundtrip(reader, writer, b"hi") == b"hi"

        # The CLI reads the live admin endpoint (urllib is blocking: run it off the loop).
        url = f"http://127.0.0.1:{admin}"
        assert await asyncio.to_thread(cli.main, ["config", "workloads", "--admin", url]) == 0
        assert await asyncio.to_thread(cli.main, ["config", "connections", "--admin", url]) == 0
        assert (
            await asyncio.to_thread(cli.main, ["config", "certificates", "--admin", url, "--json"])
            == 0
        )
        out = capsys.readouterr().out
        lines = out.splitlines()
        assert lines[0].split() == [
            "NAMESPACE",
            "POD",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ]
        assert lines[1].split() == ["default", "client", f"{prefix}.1", "node-a", "None", "HBONE"]
        assert lines[2].split() == ["default", "server", f"{prefix}.2", "node-b", "None", "HBONE"]
        assert lines[3].split()[0:2] == ["DIRECTION", "SOURCE"]
        assert lines[4].split()[0] == "inbound"
        assert lines[4].split()[3:5] == [
            f"{prefix}.2:8080",
            "spiffe://cluster.local/ns/default/sa/client",
        ]
        certs = json.loads("\n".join(lines[5:]))
        assert [c["state"] for c in certs] == ["Available"]

        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        # In flight: still served after SIGTERM, until the client ends it.
        assert await roundtrip(reader, writer, b"after term") == b"after term"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        rc = await asyncio.wait_for(proc.wait(), 10)
        assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if a.admin_address is not None:
            await asyncio.wait_for(a.stop(), 10)
        await echo.close()

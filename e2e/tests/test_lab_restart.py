"""Hitless restart: a node's ztunnel is replaced while a client opens a new connection every 10 ms.

The new ztunnel binds its in-pod listeners beside the old one's (SO_REUSEPORT), reports ready, then
the old one gets SIGTERM and drains. Every connection opened after the new process reported ready
must succeed (connect through the capture, echo round trip, no retries).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from e2e.lab.cluster import Lab

INTERVAL = 0.010
DURATION = 5.0
ECHO_PORT = 9000


@dataclass
class Attempt:
    started: float
    ok: bool
    error: str = ""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up()
    try:
        lab.start_app("server", "echo", ECHO_PORT)
        yield lab
    finally:
        assert lab.down() == []


def one(lab: Lab, dst: str, n: int) -> Attempt:
    started = time.monotonic()
    sock = lab.socket_in("client")
    sock.settimeout(3)
    try:
        sock.connect((dst, ECHO_PORT))
        msg = f"ping {n}\n".encode()
        sock.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = sock.recv(64)
            if not chunk:
                break
            got += chunk
        return Attempt(started, got == msg, "" if got == msg else f"echo {got!r}")
    except OSError as exc:
        return Attempt(started, False, repr(exc))
    finally:
        sock.close()


@pytest.mark.slow  # 5 s of traffic per node, as the issue asks
@pytest.mark.parametrize("node", ["n2", "n1"], ids=["server-node", "client-node"])
def test_restart_keeps_new_connections_working(lab: Lab, node: str) -> None:
    dst = lab.ip("server")
    assert one(lab, dst, -1).ok
    attempts: list[Attempt] = []
    stop = threading.Event()

    def load() -> None:
        n = 0
        end = time.monotonic() + DURATION
        while time.monotonic() < end and not stop.is_set():
            t0 = time.monotonic()
            attempts.append(one(lab, dst, n))
            n += 1
            time.sleep(max(0.0, INTERVAL - (time.monotonic() - t0)))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)
        ready_at, old_gone = lab.restart_ztunnel(node)
    finally:
        worker.join(timeout=DURATION + 10)
        stop.set()
    after = [a for a in attempts if a.started >= ready_at]
    failed = [a for a in after if not a.ok]
    assert len(after) > 50, f"only {len(after)} connections after the new ztunnel was ready"
    assert not failed, f"{len(failed)}/{len(after)} failed after ready, e.g. {failed[:3]}"
    assert old_gone >= ready_at
    # The new process serves: readiness on the new ports and its pods up.
    dump = lab.config_dump(node)
    assert all(s["state"] == "Up" for s in dump["workloadState"].values())

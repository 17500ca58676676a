"""Lease-based leader election: pure decisions, and two candidates against the fake API server."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from e2e.fakekube import FakeApiServer
from tests.controlplane import objects as o
from waypoint.controlplane.leader import LeaderElector, LeaseRecord, may_acquire, next_record

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("holder", "observed_since", "now", "expected"),
    [
        ("", 0.0, 0.0, True),
        ("me", 0.0, 0.0, True),
        ("other", 0.0, 14.9, False),
        ("other", 0.0, 15.0, True),
        ("other", 10.0, 20.0, False),  # record changed at 10 (a renewal): wait again
    ],
    ids=["free", "mine", "other-fresh", "other-expired", "other-renewed"],
)
def test_may_acquire(holder: str, observed_since: float, now: float, expected: bool) -> None:
    record = LeaseRecord(holder=holder, duration_seconds=15)
    assert may_acquire("me", record, observed_since, now) is expected


def test_next_record_counts_transitions() -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    taken = next_record("me", LeaseRecord(holder="other", transitions=2), now, 15)
    assert (taken.holder, taken.transitions) == ("me", 3)
    renewed = next_record("me", taken, now + dt.timedelta(seconds=5), 15)
    assert renewed.transitions == 3
    assert renewed.acquire_time == taken.acquire_time
    assert renewed.renew_time != taken.renew_time


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer()
    await srv.start()
    srv.put_object(o.namespace("istio-system"))
    try:
        yield srv
    finally:
        await srv.stop()


async def _client(server: FakeApiServer, path: Path) -> k8s.ApiClient:
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(server.write_kubeconfig(path)), client_configuration=configuration
    )
    return k8s.ApiClient(configuration)


class Candidates:
    def __init__(self, server: FakeApiServer, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.running: dict[str, tuple[LeaderElector, asyncio.Task[None], k8s.ApiClient]] = {}
        self.events: list[tuple[str, str]] = []

    async def start(self, identity: str, **kwargs: object) -> LeaderElector:
        client = await _client(self.server, self.tmp_path / f"kc-{identity}")
        elector = LeaderElector(
            client,
            namespace="istio-system",
            name="waypoint-manager",
            identity=identity,
            lease_duration=1,
            renew_deadline=0.5,
            retry_period=0.05,
            on_started=lambda: self.events.append((identity, "started")),
            on_stopped=lambda: self.events.append((identity, "stopped")),
            **kwargs,  # type: ignore[arg-type]
        )
        task = asyncio.create_task(elector.run())
        self.running[identity] = (elector, task, client)
        return elector

    async def stop(self, identity: str) -> None:
        _, task, client = self.running.pop(identity)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()


@pytest.fixture
async def candidates(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[Candidates]:
    c = Candidates(server, tmp_path)
    try:
        yield c
    finally:
        for identity in list(c.running):
            await c.stop(identity)


async def _until_leader(*electors: LeaderElector, timeout: float) -> LeaderElector:
    async with asyncio.timeout(timeout):
        while True:
            leaders = [e for e in electors if e.is_leader]
            if leaders:
                assert len(leaders) == 1, "two leaders at once"
                return leaders[0]
            await asyncio.sleep(0.02)


async def test_one_leader_and_handover_on_release(
    candidates: Candidates, server: FakeApiServer
) -> None:
    a = await candidates.start("replica-a")
    b = await candidates.start("replica-b")
    first = await _until_leader(a, b, timeout=5)
    # Stays the only leader across several renewals.
    for _ in range(10):
        await asyncio.sleep(0.05)
        assert sum(e.is_leader for e in (a, b)) == 1
    lease = server.get_object("coordination.k8s.io/v1", "Lease", "waypoint-manager", "istio-system")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == first.identity

    other = b if first is a else a
    loop = asyncio.get_running_loop()
    started = loop.time()
    await candidates.stop(first.identity)  # clean stop releases the Lease
    assert await _until_leader(other, timeout=2) is other
    assert loop.time() - started < 0.8  # no need to wait for expiry
    assert (first.identity, "stopped") in candidates.events
    assert (other.identity, "started") in candidates.events


async def test_takeover_after_expiry_when_the_leader_dies(candidates: Candidates) -> None:
    a = await candidates.start("replica-a", release_on_cancel=False)
    assert await _until_leader(a, timeout=5) is a
    b = await candidates.start("replica-b")
    await asyncio.sleep(0.3)
    assert not b.is_leader
    await candidates.stop("replica-a")  # crash: the Lease is not released
    assert await _until_leader(b, timeout=3) is b

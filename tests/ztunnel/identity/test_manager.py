"""CertificateManager on fake time: renewal at half-life, backoff, outage, expiry, concurrency."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.ztunnel.identity.fakes import FakeTime
from ztunnel.identity.ca import LocalCa, LocalCaClient, WorkloadCertificate
from ztunnel.identity.manager import CertificateManager, CertificateUnavailable
from ztunnel.identity.spiffe import SpiffeId

START = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
ALICE = SpiffeId("cluster.local", "default", "alice")
BOB = SpiffeId("cluster.local", "default", "bob")
HOUR = 3600.0


@pytest.fixture
def time() -> FakeTime:
    return FakeTime(START)


@pytest.fixture
def ca_client(time: FakeTime) -> LocalCaClient:
    return LocalCaClient(LocalCa.generate(clock=time.now))


def manager_for(ca_client: LocalCaClient, time: FakeTime, **kwargs: object) -> CertificateManager:
    options: dict[str, object] = {
        "ttl": timedelta(hours=1),
        "clock": time.now,
        "sleep": time.sleep,
        "jitter": 0.0,
        "request_timeout": None,
    }
    options.update(kwargs)
    return CertificateManager(ca_client, **options)  # type: ignore[arg-type]


@pytest.fixture
async def manager(ca_client: LocalCaClient, time: FakeTime) -> AsyncIterator[CertificateManager]:
    mgr = manager_for(ca_client, time)
    try:
        yield mgr
    finally:
        await mgr.close()


class Gate:
    """Holds CA requests in flight until released."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def __call__(self) -> None:
        await asyncio.wait_for(self.event.wait(), 5)


async def test_first_get_issues_and_caches(manager: CertificateManager, ca_client) -> None:
    cert = await manager.get(ALICE)
    assert cert.identity == ALICE
    assert cert.not_after - cert.not_before == timedelta(hours=1)
    assert await manager.get(ALICE) is cert
    assert manager.cached(ALICE) is cert
    assert manager.cached(BOB) is None
    assert ca_client.calls == 1
    assert ca_client.requested == [(ALICE, timedelta(hours=1))]


async def test_concurrent_gets_make_one_request(ca_client: LocalCaClient, time: FakeTime) -> None:
    gate = Gate()
    ca_client.gate = gate
    mgr = manager_for(ca_client, time)
    try:
        waiters = [asyncio.create_task(mgr.get(ALICE)) for _ in range(20)]
        await time.settle()
        assert ca_client.calls == 1
        assert mgr.snapshot()[0]["state"] == "Initializing"
        gate.event.set()
        certs = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert len({c.serial for c in certs}) == 1
        assert ca_client.calls == 1
    finally:
        await mgr.close()


async def test_renews_at_half_life_and_notifies(
    manager: CertificateManager, ca_client: LocalCaClient, time: FakeTime
) -> None:
    seen: list[WorkloadCertificate] = []
    unsubscribe = manager.subscribe(seen.append)
    first = await manager.get(ALICE)
    assert first.refresh_at() == START + timedelta(minutes=30)
    await time.advance(30 * 60 - 1)
    assert ca_client.calls == 1
    assert manager.cached(ALICE) is first
    await time.advance(1)
    assert ca_client.calls == 2
    second = manager.cached(ALICE)
    assert second is not None
    assert second.serial != first.serial
    assert second.not_before == START + timedelta(minutes=30)
    assert [c.serial for c in seen] == [first.serial, second.serial]
    unsubscribe()
    await time.advance(30 * 60)
    assert ca_client.calls == 3
    assert len(seen) == 2


async def test_backoff_sequence_is_exponential_and_capped(
    manager: CertificateManager, ca_client: LocalCaClient, time: FakeTime
) -> None:
    ca_client.down = True
    with pytest.raises(CertificateUnavailable, match="down"):
        await manager.get(ALICE)
    expected = [0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150, 150, 150]
    for step in expected[:-1]:
        await time.advance(step)
    assert time.sleeps == expected
    assert ca_client.calls == len(expected)  # one CSR per step, no more
    snap = manager.snapshot()[0]
    assert snap["state"] == "Unavailable"
    assert snap["failures"] == len(expected)
    # The CA comes back: the next scheduled retry succeeds and the backoff resets.
    ca_client.down = False
    await time.advance(150)
    assert manager.cached(ALICE) is not None
    (refresh,) = time.pending()
    assert 30 * 60 - 1 < refresh <= 30 * 60  # not_before is whole seconds


@pytest.mark.parametrize("seed", [1, 2, 3], ids=["seed1", "seed2", "seed3"])
async def test_backoff_jitter_stays_within_bounds(
    ca_client: LocalCaClient, time: FakeTime, seed: int
) -> None:
    ca_client.down = True
    mgr = manager_for(ca_client, time, jitter=0.2, rng=random.Random(seed))
    try:
        mgr.prefetch(ALICE)
        for _ in range(12):
            await time.advance(200)
        base = [0.5 * 2**i for i in range(len(time.sleeps))]
        for delay, nominal in zip(time.sleeps, base, strict=True):
            assert delay <= 150
            assert min(nominal, 150) * 0.8 - 1e-9 <= delay <= nominal * 1.2 + 1e-9
        assert len(set(time.sleeps[:8])) == 8  # jitter actually applied
    finally:
        await mgr.close()


async def test_valid_certificate_kept_during_outage_then_dropped_at_expiry(
    manager: CertificateManager, ca_client: LocalCaClient, time: FakeTime
) -> None:
    cert = await manager.get(ALICE)
    ca_client.down = True
    await time.advance(30 * 60)  # renewal attempt fails
    assert ca_client.calls == 2
    assert manager.cached(ALICE) is cert
    assert await manager.get(ALICE) is cert  # no extra CA call while a valid cert is held
    assert ca_client.calls == 2
    snap = manager.snapshot()[0]
    assert snap["state"] == "Available"
    assert "down" in str(snap["last_error"])
    # Retries back off: 0.5, 1, 2, ... then one capped at the time left before expiry.
    await time.advance(30 * 60 - 1)
    assert manager.cached(ALICE) is cert
    assert time.current + timedelta(seconds=time.pending()[0]) == cert.not_after
    await time.advance(1)  # expiry: the retry at not_after fails too
    assert manager.cached(ALICE) is None
    assert manager.snapshot()[0]["state"] == "Unavailable"
    assert manager.snapshot()[0]["serial"] is None
    with pytest.raises(CertificateUnavailable) as info:
        await manager.get(ALICE)
    assert info.value.identity == ALICE
    assert "down" in info.value.reason


async def test_get_retries_on_demand_after_outage(
    manager: CertificateManager, ca_client: LocalCaClient, time: FakeTime
) -> None:
    ca_client.down = True
    manager.prefetch(ALICE)
    for _ in range(10):
        await time.advance(100)
    calls = ca_client.calls
    assert time.pending()[0] > 1  # next scheduled retry is still ahead
    ca_client.down = False
    before = time.current
    cert = await manager.get(ALICE)  # does not wait for the backoff to end
    assert time.current == before
    assert cert.identity == ALICE
    assert ca_client.calls == calls + 1
    # Demand retries are rate limited: a failing CA is asked at most once per interval.
    ca_client.down = True
    await time.advance(3600)  # expired, and failing
    await time.advance(time.pending()[0])  # run the scheduled retry: next one is 150 s away
    await time.advance(1.5)  # ... and the last attempt is more than the 1 s interval ago
    calls = ca_client.calls
    with pytest.raises(CertificateUnavailable):
        await manager.get(ALICE)
    assert ca_client.calls == calls + 1
    with pytest.raises(CertificateUnavailable):
        await manager.get(ALICE)
    assert ca_client.calls == calls + 1  # same instant: no second demand request


async def test_concurrency_limit_is_honoured(ca_client: LocalCaClient, time: FakeTime) -> None:
    gate = Gate()
    ca_client.gate = gate
    mgr = manager_for(ca_client, time, max_concurrent=3)
    identities = [SpiffeId("cluster.local", "ns", f"sa{i}") for i in range(10)]
    try:
        waiters = [asyncio.create_task(mgr.get(i)) for i in identities]
        await time.settle()
        assert ca_client.in_flight == 3
        gate.event.set()
        certs = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert [c.identity for c in certs] == identities
        assert ca_client.max_in_flight == 3
        assert ca_client.calls == 10
    finally:
        await mgr.close()


class WrongIdentityCa:
    """A CA that signs someone else's identity (a confused or malicious CA)."""

    def __init__(self, ca: LocalCa) -> None:
        self.ca = ca
        self.calls = 0

    async def sign(self, identity: SpiffeId, csr_pem: bytes, ttl: timedelta) -> list[bytes]:
        self.calls += 1
        other = self.ca.issue(BOB, ttl)
        return [other.chain_pem, other.roots_pem]


async def test_certificate_for_another_identity_is_refused(time: FakeTime) -> None:
    ca = WrongIdentityCa(LocalCa.generate(clock=time.now))
    mgr = CertificateManager(ca, clock=time.now, sleep=time.sleep, jitter=0.0)
    try:
        with pytest.raises(CertificateUnavailable, match="URI SANs"):
            await mgr.get(ALICE)
        assert time.pending() == [0.5]
    finally:
        await mgr.close()


async def test_forget_and_close(manager: CertificateManager, time: FakeTime) -> None:
    await manager.get(ALICE)
    await manager.get(BOB)
    manager.forget(ALICE)
    assert manager.cached(ALICE) is None
    assert [s["identity"] for s in manager.snapshot()] == [str(BOB)]
    await manager.close()
    with pytest.raises(CertificateUnavailable, match="closed"):
        await manager.get(BOB)


async def test_forget_releases_waiters(ca_client: LocalCaClient, time: FakeTime) -> None:
    gate = Gate()
    ca_client.gate = gate
    mgr = manager_for(ca_client, time)
    try:
        waiter = asyncio.create_task(mgr.get(ALICE))
        await time.settle()
        mgr.forget(ALICE)
        with pytest.raises(CertificateUnavailable, match="forgotten"):
            await asyncio.wait_for(waiter, 5)
    finally:
        gate.event.set()
        await mgr.close()


async def test_subscriber_errors_do_not_break_rotation(
    manager: CertificateManager, time: FakeTime
) -> None:
    def broken(cert: WorkloadCertificate) -> None:
        raise RuntimeError("subscriber bug")

    manager.subscribe(broken)
    first = await manager.get(ALICE)
    await time.advance(30 * 60)
    assert manager.cached(ALICE) not in (None, first)


async def test_snapshot_has_no_key_material(manager: CertificateManager) -> None:
    cert = await manager.get(ALICE)
    (snap,) = manager.snapshot()
    assert snap["identity"] == str(ALICE)
    assert snap["state"] == "Available"
    assert snap["serial"] == f"{cert.serial:x}"
    assert snap["not_after"] == cert.not_after.isoformat()
    assert "BEGIN CERTIFICATE" in str(snap["chain"])
    assert "PRIVATE" not in repr(snap)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_concurrent": 0},
        {"initial_backoff": 0},
        {"initial_backoff": 10, "max_backoff": 1},
        {"jitter": 1.5},
        {"ttl": timedelta(0)},
    ],
    ids=["no concurrency", "zero backoff", "backoff above cap", "jitter", "ttl"],
)
def test_bad_settings_are_refused(ca_client: LocalCaClient, kwargs) -> None:
    with pytest.raises(ValueError):
        CertificateManager(ca_client, **kwargs)

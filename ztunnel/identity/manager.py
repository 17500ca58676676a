"""The certificate manager: one workload certificate per identity, fetched, renewed and expired.

Owns the life cycle ztunnel's ``identity/manager.rs`` gives certificates:

* one background task per identity makes a fresh key + CSR, asks the ``CaClient``, re-checks the answer
  (``certificate_from_chain``) and renews at half-life;
* failures are retried with capped exponential backoff and jitter (500 ms x2, at most 150 s);
* a still-valid certificate is KEPT while the CA is unreachable (the next retry is never later than
  its expiry); once expired it is dropped and ``get`` fails closed with ``CertificateUnavailable``;
* at most ``max_concurrent`` signing requests are in flight (a semaphore); concurrent ``get`` calls
  for one identity share one request.

When no valid certificate exists, ``get`` may trigger an early retry ("demand"), at most once per
``demand_retry_interval`` per identity, so an identity recovers within about a second of the CA coming
back instead of waiting out a 150 s backoff. Time comes from the injected clock and sleep, so tests run
on fake time.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ztunnel.identity.ca import (
    DEFAULT_WORKLOAD_TTL,
    CaClient,
    WorkloadCertificate,
    certificate_from_chain,
    make_csr,
    utc_now,
)
from ztunnel.identity.spiffe import SpiffeId

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[object]]


class CertState(enum.Enum):
    """What config_dump shows for an identity (ztunnel's names)."""

    INITIALIZING = "Initializing"
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"


class CertificateUnavailable(Exception):
    """No valid certificate can be had for ``identity`` right now; ``reason`` says why."""

    def __init__(self, identity: SpiffeId, reason: str) -> None:
        super().__init__(f"no certificate for {identity}: {reason}")
        self.identity = identity
        self.reason = reason


@dataclass(eq=False)
class _Entry:
    identity: SpiffeId
    next_result: asyncio.Future[None]  # resolved when the next attempt finishes
    cert: WorkloadCertificate | None = None
    state: CertState = CertState.INITIALIZING
    last_error: str | None = None
    failures: int = 0
    in_flight: bool = False
    last_attempt: datetime | None = None
    next_attempt: datetime | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class CertificateManager:
    """Fetches and rotates one certificate per identity from a ``CaClient``."""

    def __init__(
        self,
        ca: CaClient,
        *,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        max_concurrent: int = 8,
        clock: Callable[[], datetime] = utc_now,
        initial_backoff: float = 0.5,
        max_backoff: float = 150.0,
        jitter: float = 0.2,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        request_timeout: float | None = 30.0,
        demand_retry_interval: float | None = 1.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if not 0 < initial_backoff <= max_backoff:
            raise ValueError(
                f"backoff must satisfy 0 < initial_backoff ({initial_backoff}) <= "
                f"max_backoff ({max_backoff})"
            )
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        if ttl <= timedelta(0):
            raise ValueError(f"ttl must be positive, got {ttl}")
        self._ca = ca
        self._ttl = ttl
        self._clock = clock
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._jitter = jitter
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._request_timeout = request_timeout
        self._demand_retry_interval = demand_retry_interval
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._entries: dict[SpiffeId, _Entry] = {}
        self._subscribers: list[Callable[[WorkloadCertificate], None]] = []
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def get(self, identity: SpiffeId) -> WorkloadCertificate:
        """A valid certificate for ``identity``; waits for the first issuance.

        Raises ``CertificateUnavailable`` if the CA cannot issue one and no valid one is held.
        """
        entry = self._ensure(identity)
        # At most: wait for the attempt in progress, then for one demand-driven retry.
        for _ in range(3):
            now = self._clock()
            if entry.cert is not None and entry.cert.is_valid(now):
                return entry.cert
            if entry.task is not None and entry.task.done():
                break  # the rotation task died (logged); fail closed rather than wait forever
            if entry.in_flight or entry.state is CertState.INITIALIZING:
                await self._wait_next(entry)
                continue
            if self._demand_allowed(entry, now):
                entry.wake.set()  # cut the backoff short: someone needs this identity now
                await self._wait_next(entry)
                continue
            break
        now = self._clock()
        if entry.cert is not None and entry.cert.is_valid(now):
            return entry.cert
        raise CertificateUnavailable(identity, self._reason(entry, now))

    def prefetch(self, identity: SpiffeId) -> None:
        """Start fetching (and then rotating) ``identity`` without waiting (ztunnel's Warmup)."""
        self._ensure(identity)

    def cached(self, identity: SpiffeId) -> WorkloadCertificate | None:
        """The current certificate if one is held and valid now; never waits, never fetches."""
        entry = self._entries.get(identity)
        if entry is None or entry.cert is None or not entry.cert.is_valid(self._clock()):
            return None
        return entry.cert

    def forget(self, identity: SpiffeId) -> None:
        """Stop rotating ``identity`` and drop its certificate (its last workload left)."""
        entry = self._entries.pop(identity, None)
        if entry is not None:
            self._stop(entry)

    def subscribe(self, callback: Callable[[WorkloadCertificate], None]) -> Callable[[], None]:
        """Call ``callback`` with every newly issued certificate; returns the unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def snapshot(self) -> list[dict[str, object]]:
        """State of every identity for config_dump (no key material)."""
        now = self._clock()
        out: list[dict[str, object]] = []
        for identity in sorted(self._entries):
            entry = self._entries[identity]
            cert = entry.cert
            state = entry.state
            if state is CertState.AVAILABLE and (cert is None or not cert.is_valid(now)):
                state = CertState.UNAVAILABLE
            out.append(
                {
                    "identity": str(identity),
                    "state": state.value,
                    "serial": f"{cert.serial:x}" if cert else None,
                    "not_before": cert.not_before.isoformat() if cert else None,
                    "not_after": cert.not_after.isoformat() if cert else None,
                    "chain": cert.chain_pem.decode("ascii") if cert else None,
                    "roots": cert.roots_pem.decode("ascii") if cert else None,
                    "last_error": entry.last_error,
                    "failures": entry.failures,
                    "next_attempt": entry.next_attempt.isoformat() if entry.next_attempt else None,
                }
            )
        return out

    async def close(self) -> None:
        """Stop every rotation task; later ``get`` calls fail."""
        self._closed = True
        for entry in list(self._entries.values()):
            self._stop(entry)
        self._entries.clear()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    # -- internals ----------------------------------------------------------------------------

    def _ensure(self, identity: SpiffeId) -> _Entry:
        if self._closed:
            raise CertificateUnavailable(identity, "certificate manager is closed")
        entry = self._entries.get(identity)
        if entry is None:
            loop = asyncio.get_running_loop()
            entry = _Entry(identity=identity, next_result=loop.create_future())
            entry.task = loop.create_task(self._run(entry), name=f"certificate {identity}")
            self._entries[identity] = entry
        return entry

    def _stop(self, entry: _Entry) -> None:
        task = entry.task
        if task is not None and not task.done():
            task.cancel()
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)
        entry.cert = None
        entry.last_error = "identity no longer managed"
        entry.state = CertState.UNAVAILABLE
        if not entry.next_result.done():
            entry.next_result.set_result(None)

    async def _wait_next(self, entry: _Entry) -> None:
        # shield: a cancelled caller must not cancel the future other waiters share.
        await asyncio.shield(entry.next_result)
        if self._entries.get(entry.identity) is not entry:
            raise CertificateUnavailable(
                entry.identity, "certificate manager is closed" if self._closed else "forgotten"
            )

    def _demand_allowed(self, entry: _Entry, now: datetime) -> bool:
        if self._demand_retry_interval is None or entry.last_attempt is None:
            return False
        return (now - entry.last_attempt).total_seconds() >= self._demand_retry_interval

    def _reason(self, entry: _Entry, now: datetime) -> str:
        if entry.last_error:
            return entry.last_error
        if entry.cert is not None and now < entry.cert.not_before:
            return f"certificate serial {entry.cert.serial:#x} is not valid before {entry.cert.not_before}"
        if entry.cert is not None:
            return f"certificate serial {entry.cert.serial:#x} expired at {entry.cert.not_after}"
        return "no certificate issued yet"

    def _step(self, backoff: float) -> float:
        spread = backoff * self._jitter
        return min(backoff + self._rng.uniform(-spread, spread), self._max_backoff)

    async def _fetch(self, identity: SpiffeId) -> WorkloadCertificate:
        key_pem, csr_pem = make_csr(identity)  # fresh key per request, as ztunnel
        async with self._semaphore:
            request = self._ca.sign(identity, csr_pem, self._ttl)
            if self._request_timeout is None:
                chain = await request
            else:
                chain = await asyncio.wait_for(request, self._request_timeout)
        return certificate_from_chain(identity, key_pem, chain)

    async def _run(self, entry: _Entry) -> None:
        backoff = self._initial_backoff
        try:
            while True:
                entry.in_flight = True
                entry.last_attempt = self._clock()
                error: str | None = None
                cert: WorkloadCertificate | None = None
                try:
                    cert = await self._fetch(entry.identity)
                except asyncio.CancelledError:
                    raise
                except TimeoutError:
                    error = f"CA request timed out after {self._request_timeout} s"
                except Exception as err:  # any CA/chain failure is retried
                    error = f"{type(err).__name__}: {err}"
                finally:
                    entry.in_flight = False
                now = self._clock()
                if cert is not None:
                    delay = self._installed(entry, cert, now)
                    backoff = self._initial_backoff
                else:
                    assert error is not None
                    delay = self._failed(entry, error, self._step(backoff), now)
                    backoff = min(backoff * 2, self._max_backoff)
                entry.next_attempt = now + timedelta(seconds=delay)
                self._attempt_done(entry)
                await self._pause(entry, delay)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug: fail closed and visibly rather than hang waiters
            log.exception("certificate task for %s crashed", entry.identity)
            entry.cert = None
            entry.state = CertState.UNAVAILABLE
            entry.last_error = f"internal error: {err!r}"
            self._attempt_done(entry)

    def _installed(self, entry: _Entry, cert: WorkloadCertificate, now: datetime) -> float:
        entry.cert = cert
        entry.state = CertState.AVAILABLE
        entry.last_error = None
        entry.failures = 0
        log.info(
            "certificate for %s issued: serial %#x, valid %s .. %s",
            entry.identity,
            cert.serial,
            cert.not_before.isoformat(),
            cert.not_after.isoformat(),
        )
        for callback in list(self._subscribers):
            try:
                callback(cert)
            except Exception:
                log.exception("certificate subscriber failed for %s", entry.identity)
        delay = (cert.refresh_at() - now).total_seconds()
        # A CA handing out already half-used (or future) certificates must not make us spin.
        return delay if delay > 0 else self._initial_backoff

    def _failed(self, entry: _Entry, error: str, step: float, now: datetime) -> float:
        entry.failures += 1
        entry.last_error = error
        cert = entry.cert
        if cert is not None and cert.is_valid(now):
            # Keep serving the valid certificate; never sleep past its expiry.
            remaining = (cert.not_after - now).total_seconds()
            log.warning(
                "renewing %s failed (%s); keeping serial %#x (%.0f s left), retry in %.1f s",
                entry.identity,
                error,
                cert.serial,
                remaining,
                min(step, remaining),
            )
            return min(step, remaining)
        if cert is not None:
            log.error("certificate for %s expired and cannot be renewed: %s", entry.identity, error)
        else:
            log.warning("fetching certificate for %s failed: %s", entry.identity, error)
        entry.cert = None  # fail closed
        entry.state = CertState.UNAVAILABLE
        return step

    def _attempt_done(self, entry: _Entry) -> None:
        done, entry.next_result = entry.next_result, asyncio.get_running_loop().create_future()
        if not done.done():
            done.set_result(None)

    async def _pause(self, entry: _Entry, delay: float) -> None:
        """Sleep ``delay`` seconds on the injected clock, or less if ``get`` asks for a retry."""
        entry.wake.clear()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        waker = asyncio.ensure_future(entry.wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()
        entry.wake.clear()


__all__ = ["CertState", "CertificateManager", "CertificateUnavailable"]

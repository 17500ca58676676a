"""Fake time for certificate-manager tests: a settable clock and a sleep that only ``advance`` ends."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import datetime, timedelta


class FakeTime:
    """``now()`` and ``sleep()`` for injection; ``advance()`` moves time and wakes due sleepers in order."""

    def __init__(self, start: datetime) -> None:
        self.current = start
        self.sleeps: list[float] = []  # every delay requested, in order
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self.current

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._sleepers, (self.current + timedelta(seconds=delay), next(self._seq), fut)
        )
        await fut

    async def settle(self) -> None:
        """Let every runnable task run until it blocks (bounded)."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move the clock forward, waking each sleeper at its own deadline."""
        await self.settle()
        target = self.current + timedelta(seconds=seconds)
        for _ in range(10_000):  # bounded: each iteration wakes one sleeper
            while self._sleepers and self._sleepers[0][2].done():
                heapq.heappop(self._sleepers)  # cancelled (woken early)
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            when, _, fut = heapq.heappop(self._sleepers)
            self.current = max(self.current, when)
            fut.set_result(None)
            await self.settle()
        self.current = target
        await self.settle()

    def pending(self) -> list[float]:
        """Seconds from now until each live sleeper wakes."""
        return sorted(
            (when - self.current).total_seconds()
            for when, _, fut in self._sleepers
            if not fut.done()
        )

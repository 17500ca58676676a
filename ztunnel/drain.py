"""Graceful drain: stop accepting at once, let in-flight connections finish, then close them.

Owns the shutdown sequence of Istio's ztunnel (ztunnel.md section 9): on SIGTERM, SIGINT or
``/quitquitquit`` every listener closes immediately; HBONE servers send GOAWAY so peers open no new
streams; connections already in flight get until the deadline to finish on their own; what is left is
then closed cleanly (TLS close and RST_STREAM go out, unlike a kill). A second trigger while draining
does not restart the clock.

The drain runs the phases through callbacks registered by the proxies; it knows nothing about sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 5.0

StopAccepting = Callable[[], Awaitable[None]]
ForceClose = Callable[[], Awaitable[None]]


class Drain:
    """Coordinates one ztunnel's shutdown; ``deadline`` in seconds (Istio's default 5 s)."""

    def __init__(self, *, deadline: float = DEFAULT_DEADLINE) -> None:
        if deadline < 0:
            raise ValueError(f"drain deadline must be >= 0 seconds, got {deadline}")
        self.deadline = deadline
        self.triggered = asyncio.Event()
        self.finished = asyncio.Event()
        self.reason: str | None = None
        self._stop_accepting: list[StopAccepting] = []
        self._force_close: list[ForceClose] = []
        self._inflight: set[asyncio.Task[object]] = set()
        self.forced = 0  # tasks still running at the deadline
        self.duration: float | None = None

    # -- registration ------------------------------------------------------------------------

    def on_stop_accepting(self, callback: StopAccepting) -> None:
        """Called first: close listeners, send GOAWAY."""
        self._stop_accepting.append(callback)

    def on_force_close(self, callback: ForceClose) -> None:
        """Called at the deadline: close whatever is still open."""
        self._force_close.append(callback)

    def track(self, task: asyncio.Task[object]) -> None:
        """A connection task the drain waits for."""
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def draining(self) -> bool:
        return self.triggered.is_set()

    # -- the sequence ------------------------------------------------------------------------

    def trigger(self, reason: str) -> None:
        """Start draining (idempotent); ``run`` does the work."""
        if not self.triggered.is_set():
            self.reason = reason
            log.info("drain started: %s (deadline %.1fs)", reason, self.deadline)
            self.triggered.set()

    async def run(self) -> None:
        """Wait for the trigger, then drain; returns once everything is closed."""
        await self.triggered.wait()
        started = time.monotonic()
        for stop in self._stop_accepting:
            try:
                await stop()
            except Exception:
                log.exception("stop-accepting callback failed")
        pending = set(self._inflight)
        if pending:
            _, still = await asyncio.wait(pending, timeout=self.deadline)
            self.forced = len(still)
            if still:
                log.warning(
                    "drain deadline (%.1fs) reached, closing %d connections",
                    self.deadline,
                    len(still),
                )
                for close in self._force_close:
                    try:
                        await close()
                    except Exception:
                        log.exception("force-close callback failed")
                for task in still:
                    task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*still, return_exceptions=True), timeout=2.0
                    )
        self.duration = time.monotonic() - started
        log.info("drain finished in %.2fs", self.duration)
        self.finished.set()

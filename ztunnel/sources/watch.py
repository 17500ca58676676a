"""Keeps the store in step with the local config file: load at start, reload when the file changes.

The file is polled (inode, device, size and mtime; no inotify dependency, and it also catches an
editor's write-and-rename). A changed file is parsed off the event loop; a valid one replaces the
store's content atomically, an invalid one is rejected and the previous configuration stays in force,
with the error logged and counted (``reloads_ok``, ``reloads_failed``, ``last_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ztunnel.sources.localfile import LocalConfig, LocalConfigError, load_local_config
from ztunnel.state.store import StoreError, WorkloadStore

log = logging.getLogger(__name__)

_Signature = tuple[int, int, int, int] | None


def _signature(path: Path) -> _Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class LocalConfigWatcher:
    """Applies ``path`` to ``store`` and keeps applying its changes until ``stop()``."""

    def __init__(
        self,
        path: str | Path,
        store: WorkloadStore,
        *,
        interval: float = 0.2,
        on_applied: Callable[[LocalConfig], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.interval = interval
        self.on_applied = on_applied
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_error: str | None = None
        self.config: LocalConfig | None = None  # the configuration in force
        self._seen: _Signature = None
        self._task: asyncio.Task[None] | None = None

    def load_initial(self) -> LocalConfig:
        """Load and apply the file once; raises LocalConfigError (start-up must fail loudly)."""
        self._seen = _signature(self.path)
        config = load_local_config(self.path)
        self._apply(config)
        return config

    async def check_once(self) -> bool | None:
        """Reload if the file changed: True = applied, False = rejected, None = unchanged."""
        current = _signature(self.path)
        if current == self._seen:
            return None
        self._seen = current
        try:
            config = await asyncio.to_thread(load_local_config, self.path)
            self._apply(config)
        except (LocalConfigError, StoreError) as err:
            self.reloads_failed += 1
            self.last_error = str(err)
            log.error("local config %s rejected, keeping the previous one: %s", self.path, err)
            return False
        self.reloads_ok += 1
        self.last_error = None
        log.info(
            "local config %s reloaded: %d workloads, %d services, %d policies",
            self.path,
            len(config.workloads),
            len(config.services),
            len(config.policies),
        )
        return True

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check_once()
            except Exception:  # keep watching whatever happened to one reload
                log.exception("local config watcher failed on %s", self.path)

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"config-watch:{self.path}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _apply(self, config: LocalConfig) -> None:
        for warning in config.warnings:
            log.warning("%s", warning)
        self.store.replace_all(config.workloads, config.services, config.policies)
        self.config = config
        if self.on_applied is not None:
            self.on_applied(config)

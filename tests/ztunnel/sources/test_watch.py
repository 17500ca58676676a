"""The file watcher: a bad reload keeps the old config in force and is counted; a good one applies."""

from __future__ import annotations

import asyncio
import os

import pytest

from ztunnel.sources.localfile import LocalConfigError
from ztunnel.sources.watch import LocalConfigWatcher
from ztunnel.state.store import WorkloadStore

GOOD_1 = "workloads:\n- {name: a, namespace: default, workloadIps: ['10.0.0.1'], protocol: HBONE}\n"
GOOD_2 = "workloads:\n- {name: b, namespace: default, workloadIps: ['10.0.0.2'], protocol: HBONE}\n"
BAD = "workloads:\n- {name: c, namespace: default, workloadIps: ['10.0.0.300']}\n"


def write(path, text):
    # Write-and-rename, as editors and config managers do; also changes the inode.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def names(store):
    return sorted(w.name for w in store.workloads())


async def test_reload_keeps_old_config_on_error_and_applies_good(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(GOOD_1)
    store = WorkloadStore()
    watcher = LocalConfigWatcher(path, store, interval=0.01)
    watcher.load_initial()
    assert names(store) == ["a"]
    assert await watcher.check_once() is None

    write(path, BAD)
    assert await watcher.check_once() is False
    assert names(store) == ["a"]
    assert watcher.reloads_failed == 1
    assert "workloadIps[0]" in (watcher.last_error or "")
    assert await watcher.check_once() is None, "the same bad file is not re-counted"

    path.unlink()
    assert await watcher.check_once() is False
    assert names(store) == ["a"]
    assert "cannot read" in (watcher.last_error or "")

    write(path, GOOD_2)
    assert await watcher.check_once() is True
    assert names(store) == ["b"]
    assert (watcher.reloads_ok, watcher.reloads_failed, watcher.last_error) == (1, 2, None)


async def test_background_polling_applies_changes(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(GOOD_1)
    store = WorkloadStore()
    changed = asyncio.Event()
    store.subscribe(lambda change: changed.set())
    watcher = LocalConfigWatcher(path, store, interval=0.01)
    watcher.load_initial()
    changed.clear()
    watcher.start()
    try:
        write(path, GOOD_2)
        await asyncio.wait_for(changed.wait(), timeout=5)
        assert names(store) == ["b"]
    finally:
        await watcher.stop()


def test_initial_load_fails_loudly(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(BAD)
    store = WorkloadStore()
    with pytest.raises(LocalConfigError, match=r"cfg\.yaml: workloads"):
        LocalConfigWatcher(path, store).load_initial()
    assert store.version == 0

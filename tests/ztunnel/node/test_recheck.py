"""The node agent's periodic recheck: drift repaired and counted, recreated netns restarts the pod,
no two rechecks at once (fake rules, proxies and netns ids; no root)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from netfilter import InpodConfig, NetfilterError
from tests.ztunnel.node.test_agent import FakeRules, make, until, wl
from ztunnel.cli import DEFAULT_RECHECK_INTERVAL as CLI_DEFAULT
from ztunnel.cli import _parser
from ztunnel.metrics import Metrics
from ztunnel.node.agent import DEFAULT_RECHECK_INTERVAL, NodeAgent
from ztunnel.state.store import WorkloadStore

A = "Kubernetes//Pod/demo/a"
B = "Kubernetes//Pod/demo/b"


class VerifyingRules(FakeRules):
    """FakeRules with a read-only ``verify`` and a hand that can delete rules (``drift``)."""

    def __init__(self) -> None:
        super().__init__()
        self.verified: list[str] = []
        self.broken: set[str] = set()
        self.verify_error: Exception | None = None

    def drift(self, netns: str) -> None:
        self.broken.add(netns)

    def verify(self, netns: str, cfg: InpodConfig) -> list[str]:
        self.verified.append(netns)
        if self.verify_error is not None:
            raise self.verify_error
        if netns not in self.programmed:
            return ["all rules missing"]
        return ["missing rule in chain ISTIO_PRERT"] if netns in self.broken else []

    def program(self, netns: str, cfg: InpodConfig) -> list[str]:
        self.log.append(("program", netns))
        if netns in self.broken:
            self.broken.discard(netns)
            return ["missing rule in chain ISTIO_PRERT"]
        if netns in self.programmed:
            return []
        self.programmed.add(netns)
        return ["missing rules"]


def agent_with(store: WorkloadStore, ids: dict, rules: FakeRules, **kw):
    agent, proxies, *_ = make(store, ids, recheck_interval=0, **kw)
    agent.rules = rules
    return agent, proxies


async def test_drifted_rules_are_repaired_and_counted(caplog) -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])
    rules = VerifyingRules()
    agent, proxies = agent_with(store, {}, rules)
    await agent.start()
    try:
        writes = len(rules.log)
        clean = await agent.recheck()
        assert clean.checked == (A, B)
        assert clean.repaired == ()
        assert len(rules.log) == writes  # intact rules: verify only, nothing written
        rules.drift("/run/netns/b")
        with caplog.at_level("WARNING", logger="ztunnel.node.agent"):
            result = await agent.recheck()
        assert result.repaired == (B,)
        assert rules.log[writes:] == [("program", "/run/netns/b")]
        assert "missing rule in chain ISTIO_PRERT" in caplog.text  # what drifted is logged
        counters = agent.counters()
        assert counters["rules_repaired_total"] == 1
        assert counters["rechecks_total"] == 2
        assert proxies.log == [("start", "a"), ("start", "b")]  # no restart for drift
    finally:
        await agent.stop()


async def test_repair_count_reaches_metrics() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    rules = VerifyingRules()
    agent, _ = agent_with(store, {}, rules)
    metrics = Metrics()
    metrics.watch_workload_manager(agent.counters)
    await agent.start()
    try:
        rules.drift("/run/netns/a")
        await agent.recheck()
        assert metrics.value("workload_manager_rules_repaired_total") == 1
        assert metrics.value("workload_manager_rechecks_total") == 1
    finally:
        await agent.stop()


async def test_without_verify_the_recheck_programs_idempotently() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, _ = agent_with(store, {}, FakeRules())
    await agent.start()
    try:
        result = await agent.recheck()
        assert result.checked == (A,)
        assert result.repaired == ()
        assert agent.stats.rules_repaired == 0
    finally:
        await agent.stop()


async def test_recreated_netns_restarts_the_pod() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])
    ids: dict[str, tuple[int, int] | None] = {"/run/netns/a": (1, 100), "/run/netns/b": (1, 200)}
    agent, proxies = agent_with(store, ids, VerifyingRules())
    await agent.start()
    try:
        ids["/run/netns/a"] = (1, 101)  # same path, new inode: the sandbox was recreated
        result = await agent.recheck()
        assert result.restarted == (A,)
        assert proxies.log == [("start", "a"), ("start", "b"), ("stop", "a"), ("start", "a")]
        assert agent.counters()["netns_changed_total"] == 1
        assert agent._pods[A].netns_id == (1, 101)
        assert agent.pods() == {A: True, B: True}
        assert (await agent.recheck()).restarted == ()  # settled
    finally:
        await agent.stop()


async def test_missing_netns_or_netfilter_error_is_a_failure_not_a_crash() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])
    ids: dict[str, tuple[int, int] | None] = {"/run/netns/a": (1, 100), "/run/netns/b": (1, 200)}
    rules = VerifyingRules()
    agent, _ = agent_with(store, ids, rules)
    await agent.start()
    try:
        ids["/run/netns/a"] = None
        rules.verify_error = NetfilterError("nft: boom")
        result = await agent.recheck()
        assert result.failed == (A, B)
        assert agent.counters()["recheck_failures_total"] == 2
        assert "nft: boom" in agent.stats.last_error
        assert agent.pods() == {A: True, B: True}
    finally:
        await agent.stop()


class SlowRules(VerifyingRules):
    """verify blocks (in its worker thread) until released; records how many run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0
        self.entered = threading.Event()
        self._mu = threading.Lock()

    def verify(self, netns: str, cfg: InpodConfig) -> list[str]:
        with self._mu:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            self.release.wait(timeout=5)
            return super().verify(netns, cfg)
        finally:
            with self._mu:
                self.active -= 1


async def test_rechecks_do_not_overlap() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])
    rules = SlowRules()
    agent, _ = agent_with(store, {}, rules)
    await agent.start()
    try:
        first = asyncio.create_task(agent.recheck())
        await asyncio.to_thread(rules.entered.wait, 5)
        second = await agent.recheck()  # while the first one runs
        assert second.skipped
        assert second.checked == ()
        # The event loop stays free while a pod is verified in its thread.
        assert agent.pods() == {A: True, B: True}
        rules.release.set()
        done = await asyncio.wait_for(first, 5)
        assert done.checked == (A, B)
        assert rules.max_active == 1  # one pod at a time
        assert agent.stats.rechecks == 1
        assert agent.stats.rechecks_skipped == 1
    finally:
        rules.release.set()
        await agent.stop()


async def test_periodic_recheck_runs_on_its_own() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    rules = VerifyingRules()
    agent, _, _, _, _ = make(store, {}, recheck_interval=0.02)
    agent.rules = rules
    await agent.start()
    try:
        rules.drift("/run/netns/a")
        await until(lambda: agent.stats.rules_repaired == 1, "drift repaired by the timer")
        assert "/run/netns/a" not in rules.broken
    finally:
        await agent.stop()
    assert agent._recheck_task is None


def test_recheck_interval_flag_and_defaults() -> None:
    assert CLI_DEFAULT == DEFAULT_RECHECK_INTERVAL == 30.0
    args = _parser().parse_args(["run", "--recheck-interval", "0.5"])
    assert args.recheck_interval == 0.5
    assert _parser().parse_args(["run"]).recheck_interval == 30.0
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--recheck-interval", "-1"])
    with pytest.raises(ValueError, match="recheck_interval"):
        NodeAgent(node="n1", store=WorkloadStore(), proxies=None, recheck_interval=-1)

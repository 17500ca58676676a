"""The node agent shell with fake proxies, rules and netns ids (no root, no sockets)."""

from __future__ import annotations

import asyncio

from netfilter import InpodConfig, NetfilterError
from ztunnel.node.agent import READINESS_TASK, NodeAgent
from ztunnel.proxy.socket_factory import DefaultSocketFactory
from ztunnel.readiness import Readiness
from ztunnel.state.model import TunnelProtocol, Workload
from ztunnel.state.store import WorkloadStore


def wl(name: str, *, sa: str = "default", node: str = "n1") -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/demo/{name}",
        name=name,
        namespace="demo",
        node=node,
        netns=f"/run/netns/{name}",
        service_account=sa,
        tunnel_protocol=TunnelProtocol.HBONE,
    )


class FakeProxies:
    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.fail: set[str] = set()

    async def start_pod(self, workload, sockets) -> None:
        if workload.name in self.fail:
            raise OSError(98, "address in use")
        self.log.append(("start", workload.name))

    async def stop_pod(self, uid: str) -> None:
        self.log.append(("stop", uid.rsplit("/", 1)[-1]))


class FakeRules:
    def __init__(self) -> None:
        self.programmed: set[str] = set()
        self.log: list[tuple[str, str]] = []

    def program(self, netns: str, cfg: InpodConfig) -> list[str]:
        self.log.append(("program", netns))
        if netns in self.programmed:
            return []
        self.programmed.add(netns)
        return ["missing rules"]

    def unprogram(self, netns: str, cfg: InpodConfig) -> list[str]:
        self.log.append(("unprogram", netns))
        if netns not in self.programmed:
            raise NetfilterError("nothing there")
        self.programmed.discard(netns)
        return []


class FakeCerts:
    def __init__(self) -> None:
        self.prefetched: list[str] = []

    def prefetch(self, identity) -> None:
        self.prefetched.append(str(identity))


def make(store: WorkloadStore, ids: dict[str, tuple[int, int] | None], **kw):
    proxies, rules, certs, ready = FakeProxies(), FakeRules(), FakeCerts(), Readiness()
    agent = NodeAgent(
        node="n1",
        store=store,
        proxies=proxies,
        rules=rules,
        certs=certs,
        readiness=ready,
        retry_interval=0.05,
        socket_factory=lambda path: DefaultSocketFactory(),
        netns_id_of=lambda path: ids.get(path, (1, hash(path) & 0xFFFF)),
        **kw,
    )
    return agent, proxies, rules, certs, ready


async def test_start_programs_rules_then_listeners_and_becomes_ready() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b"), wl("c", node="n2")], [], [])
    agent, proxies, rules, certs, ready = make(store, {})
    assert not ready.ready
    await agent.start()
    try:
        assert sorted(proxies.log) == [("start", "a"), ("start", "b")]
        assert rules.programmed == {"/run/netns/a", "/run/netns/b"}
        assert certs.prefetched == ["spiffe://cluster.local/ns/demo/sa/default"] * 2
        assert ready.ready
        assert agent.snapshot()["counters"]["active_proxy_count"] == 2
    finally:
        await agent.stop()


async def test_pod_removed_drains_then_removes_rules() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])
    agent, proxies, rules, _, _ = make(store, {})
    await agent.start()
    store.replace_all([wl("a")], [], [])
    for _ in range(100):
        if ("stop", "b") in proxies.log and "/run/netns/b" not in rules.programmed:
            break
        await asyncio.sleep(0.01)
    assert ("stop", "b") in proxies.log
    assert rules.programmed == {"/run/netns/a"}
    await agent.stop()
    # Shutdown drains but keeps the rules (fail closed until the next ztunnel adopts the pod).
    assert ("stop", "a") in proxies.log
    assert rules.programmed == {"/run/netns/a"}


async def test_adopting_pods_with_rules_writes_nothing() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, _, rules, _, _ = make(store, {})
    rules.programmed.add("/run/netns/a")  # left by the previous ztunnel
    await agent.start()
    assert agent.stats.rules_changed == 0
    assert agent.pods() == {"Kubernetes//Pod/demo/a": True}
    await agent.stop()


async def test_failed_start_is_pending_blocks_readiness_and_is_retried() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, proxies, _, _, ready = make(store, {})
    proxies.fail.add("a")
    await agent.start()
    try:
        assert agent.pods() == {"Kubernetes//Pod/demo/a": False}
        assert READINESS_TASK in ready.pending()
        proxies.fail.clear()
        for _ in range(200):
            if agent.pods()["Kubernetes//Pod/demo/a"]:
                break
            await asyncio.sleep(0.01)
        assert agent.pods() == {"Kubernetes//Pod/demo/a": True}
        assert ready.ready
    finally:
        await agent.stop()


async def test_missing_netns_is_pending() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, proxies, rules, _, _ = make(store, {"/run/netns/a": None})
    await agent.start()
    try:
        assert agent.pods() == {"Kubernetes//Pod/demo/a": False}
        assert not proxies.log
        assert not rules.log
        assert (
            "does not exist" in agent.snapshot()["workloadState"]["Kubernetes//Pod/demo/a"]["error"]
        )
    finally:
        await agent.stop()


async def test_identity_change_restarts_pod() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, proxies, _, _, _ = make(store, {})
    await agent.start()
    store.replace_all([wl("a", sa="new")], [], [])
    for _ in range(100):
        if proxies.log.count(("start", "a")) == 2:
            break
        await asyncio.sleep(0.01)
    assert proxies.log == [("start", "a"), ("stop", "a"), ("start", "a")]
    await agent.stop()


class BlockingStop(FakeProxies):
    """stop_pod waits for ``release`` (a pod draining its connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def stop_pod(self, uid: str) -> None:
        self.log.append(("stop", uid.rsplit("/", 1)[-1]))
        await self.release.wait()
        self.log.append(("stopped", uid.rsplit("/", 1)[-1]))


async def until(predicate, what: str) -> None:
    for _ in range(300):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_a_draining_pod_does_not_hold_up_other_pods() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, _, rules, _, _ = make(store, {})
    proxies = BlockingStop()
    agent.proxies = proxies
    await agent.start()
    try:
        store.replace_all([wl("b")], [], [])  # a leaves (drains, blocked), b arrives
        await until(lambda: agent.pods() == {"Kubernetes//Pod/demo/b": True}, "b started")
        assert ("stop", "a") in proxies.log
        assert "/run/netns/a" in rules.programmed  # rules stay until the drain is over
        assert agent.snapshot()["counters"]["draining_proxy_count"] == 1
        proxies.release.set()
        await until(lambda: "/run/netns/a" not in rules.programmed, "a's rules removed")
        assert agent.snapshot()["counters"]["draining_proxy_count"] == 0
    finally:
        proxies.release.set()
        await agent.stop()


async def test_pod_back_in_its_netns_while_draining_keeps_its_rules() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a")], [], [])
    agent, _, rules, _, _ = make(store, {})
    proxies = BlockingStop()
    agent.proxies = proxies
    await agent.start()
    try:
        store.replace_all([], [], [])
        await until(lambda: ("stop", "a") in proxies.log, "a stopping")
        store.replace_all([wl("a")], [], [])
        await until(lambda: "Kubernetes//Pod/demo/a" in agent.pods(), "a back")
        await asyncio.sleep(0.05)
        # The new start waits for the old proxies of the same uid to be gone.
        assert proxies.log == [("start", "a"), ("stop", "a")]
        proxies.release.set()
        await until(lambda: agent.pods() == {"Kubernetes//Pod/demo/a": True}, "a up again")
        await agent.wait_removals()
        assert proxies.log == [("start", "a"), ("stop", "a"), ("stopped", "a"), ("start", "a")]
        assert rules.programmed == {"/run/netns/a"}
        assert ("unprogram", "/run/netns/a") not in rules.log
    finally:
        proxies.release.set()
        await agent.stop()


class Provider:
    def __init__(self) -> None:
        self.synced = False
        self.wanted: dict[str, Workload] = {}
        self.callbacks: list = []

    def pods(self, store, node):
        return dict(self.wanted)

    def subscribe(self, callback):
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback)


async def test_local_pods_provider_decides_and_holds_readiness_until_synced() -> None:
    store = WorkloadStore()
    store.replace_all([wl("a"), wl("b")], [], [])  # the store alone would enroll both
    provider = Provider()
    agent, proxies, _, _, ready = make(store, {}, local_pods=provider)
    await agent.start()
    try:
        assert proxies.log == []
        assert ready.pending() == {READINESS_TASK: "pod list not synced yet"}
        assert not agent.ready
        provider.wanted = {"Kubernetes//Pod/demo/b": wl("b")}
        provider.synced = True
        for callback in provider.callbacks:
            callback()
        await until(lambda: ready.ready, "ready")
        assert proxies.log == [("start", "b")]
        assert agent.ready
    finally:
        await agent.stop()
    assert provider.callbacks == []  # unsubscribed

"""In-pod placement without root: the app as the node agent's ``PodProxies``, with fake netns.

Each "pod netns" is a plain file (so the agent's netns ids are real dev/inode pairs and a missing or
recreated file behaves like a missing or recreated sandbox) and ``PodNetns`` stands in for the
socket factory that would create sockets inside it: ``[::]`` and ``127.0.0.1`` listeners are bound
on the pod's IP and upstream sockets get the pod's IP as source, as they would inside the pod. The
capture rules are a fake that records what is programmed. Real HBONE, TLS and TCP on 127.X.Y.0/24.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from netfilter import InpodConfig, NetfilterError
from ztunnel.app import App, AppError, Placement
from ztunnel.node.agent import READINESS_TASK
from ztunnel.proxy.socket_factory import LISTEN_BACKLOG, DefaultSocketFactory, Endpoint
from ztunnel.sources.localfile import parse_local_config
from ztunnel.state.model import IPAddress, Workload
from ztunnel.state.store import WorkloadStore

from ..app.harness import (
    Echo,
    SocksRefused,
    app_config,
    get,
    random_prefix,
    roundtrip,
    socks_connect,
    until,
)

CLIENT_UID = "Kubernetes//Pod/default/client"
SERVER_UID = "Kubernetes//Pod/default/server"


class PodNetns(DefaultSocketFactory):
    """A pod netns stand-in: wildcard and loopback listeners bind on the pod IP; upstream sockets
    leave from the pod IP."""

    def __init__(self, ip: IPAddress) -> None:
        super().__init__()
        self.ip = ip
        self.closed = False

    def listener(self, addr: Endpoint, *, backlog: int = LISTEN_BACKLOG) -> socket.socket:
        if addr.ip.is_unspecified or addr.ip.is_loopback:
            addr = Endpoint(self.ip, addr.port)
        return super().listener(addr, backlog=backlog)

    def upstream(
        self, family: socket.AddressFamily, *, source: IPAddress | None = None, spoof: bool = False
    ) -> socket.socket:
        if source is None and family == socket.AF_INET:
            source = self.ip
        return super().upstream(family, source=source, spoof=spoof)

    def close(self) -> None:
        self.closed = True


class FakeRules:
    """Capture rules per netns path, shared by every app of a test (they are the kernel's)."""

    def __init__(self) -> None:
        self.programmed: set[str] = set()
        self.writes: list[str] = []
        self.removed: list[str] = []

    def program(self, netns: str, cfg: InpodConfig) -> list[str]:
        if netns in self.programmed:
            return []  # verified live and right: nothing to write
        self.programmed.add(netns)
        self.writes.append(netns)
        return ["rules missing"]

    def unprogram(self, netns: str, cfg: InpodConfig) -> list[str]:
        if netns not in self.programmed:
            raise NetfilterError(f"{netns}: no rules")
        self.programmed.discard(netns)
        self.removed.append(netns)
        return []


def inpod_config_text(p: str, ns_dir: Path, *, server: bool = True, client: bool = True) -> str:
    pods = []
    if client:
        pods.append(
            f"""\
  - name: client
    namespace: default
    serviceAccount: client
    workloadIps: ["{p}.1"]
    protocol: HBONE
    node: node-a
    netns: {ns_dir}/client
"""
        )
    if server:
        pods.append(
            f"""\
  - name: server
    namespace: default
    serviceAccount: server
    workloadIps: ["{p}.2"]
    protocol: HBONE
    node: node-b
    netns: {ns_dir}/server
"""
        )
    return "workloads:\n" + "".join(pods) + "services: []\npolicies: []\n"


@dataclass
class Pods:
    tmp: Path
    prefix: str
    path: Path
    ns_dir: Path
    rules: FakeRules
    echo: Echo
    logs: list[str] = field(default_factory=list)
    apps: list[App] = field(default_factory=list)

    @property
    def client_ip(self) -> str:
        return f"{self.prefix}.1"

    @property
    def server_ip(self) -> str:
        return f"{self.prefix}.2"

    def netns(self, pod: str) -> str:
        return str(self.ns_dir / pod)

    def sockets(self, netns: str) -> PodNetns:
        ip = {"client": self.client_ip, "server": self.server_ip}[Path(netns).name]
        return PodNetns(ip=ipaddress.ip_address(ip))

    def write(self, text: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)

    async def app(self, node: str, *, wait_ready: bool = True, **overrides: object) -> App:
        values: dict[str, object] = {
            "placement": Placement.INPOD,
            "rules": self.rules,
            "pod_sockets": self.sockets,
            "pod_retry_interval": 0.05,
        }
        values.update(overrides)
        app = App(app_config(self.path, node, self.logs, **values))
        await app.start()
        self.apps.append(app)
        if wait_ready:
            await until(lambda: app.readiness.ready, 5, f"{node} ready")
        return app


@contextlib.asynccontextmanager
async def pods(
    tmp_path: Path, *, make_netns: tuple[str, ...] = ("client", "server")
) -> AsyncIterator[Pods]:
    prefix = random_prefix()
    ns_dir = tmp_path / "netns"
    ns_dir.mkdir()
    for name in make_netns:
        (ns_dir / name).touch()
    path = tmp_path / "config.yaml"
    path.write_text(inpod_config_text(prefix, ns_dir))
    echo = Echo(f"{prefix}.2", 8080)
    await echo.start()
    env = Pods(tmp_path, prefix, path, ns_dir, FakeRules(), echo)
    try:
        yield env
    finally:
        for app in env.apps:
            if not app._stopped.is_set():
                app.drain.deadline = 0.2
                await asyncio.wait_for(app.stop("test teardown"), 10)
        await echo.close()


async def test_inpod_programs_rules_opens_pod_listeners_and_carries_traffic(tmp_path):
    async with pods(tmp_path) as env:
        a = await env.app("node-a")
        b = await env.app("node-b")
        assert env.rules.programmed == {env.netns("client"), env.netns("server")}
        reader, writer = await socks_connect(env.client_ip, env.server_ip, 8080)
        assert await roundtrip(reader, writer, b"in-pod") == b"in-pod"
        # The app saw the client pod's address (the pod's own source, carried through HBONE).
        assert env.echo.peers[-1][0] == env.client_ip
        status, body = await get(b.url("admin") + "/config_dump")
        assert status == 200
        dump = json.loads(body)
        state = dump["workloadState"][SERVER_UID]
        assert state["state"] == "Up"
        assert state["netns"] == env.netns("server")
        assert state["error"] == ""
        assert f"{env.server_ip}:15008" in state["listeners"]
        assert list(dump["workloadState"]) == [SERVER_UID]  # the client is node-a's
        assert dump["nodeAgent"]["counters"]["active_proxy_count"] == 1
        assert dump["nodeAgent"]["counters"]["rules_changed_total"] == 1
        assert dump["config"]["placement"] == "inpod"
        assert b.metrics.value("workload_manager_active_proxy_count") == 1
        assert b.metrics.value("workload_manager_proxies_started_total") == 1
        status, text = await get(b.url("metrics") + "/metrics")
        assert "workload_manager_pending_proxy_count 0.0" in text
        assert a.config_dump()["workloadState"][CLIENT_UID]["state"] == "Up"
        writer.close()


async def test_removed_pod_stops_accepting_drains_then_loses_its_rules(tmp_path):
    async with pods(tmp_path) as env:
        a = await env.app("node-a")
        await env.app("node-b")
        reader, writer = await socks_connect(env.client_ip, env.server_ip, 8080)
        assert await roundtrip(reader, writer, b"before") == b"before"
        # The client pod leaves node-a's config: its listeners close at once, the outbound
        # connection in flight drains, then its rules go.
        env.write(inpod_config_text(env.prefix, env.ns_dir, client=False))
        await until(lambda: CLIENT_UID not in a.proxies, what="client pod stopped")
        with pytest.raises((SocksRefused, OSError)):
            await socks_connect(env.client_ip, env.server_ip, 8080)
        assert env.netns("client") in env.rules.programmed  # still draining
        assert a.config_dump()["nodeAgent"]["counters"]["draining_proxy_count"] == 1
        assert await roundtrip(reader, writer, b"during drain") == b"during drain"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await until(lambda: env.netns("client") not in env.rules.programmed, what="rules removed")
        assert env.rules.removed == [env.netns("client")]
        assert a.config_dump()["workloadState"] == {}
        assert a.config_dump()["nodeAgent"]["counters"]["draining_proxy_count"] == 0


async def test_pending_pod_blocks_readiness_and_is_retried_when_its_netns_appears(tmp_path):
    async with pods(tmp_path, make_netns=("client",)) as env:
        b = await env.app("node-b", wait_ready=False)
        await until(lambda: "config" not in b.readiness.pending(), what="config loaded")
        assert not b.readiness.ready
        assert b.readiness.pending()[READINESS_TASK] == f"pending: {SERVER_UID}"
        state = b.config_dump()["workloadState"][SERVER_UID]
        assert state["state"] == "Pending"
        assert "does not exist" in state["error"]
        assert state["listeners"] == []
        assert b.metrics.value("workload_manager_pending_proxy_count") == 1
        status, text = await get(b.url("readiness") + "/healthz/ready")
        assert status == 500
        assert READINESS_TASK in text
        (env.ns_dir / "server").touch()  # the sandbox appears
        await until(lambda: b.readiness.ready, 5, "ready after retry")
        assert b.config_dump()["workloadState"][SERVER_UID]["state"] == "Up"
        assert env.netns("server") in env.rules.programmed


async def test_restarted_ztunnel_adopts_pods_beside_the_old_one(tmp_path):
    async with pods(tmp_path) as env:
        await env.app("node-a")
        old = await env.app("node-b")
        writes = list(env.rules.writes)
        # The new process binds beside the old one (SO_REUSEPORT) and adopts: nothing rewritten.
        new = await env.app("node-b")
        assert env.rules.writes == writes
        assert new.agent is not None
        assert new.agent.stats.rules_changed == 0
        assert new.config_dump()["workloadState"][SERVER_UID]["state"] == "Up"
        await asyncio.wait_for(old.stop("replaced"), 10)
        assert env.netns("server") in env.rules.programmed  # shutdown keeps the rules
        for n in range(3):
            reader, writer = await socks_connect(env.client_ip, env.server_ip, 8080)
            assert await roundtrip(reader, writer, b"x%d" % n) == b"x%d" % n
            writer.close()
        assert any("server" in line and "inbound" in line for line in env.logs)


async def test_netns_recreated_restarts_the_pod(tmp_path):
    async with pods(tmp_path) as env:
        b = await env.app("node-b")
        first = b.proxies[SERVER_UID]
        (env.ns_dir / "server.new").touch()
        (env.ns_dir / "server.new").rename(env.ns_dir / "server")  # new inode, same path
        # A store change makes the agent look again (in Kubernetes the pod watcher would).
        env.write(inpod_config_text(env.prefix, env.ns_dir, client=False))
        await until(lambda: b.proxies.get(SERVER_UID) not in (None, first), what="pod restarted")
        assert first.state == "Down"
        assert b.config_dump()["workloadState"][SERVER_UID]["state"] == "Up"


# --- the configuration-source seam ----------------------------------------------------------------


class MemorySource:
    """A ConfigSource test double: fills the store when told, ready after the first publish."""

    kind = "memory"
    node = None

    def __init__(self) -> None:
        self.store: WorkloadStore | None = None
        self.on_rejected: Callable[[str], None] | None = None
        self.ready = asyncio.Event()
        self.stopped = False

    async def start(self, store: WorkloadStore, on_rejected: Callable[[str], None]) -> None:
        self.store, self.on_rejected = store, on_rejected

    def publish(self, text: str) -> None:
        assert self.store is not None
        cfg = parse_local_config(text, source="memory")
        self.store.replace_all(cfg.workloads, cfg.services, cfg.policies)
        self.ready.set()

    async def wait_ready(self) -> None:
        await self.ready.wait()

    async def stop(self) -> None:
        self.stopped = True

    def describe(self) -> dict[str, object]:
        return {"source": "memory", "published": self.ready.is_set()}


class SeenPods:
    """A LocalPods test double: enrolls only the store's pods it has "seen" on the node."""

    def __init__(self) -> None:
        self.synced = False
        self.seen: dict[str, str] = {}  # pod name -> netns path
        self._callbacks: list[Callable[[], None]] = []

    def pods(self, store: WorkloadStore, node: str) -> Mapping[str, Workload]:
        return {
            w.uid: replace(w, netns=self.seen[w.name])
            for w in store.workloads()
            if w.node == node and w.name in self.seen
        }

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback)

    def see(self, name: str, netns: str) -> None:
        self.seen[name] = netns
        self.synced = True
        for callback in list(self._callbacks):
            callback()


async def test_injected_source_and_local_pods_drive_the_agent_and_readiness(tmp_path):
    async with pods(tmp_path) as env:
        source, seen = MemorySource(), SeenPods()
        b = await env.app(
            "node-b", wait_ready=False, source=source, config_path=None, local_pods=seen
        )
        assert set(b.readiness.pending()) == {"config", READINESS_TASK}
        assert b.readiness.pending()[READINESS_TASK] == "pod list not synced yet"
        # The netns is not in the published config: the provider supplies it.
        source.publish(env.path.read_text().replace(f"netns: {env.netns('server')}", ""))
        await until(lambda: "config" not in b.readiness.pending(), what="config ready")
        assert not b.readiness.ready
        assert b.proxies == {}
        seen.see("server", env.netns("server"))
        await until(lambda: b.readiness.ready, 5, "ready")
        assert b.config_dump()["workloadState"][SERVER_UID]["state"] == "Up"
        assert b.config_dump()["config"]["kind"] == "memory"
        assert source.on_rejected is not None
        source.on_rejected("bad push")
        assert b.metrics.config_reload_failures.labels(source="memory")._value.get() == 1
        await asyncio.wait_for(b.stop(), 10)
        assert source.stopped


def test_no_config_and_no_source_is_a_clear_error(tmp_path):
    with pytest.raises(AppError, match="no configuration"):
        App(app_config(None, "n", [], placement=Placement.INPOD))  # type: ignore[arg-type]

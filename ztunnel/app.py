"""The ztunnel process: composition root of store, sources, certificates, proxies and operations.

Owns start-up order, the per-workload proxies and shutdown:

1. metrics (15020), readiness (15021, not ready yet) and admin (127.0.0.1:15000) servers start first,
   so "not ready, pending: config" is observable;
2. the configuration source starts filling the store: by default the local config file
   (``LocalFileSource``: a bad file is fatal at start; it is then watched, and a rejected reload
   keeps the old configuration in force and is counted, ``istio_config_reload_failures_total``);
   an injected ``AppConfig.source`` (e.g. xDS) stands in for it. Readiness waits for the source's
   first complete configuration;
3. for every local workload a ``WorkloadProxy`` opens outbound 15001, inbound HBONE 15008, inbound
   plaintext 15006 and optionally SOCKS5 15080. The placement decides how:

   * ``inpod``: the app is the ``PodProxies`` of a ``ztunnel.node.agent.NodeAgent``, which, per pod
     of this node (``AppConfig.local_pods``; default: store workloads on this node with a netns),
     programs the capture rules, then has the app open the listeners on ``[::]`` inside the pod's
     netns (``NetnsSocketFactory``: SO_MARK 0x539, SO_REUSEPORT, so a restarted ztunnel binds
     beside the old one and adopts the pod). Failed starts stay pending, are retried and block
     readiness; a removed pod is drained, then loses its rules;
   * ``loopback``: listeners on the workload's own IP in the current netns (tests, dedicated
     mode), reconciled by the app itself, no rules.

   Each workload's certificate is prefetched; readiness waits for it;
4. store changes update the proxies (new attributes, new pods, gone pods) and re-check live
   connections against policy (the tracker);
5. SIGTERM / SIGINT / ``/quitquitquit`` drain: listeners close at once, HBONE servers GOAWAY,
   in-flight connections get until the deadline, then everything is closed cleanly. In-pod rules
   stay (a pod without ztunnel fails closed until the next ztunnel adopts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from netfilter import InpodConfig
from ztunnel import config as zc
from ztunnel.accesslog import AccessLog, LogFormat
from ztunnel.admin import Admin, serialize
from ztunnel.drain import DEFAULT_DEADLINE, Drain
from ztunnel.hbone.guard import DEFAULT_LISTENER_LIMITS, ListenerLimits
from ztunnel.identity import tls
from ztunnel.identity.ca import CaClient, LocalCa, LocalCaClient
from ztunnel.identity.manager import CertificateManager, CertificateUnavailable
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.metrics import Metrics, Reporter
from ztunnel.node.agent import DEFAULT_RECHECK_INTERVAL, LocalPods, NodeAgent, RuleProgrammer
from ztunnel.proxy.connections import ConnectionTracker, ProxyContext, TrackedConnection
from ztunnel.proxy.hbone_server import HboneServer
from ztunnel.proxy.inbound import InboundHbone
from ztunnel.proxy.outbound import Listener, Outbound
from ztunnel.proxy.plaintext import InboundPlaintext, OriginalDst
from ztunnel.proxy.pool import HbonePool, PoolKey
from ztunnel.proxy.socket_factory import (
    DefaultSocketFactory,
    Endpoint,
    SocketFactory,
    family_of,
    local_endpoint,
    original_destination,
)
from ztunnel.proxy.socks5 import Socks5
from ztunnel.readiness import Readiness
from ztunnel.sources.watch import LocalConfigWatcher
from ztunnel.state.authz import Verdict
from ztunnel.state.model import IPAddress, Workload
from ztunnel.state.store import StoreChange, WorkloadStore

log = logging.getLogger(__name__)


class Placement(enum.Enum):
    INPOD = "inpod"  # listeners inside each pod's netns (needs root)
    LOOPBACK = "loopback"  # listeners on the workload IP in ztunnel's netns (tests, dedicated)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadPorts:
    outbound: int = zc.OUTBOUND_CAPTURE_PORT
    inbound: int = zc.INBOUND_HBONE_PORT
    plaintext: int = zc.INBOUND_PLAINTEXT_PORT
    socks5: int = zc.SOCKS5_PORT


class ConfigSource(Protocol):
    """Fills the app's ``WorkloadStore`` and says when its first complete configuration is in.

    ``LocalFileSource`` is the default; an xDS client (or anything else) fits the same protocol.
    Lifecycle: ``start`` once, ``wait_ready`` (may be awaited while the source keeps running),
    ``stop`` once at shutdown.
    """

    kind: str
    """Short name: the ``source`` label of ``istio_config_reload_failures_total`` ("local", "xds")."""

    @property
    def node(self) -> str | None:
        """This node's name if the source carries it (the local file's ``node:``), after start."""
        ...

    async def start(self, store: WorkloadStore, on_rejected: Callable[[str], None]) -> None:
        """Begin filling ``store``; may return before the first configuration is complete.

        Raise (any ``Exception``, with a message naming what and where) when start-up must fail,
        e.g. an invalid local file. Call ``on_rejected(reason)`` for every later update that was
        rejected while the previous configuration stays in force (the app counts and logs it).
        """
        ...

    async def wait_ready(self) -> None:
        """Return once the first complete configuration has been applied to the store."""
        ...

    async def stop(self) -> None:
        """Stop following updates (the store keeps what it has)."""
        ...

    def describe(self) -> dict[str, object]:
        """State for ``config_dump``'s ``config`` section (where from, reload counters, errors)."""
        ...


class LocalFileSource:
    """The local YAML file: loaded at start (errors are fatal), then polled for changes."""

    kind = "local"

    def __init__(self, path: Path, *, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval
        self.watcher: LocalConfigWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._node: str | None = None

    @property
    def node(self) -> str | None:
        return self._node

    async def start(self, store: WorkloadStore, on_rejected: Callable[[str], None]) -> None:
        self.watcher = watcher = LocalConfigWatcher(self.path, store, interval=self.interval)
        loaded = await asyncio.to_thread(watcher.load_initial)
        self._node = loaded.node

        async def poll() -> None:
            while True:
                await asyncio.sleep(self.interval)
                try:
                    applied = await watcher.check_once()
                except Exception:  # keep watching whatever happened to one reload
                    log.exception("local config watch failed on %s", self.path)
                    continue
                if applied is False:
                    on_rejected(watcher.last_error or "rejected")

        self._task = asyncio.get_running_loop().create_task(poll(), name="config-watch")

    async def wait_ready(self) -> None:
        return  # start() applied the file or failed

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def describe(self) -> dict[str, object]:
        w = self.watcher
        return {
            "source": str(self.path),
            "reloads_ok": w.reloads_ok if w else 0,
            "reloads_failed": w.reloads_failed if w else 0,
            "last_error": w.last_error if w else None,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AppConfig:
    """Everything ``ztunnel run`` decides; ports of 0 pick a free one (tests).

    Configuration comes from ``source`` if given, else from the local file ``config_path``.
    In-pod seams (defaults in brackets): ``local_pods`` decides which pods this node serves [store
    workloads on this node with a netns]; ``rules`` programs their capture [``netfilter``];
    ``pod_sockets`` makes a pod's socket factory from its netns path [``NetnsSocketFactory``].
    """

    config_path: Path | None = None
    source: ConfigSource | None = None
    local_pods: LocalPods | None = None
    node: str | None = None
    ca_dir: Path | None = None
    ca_address: str | None = None
    ca_client: CaClient | None = None  # injected (tests); wins over ca_dir / ca_address
    placement: Placement = Placement.LOOPBACK
    admin_host: str = "127.0.0.1"
    admin_port: int = zc.ADMIN_PORT
    metrics_host: str = "0.0.0.0"
    metrics_port: int = zc.METRICS_PORT
    readiness_host: str = "0.0.0.0"
    readiness_port: int = zc.READINESS_PORT
    log_format: LogFormat = LogFormat.TEXT
    drain_deadline: float = DEFAULT_DEADLINE
    socks5: bool = True
    reload_interval: float = 0.2
    connect_timeout: float = 10.0
    pool_idle_timeout: float = 300.0
    ports: WorkloadPorts = field(default_factory=WorkloadPorts)
    access_log_sink: Callable[[str], None] | None = None
    plaintext_original_dst: OriginalDst | None = None  # loopback tests: no capture, say where
    inpod: InpodConfig = field(default_factory=InpodConfig)
    pod_retry_interval: float = 5.0  # a pending pod is retried this often (Istio: 5 s)
    # Up pods' rules are verified (drift repaired) and netns identity checked this often; 0 = off.
    pod_recheck_interval: float = DEFAULT_RECHECK_INTERVAL
    rules: RuleProgrammer | None = None
    pod_sockets: Callable[[str], SocketFactory] | None = None
    # Connection caps of each pod's HBONE listener (global and per source identity).
    listener_limits: ListenerLimits = DEFAULT_LISTENER_LIMITS


class AppError(Exception):
    """Start-up failed; the message says what (config file, CA, a port in use)."""


class WorkloadProxy:
    """The listeners of one local workload and the handlers behind them.

    The socket factory belongs to the caller (in-pod: the node agent closes it with the pod).
    """

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        factory: SocketFactory,
        config: AppConfig,
    ) -> None:
        self.ctx = ctx
        self.workload = workload
        self.factory = factory
        self.config = config
        self.outbound = Outbound(ctx, workload, factory)
        self.inbound = InboundHbone(ctx, workload, factory)
        self.plaintext = InboundPlaintext(
            ctx,
            workload,
            factory,
            original_dst=config.plaintext_original_dst or original_destination,
        )
        self.socks5 = Socks5(self.outbound)
        self.listeners: list[Listener] = []
        self.servers: list[HboneServer] = []
        self._hbone_sockets: list[socket.socket] = []  # the servers' listeners, for describe()
        self.state = "Pending"

    def update(self, workload: Workload) -> None:
        """Same pod, new attributes (e.g. service membership): handlers see it from now on."""
        self.workload = workload
        self.outbound.workload = workload
        self.inbound.workload = workload
        self.plaintext.workload = workload

    def same_pod(self, workload: Workload) -> bool:
        """Can ``workload`` be served by these listeners (same addresses and identity)?"""
        return (
            self.workload.addresses == workload.addresses
            and self.workload.identity() == workload.identity()
        )

    def _hosts(self) -> list[IPAddress]:
        if self.config.placement is Placement.INPOD:
            return [ipaddress.IPv6Address("::")]
        return list(self.workload.addresses)

    async def start(self) -> None:
        ports = self.config.ports
        identity = self.workload.identity()
        certs = self.ctx.certs
        try:
            for host in self._hosts():
                self._listen(host, ports.outbound, self.outbound.handle_captured, "outbound")
                self._listen(host, ports.plaintext, self.plaintext.handle, "plaintext")
                if self.config.socks5:
                    # Istio: SOCKS5 on 127.0.0.1 in the pod; loopback mode: the workload IP.
                    socks_host = host
                    if self.config.placement is Placement.INPOD:
                        socks_host = ipaddress.IPv4Address("127.0.0.1")
                    self._listen(socks_host, ports.socks5, self.socks5.handle, "socks5")

                def server_context(identity: SpiffeId = identity) -> ssl.SSLContext:
                    cert = certs.cached(identity)
                    if cert is None:
                        raise CertificateUnavailable(identity, "no certificate yet")
                    return tls.server_context(cert)

                server = HboneServer(
                    ssl_context=server_context,
                    trust_domain=self.workload.trust_domain or zc.DEFAULT_TRUST_DOMAIN,
                    on_connect=self.inbound.on_connect,
                    on_tunnel_closed=self.inbound.on_closed,
                    listener_limits=self.config.listener_limits,
                )
                sock = self.factory.listener(Endpoint(host, ports.inbound))
                self._hbone_sockets.append(sock)
                await server.start(sock)
                self.servers.append(server)
        except BaseException:
            await self.close()
            raise
        self.state = "Up"

    def _listen(self, host: IPAddress, port: int, handler: Any, kind: str) -> None:
        sock = self.factory.listener(Endpoint(host, port))
        listener = Listener(self.ctx, sock, handler, f"{kind}:{self.workload.name}:{port}")
        listener.start()
        self.listeners.append(listener)

    def stop_accepting(self, deadline: float) -> list[asyncio.Task[None]]:
        """Drain step 1: listeners close now; HBONE servers GOAWAY and wait up to ``deadline``."""
        for listener in self.listeners:
            listener.stop_accepting()
        return [
            asyncio.get_running_loop().create_task(server.drain(deadline), name="hbone-drain")
            for server in self.servers
        ]

    async def drain(self, deadline: float) -> None:
        """Stop accepting now, let this workload's connections finish until ``deadline``, close."""
        if self.state == "Down":
            return
        self.state = "Draining"
        waits: list[asyncio.Task[Any]] = list(self.stop_accepting(deadline))
        waits += [task for listener in self.listeners for task in listener.connections]
        if waits:
            await asyncio.wait(waits, timeout=deadline)
        await self.close()

    async def close(self) -> None:
        """Close everything of this workload now (removal, or the end of a drain)."""
        self.state = "Down"
        for listener in self.listeners:
            await listener.close()
        for server in self.servers:
            await server.close()
        for sock in self._hbone_sockets:
            sock.close()  # a server that never started does not own its socket yet
        self.listeners.clear()
        self.servers.clear()
        self._hbone_sockets.clear()

    def describe(self) -> dict[str, object]:
        socks = [lst.sock for lst in self.listeners] + self._hbone_sockets
        return {
            "state": self.state,
            "workload": self.workload.uid,
            "listeners": sorted(str(local_endpoint(s)) for s in socks if s.fileno() >= 0),
        }


class App:
    """One ztunnel. ``await start()``, then ``await wait()`` (returns after a drain) or ``stop()``.

    In ``inpod`` placement it is also the ``PodProxies`` of its node agent (``start_pod``,
    ``stop_pod``).
    """

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.store = WorkloadStore()
        self.metrics = Metrics()
        self.metrics.watch_hbone_listeners(self._hbone_counters)
        self.readiness = Readiness()
        self.drain = Drain(deadline=config.drain_deadline)
        self.access_log = AccessLog(config.log_format, sink=config.access_log_sink)
        self.tracker = ConnectionTracker(self.store, on_late_deny=self._late_deny)
        self.certs = CertificateManager(self._ca_client())
        self.pool = HbonePool(
            client_context=self._client_context,
            connector=self._connect_hbone,
            idle_timeout=config.pool_idle_timeout,
            connect_timeout=config.connect_timeout,
        )
        illegal = set(zc.ILLEGAL_PORTS)
        if config.socks5:
            illegal.add(config.ports.socks5)
        self.ctx = ProxyContext(
            store=self.store,
            certs=self.certs,
            pool=self.pool,
            metrics=self.metrics,
            access_log=self.access_log,
            tracker=self.tracker,
            drain=self.drain,
            rng=random.Random(),
            loopback=config.placement is Placement.LOOPBACK,
            illegal_ports=frozenset(illegal),
            connect_timeout=config.connect_timeout,
        )
        self.source: ConfigSource = self._source()
        self.node: str | None = config.node
        self.agent: NodeAgent | None = None  # inpod placement, once started
        self.proxies: dict[str, WorkloadProxy] = {}
        self._draining: set[WorkloadProxy] = set()  # stopped pods finishing their connections
        self._by_ip: dict[IPAddress, WorkloadProxy] = {}
        self._runners: list[web.AppRunner] = []
        self.admin_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.readiness_address: tuple[str, int] | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._reconcile_wanted = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._stopped = asyncio.Event()
        self._wanted_identities: set[SpiffeId] = set()

    # -- wiring --------------------------------------------------------------------------------

    def _source(self) -> ConfigSource:
        c = self.config
        if c.source is not None:
            return c.source
        if c.config_path is None:
            raise AppError("no configuration: give --config FILE (or inject AppConfig.source)")
        return LocalFileSource(c.config_path, interval=c.reload_interval)

    def _ca_client(self) -> CaClient:
        c = self.config
        if c.ca_client is not None:
            return c.ca_client
        if c.ca_dir is not None:
            return LocalCaClient(LocalCa.load(c.ca_dir))
        if c.ca_address is not None:
            from ztunnel.identity.istio_ca import IstioCaClient

            return IstioCaClient(c.ca_address)
        raise AppError("no certificate authority: give --ca-dir or --ca-address")

    async def _client_context(self, identity: SpiffeId) -> ssl.SSLContext:
        # The pool asks before it dials: waits for a first issuance, raises CertificateUnavailable.
        return tls.client_context(await self.certs.get(identity))

    async def _connect_hbone(self, key: PoolKey) -> socket.socket:
        # In-pod: the source pod's factory, so the socket lives in its netns and carries the mark.
        proxy = self._by_ip.get(key.src_ip) if key.src_ip is not None else None
        factory: SocketFactory = proxy.factory if proxy is not None else DefaultSocketFactory()
        source = key.src_ip if self.ctx.loopback else None
        if source is not None and source.version != key.dst_ip.version:
            source = None
        sock = factory.upstream(family_of(key.dst_ip), source=source)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (str(key.dst_ip), key.dst_port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _late_deny(self, conn: TrackedConnection, verdict: Verdict) -> None:
        self.metrics.late_denials.labels(reporter=Reporter.DESTINATION.value).inc()
        if verdict.missing_policies:
            self.metrics.unknown_policy_denied(verdict.missing_policies)

    def _config_rejected(self, reason: str) -> None:
        log.error(
            "%s configuration update rejected, previous one stays: %s", self.source.kind, reason
        )
        self.metrics.config_reload_failed(self.source.kind)

    # -- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        inpod = c.placement is Placement.INPOD
        self.readiness.register("config", str(self.source.describe().get("source", "")))
        if not inpod:
            self.readiness.register("workload proxies")
        self.metrics_address = await self._serve(
            self.metrics.routes(), c.metrics_host, c.metrics_port
        )
        self.readiness_address = await self._serve(
            self.readiness.routes(), c.readiness_host, c.readiness_port
        )
        admin = Admin(dump=self.config_dump, quit=self.drain.trigger)
        self.admin_address = await self._serve(admin.routes(), c.admin_host, c.admin_port)
        try:
            await self.source.start(self.store, self._config_rejected)
        except Exception as err:
            await self._stop_servers()
            raise AppError(str(err)) from err
        if self.node is None:
            self.node = self.source.node
        if self.node is None:
            await self.source.stop()
            await self._stop_servers()
            where = self.source.describe().get("source", self.source.kind)
            raise AppError(f"{where}: no node given (--node or top-level `node:`)")
        self.tracker.start()
        self._unsubscribe = self.store.subscribe(self._on_store_change)
        self.drain.on_stop_accepting(self._stop_accepting)
        self.drain.on_force_close(self._force_close)
        loop = asyncio.get_running_loop()
        if inpod:
            self.agent = NodeAgent(
                node=self.node,
                store=self.store,
                proxies=self,
                certs=None,  # start_pod prefetches (and readiness waits for) the certificate
                rules=c.rules,
                inpod=c.inpod,
                readiness=self.readiness,
                retry_interval=c.pod_retry_interval,
                recheck_interval=c.pod_recheck_interval,
                socket_factory=c.pod_sockets,
                local_pods=c.local_pods,
            )
            agent = self.agent
            self.metrics.watch_workload_manager(lambda: agent.counters())
            # Rules, then listeners, for every pod known now (a restart adopts them here).
            await agent.start()
        else:
            await self._reconcile()
            self.readiness.done("workload proxies")
            self._tasks.append(loop.create_task(self._reconcile_loop(), name="reconcile"))
        self._tasks += [
            loop.create_task(self._config_ready(), name="config-ready"),
            loop.create_task(self._drain_then_stop(), name="drain"),
        ]

    async def _config_ready(self) -> None:
        await self.source.wait_ready()
        # Serve what the first complete configuration names before saying "ready": readiness
        # never goes back, and a restarted ztunnel must listen in its pods before the old leaves.
        try:
            if self.agent is not None:
                await self.agent.reconcile()
            else:
                await self._reconcile()
        except Exception:  # the agent's loop retries; readiness still follows its pending pods
            log.exception("serving the first configuration failed")
        self.readiness.done("config")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain.trigger, sig.name)

    async def wait(self) -> None:
        """Return once a drain finished and everything is closed."""
        await self._stopped.wait()

    async def stop(self, reason: str = "stop") -> None:
        """Drain (with the configured deadline) and close."""
        self.drain.trigger(reason)
        await self.wait()

    async def _serve(self, routes: list[web.RouteDef], host: str, port: int) -> tuple[str, int]:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise AppError(f"cannot listen on {host}:{port}: {err.strerror}") from err
        self._runners.append(runner)
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        bound = sockets[0].getsockname()[:2] if sockets else (host, port)
        return (bound[0], int(bound[1]))

    async def _stop_servers(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()

    def _on_store_change(self, _change: StoreChange) -> None:
        if self.agent is None:
            self._reconcile_wanted.set()
            return
        # In-pod: the agent starts/stops pods; running pods see their new attributes now.
        for uid, proxy in self.proxies.items():
            current = self.store.workload_by_uid(uid)
            if current is not None and current is not proxy.workload and proxy.same_pod(current):
                proxy.update(current)
        self._refresh_local()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile_wanted.wait()
            self._reconcile_wanted.clear()
            if self.drain.draining:
                return
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconciling workload proxies failed")

    def local_workloads(self) -> list[Workload]:
        assert self.node is not None
        return [w for w in self.store.workloads_on_node(self.node) if w.is_hbone and w.addresses]

    async def _reconcile(self) -> None:
        """Loopback placement: listeners on each local workload's IPs, following the store."""
        wanted = {w.uid: w for w in self.local_workloads()}
        for uid in [u for u in self.proxies if u not in wanted]:
            proxy = self.proxies.pop(uid)
            log.info("workload %s left this node: closing its proxies", uid)
            await proxy.close()
        for uid, workload in wanted.items():
            existing = self.proxies.get(uid)
            if existing is not None:
                if existing.same_pod(workload):
                    existing.update(workload)
                    continue
                await existing.close()
                del self.proxies[uid]
            self._want_certificate(workload.identity())
            try:
                proxy = WorkloadProxy(self.ctx, workload, DefaultSocketFactory(), self.config)
                await proxy.start()
            except OSError as err:
                log.error("workload %s: cannot open its listeners: %s", uid, err)
                continue
            self.proxies[uid] = proxy
            log.info("workload %s: proxies up on %s", uid, proxy.describe()["listeners"])
        self._refresh_local()

    def _refresh_local(self) -> None:
        """Recompute the by-IP views of the running proxies; drop certificates no pod needs."""
        self._by_ip = {ip: p for p in self.proxies.values() for ip in p.workload.addresses}
        self.ctx.local_by_ip.clear()
        self.ctx.local_by_ip.update({ip: p.workload for ip, p in self._by_ip.items()})
        current = {p.workload.identity() for p in self.proxies.values()}
        for identity in self._wanted_identities - current:
            self.certs.forget(identity)  # its last workload left this node
            self.readiness.done(f"certificate {identity}")
        self._wanted_identities = current

    def _want_certificate(self, identity: SpiffeId) -> None:
        if self.certs.cached(identity) is not None:
            return
        task_name = f"certificate {identity}"
        self.readiness.register(task_name)
        self.certs.prefetch(identity)

        async def wait_for_it() -> None:
            while True:
                try:
                    await self.certs.get(identity)
                except CertificateUnavailable as err:
                    log.warning("certificate for %s not available yet: %s", identity, err.reason)
                    await asyncio.sleep(1.0)
                    continue
                self.readiness.done(task_name)
                return

        self._tasks.append(asyncio.get_running_loop().create_task(wait_for_it()))

    # -- PodProxies (the node agent's side, inpod placement) ---------------------------------------

    async def start_pod(self, workload: Workload, sockets: SocketFactory) -> None:
        """Open this pod's listeners with ``sockets`` (its netns) and serve as ``workload``."""
        if self.drain.draining:
            raise AppError(f"ztunnel is draining: not starting pod {workload.uid}")
        old = self.proxies.pop(workload.uid, None)
        if old is not None:  # the agent stops before it restarts; never leave two behind
            await old.close()
        proxy = WorkloadProxy(self.ctx, workload, sockets, self.config)
        await proxy.start()  # on failure nothing is left bound; the agent keeps the pod pending
        self.proxies[workload.uid] = proxy
        self._want_certificate(workload.identity())
        self._refresh_local()
        log.info("pod %s: proxies up on %s", workload.uid, proxy.describe()["listeners"])

    async def stop_pod(self, uid: str) -> None:
        """Stop accepting at once, let the pod's connections finish until the drain deadline."""
        proxy = self.proxies.pop(uid, None)
        if proxy is None:
            return
        self._refresh_local()
        if self.drain.draining:
            await proxy.close()  # the app-wide drain already gave its connections their time
            return
        self._draining.add(proxy)
        try:
            await proxy.drain(self.drain.deadline)
        finally:
            self._draining.discard(proxy)

    # -- drain ---------------------------------------------------------------------------------

    async def _stop_accepting(self) -> None:
        for proxy in self.proxies.values():
            for task in proxy.stop_accepting(self.drain.deadline):
                self.drain.track(task)

    async def _force_close(self) -> None:
        for proxy in [*self.proxies.values(), *self._draining]:
            await proxy.close()

    async def _drain_then_stop(self) -> None:
        await self.drain.run()
        await self._shutdown()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        await self.source.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.tracker.stop()
        if self.agent is not None:
            await self.agent.stop()  # rules stay: the next ztunnel adopts the pods
        for proxy in [*self.proxies.values(), *self._draining]:
            await proxy.close()
        self.proxies.clear()
        await self.pool.close()
        await self.certs.close()
        await self._stop_servers()
        self._stopped.set()

    # -- introspection -------------------------------------------------------------------------

    def workload_state(self) -> dict[str, Any]:
        """Per pod: Pending|Up (and why pending), with the listeners that serve it."""
        if self.agent is None:
            return {uid: p.describe() for uid, p in self.proxies.items()}
        states = self.agent.workload_state()
        for uid, entry in states.items():
            proxy = self.proxies.get(uid)
            entry["listeners"] = proxy.describe()["listeners"] if proxy is not None else []
        return states

    def _hbone_counters(self) -> dict[str, int]:
        """The HBONE listeners' counters summed over this node's pods (for /metrics).

        A pod that goes away takes its counts with it; Prometheus' rate() treats that as a reset.
        """
        total: dict[str, int] = {}
        for proxy in list(self.proxies.values()):
            for server in proxy.servers:
                for key, value in server.counters().items():
                    total[key] = total.get(key, 0) + value
        return total

    def config_dump(self) -> dict[str, Any]:
        certificates = [
            {k: v for k, v in entry.items() if k not in ("chain", "roots")}
            | {"chain": entry["chain"]}
            for entry in self.certs.snapshot()
        ]
        dump: dict[str, Any] = {
            "node": self.node,
            "workloads": serialize(list(self.store.workloads())),
            "services": serialize(list(self.store.services())),
            "policies": serialize(list(self.store.policies())),
            "certificates": certificates,
            "connections": self.tracker.snapshot(),
            "workloadState": self.workload_state(),
            "config": {
                **self.source.describe(),
                "kind": self.source.kind,
                "version": self.store.version,
                "placement": self.config.placement.value,
            },
            "pool": serialize(self.pool.statistics()),
            "ready": self.readiness.ready,
            "pending": self.readiness.pending(),
        }
        if self.agent is not None:
            snapshot = self.agent.snapshot()
            dump["nodeAgent"] = {k: snapshot[k] for k in ("counters", "lastError")}
        return dump

    def url(self, which: str) -> str:
        address = {
            "admin": self.admin_address,
            "metrics": self.metrics_address,
            "readiness": self.readiness_address,
        }[which]
        if address is None:
            raise AppError(f"{which} server is not running")
        host = address[0]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{host}:{address[1]}"

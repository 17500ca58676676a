"""The `waypoint proxy` process: identity, configuration sources, listeners, drain.

Owns process wiring in two modes:

* local (lab, tests): the SPIFFE certificate from the local CA directory, the workload store and
  the L7 configuration from the local config file the waypoint shares with ztunnel
  (``workloads``/``services``/``policies`` for the store, ``httpRoutes``/``grpcRoutes``/
  ``authorizationPolicies`` for L7), optionally plus Kubernetes for L7;
* cluster (``AppOptions.cluster``, a pod of the manager's Deployment): the certificate from the
  Istio CA with the pod's own token (``xdsview.ca_client``), the workload store over delta xDS from
  the control plane (``xdsview.XdsView``), L7 configuration from Kubernetes (HTTPRoute, GRPCRoute,
  AuthorizationPolicy through the manager's `KubeApi`, ``kubesource``); ready once xDS synced.

Both rotate the certificate with `CertificateManager` and run the HBONE server on
15008, metrics on 15020 and readiness on 15021; reloads (the file is polled; a bad store part keeps
the previous store, a bad route or policy is rejected and reported while the rest is applied); and
the drain on SIGTERM (GOAWAY, in-flight requests finish until the deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from waypoint.proxy.authz import WaypointScope
from waypoint.proxy.config import (
    GRPC_ROUTES_KEY,
    HTTP_ROUTES_KEY,
    POLICIES_KEY,
    ConfigDocumentError,
    L7Config,
    parse_local_config,
)
from waypoint.proxy.server import ProxySettings, WaypointProxy
from waypoint.proxy.telemetry import Telemetry
from waypoint.proxy.upstream import UpstreamPool
from waypoint.proxy.xdsview import ClusterSettings, XdsView, ca_client
from ztunnel.config import INBOUND_HBONE_PORT, METRICS_PORT, READINESS_PORT
from ztunnel.identity.ca import CaClient, LocalCa, LocalCaClient
from ztunnel.identity.manager import CertificateManager
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.hbone_server import HboneServer
from ztunnel.proxy.pool import HbonePool
from ztunnel.readiness import Readiness
from ztunnel.sources.localfile import LocalConfig, LocalConfigError
from ztunnel.sources.localfile import parse_local_config as parse_mesh_config
from ztunnel.state.store import StoreError, WorkloadStore

log = logging.getLogger(__name__)

MESH_KEYS = ("workloads", "services", "policies", "node")
L7_KEYS = (HTTP_ROUTES_KEY, GRPC_ROUTES_KEY, POLICIES_KEY)
MAX_FILE_BYTES = 16 * 1024 * 1024


class ConfigFileError(ValueError):
    """The file cannot be used at all (unreadable, not YAML, unknown top-level keys)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitConfig:
    mesh: LocalConfig
    l7_objects: Mapping[str, list[Any]]
    """Raw route/policy objects by top-level key (validated when merged with other sources)."""


def split_document(text: str, source: str) -> SplitConfig:
    """Parse the shared file: the ztunnel part strictly, the L7 part as raw objects.

    Raises ConfigFileError or LocalConfigError (whole file rejected).
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{source}: not valid YAML: {err}") from err
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        raise ConfigFileError(f"{source}: the top level must be a mapping")
    unknown = sorted(str(k) for k in doc if k not in MESH_KEYS and k not in L7_KEYS)
    if unknown:
        raise ConfigFileError(
            f"{source}: unknown top-level key(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(MESH_KEYS + L7_KEYS)})"
        )
    mesh_doc = {k: doc[k] for k in MESH_KEYS if k in doc}
    mesh = parse_mesh_config(yaml.safe_dump(mesh_doc), source=source)
    l7: dict[str, list[Any]] = {}
    for key in L7_KEYS:
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise ConfigFileError(f"{source}: {key}: must be a list of objects")
        l7[key] = value
    return SplitConfig(mesh=mesh, l7_objects=l7)


def merge_l7(*sources: Mapping[str, list[Any]], source: str = "<merged>") -> L7Config:
    """One validated L7Config from several sources of raw objects (file, Kubernetes)."""
    merged: dict[str, list[Any]] = {key: [] for key in L7_KEYS}
    for objects in sources:
        for key in L7_KEYS:
            merged[key].extend(objects.get(key, ()))
    return parse_local_config(merged, source=source)


class L7Sources:
    """Keeps the L7 objects of each source and pushes the merged config into the proxy."""

    def __init__(self, proxy: WaypointProxy, telemetry: Telemetry) -> None:
        self.proxy = proxy
        self.telemetry = telemetry
        self.objects: dict[str, Mapping[str, list[Any]]] = {}
        self.errors: tuple[str, ...] = ()

    def update(self, name: str, objects: Mapping[str, list[Any]]) -> L7Config:
        self.objects[name] = objects
        config = merge_l7(*self.objects.values(), source=name)
        for problem in config.errors:
            log.error("configuration rejected: %s", problem)
        for warning in config.warnings:
            log.warning("configuration warning: %s", warning)
        self.errors = tuple(str(e) for e in config.errors)
        self.telemetry.config_errors.labels(source="all").set(len(config.errors))
        self.proxy.set_config(config)
        return config


class ConfigFileWatcher:
    """Polls the shared file; applies the store part and the L7 part on change."""

    def __init__(
        self, path: Path, store: WorkloadStore, sources: L7Sources, *, interval: float = 1.0
    ) -> None:
        self.path = path
        self.store = store
        self.sources = sources
        self.interval = interval
        self._seen: tuple[int, int, int, int] | None = None
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def _read(self) -> SplitConfig:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as err:
            raise ConfigFileError(f"{self.path}: cannot read: {err.strerror}") from err
        if len(data) > MAX_FILE_BYTES:
            raise ConfigFileError(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        return split_document(data.decode("utf-8", errors="replace"), str(self.path))

    def load(self) -> None:
        """Initial load: any error is fatal (start-up must fail loudly)."""
        self._seen = self._signature()
        self._apply(self._read())

    def check_once(self) -> bool | None:
        current = self._signature()
        if current == self._seen:
            return None
        self._seen = current
        try:
            split = self._read()
            self._apply(split)
        except (ConfigFileError, LocalConfigError, StoreError, ConfigDocumentError) as err:
            self.reloads_failed += 1
            self.last_error = str(err)
            log.error("config %s rejected, keeping the previous one: %s", self.path, err)
            return False
        self.reloads_ok += 1
        self.last_error = None
        log.info("config %s reloaded", self.path)
        return True

    def _apply(self, split: SplitConfig) -> None:
        mesh = split.mesh
        self.store.replace_all(mesh.workloads, mesh.services, mesh.policies)
        self.sources.update("file", split.l7_objects)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.check_once()
            except Exception:
                log.exception("config watcher failed on %s", self.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppOptions:
    identity: SpiffeId
    gateway_name: str
    gateway_namespace: str
    listen: str = "0.0.0.0"
    hbone_port: int = INBOUND_HBONE_PORT
    metrics_port: int = METRICS_PORT
    readiness_port: int = READINESS_PORT
    kubeconfig: str | None = None
    kube: bool = False
    drain_deadline: float = 5.0
    reload_interval: float = 1.0
    cluster_domain: str = "cluster.local"
    upstream_hbone_port: int = INBOUND_HBONE_PORT
    config: Path | None = None
    """Local mode: the shared config file (store + L7)."""
    ca_dir: Path | None = None
    """Local mode: the CA directory (LocalCa.save)."""
    cluster: ClusterSettings | None = None
    """Cluster mode: xDS + Istio CA + Kubernetes L7 (then no config file and no CA directory)."""

    def __post_init__(self) -> None:
        if self.cluster is None and (self.config is None or self.ca_dir is None):
            raise ValueError("local mode needs both a config file and a CA directory")
        if self.cluster is not None and (self.config is not None or self.ca_dir is not None):
            raise ValueError(
                "cluster mode takes its workloads from xDS and its certificate from the CA: "
                "no config file or CA directory"
            )


class WaypointApp:
    """One waypoint proxy process."""

    def __init__(self, options: AppOptions) -> None:
        self.options = options
        self.readiness = Readiness()
        self.telemetry = Telemetry()
        self.store = WorkloadStore()
        self.certs: CertificateManager | None = None
        self.hbone: HboneServer | None = None
        self.proxy: WaypointProxy | None = None
        self.watcher: ConfigFileWatcher | None = None
        self.xds: XdsView | None = None
        self.kube_source: Any = None
        self._ca_client: CaClient | None = None
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._kube_api: Any = None
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        o = self.options
        for task in ("config", "certificate", "proxy"):
            self.readiness.register(task)
        await self._serve_http(o.readiness_port, self.readiness.routes())
        await self._serve_http(o.metrics_port, self.telemetry.routes())
        if o.cluster is not None:
            self._ca_client = ca_client(o.cluster)
        else:
            assert o.ca_dir is not None  # AppOptions checked it
            self._ca_client = LocalCaClient(LocalCa.load(o.ca_dir))
        self.certs = CertificateManager(self._ca_client)
        cert = await self.certs.get(o.identity)
        self.readiness.done("certificate")
        certs = self.certs

        def current() -> Any:
            return certs.cached(o.identity) or cert

        upstream = UpstreamPool(
            HbonePool(client_context=lambda _ident: client_context(current())),
            o.identity,
            hbone_port=o.upstream_hbone_port,
        )
        self.proxy = WaypointProxy(
            store=self.store,
            upstream=upstream,
            telemetry=self.telemetry,
            settings=ProxySettings(
                scope=WaypointScope(namespace=o.gateway_namespace, name=o.gateway_name),
                cluster_domain=o.cluster_domain,
            ),
        )
        sources = L7Sources(self.proxy, self.telemetry)
        if o.config is not None:
            self.watcher = ConfigFileWatcher(
                o.config, self.store, sources, interval=o.reload_interval
            )
            self.watcher.load()
            self._tasks.append(asyncio.ensure_future(self.watcher.run()))
        if o.kube or o.cluster is not None:
            await self._start_kube(sources)
        if o.cluster is not None:
            self.xds = XdsView(o.cluster, self.store)
            self.xds.start()
            self._tasks.append(asyncio.ensure_future(self._config_ready(self.xds)))
        else:
            self.readiness.done("config")
        self.hbone = HboneServer(
            ssl_context=lambda: server_context(current()),
            trust_domain=o.identity.trust_domain,
            on_connect=self.proxy.on_connect,
        )
        await self.hbone.start(host=o.listen, port=o.hbone_port)
        self.readiness.done("proxy")
        log.info(
            "waypoint proxy %s/%s serving HBONE on %s:%d as %s",
            o.gateway_namespace,
            o.gateway_name,
            o.listen,
            self.hbone.address[1],
            o.identity,
        )

    async def _config_ready(self, xds: XdsView) -> None:
        # Not ready (15021) until the first push of every type: before that, no Service is known.
        await xds.ready.wait()
        log.info("xDS synced: %d workloads, %d services", *self._store_size())
        self.readiness.done("config")

    def _store_size(self) -> tuple[int, int]:
        return len(list(self.store.workloads())), len(list(self.store.services()))

    async def _start_kube(self, sources: L7Sources) -> None:
        from waypoint.manager.client import connect
        from waypoint.proxy.kubesource import KubeL7Source

        kubeconfig = self.options.kubeconfig
        if kubeconfig is None and self.options.cluster is not None:
            kubeconfig = self.options.cluster.kubeconfig
        self._kube_api = await connect(kubeconfig)
        source = KubeL7Source(self._kube_api, lambda objs: sources.update("kubernetes", objs))
        await source.initial()
        self.kube_source = source
        self._tasks.append(asyncio.ensure_future(source.run()))

    async def _serve_http(self, port: int, routes: list[web.RouteDef]) -> None:
        app = web.Application()
        app.add_routes(routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.options.listen, port).start()
        self._runners.append(runner)

    async def drain(self) -> None:
        """GOAWAY to every client, let in-flight requests finish until the deadline, stop."""
        log.info("draining (deadline %.1fs)", self.options.drain_deadline)
        if self.proxy is not None:
            self.proxy.start_drain()
        if self.hbone is not None:
            await self.hbone.drain(self.options.drain_deadline)
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.hbone is not None:
            await self.hbone.close()
        if self.proxy is not None:
            await self.proxy.close()
            await self.proxy.upstream.close()
        if self.xds is not None:
            await self.xds.close()
        if self.certs is not None:
            await self.certs.close()
        close_ca = getattr(self._ca_client, "close", None)
        if close_ca is not None:
            with contextlib.suppress(Exception):
                await close_ca()
        if self._kube_api is not None:
            await self._kube_api.close()
        for runner in self._runners:
            await runner.cleanup()
        self.stopped.set()

    async def run(self) -> int:
        """Start, serve until SIGTERM/SIGINT, drain."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        await stop.wait()
        await self.drain()
        return 0

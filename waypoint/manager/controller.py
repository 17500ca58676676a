"""The waypoint manager's controller: informers, a keyed work queue, and level-based reconcilers.

Owns `Informer` (list, then watch with resourceVersion resume; a 410 Gone or a broken stream relists
and diffs the cache, so no event is lost), and `WaypointManager`, which reconciles three kinds of key:

* ("gateway", ns, name): parse and validate the Gateway, resolve its parametersRef, render, plan
  against what exists, server-side apply / delete, then write status through the status subresource.
  An invalid Gateway gets conditions naming what is wrong and nothing is applied or deleted.
* ("class", name): GatewayClass Accepted for classes whose controllerName is ours.
* ("bindings",): recompute the binding table from every Namespace, Service, Pod and waypoint and write
  the istio.io/WaypointBound condition on each Service that changed.
* ("rootcert", ns): publish the CA's current roots in ConfigMap `istio-ca-root-cert` of that namespace
  (`rootcert`), when the manager was given the CA's roots. Namespace and ConfigMap events enqueue
  it (a deleted ConfigMap is recreated); a root rotation, seen by polling the roots or announced
  through `roots_changed()`, enqueues every namespace.

Every reconcile reads current state and converges on it (level-based): a restart re-lists and repeats
the same deterministic writes, so nothing is duplicated or lost. Failures requeue with capped backoff.
All decisions are in the pure modules (model, params, render, plan, status, binding); this module only
moves data between them and the `KubeApi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import kinds
from .binding import (
    BindingTable,
    NamespaceInfo,
    ServiceInfo,
    WaypointInfo,
    WorkloadInfo,
    resolve_bindings,
    waypoint_bound_condition,
)
from .kinds import ResourceType
from .kube import Conflict, Gone, KubeApi, KubeError, NotFound, WatchEvent
from .model import (
    BUILTIN_CLASSES,
    CONTROLLER_NAME,
    FIELD_MANAGER,
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    MANAGED_VALUE,
    WAYPOINT_BOUND_CONDITION,
    WAYPOINT_FOR_LABEL,
    Gateway,
    ModelError,
    Problem,
    parse_gateway,
    parse_gateway_class,
    validate_gateway,
)
from .params import Params, ParamsError, parse_params
from .plan import Plan, plan
from .render import RenderConfig, RenderError, render
from .rootcert import plan_root_cert
from .status import Runtime, gateway_class_status, gateway_status, set_condition, without_times

log = logging.getLogger(__name__)

Key = tuple[str, ...]
ObjKey = tuple[str, str]
MANAGED_SELECTOR = f"{MANAGED_LABEL}={MANAGED_VALUE}"


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _labels(obj: Mapping[str, Any]) -> Mapping[str, str]:
    labels = _meta(obj).get("labels")
    return labels if isinstance(labels, Mapping) else {}


def _okey(obj: Mapping[str, Any]) -> ObjKey:
    meta = _meta(obj)
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


Listener = Callable[[str, Mapping[str, Any]], None]


class Informer:
    """A cache of one kind kept current by list + watch; calls every listener `(type, obj)` per change.

    Several consumers (the waypoint controller, the control plane) share one Informer per kind and
    selector through `WatchCache`, so each kind is listed and watched once per process. A listener
    that raises is logged and skipped: one consumer's bug must not starve the others of events.
    """

    def __init__(
        self,
        api: KubeApi,
        rt: ResourceType,
        on_event: Listener | None = None,
        *,
        label_selector: str | None = None,
        watch_timeout: int = 300,
        retry_delay: float = 0.5,
    ) -> None:
        self.api = api
        self.rt = rt
        self.label_selector = label_selector
        self.cache: dict[ObjKey, dict[str, Any]] = {}
        self.synced = asyncio.Event()
        self.relists = 0
        """How many times the full list ran (1 + one per Gone/broken watch); for tests and metrics."""
        self.changes = 0
        """Bumped on every delivered change; lets consumers memoize what they derive from the cache."""
        self._listeners: list[Listener] = [on_event] if on_event is not None else []
        self._watch_timeout = watch_timeout
        self._retry_delay = retry_delay

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def replay(self, listener: Listener) -> None:
        """Deliver the current cache to `listener` as ADDED (a consumer joining a synced cache)."""
        for obj in list(self.cache.values()):
            listener("ADDED", obj)

    def _on_event(self, event_type: str, obj: Mapping[str, Any]) -> None:
        self.changes += 1
        for listener in list(self._listeners):
            try:
                listener(event_type, obj)
            except Exception:
                log.exception("informer %s: a listener failed on %s", self.rt.plural, event_type)

    async def _relist(self) -> str:
        items, rv = await self.api.list(self.rt, label_selector=self.label_selector)
        self.relists += 1
        fresh = {_okey(o): o for o in items}
        old = self.cache
        self.cache = fresh
        # Diff against the old cache so consumers see deletions that happened while we were away.
        for key, obj in old.items():
            if key not in fresh:
                self._on_event("DELETED", obj)
        for key, obj in fresh.items():
            prev = old.get(key)
            if prev is None or _meta(prev).get("resourceVersion") != _meta(obj).get(
                "resourceVersion"
            ):
                self._on_event("ADDED" if prev is None else "MODIFIED", obj)
        self.synced.set()
        return rv

    async def run(self) -> None:
        rv: str | None = None
        delay = self._retry_delay
        while True:
            try:
                if rv is None:
                    rv = await self._relist()
                async for event in self.api.watch(
                    self.rt,
                    resource_version=rv,
                    label_selector=self.label_selector,
                    timeout_seconds=self._watch_timeout,
                ):
                    rv = event.resource_version or rv
                    self._apply_event(event)
                delay = self._retry_delay
            except Gone:
                log.info("watch %s: resourceVersion %s is gone; relisting", self.rt.plural, rv)
                rv = None
            except KubeError as exc:
                log.warning("watch %s failed (%s); retrying in %.1fs", self.rt.plural, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                rv = None

    def _apply_event(self, event: WatchEvent) -> None:
        if event.type == "BOOKMARK":
            return
        obj = dict(event.obj)
        key = _okey(obj)
        if event.type == "DELETED":
            self.cache.pop(key, None)
        else:
            self.cache[key] = obj
        self._on_event(event.type, obj)


class WatchCache:
    """The process's watch cache: one `Informer` per (kind, label selector), shared by every consumer.

    `informer()` returns the existing Informer or makes one (started at once if the cache runs).
    The creator of a WatchCache owns its lifecycle (`start`/`stop`); consumers only add listeners.
    `binding_table()` is the one binding computation of the process, memoized on the caches it
    reads, so the waypoint controller and the control plane share the result of each change.
    """

    def __init__(self, api: KubeApi, *, watch_timeout: int = 300, retry_delay: float = 0.5) -> None:
        self.api = api
        self._watch_timeout = watch_timeout
        self._retry_delay = retry_delay
        self._informers: dict[tuple[str, str, str | None], Informer] = {}
        self._tasks: dict[tuple[str, str, str | None], asyncio.Task[None]] = {}
        self._running = False
        self._bindings: tuple[tuple[int, ...], BindingTable] | None = None

    @staticmethod
    def _key(rt: ResourceType, label_selector: str | None) -> tuple[str, str, str | None]:
        return (rt.group, rt.plural, label_selector)

    def informer(self, rt: ResourceType, label_selector: str | None = None) -> Informer:
        key = self._key(rt, label_selector)
        inf = self._informers.get(key)
        if inf is None:
            inf = Informer(
                self.api,
                rt,
                label_selector=label_selector,
                watch_timeout=self._watch_timeout,
                retry_delay=self._retry_delay,
            )
            self._informers[key] = inf
            if self._running:
                self._start_one(key, inf)
        return inf

    def get(self, rt: ResourceType, label_selector: str | None = None) -> Informer | None:
        return self._informers.get(self._key(rt, label_selector))

    @property
    def informers(self) -> list[Informer]:
        return list(self._informers.values())

    @property
    def running(self) -> bool:
        return self._running

    def _start_one(self, key: tuple[str, str, str | None], inf: Informer) -> None:
        sel = f"?{inf.label_selector}" if inf.label_selector else ""
        self._tasks[key] = asyncio.create_task(inf.run(), name=f"informer-{inf.rt.plural}{sel}")

    def start(self) -> None:
        """Start every informer not yet running (idempotent; needs a running event loop)."""
        self._running = True
        for key, inf in self._informers.items():
            if key not in self._tasks:
                self._start_one(key, inf)

    @property
    def synced(self) -> bool:
        return self._running and all(inf.synced.is_set() for inf in self._informers.values())

    async def wait_synced(
        self, informers: Collection[Informer] | None = None, timeout: float = 60.0
    ) -> None:
        """Wait until `informers` (default: all) have listed once; TimeoutError names the laggards."""
        waiting = list(self._informers.values() if informers is None else informers)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(inf.synced.wait() for inf in waiting)), timeout=timeout
            )
        except TimeoutError:
            late = ", ".join(inf.rt.plural for inf in waiting if not inf.synced.is_set())
            raise TimeoutError(
                f"watch cache: no initial list within {timeout}s for {late}"
            ) from None

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def binding_table(self) -> BindingTable:
        """The waypoint binding table from the cached Namespaces, Services, Pods and Gateways.

        Pods count only if this cache watches them. Recomputed only when one of those caches
        changed since the last call.
        """
        deps = [
            self.informer(kinds.NAMESPACE),
            self.informer(kinds.SERVICE),
            self.informer(kinds.GATEWAY),
            self.informer(kinds.GATEWAY_CLASS),
        ]
        pods = self.get(kinds.POD)
        if pods is not None:
            deps.append(pods)
        stamp = tuple(id(d) for d in deps) + tuple(d.changes for d in deps)
        if self._bindings is not None and self._bindings[0] == stamp:
            return self._bindings[1]
        table = compute_bindings(
            deps[0].cache.values(),
            deps[1].cache.values(),
            pods.cache.values() if pods is not None else (),
            deps[2].cache.values(),
            {name: obj for (_, name), obj in deps[3].cache.items()},
        )
        self._bindings = (stamp, table)
        return table


def class_is_ours(class_name: str, classes: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a GatewayClass (by name, from the cached classes) is managed by this controller."""
    obj = classes.get(class_name)
    if obj is None:
        # Istio's behaviour: the built-in classes are ours even before their object exists.
        return class_name in BUILTIN_CLASSES
    return ((obj.get("spec") or {}).get("controllerName")) == CONTROLLER_NAME


def compute_bindings(
    namespaces: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    gateways: Iterable[Mapping[str, Any]],
    classes: Mapping[str, Mapping[str, Any]],
) -> BindingTable:
    """The binding table from watched objects: the one function both controller and xDS use."""
    waypoints = []
    for obj in gateways:
        class_name = str((obj.get("spec") or {}).get("gatewayClassName", ""))
        if not class_is_ours(class_name, classes):
            continue
        try:
            gw = parse_gateway(obj)
        except ModelError:
            continue
        addresses = tuple(
            (str(a.get("type", "IPAddress")), str(a.get("value", "")))
            for a in (obj.get("status") or {}).get("addresses") or []
        )
        waypoints.append(
            WaypointInfo(
                gateway=gw,
                addresses=addresses,
                class_waypoint_for=_labels(classes.get(class_name) or {}).get(WAYPOINT_FOR_LABEL),
            )
        )
    return resolve_bindings(
        namespaces=[NamespaceInfo(name=_okey(o)[1], labels=dict(_labels(o))) for o in namespaces],
        services=[
            ServiceInfo(namespace=_okey(o)[0], name=_okey(o)[1], labels=dict(_labels(o)))
            for o in services
        ],
        workloads=[
            WorkloadInfo(
                namespace=_okey(o)[0],
                name=_okey(o)[1],
                service_account=str((o.get("spec") or {}).get("serviceAccountName") or "default"),
                labels=dict(_labels(o)),
            )
            for o in pods
        ],
        waypoints=waypoints,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayReport:
    """What the last reconcile of one Gateway did; for logs, tests and the CLI."""

    problems: tuple[Problem, ...] = ()
    foreign: tuple[str, ...] = ()
    plan: Plan | None = None


class WaypointManager:
    """Gateway API waypoint Gateways in, waypoint objects, status and a binding table out."""

    def __init__(
        self,
        api: KubeApi,
        config: RenderConfig | None = None,
        *,
        now: Callable[[], str] = utc_now,
        watch_pods: bool = True,
        watch_timeout: int = 300,
        max_backoff: float = 10.0,
        on_bindings: Callable[[BindingTable], Awaitable[None] | None] | None = None,
        cache: WatchCache | None = None,
        roots: Callable[[], bytes | str | None] | None = None,
        roots_poll_interval: float = 5.0,
    ) -> None:
        """`roots` returns the CA's current trusted roots (PEM; None: not known yet); with it, the
        manager publishes them in every namespace and re-checks them every `roots_poll_interval`
        seconds (root rotation)."""
        self.api = api
        self.config = config or RenderConfig()
        self.now = now
        self.binding_table = BindingTable()
        self.reports: dict[ObjKey, GatewayReport] = {}
        self.reconciles = 0
        """Reconciles finished without error (for metrics)."""
        self.reconcile_errors = 0
        self._on_bindings = on_bindings
        self._max_backoff = max_backoff
        # (priority, sequence, key): waypoint keys before root-certificate keys, so the writes for
        # thousands of namespaces at start-up or after a root rotation never hold up a Gateway.
        self._queue: asyncio.PriorityQueue[tuple[int, int, Key]] = asyncio.PriorityQueue()
        self._sequence = 0
        self._pending: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._retries: set[asyncio.TimerHandle] = set()
        self._idle = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._service_labels: dict[ObjKey, dict[str, str]] = {}
        self._roots = roots
        self._roots_poll_interval = roots_poll_interval
        self.root_cert_foreign: dict[str, str] = {}
        """Namespaces whose `istio-ca-root-cert` is not ours (left alone) -> why; for logs and tests."""
        # A cache passed in is shared with other consumers and outlives this manager's start/stop
        # (leadership may come and go); without one, the manager owns a private cache.
        self._owns_cache = cache is None
        self.cache = cache or WatchCache(api, watch_timeout=watch_timeout)
        self._listeners: list[tuple[Informer, Listener]] = []

        self.gateways = self.cache.informer(kinds.GATEWAY)
        self.classes = self.cache.informer(kinds.GATEWAY_CLASS)
        self.namespaces = self.cache.informer(kinds.NAMESPACE)
        self.services = self.cache.informer(kinds.SERVICE)
        self.configmaps = self.cache.informer(kinds.CONFIG_MAP)
        self.pods = self.cache.informer(kinds.POD) if watch_pods else None
        # Owned kinds are watched through the managed label only: foreign objects are looked up by name.
        self.owned: dict[str, Informer] = {
            rt.kind: self.cache.informer(rt, MANAGED_SELECTOR)
            for rt in kinds.OWNED_KINDS
            if rt is not kinds.SERVICE
        }
        self.informers = [
            self.gateways,
            self.classes,
            self.namespaces,
            self.services,
            self.configmaps,
            *self.owned.values(),
            *([self.pods] if self.pods else []),
        ]

    # --- lifecycle ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def start(self) -> None:
        """Listen to the informers and start the worker; returns once every cache has listed once.

        Restartable: with a shared cache that already synced, the current cache is replayed as
        ADDED events, so a manager that (re)gains leadership reconciles everything once.
        """
        if self._listeners or self._tasks:
            return
        for inf in self.informers:
            listener = self._event_handler(inf.rt)
            inf.add_listener(listener)
            self._listeners.append((inf, listener))
            inf.replay(listener)  # empty for an informer that has not listed yet
        self.cache.start()
        try:
            await self.cache.wait_synced(self.informers)
        except BaseException:
            await self.stop()
            raise
        # Only now: reconciling against half-listed caches would plan from a partial view.
        self._tasks.append(asyncio.create_task(self._worker(), name="waypoint-manager-worker"))
        if self._roots is not None:
            self._tasks.append(asyncio.create_task(self._poll_roots(), name="root-cert-poll"))

    async def stop(self) -> None:
        for inf, listener in self._listeners:
            inf.remove_listener(listener)
        self._listeners.clear()
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # A later start() begins from a clean queue and replays the caches.
        self._queue = asyncio.PriorityQueue()
        self._pending.clear()
        self._failures.clear()
        self._idle.clear()
        if self._owns_cache:
            await self.cache.stop()

    async def run_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    async def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty and no reconcile runs (tests; also a readiness signal)."""
        async with asyncio.timeout(timeout):
            while True:
                await self._idle.wait()
                await asyncio.sleep(0.05)  # let in-flight watch events land and enqueue
                if self._idle.is_set() and not self._pending:
                    return

    # --- events -> keys --------------------------------------------------------------------

    def enqueue(self, key: Key) -> None:
        if key not in self._pending:
            self._pending.add(key)
            self._idle.clear()
            self._sequence += 1
            self._queue.put_nowait((1 if key[0] == "rootcert" else 0, self._sequence, key))

    def _event_handler(self, rt: ResourceType) -> Callable[[str, Mapping[str, Any]], None]:
        def handle(event_type: str, obj: Mapping[str, Any]) -> None:
            ns, name = _okey(obj)
            if rt is kinds.GATEWAY:
                self.enqueue(("gateway", ns, name))
                self.enqueue(("bindings",))
            elif rt is kinds.GATEWAY_CLASS:
                self.enqueue(("class", name))
                for gns, gname in list(self.gateways.cache):
                    self.enqueue(("gateway", gns, gname))
                self.enqueue(("bindings",))
            elif rt is kinds.CONFIG_MAP:
                if name == self.config.root_cert_configmap:
                    self.enqueue(("rootcert", ns))
                for (gns, gname), gw in list(self.gateways.cache.items()):
                    ref = ((gw.get("spec") or {}).get("infrastructure") or {}).get(
                        "parametersRef"
                    ) or {}
                    if gns == ns and ref.get("name") == name:
                        self.enqueue(("gateway", gns, gname))
            elif rt in (kinds.NAMESPACE, kinds.POD):
                self.enqueue(("bindings",))
                if rt is kinds.NAMESPACE and event_type != "DELETED":
                    self.enqueue(("rootcert", name))
            else:
                labels = _labels(obj)
                if labels.get(MANAGED_LABEL) == MANAGED_VALUE and labels.get(GATEWAY_NAME_LABEL):
                    self.enqueue(("gateway", ns, labels[GATEWAY_NAME_LABEL]))
                if rt is kinds.SERVICE and (event_type != "MODIFIED" or self._service_changed(obj)):
                    self.enqueue(("bindings",))

        return handle

    def _service_changed(self, obj: Mapping[str, Any]) -> bool:
        # Our own status writes come back as MODIFIED; only label changes matter for bindings.
        key = _okey(obj)
        seen = self._service_labels.get(key)
        return seen is None or seen != dict(_labels(obj))

    async def _worker(self) -> None:
        while True:
            if self._queue.empty():
                self._idle.set()
            _, _, key = await self._queue.get()
            self._idle.clear()
            self._pending.discard(key)
            try:
                await self.reconcile(key)
                self._failures.pop(key, None)
                self.reconciles += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Any failure (API error, bad object, our own bug) retries with backoff: the worker
                # must never die and leave the cluster unreconciled.
                self.reconcile_errors += 1
                attempts = self._failures.get(key, 0) + 1
                self._failures[key] = attempts
                delay = min(0.1 * 2**attempts, self._max_backoff)
                if isinstance(exc, KubeError | ModelError):
                    level = logging.INFO if isinstance(exc, Conflict) else logging.WARNING
                    log.log(
                        level,
                        "reconcile %s failed (%s); retry %d in %.1fs",
                        key,
                        exc,
                        attempts,
                        delay,
                    )
                else:
                    log.exception("reconcile %s crashed; retry %d in %.1fs", key, attempts, delay)
                self._idle.clear()
                self._retry_later(delay, key)

    def _retry_later(self, delay: float, key: Key) -> None:
        handle: asyncio.TimerHandle | None = None

        def fire() -> None:
            if handle is not None:
                self._retries.discard(handle)
            self.enqueue(key)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._retries.add(handle)

    async def reconcile(self, key: Key) -> None:
        if key[0] == "gateway":
            await self.reconcile_gateway(key[1], key[2])
        elif key[0] == "class":
            await self.reconcile_class(key[1])
        elif key[0] == "bindings":
            await self.reconcile_bindings()
        elif key[0] == "rootcert":
            await self.reconcile_root_cert(key[1])

    # --- GatewayClass -------------------------------------------------------------------------

    def _class_is_ours(self, class_name: str) -> bool:
        return class_is_ours(
            class_name, {name: obj for (_, name), obj in self.classes.cache.items()}
        )

    async def reconcile_class(self, name: str) -> None:
        obj = self.classes.cache.get(("", name))
        if obj is None:
            return
        try:
            gc = parse_gateway_class(obj)
        except ModelError as exc:
            log.warning("%s", exc)
            return
        if gc.controller_name != CONTROLLER_NAME:
            return
        previous = obj.get("status") or {}
        status = gateway_class_status(gc, previous, self.now())
        if without_times(status.get("conditions")) != without_times(previous.get("conditions")):
            await self._write_status(
                kinds.GATEWAY_CLASS, "", name, {"conditions": status["conditions"]}
            )

    # --- Gateway ------------------------------------------------------------------------------

    def _params(self, gw: Gateway) -> tuple[Params, list[Problem]]:
        ref = gw.parameters_ref
        if ref is None:
            return Params(), []
        if ref.group != "" or ref.kind != "ConfigMap":
            return Params(), [
                Problem(
                    condition="ResolvedRefs",
                    reason="InvalidParameters",
                    message=f"spec.infrastructure.parametersRef: unknown infrastructure parameters type "
                    f'{ref.group or "core"}/{ref.kind} (only group "", kind ConfigMap)',
                )
            ]
        cm = self.configmaps.cache.get((gw.namespace, ref.name))
        if cm is None:
            return Params(), [
                Problem(
                    condition="ResolvedRefs",
                    reason="InvalidParameters",
                    message=f"spec.infrastructure.parametersRef: ConfigMap {gw.namespace}/{ref.name} does not exist",
                )
            ]
        try:
            return parse_params(cm), []
        except ParamsError as exc:
            return Params(), [
                Problem(condition="ResolvedRefs", reason="InvalidParameters", message=str(exc))
            ]

    async def _observed(
        self, namespace: str, gateway: str, desired: list[dict[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """Managed objects of this Gateway (from caches) plus whatever holds a desired name."""
        found: dict[tuple[str, str], Mapping[str, Any]] = {}
        for rt in kinds.OWNED_KINDS:
            cache = self.services.cache if rt is kinds.SERVICE else self.owned[rt.kind].cache
            for (ns, _), obj in cache.items():
                labels = _labels(obj)
                if (
                    ns == namespace
                    and labels.get(MANAGED_LABEL) == MANAGED_VALUE
                    and labels.get(GATEWAY_NAME_LABEL) == gateway
                ):
                    found[(rt.kind, _okey(obj)[1])] = {**obj, "kind": rt.kind}
        for obj in desired:
            kind, name = obj["kind"], obj["metadata"]["name"]
            if (kind, name) in found:
                continue
            current = await self.api.get(kinds.BY_KIND[kind], namespace, name)
            if current is not None:
                found[(kind, name)] = {**current, "kind": kind}
        return list(found.values())

    async def _execute(self, p: Plan) -> None:
        for a in p.applies:
            body: dict[str, Any] = dict(a.obj)
            if a.resource_version:
                # Pin the version we planned against: a concurrent writer turns this into a 409 and a retry.
                body["metadata"] = {**body["metadata"], "resourceVersion": a.resource_version}
            log.info("apply %s", a.key)
            await self.api.apply(
                kinds.BY_KIND[a.key.kind], body, field_manager=FIELD_MANAGER, force=True
            )
        for d in p.deletes:
            log.info("delete %s (no longer rendered)", d.key)
            await self.api.delete(
                kinds.BY_KIND[d.key.kind], d.key.namespace, d.key.name, uid=d.uid or None
            )
        for f in p.foreign:
            log.warning("%s", f.reason)

    async def reconcile_gateway(self, namespace: str, name: str) -> None:
        obj = self.gateways.cache.get((namespace, name))
        if obj is None or _meta(obj).get("deletionTimestamp"):
            # Owner references let the garbage collector cascade; prune anyway for objects without one.
            self.reports.pop((namespace, name), None)
            await self._execute(
                plan(namespace, name, [], await self._observed(namespace, name, []))
            )
            return
        class_name = str((obj.get("spec") or {}).get("gatewayClassName", ""))
        if not self._class_is_ours(class_name):
            return
        try:
            gw = parse_gateway(obj)
        except ModelError as exc:
            # Retrying cannot fix a malformed object; say what is wrong and wait for an edit.
            log.warning("%s", exc)
            previous = (obj.get("status") or {}).get("conditions") or []
            generation = _meta(obj).get("generation")
            conditions = [
                set_condition(
                    previous,
                    type_=type_,
                    status=False,
                    reason=reason,
                    message=str(exc),
                    generation=generation if isinstance(generation, int) else None,
                    now=self.now(),
                )
                for type_, reason in (("Accepted", "InvalidParameters"), ("Programmed", "Invalid"))
            ]
            if without_times(conditions) != without_times(previous):
                await self._write_status(kinds.GATEWAY, namespace, name, {"conditions": conditions})
            return
        problems = validate_gateway(gw)
        params, param_problems = self._params(gw)
        problems += param_problems
        desired: list[dict[str, Any]] = []
        if not problems:
            try:
                desired = render(
                    gw,
                    params,
                    self.config,
                    params_source=f"ConfigMap {namespace}/{gw.parameters_ref.name}"
                    if gw.parameters_ref
                    else "params",
                )
            except RenderError as exc:
                problems.append(
                    Problem(condition="ResolvedRefs", reason="InvalidParameters", message=str(exc))
                )
        p: Plan | None = None
        foreign: tuple[str, ...] = ()
        if not problems:
            # Nothing half-made: writes happen only for a Gateway that fully validated and rendered.
            p = plan(namespace, name, desired, await self._observed(namespace, name, desired))
            await self._execute(p)
            foreign = tuple(f.reason for f in p.foreign)
        self.reports[(namespace, name)] = GatewayReport(
            problems=tuple(problems), foreign=foreign, plan=p
        )
        await self._write_gateway_status(gw, obj, problems, foreign)

    def _runtime(self, gw: Gateway) -> Runtime:
        dep = self.owned[kinds.DEPLOYMENT.kind].cache.get(gw.key) or {}
        svc = self.services.cache.get(gw.key) or {}
        if _labels(svc).get(MANAGED_LABEL) != MANAGED_VALUE:
            svc = {}
        ready = int((dep.get("status") or {}).get("readyReplicas") or 0)
        spec = svc.get("spec") or {}
        ips = [
            ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"
        ]
        return Runtime(ready_replicas=ready, cluster_ips=tuple(ips))

    async def _write_gateway_status(
        self, gw: Gateway, obj: Mapping[str, Any], problems: list[Problem], foreign: tuple[str, ...]
    ) -> None:
        previous = obj.get("status") or {}
        status = gateway_status(
            gw,
            problems=problems,
            foreign=foreign,
            runtime=self._runtime(gw),
            previous=previous,
            now=self.now(),
            cluster_domain=self.config.cluster_domain,
        )
        if without_times(status) != without_times(
            {k: previous[k] for k in status if k in previous}
        ):
            await self._write_status(kinds.GATEWAY, gw.namespace, gw.name, status)

    async def _write_status(
        self, rt: ResourceType, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        meta: dict[str, Any] = {"name": name}
        if namespace:
            meta["namespace"] = namespace
        body = {
            "apiVersion": rt.api_version,
            "kind": rt.kind,
            "metadata": meta,
            "status": dict(status),
        }
        try:
            await self.api.apply(
                rt, body, field_manager=FIELD_MANAGER, force=True, subresource="status"
            )
        except NotFound:
            pass  # deleted meanwhile: nothing to report on

    # --- bindings ----------------------------------------------------------------------------

    async def reconcile_bindings(self) -> None:
        # The same (memoized) computation the control plane publishes over xDS.
        table = self.cache.binding_table()
        self.binding_table = table
        if self._on_bindings is not None:
            result = self._on_bindings(table)
            if result is not None:
                await result
        for key, svc in list(self.services.cache.items()):
            if _labels(svc).get(MANAGED_LABEL) == MANAGED_VALUE:
                continue
            self._service_labels[key] = dict(_labels(svc))
            conditions = (svc.get("status") or {}).get("conditions") or []
            current = next(
                (c for c in conditions if c.get("type") == WAYPOINT_BOUND_CONDITION), None
            )
            wanted = waypoint_bound_condition(table.services.get(key), conditions, self.now())
            if without_times(current) == without_times(wanted):
                continue
            # Server-side apply of just our condition: others' conditions stay; applying none removes ours.
            status: dict[str, Any] = {"conditions": [wanted]} if wanted else {}
            await self._write_status(kinds.SERVICE, key[0], key[1], status)

    # --- root certificate ConfigMaps ------------------------------------------------------------

    def _current_roots(self) -> str | None:
        roots = self._roots() if self._roots is not None else None
        if isinstance(roots, bytes):
            roots = roots.decode("ascii")
        return roots or None

    def roots_changed(self) -> None:
        """The CA's roots changed (rotation): republish them in every namespace."""
        for _, name in list(self.namespaces.cache):
            self.enqueue(("rootcert", name))

    async def _poll_roots(self) -> None:
        # The start-up replay of every Namespace publishes the roots of now; this catches changes.
        seen: str | None = None
        with contextlib.suppress(Exception):
            seen = self._current_roots()
        while True:
            await asyncio.sleep(self._roots_poll_interval)
            try:
                roots = self._current_roots()
            except Exception:  # a failing CA must not stop the poll
                log.exception("reading the CA's roots failed")
                continue
            if roots is not None and roots != seen:
                seen = roots
                log.info("the CA's roots changed; republishing %s", self.config.root_cert_configmap)
                self.roots_changed()

    async def reconcile_root_cert(self, namespace: str) -> None:
        roots = self._current_roots()
        if roots is None:
            return
        name = self.config.root_cert_configmap
        current: Mapping[str, Any] | None = self.configmaps.cache.get((namespace, name))
        if current is None:
            # The cache may lag a ConfigMap someone else just made: never create over it blindly.
            current = await self.api.get(kinds.CONFIG_MAP, namespace, name)
        p = plan_root_cert(self.namespaces.cache.get(("", namespace)), current, roots, name=name)
        if p.foreign:
            if namespace not in self.root_cert_foreign:
                log.warning("%s", p.foreign[0].reason)
            self.root_cert_foreign[namespace] = p.foreign[0].reason
            return
        self.root_cert_foreign.pop(namespace, None)
        for a in p.applies:
            body: dict[str, Any] = dict(a.obj)
            if a.resource_version:
                # Pinned: a concurrent writer turns this into a 409 and a retry from fresh state.
                body["metadata"] = {**body["metadata"], "resourceVersion": a.resource_version}
            log.info("apply %s", a.key)
            await self.api.apply(kinds.CONFIG_MAP, body, field_manager=FIELD_MANAGER, force=True)

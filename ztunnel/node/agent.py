"""The node agent (local mode): keep this node's pods captured and served, as the store changes.

Owns the per-pod life cycle that Istio splits between istio-cni and ztunnel's in-pod manager
(ztunnel.md section 7.1, reliability.md section 4), driven by the workload store instead of ZDS:

* a pod appears (enrolled per ``plan.enrolled``): program its capture rules with ``netfilter``
  (idempotent: rules already there are verified and repaired, which is how a restarted ztunnel
  *adopts* running pods), ask for its certificate (prefetch, so the first connection does not wait),
  then have the app open 15001/15006/15008 inside the pod netns through a ``NetnsSocketFactory``
  (SO_MARK 0x539, SO_REUSEPORT: a new ztunnel binds beside the old one, so one is always listening);
* a start that fails (netns missing, port taken) leaves the pod *pending*; it is retried every
  ``retry_interval`` seconds and readiness stays blocked on it, as ztunnel does;
* a pod disappears: its listeners stop at once and drain in the background (other pods keep
  converging meanwhile), then its rules are removed (ignored if the netns is already gone, or if a
  pod came back into that netns while it drained); its netns changed (sandbox recreated) or its
  identity changed: stop (drain included), then start;
* every ``recheck_interval`` seconds (``recheck``; default 30 s) each Up pod is looked at again,
  one at a time, off the event loop (``to_thread``): its capture rules are verified and any drift
  (a rule deleted by hand, a flushed table) is repaired and counted (``rules_repaired_total``); a
  netns path that now names a different (dev, inode) (the sandbox was recreated at the same path,
  which Istio keys netns by) restarts the pod: stop, then start in the new netns. Rechecks never
  overlap: one that finds another still running is skipped;
* ``stop()`` (ztunnel shutting down) drains every pod but leaves the rules in place: a pod with
  rules and no listener fails closed, and the next ztunnel adopts it.

Which pods are "this node's" comes from a ``LocalPods`` provider: by default the store's enrolled
workloads (``StoreLocalPods``); a Kubernetes pod watcher can stand in (it wakes the agent through
``subscribe`` and holds readiness back until it has ``synced``).

Readiness: the task ``workload proxy manager`` is pending until the provider has synced and a
reconcile has started every pod (nothing pending). The app (``ztunnel.app.App`` in ``inpod``
placement) supplies the proxies through the ``PodProxies`` protocol; with ``proxies=None`` the
agent only keeps the rules (the istio-cni role: capture a pod before any ztunnel listens in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from netfilter import InpodConfig, NetfilterError, PodNetfilter
from ztunnel.config import INPOD_MARK
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.node.plan import NetnsId, Plan, Running, local_pods, plan
from ztunnel.proxy.socket_factory import NetnsSocketFactory, SocketFactory
from ztunnel.readiness import Readiness
from ztunnel.state.model import Workload
from ztunnel.state.store import StoreChange, WorkloadStore

log = logging.getLogger(__name__)

READINESS_TASK = "workload proxy manager"
DEFAULT_RETRY_INTERVAL = 5.0
DEFAULT_RECHECK_INTERVAL = 30.0

_Outcome = Literal["ok", "repaired", "moved", "failed"]


class PodProxies(Protocol):
    """What the app must offer the agent: start and stop the in-pod proxies of one pod."""

    async def start_pod(self, workload: Workload, sockets: SocketFactory) -> None:
        """Open 15001/15006/15008 with ``sockets`` (they live in the pod netns) and serve as
        ``workload``. On failure raise, with nothing left bound."""
        ...

    async def stop_pod(self, uid: str) -> None:
        """Stop accepting at once, let this pod's connections finish (drain deadline), close."""
        ...


class LocalPods(Protocol):
    """Which pods of ``node`` the agent must serve: uid -> workload, each with its ``netns`` set.

    The default (``StoreLocalPods``) reads the workload store; a Kubernetes pod watcher can
    combine the store with pods it sees on the node (and their netns paths).
    """

    @property
    def synced(self) -> bool:
        """False until the provider knows the full set (readiness waits for it)."""
        ...

    def pods(self, store: WorkloadStore, node: str) -> Mapping[str, Workload]:
        """The enrolled pods now (pure read; called under the agent's lock, must not block)."""
        ...

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when ``pods`` may have changed for reasons other than a store change
        (the agent follows the store itself); returns the unsubscribe function."""
        ...


class StoreLocalPods:
    """The default provider: workloads in the store on this node, in the mesh, with a netns."""

    synced = True

    def pods(self, store: WorkloadStore, node: str) -> Mapping[str, Workload]:
        return local_pods(store.workloads(), node)

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        return lambda: None


class RuleProgrammer(Protocol):
    """The capture rules of one pod netns (``netfilter.PodNetfilter`` fits); blocking calls."""

    def program(self, netns: str, cfg: InpodConfig) -> object: ...

    def unprogram(self, netns: str, cfg: InpodConfig) -> object: ...


class RuleVerifier(Protocol):
    """Optional on a ``RuleProgrammer``: read-only drift check (``PodNetfilter.verify`` fits).

    The recheck uses it when present (a pure read each interval, writes only on drift); without
    it the recheck calls ``program``, which is idempotent and writes only what differs.
    """

    def verify(self, netns: str, cfg: InpodConfig) -> Sequence[object]: ...


class CertPrefetcher(Protocol):
    """``CertificateManager`` fits: start fetching an identity's certificate in the background."""

    def prefetch(self, identity: SpiffeId) -> None: ...


def netns_id(path: str) -> NetnsId | None:
    """(dev, inode) of a netns file, None if it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass
class _Pod:
    workload: Workload
    netns_id: NetnsId | None
    up: bool = False
    sockets: SocketFactory | None = None
    error: str = ""
    started_at: float = 0.0
    attempts: int = 0

    def running(self) -> Running:
        assert self.workload.netns is not None
        return Running(
            uid=self.workload.uid,
            netns=self.workload.netns,
            netns_id=self.netns_id,
            identity=self.workload.identity(),
            up=self.up,
        )


@dataclass
class AgentStats:
    """Counters shown in config_dump (ztunnel's ``workload_manager_*`` meanings)."""

    started: int = 0
    stopped: int = 0
    start_failures: int = 0
    rules_changed: int = 0
    """Starts that had to write rules (fresh pod or drift); adopted pods with intact rules don't."""
    reconciles: int = 0
    rechecks: int = 0
    """Completed periodic rechecks (skipped ones, which found a recheck running, not counted)."""
    rechecks_skipped: int = 0
    rules_repaired: int = 0
    """Pods whose rules a recheck found drifted and rewrote."""
    recheck_failures: int = 0
    """Pod rechecks that could not verify or repair (netns gone, netfilter error)."""
    netns_changed: int = 0
    """Up pods whose netns path a recheck found pointing at a new (dev, inode): restarted."""
    last_error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RecheckResult:
    """What one ``recheck`` pass did (uids)."""

    skipped: bool = False
    """Another recheck was still running: this one did nothing."""
    checked: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()


class NodeAgent:
    """Reconciles the pods of ``node`` in ``store`` with rules and in-pod proxies."""

    def __init__(
        self,
        *,
        node: str,
        store: WorkloadStore,
        proxies: PodProxies | None,
        certs: CertPrefetcher | None = None,
        rules: RuleProgrammer | None = None,
        inpod: InpodConfig | None = None,
        readiness: Readiness | None = None,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        recheck_interval: float | None = DEFAULT_RECHECK_INTERVAL,
        socket_factory: Callable[[str], SocketFactory] | None = None,
        netns_id_of: Callable[[str], NetnsId | None] = netns_id,
        local_pods: LocalPods | None = None,
    ) -> None:
        self.node = node
        self.store = store
        self.proxies = proxies
        self.certs = certs
        self.rules: RuleProgrammer = rules or PodNetfilter()
        self.inpod = inpod or InpodConfig()
        self.readiness = readiness
        self.retry_interval = retry_interval
        if recheck_interval is not None and recheck_interval < 0:
            raise ValueError(f"node agent: recheck_interval {recheck_interval!r} must be >= 0")
        # None or 0: no periodic recheck (rules are then verified only on start/adoption).
        self.recheck_interval = recheck_interval or None
        self._socket_factory = socket_factory or _netns_factory
        self._netns_id_of = netns_id_of
        self.local_pods: LocalPods = local_pods or StoreLocalPods()
        self.stats = AgentStats()
        self._pods: dict[str, _Pod] = {}
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self._rechecking = False  # a recheck pass is running (no overlap)
        self._unsubscribe: list[Callable[[], None]] = []
        self._removals: set[asyncio.Task[None]] = set()  # removed pods: drain, then rules
        self._draining: dict[str, asyncio.Task[None]] = {}  # uid -> its drain (part of a removal)
        self._first_done = False
        if readiness is not None:
            readiness.register(READINESS_TASK, f"pods of node {node}")

    # --- life cycle ------------------------------------------------------------------------

    async def start(self) -> Plan:
        """Reconcile once (adopting pods a previous ztunnel left), then follow the store."""
        self._unsubscribe = [
            self.store.subscribe(self._on_change),
            self.local_pods.subscribe(self._wake.set),
        ]
        result = await self.reconcile()
        self._task = asyncio.create_task(self._loop(), name=f"node-agent:{self.node}")
        if self.recheck_interval is not None:
            self._recheck_task = asyncio.create_task(
                self._recheck_loop(self.recheck_interval), name=f"node-agent:recheck:{self.node}"
            )
        return result

    async def stop(self, *, remove_rules: bool = False) -> None:
        """Drain every pod (in parallel). Rules stay unless ``remove_rules`` (then nothing is left)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        for task in (self._recheck_task, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._recheck_task = None
        async with self._lock:
            uids = list(self._pods)
            await asyncio.gather(
                *(self._stop_pod(uid, remove_rules=remove_rules) for uid in uids),
                return_exceptions=True,
            )
        await self.wait_removals()

    async def wait_removals(self) -> None:
        """Wait until pods removed earlier have drained and lost their rules."""
        while self._removals:
            await asyncio.gather(*list(self._removals), return_exceptions=True)

    def _on_change(self, change: StoreChange) -> None:
        if change.workloads:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            pending = any(not p.up for p in self._pods.values())
            try:
                # Wake on a store change; with pending pods also after the retry interval.
                await asyncio.wait_for(
                    self._wake.wait(), timeout=self.retry_interval if pending else None
                )
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception as exc:  # keep following the store whatever one pass did
                self.stats.last_error = str(exc)
                log.exception("node agent: reconcile failed")

    async def _recheck_loop(self, interval: float) -> None:
        # Sleep *after* each pass: a slow pass delays the next one instead of stacking up.
        while True:
            await asyncio.sleep(interval)
            try:
                await self.recheck()
            except Exception as exc:  # keep rechecking whatever one pass did
                self.stats.last_error = f"recheck: {exc}"
                log.exception("node agent: recheck failed")

    # --- recheck ---------------------------------------------------------------------------

    async def recheck(self) -> RecheckResult:
        """Look at every Up pod again, one at a time: repair drifted rules, restart a pod whose
        netns was recreated. Skipped (``skipped=True``) if a recheck is already running."""
        if self._rechecking:
            self.stats.rechecks_skipped += 1
            return RecheckResult(skipped=True)
        self._rechecking = True
        try:
            checked: list[str] = []
            outcomes: dict[str, list[str]] = {"repaired": [], "moved": [], "failed": [], "ok": []}
            for uid in sorted(self._pods):
                pod = self._pods.get(uid)
                if pod is None or not pod.up or pod.workload.netns is None:
                    continue  # gone meanwhile, or pending (the retry loop owns those)
                checked.append(uid)
                outcomes[await self._recheck_pod(uid, pod, pod.workload.netns)].append(uid)
            moved = outcomes["moved"]
            if moved:
                # The plan sees the new (dev, inode) and restarts these pods: stop, then start.
                await self.reconcile()
            self.stats.rechecks += 1
            return RecheckResult(
                checked=tuple(checked),
                repaired=tuple(outcomes["repaired"]),
                restarted=tuple(u for u in moved if (p := self._pods.get(u)) and p.up),
                failed=tuple(outcomes["failed"]),
            )
        finally:
            self._rechecking = False

    async def _recheck_pod(self, uid: str, pod: _Pod, netns: str) -> _Outcome:
        """``ok`` | ``repaired`` | ``moved`` (netns recreated) | ``failed``."""
        nsid = await asyncio.to_thread(self._netns_id_of, netns)
        if nsid is None:
            # The sandbox is gone but the pod is still wanted: its removal or a new netns will
            # come through the store/provider; nothing to repair in a missing netns.
            log.warning("node %s: recheck of pod %s: netns %s is missing", self.node, uid, netns)
            self.stats.recheck_failures += 1
            return "failed"
        if pod.netns_id is not None and nsid != pod.netns_id:
            log.warning(
                "node %s: pod %s: netns %s was recreated (dev/inode %s -> %s): restarting",
                self.node,
                uid,
                netns,
                pod.netns_id,
                nsid,
            )
            self.stats.netns_changed += 1
            return "moved"
        try:
            verify = getattr(self.rules, "verify", None)
            if callable(verify):
                drifts = list(await asyncio.to_thread(verify, netns, self.inpod))
                if not drifts:
                    return "ok"
            async with self._lock:
                # Under the lock: a reconcile may have stopped, removed or restarted the pod
                # while we read; only the pod we looked at, still Up, gets its rules rewritten.
                if self._pods.get(uid) is not pod or not pod.up:
                    return "ok"
                fixed = await asyncio.to_thread(self.rules.program, netns, self.inpod)
        except Exception as exc:
            self.stats.recheck_failures += 1
            self.stats.last_error = f"{uid}: recheck: {type(exc).__name__}: {exc}"
            log.warning("node %s: recheck of pod %s (%s) failed: %s", self.node, uid, netns, exc)
            return "failed"
        if not fixed:
            return "ok"  # repaired meanwhile (or verify saw a transient state)
        self.stats.rules_repaired += 1
        what = "; ".join(map(str, fixed)) if isinstance(fixed, list | tuple) else str(fixed)
        log.warning(
            "node %s: pod %s: rules drifted in %s, repaired: %s", self.node, uid, netns, what
        )
        return "repaired"

    # --- reconcile -------------------------------------------------------------------------

    async def reconcile(self) -> Plan:
        """One pass: compute the plan from the store and carry it out."""
        async with self._lock:
            wanted = dict(self.local_pods.pods(self.store, self.node))
            ids = {w.netns: self._netns_id_of(w.netns) for w in wanted.values() if w.netns}
            steps = plan({u: p.running() for u, p in self._pods.items()}, wanted, ids)
            if not steps.empty:
                log.info(
                    "node %s: start %s, stop %s, retry %s",
                    self.node,
                    [w.uid for w in steps.start],
                    list(steps.stop),
                    [w.uid for w in steps.retry],
                )
            # Removed pods drain in the background (their listeners close at once) so a long
            # drain deadline does not hold up other pods; restarted pods stop first, fully, so
            # they have released their listeners before the new start.
            for uid in steps.stop:
                if uid not in wanted:
                    self._remove_in_background(uid)
            await asyncio.gather(*(self._stop_pod(uid, remove_rules=False) for uid in steps.stop))
            await asyncio.gather(
                *(self._start_pod(w, ids.get(w.netns or "")) for w in steps.start + steps.retry)
            )
            self.stats.reconciles += 1
            self._update_readiness()
            return steps

    def _update_readiness(self) -> None:
        if self.readiness is None:
            return
        pending = sorted(u for u, p in self._pods.items() if not p.up)
        if pending:
            self.readiness.register(READINESS_TASK, "pending: " + ", ".join(pending))
        elif not self.local_pods.synced:
            self.readiness.register(READINESS_TASK, "pod list not synced yet")
        else:
            self._first_done = True
            self.readiness.done(READINESS_TASK)

    async def _start_pod(self, w: Workload, nsid: NetnsId | None) -> None:
        assert w.netns is not None
        pod = self._pods.get(w.uid)
        if pod is None:
            pod = self._pods[w.uid] = _Pod(workload=w, netns_id=nsid)
        pod.workload, pod.netns_id = w, nsid
        pod.attempts += 1
        drain = self._draining.get(w.uid)
        if drain is not None:
            # Back while its previous incarnation drains: the proxies are keyed by uid, so the
            # old ones must be gone before the new ones start (rare; bounded by the deadline).
            with contextlib.suppress(Exception):
                await asyncio.shield(drain)
        try:
            if nsid is None:
                raise NetfilterError(f"network namespace {w.netns} does not exist")
            # Rules first: listeners without rules would not see traffic; rules without listeners
            # fail closed (refused), never open.
            drifts = await asyncio.to_thread(self.rules.program, w.netns, self.inpod)
            if drifts:  # [] = rules already live and right (an adopted pod)
                self.stats.rules_changed += 1
            if self.certs is not None:
                self.certs.prefetch(w.identity())
            if self.proxies is not None:
                if pod.sockets is None:
                    pod.sockets = await asyncio.to_thread(self._socket_factory, w.netns)
                await self.proxies.start_pod(w, pod.sockets)
        except Exception as exc:
            pod.up = False
            pod.error = f"{type(exc).__name__}: {exc}"
            self.stats.start_failures += 1
            self.stats.last_error = f"{w.uid}: {pod.error}"
            log.warning(
                "node %s: pod %s (%s) not started, retry in %.0f s: %s",
                self.node,
                w.uid,
                w.netns,
                self.retry_interval,
                pod.error,
            )
            return
        pod.up, pod.error, pod.started_at = True, "", time.time()
        self.stats.started += 1
        log.info("node %s: serving pod %s in %s as %s", self.node, w.uid, w.netns, w.identity())

    def _remove_in_background(self, uid: str) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        drain = asyncio.create_task(self._stop(uid, pod), name=f"node-agent:drain:{uid}")
        self._draining[uid] = drain
        task = asyncio.create_task(self._remove(uid, pod, drain), name=f"node-agent:remove:{uid}")
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove(self, uid: str, pod: _Pod, drain: asyncio.Task[None]) -> None:
        try:
            await drain
        finally:
            if self._draining.get(uid) is drain:
                del self._draining[uid]
        netns = pod.workload.netns
        async with self._lock:
            # A pod (the same uid back, or a new one) may have been started in that netns while
            # this one drained: its rules are the same rules, so they stay.
            if any(p.workload.netns == netns for p in self._pods.values()):
                log.info("node %s: pod %s stopped (rules kept: netns in use)", self.node, uid)
                return
            await self._unprogram(uid, netns)
        log.info("node %s: pod %s stopped (rules removed)", self.node, uid)

    async def _unprogram(self, uid: str, netns: str | None) -> None:
        if netns and self._netns_id_of(netns) is not None:
            try:
                await asyncio.to_thread(self.rules.unprogram, netns, self.inpod)
            except NetfilterError as exc:
                log.warning("node %s: removing rules of %s failed: %s", self.node, uid, exc)

    async def _stop(self, uid: str, pod: _Pod) -> None:
        """Drain the pod's proxies and release its sockets (rules untouched)."""
        if pod.up and self.proxies is not None:
            try:
                await self.proxies.stop_pod(uid)
            except Exception:
                log.exception("node %s: stopping pod %s failed", self.node, uid)
            self.stats.stopped += 1
        close = getattr(pod.sockets, "close", None)
        if callable(close):
            close()

    async def _stop_pod(self, uid: str, *, remove_rules: bool) -> None:
        pod = self._pods.pop(uid, None)
        if pod is None:
            return
        await self._stop(uid, pod)
        if remove_rules:
            await self._unprogram(uid, pod.workload.netns)
        log.info(
            "node %s: pod %s stopped (rules %s)",
            self.node,
            uid,
            "removed" if remove_rules else "kept",
        )

    # --- views -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return (
            self._first_done and self.local_pods.synced and all(p.up for p in self._pods.values())
        )

    def pods(self) -> dict[str, bool]:
        """uid -> up."""
        return {uid: p.up for uid, p in self._pods.items()}

    def workload_state(self) -> dict[str, dict[str, object]]:
        """Per uid: ``state`` Pending|Up (ztunnel's words), pod info, netns and the last error."""
        return {
            uid: {
                "state": "Up" if p.up else "Pending",
                "info": {
                    "name": p.workload.name,
                    "namespace": p.workload.namespace,
                    "serviceAccount": p.workload.service_account,
                },
                "netns": p.workload.netns,
                "error": p.error,
            }
            for uid, p in sorted(self._pods.items())
        }

    def snapshot(self) -> dict[str, object]:
        """For config_dump: ``workloadState`` per uid and counters."""
        return {
            "node": self.node,
            "workloadState": self.workload_state(),
            "counters": self.counters(),
            "lastError": self.stats.last_error,
        }

    def counters(self) -> dict[str, int]:
        """ztunnel's ``workload_manager_*`` meanings, plus this agent's own."""
        return {
            "active_proxy_count": sum(1 for p in self._pods.values() if p.up),
            "pending_proxy_count": sum(1 for p in self._pods.values() if not p.up),
            "proxies_started_total": self.stats.started,
            "proxies_stopped_total": self.stats.stopped,
            "start_failures_total": self.stats.start_failures,
            "rules_changed_total": self.stats.rules_changed,
            "reconciles_total": self.stats.reconciles,
            "draining_proxy_count": len(self._removals),
            "rechecks_total": self.stats.rechecks,
            "rules_repaired_total": self.stats.rules_repaired,
            "recheck_failures_total": self.stats.recheck_failures,
            "netns_changed_total": self.stats.netns_changed,
        }


def _netns_factory(netns: str) -> SocketFactory:
    return NetnsSocketFactory(netns, mark=INPOD_MARK)

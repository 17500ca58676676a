"""The node agent's local-pods provider in Kubernetes mode: watched pods + their netns + xDS view.

Owns ``KubeLocalPods`` (the ``ztunnel.node.agent.LocalPods`` seam): it is fed by two reflectors
(this node's pods, every namespace), applies the pure membership decision (``pods.ClusterView``),
finds each member's network namespace in the background (``netns.NetnsFinder``, blocking, so in a
thread) and wakes the agent when the set of servable pods changed. ``pods(store, node)`` - called
by the agent under its lock - only reads: members whose netns is known, as workloads (the xDS
workload when the store has it, else one built from the Pod; ``pods.local_workload``).

A member whose netns is not found yet is retried every ``retry_interval`` and listed under
``unresolved`` in the snapshot; known netns are re-checked on every pass (a recreated sandbox gets
a new netns: the path vanishes or its inode changes) so the agent restarts the pod there.
``synced`` (readiness) waits for both lists and one resolution pass over the first members.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.kube.netns import NetnsError, NetnsFinder, NetnsId, stat_id
from ztunnel.kube.pods import (
    DEFAULT_CLUSTER_ID,
    ClusterView,
    LocalPod,
    local_workload,
    workload_uid,
)
from ztunnel.state.model import IPAddress, Workload
from ztunnel.state.store import WorkloadStore

log = logging.getLogger(__name__)

DEFAULT_RETRY_INTERVAL = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Resolved:
    pod_uid: str
    ips: tuple[IPAddress, ...]
    path: str
    netns_id: NetnsId


class KubeLocalPods:
    """See the module docstring. Feed it with ``on_pod``/``replace_pods`` and the namespace
    counterparts (``start_watches`` wires reflectors), and ``start()`` its resolver."""

    def __init__(
        self,
        node: str,
        *,
        finder: NetnsFinder,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        stat: Callable[[str], NetnsId | None] = stat_id,
    ) -> None:
        self.node = node
        self.view = ClusterView(node)
        self.finder = finder
        self.cluster_id = cluster_id
        self.trust_domain = trust_domain
        self.retry_interval = retry_interval
        self._stat_id = stat
        self._resolved: dict[str, _Resolved] = {}
        self.unresolved: dict[str, str] = {}  # ns/name -> why its netns is not known
        self._subscribers: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._pods_listed = False
        self._namespaces_listed = False
        self._first_pass = False
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    # --- feeding (reflector callbacks) ----------------------------------------------------

    def replace_pods(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.view.replace_pods(items)
        self._pods_listed = True
        self._wake.set()

    def on_pod(self, event_type: str, obj: Mapping[str, Any]) -> None:
        if self.view.apply_pod(event_type, obj):
            self._wake.set()

    def replace_namespaces(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.view.replace_namespaces(items)
        self._namespaces_listed = True
        self._wake.set()

    def on_namespace(self, event_type: str, obj: Mapping[str, Any]) -> None:
        if self.view.apply_namespace(event_type, obj):
            self._wake.set()

    # --- the LocalPods seam -----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._pods_listed and self._namespaces_listed and self._first_pass

    def pods(self, store: WorkloadStore, node: str) -> Mapping[str, Workload]:
        out: dict[str, Workload] = {}
        for key, pod in self.view.members().items():
            resolved = self._resolved.get(key)
            if resolved is None or not _same_pod(resolved, pod):
                continue
            xds = store.workload_by_uid(workload_uid(self.cluster_id, pod.namespace, pod.name))
            w = local_workload(
                pod,
                netns=resolved.path,
                xds=xds,
                cluster_id=self.cluster_id,
                trust_domain=self.trust_domain,
            )
            out[w.uid] = w
        return out

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # --- resolver ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"kube-local-pods:{self.node}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            timeout = self.retry_interval if (self.unresolved or self._resolved) else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass
            self._wake.clear()
            if not (self._pods_listed and self._namespaces_listed):
                continue
            try:
                changed = await self.resolve_once()
            except Exception:  # keep resolving whatever one pass did
                log.exception("kube local pods: resolving network namespaces failed")
                continue
            if changed or not self._first_pass:
                self._first_pass = True
                self._notify()

    async def resolve_once(self) -> bool:
        """One pass: forget non-members and stale netns, find the missing ones. Returns whether
        what ``pods`` returns changed."""
        self.passes += 1
        members = self.view.members()
        changed = False
        for key in [k for k in self._resolved if k not in members]:
            del self._resolved[key]
            changed = True
        for key in [k for k in self.unresolved if k not in members]:
            del self.unresolved[key]
        for key, pod in members.items():
            have = self._resolved.get(key)
            if have is not None and _same_pod(have, pod):
                if self._stat_id(have.path) == have.netns_id:
                    continue
                log.info("pod %s: network namespace %s changed or vanished", key, have.path)
            try:
                found = await asyncio.to_thread(self.finder.find, pod.ips, f"pod {key}")
            except NetnsError as err:
                if self.unresolved.get(key) != str(err):
                    log.warning("%s", err)
                self.unresolved[key] = str(err)
                if key in self._resolved:
                    del self._resolved[key]
                    changed = True
                continue
            self.unresolved.pop(key, None)
            new = _Resolved(
                pod_uid=pod.pod_uid, ips=pod.ips, path=found.path, netns_id=found.netns_id
            )
            if have != new:
                self._resolved[key] = new
                changed = True
                log.info("pod %s (%s): network namespace %s", key, pod.ips[0], found.path)
        return changed

    def _notify(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("kube local pods: a subscriber failed")

    # --- views ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """For config_dump: every pod of the node, its decision and netns."""
        return {
            "node": self.node,
            "synced": self.synced,
            "pods": {
                key: {
                    "enrolled": d.enrolled,
                    "reason": d.reason,
                    "netns": r.path if (r := self._resolved.get(key)) else None,
                    "error": self.unresolved.get(key, ""),
                }
                for key, d in self.view.decisions().items()
            },
        }


def _same_pod(resolved: _Resolved, pod: LocalPod) -> bool:
    return resolved.pod_uid == pod.pod_uid and resolved.ips == pod.ips

"""The indexed store of workloads, services and authorization policies.

Owns every lookup the data path makes, each O(1) (or O(k) in the few entries sharing a key): workload
by uid and by (network, IP); services by (network, VIP) and by ``ns/hostname``; a service's endpoints;
policies by ``ns/name`` and by namespace (``""`` holds GLOBAL policies); workloads on a node.

Two ways to change it: ``replace_all`` swaps everything at once (the local file), the keyed
``upsert_*``/``remove_*`` calls serve incremental sources (xDS). Every change bumps ``version`` and
notifies subscribers after the store is consistent again; policy subscribers are how the proxies learn
they must re-check live connections. Single-threaded by design (one event loop); pure, no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ztunnel.state.model import (
    Authorization,
    IPAddress,
    NetworkAddress,
    Scope,
    Service,
    Visibility,
    Workload,
)

log = logging.getLogger(__name__)
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreChange:
    """What one mutation touched; passed to subscribers."""

    version: int
    workloads: bool
    services: bool
    policies: bool


Subscriber = Callable[[StoreChange], None]


class StoreError(ValueError):
    """A mutation was refused (e.g. duplicate keys in ``replace_all``); the store is unchanged."""


class _Indexes:
    """All indexes together so ``replace_all`` can build a new set and swap it in one assignment."""

    __slots__ = (
        "endpoints",
        "policies",
        "policies_by_ns",
        "services",
        "services_by_vip",
        "workloads",
        "workloads_by_addr",
        "workloads_by_node",
    )

    def __init__(self) -> None:
        self.workloads: dict[str, Workload] = {}
        self.workloads_by_addr: dict[NetworkAddress, str] = {}
        self.workloads_by_node: dict[str, dict[str, Workload]] = {}
        # service key -> {workload uid: workload}; membership comes from Workload.services.
        self.endpoints: dict[str, dict[str, Workload]] = {}
        self.services: dict[str, Service] = {}
        self.services_by_vip: dict[NetworkAddress, dict[str, Service]] = {}
        self.policies: dict[str, Authorization] = {}
        self.policies_by_ns: dict[str, dict[str, Authorization]] = {}

    def add_workload(self, w: Workload) -> None:
        self.workloads[w.uid] = w
        for addr in w.network_addresses():
            # Last writer wins for a shared IP (as Istio's xDS handling); replace_all rejects it.
            self.workloads_by_addr[addr] = w.uid
        if w.node:
            self.workloads_by_node.setdefault(w.node, {})[w.uid] = w
        for svc_key in w.services:
            self.endpoints.setdefault(svc_key, {})[w.uid] = w

    def drop_workload(self, uid: str) -> Workload | None:
        w = self.workloads.pop(uid, None)
        if w is None:
            return None
        for addr in w.network_addresses():
            if self.workloads_by_addr.get(addr) == uid:
                del self.workloads_by_addr[addr]
        if w.node:
            _discard(self.workloads_by_node, w.node, uid)
        for svc_key in w.services:
            _discard(self.endpoints, svc_key, uid)
        return w

    def add_service(self, s: Service) -> None:
        self.services[s.key] = s
        for vip in s.vips:
            self.services_by_vip.setdefault(vip, {})[s.key] = s

    def drop_service(self, key: str) -> Service | None:
        s = self.services.pop(key, None)
        if s is None:
            return None
        for vip in s.vips:
            _discard(self.services_by_vip, vip, key)
        return s

    def add_policy(self, p: Authorization) -> None:
        self.policies[p.key] = p
        self.policies_by_ns.setdefault(_policy_bucket(p), {})[p.key] = p

    def drop_policy(self, key: str) -> Authorization | None:
        p = self.policies.pop(key, None)
        if p is None:
            return None
        _discard(self.policies_by_ns, _policy_bucket(p), key)
        return p


def _policy_bucket(p: Authorization) -> str:
    # GLOBAL policies live under "" (as ztunnel stores them); selector policies are only reached
    # through the workloads that reference them, so they get a bucket nobody reads by namespace.
    if p.scope is Scope.GLOBAL:
        return ""
    if p.scope is Scope.NAMESPACE:
        return p.namespace
    return "\x00selector"


def _discard(index: dict[_K, dict[str, _V]], outer: _K, inner: str) -> None:
    bucket = index.get(outer)
    if bucket is not None:
        bucket.pop(inner, None)
        if not bucket:
            del index[outer]


class WorkloadStore:
    """Workloads, services and policies, indexed; see the module docstring."""

    def __init__(self) -> None:
        self._ix = _Indexes()
        self._version = 0
        self._subscribers: list[Subscriber] = []
        self._policy_subscribers: list[Subscriber] = []

    # ----- reads -----

    @property
    def version(self) -> int:
        """Increases by one on every mutation (also on a no-op replace); 0 = never loaded."""
        return self._version

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._ix.workloads.get(uid)

    def workload_by_ip(self, ip: IPAddress, network: str = "") -> Workload | None:
        uid = self._ix.workloads_by_addr.get(NetworkAddress(network=network, address=ip))
        return None if uid is None else self._ix.workloads[uid]

    def service_by_key(self, key: str) -> Service | None:
        """Service by ``namespace/hostname``."""
        return self._ix.services.get(key)

    def services_by_vip(self, ip: IPAddress, network: str = "") -> tuple[Service, ...]:
        bucket = self._ix.services_by_vip.get(NetworkAddress(network=network, address=ip))
        return tuple(bucket.values()) if bucket else ()

    def service_by_vip(
        self, ip: IPAddress, network: str = "", client_namespace: str | None = None
    ) -> Service | None:
        """The service a client reaches at this VIP (Istio's ``get_best_by_vip``).

        Services visible only in their namespace are hidden from other namespaces; a service in the
        client's namespace wins, then a ``canonical`` one, then the first by key (deterministic).
        """
        candidates = [
            s
            for s in self.services_by_vip(ip, network)
            if s.visibility is Visibility.PUBLIC
            or client_namespace is None
            or s.namespace == client_namespace
        ]
        if not candidates:
            return None
        candidates.sort(
            key=lambda s: (s.namespace != client_namespace, not s.canonical, s.key),
        )
        return candidates[0]

    def endpoints(self, service_key: str) -> tuple[Workload, ...]:
        """All workloads that back the service (healthy or not), in uid order."""
        bucket = self._ix.endpoints.get(service_key)
        if not bucket:
            return ()
        return tuple(bucket[uid] for uid in sorted(bucket))

    def policy(self, key: str) -> Authorization | None:
        return self._ix.policies.get(key)

    def policies_in_namespace(self, namespace: str) -> tuple[Authorization, ...]:
        """NAMESPACE-scoped policies of ``namespace``; ``""`` gives the GLOBAL policies."""
        bucket = self._ix.policies_by_ns.get(namespace)
        return tuple(bucket.values()) if bucket else ()

    def policies_for(self, workload: Workload) -> tuple[tuple[Authorization, ...], tuple[str, ...]]:
        """Policies that apply to a workload, and the referenced policy keys that are unknown.

        Applies: GLOBAL policies, NAMESPACE policies of its namespace, and the policies it references.
        Cost is proportional to those policies only, never to the store size.
        """
        found: dict[str, Authorization] = {}
        for p in self.policies_in_namespace(""):
            found[p.key] = p
        if workload.namespace:
            for p in self.policies_in_namespace(workload.namespace):
                found[p.key] = p
        missing: list[str] = []
        for key in workload.authorization_policies:
            referenced = self._ix.policies.get(key)
            if referenced is None:
                missing.append(key)
            else:
                found[key] = referenced
        return tuple(found.values()), tuple(missing)

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        bucket = self._ix.workloads_by_node.get(node)
        return tuple(bucket[uid] for uid in sorted(bucket)) if bucket else ()

    def workloads(self) -> tuple[Workload, ...]:
        return tuple(self._ix.workloads.values())

    def services(self) -> tuple[Service, ...]:
        return tuple(self._ix.services.values())

    def policies(self) -> tuple[Authorization, ...]:
        return tuple(self._ix.policies.values())

    # ----- subscriptions -----

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` after every change; returns a function that unsubscribes."""
        return _add(self._subscribers, callback)

    def subscribe_policies(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` after any change that can alter an authorization verdict.

        That is a policy change or a workload change (a workload's referenced policies, namespace or
        identity may have changed). The proxies re-check their live connections here.
        """
        return _add(self._policy_subscribers, callback)

    # ----- mutations -----

    def replace_all(
        self,
        workloads: Iterable[Workload],
        services: Iterable[Service],
        policies: Iterable[Authorization],
    ) -> None:
        """Replace the whole content atomically; duplicate keys raise StoreError and change nothing."""
        ix = _Indexes()
        errors: list[str] = []
        for w in workloads:
            if w.uid in ix.workloads:
                errors.append(f"duplicate workload uid {w.uid!r}")
            for addr in w.network_addresses():
                other = ix.workloads_by_addr.get(addr)
                if other is not None and other != w.uid:
                    errors.append(f"workloads {other!r} and {w.uid!r} share address {addr}")
            ix.add_workload(w)
        for s in services:
            if s.key in ix.services:
                errors.append(f"duplicate service {s.key!r}")
            ix.add_service(s)
        for p in policies:
            if p.key in ix.policies:
                errors.append(f"duplicate policy {p.key!r}")
            ix.add_policy(p)
        if errors:
            raise StoreError("; ".join(errors))
        self._ix = ix
        self._changed(workloads=True, services=True, policies=True)

    def upsert_workload(self, workload: Workload) -> None:
        self._ix.drop_workload(workload.uid)
        self._ix.add_workload(workload)
        self._changed(workloads=True)

    def remove_workload(self, uid: str) -> bool:
        if self._ix.drop_workload(uid) is None:
            return False
        self._changed(workloads=True)
        return True

    def upsert_service(self, service: Service) -> None:
        self._ix.drop_service(service.key)
        self._ix.add_service(service)
        self._changed(services=True)

    def remove_service(self, key: str) -> bool:
        if self._ix.drop_service(key) is None:
            return False
        self._changed(services=True)
        return True

    def upsert_policy(self, policy: Authorization) -> None:
        self._ix.drop_policy(policy.key)
        self._ix.add_policy(policy)
        self._changed(policies=True)

    def remove_policy(self, key: str) -> bool:
        if self._ix.drop_policy(key) is None:
            return False
        self._changed(policies=True)
        return True

    def _changed(
        self, *, workloads: bool = False, services: bool = False, policies: bool = False
    ) -> None:
        self._version += 1
        change = StoreChange(
            version=self._version, workloads=workloads, services=services, policies=policies
        )
        targets = list(self._subscribers)
        if workloads or policies:
            targets += self._policy_subscribers
        for callback in targets:
            # A broken subscriber must not stop the others or undo the change.
            try:
                callback(change)
            except Exception:
                log.exception("store subscriber %r failed on version %d", callback, self._version)


def _add(subscribers: list[Subscriber], callback: Subscriber) -> Callable[[], None]:
    subscribers.append(callback)

    def unsubscribe() -> None:
        if callback in subscribers:
            subscribers.remove(callback)

    return unsubscribe

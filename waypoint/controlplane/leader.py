"""Lease-based leader election (coordination.k8s.io/v1), as client-go's leaderelection does it.

Several manager replicas serve xDS and certificates at the same time (reads need no leader); only the
waypoint controller's *writes* must come from one replica, so the service starts that controller when
this replica becomes leader and stops it when leadership is lost.

Protocol (client-go semantics): a candidate reads the Lease; it may take it when nobody holds it,
when it already holds it, or when the record has not changed for `lease_duration` seconds *as measured
on this candidate's own monotonic clock since it first saw that record* (so clock skew between
replicas does not matter). Writes are compare-and-swap on the Lease's resourceVersion (create, or
PUT with the read version: a concurrent writer gets 409 and loses). A leader that cannot renew for
`renew_deadline` steps down. On a clean stop the leader releases the Lease (empty holder) so a
standby takes over at once.

`LeaseRecord`, `parse_lease`, `lease_body` and `may_acquire` are the pure core; `LeaderElector` is
the asyncio shell over a kubernetes_asyncio `ApiClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None] | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRecord:
    holder: str = ""
    duration_seconds: int = 15
    acquire_time: str | None = None
    renew_time: str | None = None
    transitions: int = 0


def micro_time(moment: dt.datetime) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_lease(obj: Mapping[str, Any]) -> tuple[LeaseRecord, str]:
    """The record of a Lease object and its resourceVersion."""
    spec = obj.get("spec") or {}
    duration = spec.get("leaseDurationSeconds")
    record = LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=int(duration) if isinstance(duration, int) and duration > 0 else 15,
        acquire_time=spec.get("acquireTime"),
        renew_time=spec.get("renewTime"),
        transitions=int(spec.get("leaseTransitions") or 0),
    )
    return record, str((obj.get("metadata") or {}).get("resourceVersion") or "")


def lease_body(
    namespace: str, name: str, record: LeaseRecord, resource_version: str | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    spec: dict[str, Any] = {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "leaseTransitions": record.transitions,
    }
    if record.acquire_time:
        spec["acquireTime"] = record.acquire_time
    if record.renew_time:
        spec["renewTime"] = record.renew_time
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": spec,
    }


def may_acquire(
    identity: str,
    current: LeaseRecord,
    observed_since: float,
    now: float,
) -> bool:
    """Whether `identity` may write itself into the Lease now.

    `observed_since` is when (monotonic, local) this candidate first saw exactly this record.
    """
    if not current.holder or current.holder == identity:
        return True
    return now >= observed_since + current.duration_seconds


def next_record(
    identity: str, current: LeaseRecord | None, now: dt.datetime, duration: int
) -> LeaseRecord:
    """The record `identity` writes to take or renew the Lease."""
    stamp = micro_time(now)
    if current is not None and current.holder == identity:
        return LeaseRecord(
            holder=identity,
            duration_seconds=duration,
            acquire_time=current.acquire_time or stamp,
            renew_time=stamp,
            transitions=current.transitions,
        )
    transitions = current.transitions + 1 if current is not None and current.holder else 0
    if current is not None and not current.holder:
        transitions = current.transitions  # a released lease: not a forced transition
    return LeaseRecord(
        holder=identity,
        duration_seconds=duration,
        acquire_time=stamp,
        renew_time=stamp,
        transitions=transitions,
    )


class LeaderElector:
    """Keeps trying to hold one Lease; calls `on_started` / `on_stopped` on leadership changes."""

    def __init__(
        self,
        api_client: k8s.ApiClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: int = 15,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        on_started: Callback | None = None,
        on_stopped: Callback | None = None,
        release_on_cancel: bool = True,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if not identity:
            raise ValueError("leader election: identity must not be empty")
        if not 0 < renew_deadline < lease_duration:
            raise ValueError(
                f"leader election: renew_deadline {renew_deadline} must be between 0 and "
                f"lease_duration {lease_duration}"
            )
        self._api = api_client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._duration = lease_duration
        self._renew_deadline = renew_deadline
        self._retry = retry_period
        self._on_started = on_started
        self._on_stopped = on_stopped
        self._release_on_cancel = release_on_cancel
        self._mono = monotonic
        self._wall = wall
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.is_leader = False
        self.leader: str = ""  # the holder as last seen
        self.changed = asyncio.Event()  # set on every leadership change of this replica

    @property
    def _path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases"

    async def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any] | None:
        try:
            result = await self._api.call_api(
                path,
                method,
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=max(1.0, self._renew_deadline / 2),
            )
        except ApiException as err:
            if err.status == 404 and method == "GET":
                return None
            raise
        return result if isinstance(result, dict) else {}

    async def try_acquire_or_renew(self) -> bool:
        """One round: read, decide, compare-and-swap. True when this replica holds the Lease."""
        now = self._mono()
        obj = await self._call("GET", f"{self._path}/{self.name}")
        if obj is None:
            record = next_record(self.identity, None, self._wall(), self._duration)
            try:
                await self._call(
                    "POST", self._path, lease_body(self.namespace, self.name, record, None)
                )
            except ApiException as err:
                if err.status == 409:
                    return False  # someone else created it first
                raise
            self._observe(record, now)
            return True
        current, version = parse_lease(obj)
        if current != self._observed:
            self._observe(current, now)
        self.leader = current.holder
        if not may_acquire(self.identity, current, self._observed_at, now):
            return False
        record = next_record(self.identity, current, self._wall(), self._duration)
        try:
            await self._call(
                "PUT",
                f"{self._path}/{self.name}",
                lease_body(self.namespace, self.name, record, version),
            )
        except ApiException as err:
            if err.status == 409:
                return False  # lost the race; read again next round
            raise
        self._observe(record, now)
        return True

    def _observe(self, record: LeaseRecord, now: float) -> None:
        self._observed = record
        self._observed_at = now
        self.leader = record.holder

    async def _set_leader(self, value: bool) -> None:
        if value == self.is_leader:
            return
        self.is_leader = value
        self.changed.set()
        log.info(
            "leader election %s/%s: %s %s leadership",
            self.namespace,
            self.name,
            self.identity,
            "acquired" if value else "lost",
        )
        callback = self._on_started if value else self._on_stopped
        if callback is not None:
            result = callback()
            if inspect.isawaitable(result):
                await result

    async def run(self) -> None:
        """Elect forever (cancel to stop; the Lease is released if held)."""
        try:
            while True:
                try:
                    held = await self.try_acquire_or_renew()
                    if held:
                        self._last_renew = self._mono()
                except Exception as err:  # API trouble: keep trying, step down past the deadline
                    log.warning("leader election %s/%s: %s", self.namespace, self.name, err)
                    held = self.is_leader and self._mono() - self._last_renew < self._renew_deadline
                if held != self.is_leader:
                    await self._set_leader(held)
                await asyncio.sleep(self._retry)
        finally:
            if self.is_leader:
                with contextlib.suppress(Exception):
                    if self._release_on_cancel:
                        await asyncio.shield(self.release())
                    else:
                        await self._set_leader(False)

    async def release(self) -> None:
        """Give the Lease up (empty holder) so a standby takes over without waiting."""
        was_leader = self.is_leader
        await self._set_leader(False)
        if not was_leader:
            return
        obj = await self._call("GET", f"{self._path}/{self.name}")
        if obj is None:
            return
        current, version = parse_lease(obj)
        if current.holder != self.identity:
            return
        released = LeaseRecord(
            holder="",
            duration_seconds=1,
            acquire_time=current.acquire_time,
            renew_time=micro_time(self._wall()),
            transitions=current.transitions,
        )
        with contextlib.suppress(ApiException):
            await self._call(
                "PUT",
                f"{self._path}/{self.name}",
                lease_body(self.namespace, self.name, released, version),
            )

"""The xDS configuration source: Istio workload API pushes applied to the WorkloadStore.

``XdsSource`` is the ``ResourceHandler`` an ``XdsClient`` feeds. Per push it converts every resource
with ``ztunnel.xds.convert``, applies the good ones to the store with the keyed
``upsert_*``/``remove_*`` calls and returns the bad ones with their reason, which the session NACKs
(the rest of the push still applies, and a rejected resource keeps its last good state in the store).
Removals arrive by resource name: a workload uid or a service ``ns/hostname`` for Address resources,
``ns/name`` for Authorization. A resource whose name differs from its key is rejected, because later
removals by that name would miss it.

Nothing is dropped on disconnect: the store keeps the last known state until the control plane says
otherwise (ztunnel never expires xDS state). ``ready`` turns true once the first push of every
subscribed type URL has been applied (also when some of its resources were rejected, so one bad
resource cannot keep the node from starting), and stays true.

Usage:
    source = XdsSource(store)
    client = XdsClient(XdsClientConfig(address=..., node=NodeInfo.from_env(os.environ)), source)
    task = asyncio.create_task(client.run())
    await source.wait_ready(timeout=30)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from ztunnel.state.model import Authorization, Service, Workload
from ztunnel.state.store import WorkloadStore
from ztunnel.xds import convert, protos
from ztunnel.xds.session import Versioned

log = logging.getLogger(__name__)

__all__ = ["XdsSource", "XdsSourceCounters"]

_Kind = Literal["workload", "service"]


@dataclass(slots=True)
class XdsSourceCounters:
    """What the source has done since it was created (exported as metrics by the caller)."""

    pushes: int = 0
    workloads_applied: int = 0
    services_applied: int = 0
    policies_applied: int = 0
    removed: int = 0
    rejected: int = 0


class XdsSource:
    """Applies decoded workload-API resources to a WorkloadStore; see the module docstring."""

    def __init__(
        self,
        store: WorkloadStore,
        *,
        type_urls: Sequence[str] = protos.ZTUNNEL_TYPE_URLS,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        unknown = [t for t in type_urls if t not in _HANDLED]
        if unknown:
            raise ValueError(f"XdsSource cannot handle type URL(s) {unknown}")
        self._store = store
        self._type_urls = frozenset(type_urls)
        self._on_ready = on_ready
        self._seen: set[str] = set()
        self._ready_event = asyncio.Event()
        # Address resource name -> what it is in the store, so a removal by name finds it.
        self._address_kinds: dict[str, _Kind] = {}
        self.counters = XdsSourceCounters()
        # The reasons of the most recent rejection per resource name (cleared once it applies).
        self.rejections: dict[str, str] = {}

    @property
    def ready(self) -> bool:
        return self._seen >= self._type_urls

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the first push of every subscribed type URL has been applied."""
        await asyncio.wait_for(self._ready_event.wait(), timeout)

    # ----- ResourceHandler -----

    def on_resources(
        self, type_url: str, added: Mapping[str, Versioned], removed: Sequence[str]
    ) -> Mapping[str, str]:
        if type_url not in self._type_urls:
            # The session only passes subscribed types; this guards a miswired client.
            return {"*": f"type URL {type_url!r} is not handled by this source"}
        self.counters.pushes += 1
        if type_url == protos.ADDRESS_TYPE_URL:
            for name in removed:
                self._remove_address(name)
            rejected = self._apply(added, self._apply_address)
        else:
            for name in removed:
                if self._store.remove_policy(name):
                    self.counters.removed += 1
                self.rejections.pop(name, None)
            rejected = self._apply(added, self._apply_policy)
        self._mark_seen(type_url)
        return rejected

    # ----- internals -----

    def _apply(
        self, added: Mapping[str, Versioned], apply_one: Callable[[str, protos.Message], None]
    ) -> dict[str, str]:
        rejected: dict[str, str] = {}
        for name, (_version, message) in added.items():
            try:
                apply_one(name, message)
            except (convert.ConversionError, _NameMismatch) as err:
                rejected[name] = str(err)
                self.rejections[name] = str(err)
                self.counters.rejected += 1
                log.warning("xds: rejected %s: %s", name, err)
            else:
                self.rejections.pop(name, None)
        return rejected

    def _apply_address(self, name: str, message: protos.Message) -> None:
        if not isinstance(message, protos.Address):
            raise _NameMismatch(f"expected istio.workload.Address, got {type(message).__name__}")
        value = convert.address_from_proto(message)
        _check_name(name, value)
        kind: _Kind = "workload" if isinstance(value, Workload) else "service"
        previous = self._address_kinds.get(name)
        if previous is not None and previous != kind:
            self._remove_address(name)  # the same name changed from workload to service or back
        self._address_kinds[name] = kind
        if isinstance(value, Workload):
            self._store.upsert_workload(value)
            self.counters.workloads_applied += 1
        else:
            self._store.upsert_service(value)
            self.counters.services_applied += 1

    def _apply_policy(self, name: str, message: protos.Message) -> None:
        if not isinstance(message, protos.Authorization):
            raise _NameMismatch(
                f"expected istio.security.Authorization, got {type(message).__name__}"
            )
        policy = convert.authorization_from_proto(message)
        _check_name(name, policy)
        self._store.upsert_policy(policy)
        self.counters.policies_applied += 1

    def _remove_address(self, name: str) -> None:
        kind = self._address_kinds.pop(name, None)
        self.rejections.pop(name, None)
        # Without a record (e.g. it was only ever rejected), try both, workload first (ztunnel).
        removed = False
        if kind in (None, "workload"):
            removed = self._store.remove_workload(name)
        if not removed and kind in (None, "service"):
            removed = self._store.remove_service(name)
        if removed:
            self.counters.removed += 1

    def _mark_seen(self, type_url: str) -> None:
        was_ready = self.ready
        self._seen.add(type_url)
        if self.ready and not was_ready:
            self._ready_event.set()
            log.info("xds: first push of every type applied; source is ready")
            if self._on_ready is not None:
                self._on_ready()


_HANDLED = frozenset({protos.ADDRESS_TYPE_URL, protos.AUTHORIZATION_TYPE_URL})


class _NameMismatch(ValueError):
    """The resource name is not the key of what it carries."""


def _check_name(name: str, value: Workload | Service | Authorization) -> None:
    key = convert.resource_name(value)
    if key != name:
        what = (
            "workload uid"
            if isinstance(value, Workload)
            else "service key <namespace>/<hostname>"
            if isinstance(value, Service)
            else "policy key <namespace>/<name>"
        )
        raise _NameMismatch(f"resource name {name!r} does not match its {what} {key!r}")

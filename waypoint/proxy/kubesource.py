"""L7 configuration from Kubernetes: HTTPRoute, GRPCRoute and AuthorizationPolicy, listed and watched.

Owns the list-then-watch loop over the manager's `KubeApi` seam (the same client the manager uses):
the objects of the three kinds are kept by ``namespace/name``; every change hands the full set
(as the raw object lists the local file also yields) to a callback, which validates and applies it
(a bad object is rejected and reported there, the rest works). A 410 Gone relists; other errors
back off and retry, then relist (events missed meanwhile are not lost). A callback that raises is
logged and does not stop the watches. `relists` and `errors` count what happened (tests, metrics).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

from waypoint.manager.kinds import ResourceType
from waypoint.manager.kube import Gone, KubeApi, KubeError
from waypoint.proxy.config import GRPC_ROUTES_KEY, HTTP_ROUTES_KEY, POLICIES_KEY

log = logging.getLogger(__name__)

HTTP_ROUTE: Final = ResourceType(
    group="gateway.networking.k8s.io", version="v1", plural="httproutes", kind="HTTPRoute"
)
GRPC_ROUTE: Final = ResourceType(
    group="gateway.networking.k8s.io", version="v1", plural="grpcroutes", kind="GRPCRoute"
)
AUTHORIZATION_POLICY: Final = ResourceType(
    group="security.istio.io",
    version="v1",
    plural="authorizationpolicies",
    kind="AuthorizationPolicy",
)
KINDS: Final = {
    HTTP_ROUTES_KEY: HTTP_ROUTE,
    GRPC_ROUTES_KEY: GRPC_ROUTE,
    POLICIES_KEY: AUTHORIZATION_POLICY,
}


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class KubeL7Source:
    """Keeps the three kinds in memory; calls `on_change(objects by config key)` after changes."""

    def __init__(
        self,
        api: KubeApi,
        on_change: Callable[[Mapping[str, list[Any]]], object],
        *,
        retry_delay: float = 1.0,
    ) -> None:
        self.api = api
        self.on_change = on_change
        self.retry_delay = retry_delay
        self.objects: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in KINDS}
        self._versions: dict[str, str] = {}
        self.relists = 0
        self.errors = 0
        self.changes = 0

    def snapshot(self) -> dict[str, list[Any]]:
        return {key: list(objs.values()) for key, objs in self.objects.items()}

    async def _list(self, key: str) -> None:
        items, version = await self.api.list(KINDS[key])
        self.objects[key] = {_key(o): o for o in items}
        self._versions[key] = version

    def _publish(self) -> None:
        self.changes += 1
        try:
            self.on_change(self.snapshot())
        except Exception:  # the watches must outlive a bug in one consumer
            log.exception("applying the Kubernetes L7 configuration failed")

    async def initial(self) -> None:
        """List every kind once and publish (start-up waits for this)."""
        for key in KINDS:
            await self._list(key)
        self._publish()

    async def _watch(self, key: str) -> None:
        while True:
            try:
                async for event in self.api.watch(
                    KINDS[key], resource_version=self._versions.get(key, "")
                ):
                    if event.resource_version:
                        self._versions[key] = event.resource_version
                    if event.type == "BOOKMARK":
                        continue
                    name = _key(event.obj)
                    if event.type == "DELETED":
                        self.objects[key].pop(name, None)
                    else:
                        self.objects[key][name] = dict(event.obj)
                    self._publish()
            except Gone:
                log.info("watch of %s expired (410 Gone); relisting", KINDS[key].kind)
                await self._relist(key)
                continue
            except (KubeError, OSError, ValueError) as err:
                self.errors += 1
                log.warning("watch of %s failed: %s; retrying", KINDS[key].kind, err)
                await asyncio.sleep(self.retry_delay)
                await self._relist(key)

    async def _relist(self, key: str) -> None:
        try:
            await self._list(key)
        except (KubeError, OSError, ValueError) as err:
            self.errors += 1
            log.warning("relist of %s failed: %s", KINDS[key].kind, err)
            await asyncio.sleep(self.retry_delay)
            return
        self.relists += 1
        self._publish()

    async def run(self) -> None:
        """Watch all kinds until cancelled."""
        await asyncio.gather(*(self._watch(key) for key in KINDS))

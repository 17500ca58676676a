"""L7 configuration from Kubernetes: HTTPRoute, GRPCRoute and AuthorizationPolicy, listed and watched.

Owns the list-then-watch loop over the manager's `KubeApi` seam (the same client the manager uses)
and which namespaces it covers (`watch_namespaces`). By default a waypoint pod watches only its
own namespace (``POD_NAMESPACE``, set by the rendered Deployment): that is what the RoleBinding the
manager renders for its ServiceAccount allows. ``WAYPOINT_WATCH_NAMESPACES`` widens it (a
comma-separated list, or ``*`` for every namespace, which needs a ClusterRoleBinding); without
either (local mode, lab) it watches every namespace. One list + watch runs per kind and namespace.
The objects of the three kinds are kept by ``namespace/name``; every change hands the full set
(as the raw object lists the local file also yields) to a callback, which validates and applies it
(a bad object is rejected and reported there, the rest works). A 410 Gone relists; other errors
back off and retry, then relist (events missed meanwhile are not lost). A callback that raises is
logged and does not stop the watches. `relists` and `errors` count what happened (tests, metrics).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
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
WATCH_NAMESPACES_ENV: Final = "WAYPOINT_WATCH_NAMESPACES"
ALL_NAMESPACES: Final = "*"
_NAMESPACE_NAME: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def parse_namespaces(value: str, where: str) -> tuple[str, ...] | None:
    """'a,b' -> ('a', 'b'); '*' -> None (every namespace). ValueError names `where` and the bad part."""
    if value.strip() == ALL_NAMESPACES:
        return None
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if not names:
        raise ValueError(f"{where}: no namespace in {value!r} (use {ALL_NAMESPACES!r} for all)")
    for name in names:
        if not _NAMESPACE_NAME.match(name):
            raise ValueError(f"{where}: {name!r} is not a namespace name")
    return names


def watch_namespaces(env: Mapping[str, str]) -> tuple[str, ...] | None:
    """The namespaces a waypoint watches (None: all), from `WATCH_NAMESPACES_ENV` else `POD_NAMESPACE`."""
    wide = (env.get(WATCH_NAMESPACES_ENV) or "").strip()
    if wide:
        return parse_namespaces(wide, WATCH_NAMESPACES_ENV)
    own = (env.get("POD_NAMESPACE") or "").strip()
    return parse_namespaces(own, "POD_NAMESPACE") if own else None


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


# One list + watch: a config key and a namespace (None: every namespace).
Scope = tuple[str, str | None]


class KubeL7Source:
    """Keeps the three kinds in memory; calls `on_change(objects by config key)` after changes.

    `namespaces`: the namespaces to watch; None (default) reads `watch_namespaces(os.environ)`,
    `ALL_NAMESPACES` watches every namespace.
    """

    def __init__(
        self,
        api: KubeApi,
        on_change: Callable[[Mapping[str, list[Any]]], object],
        *,
        namespaces: Sequence[str] | str | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self.api = api
        self.on_change = on_change
        self.retry_delay = retry_delay
        if namespaces is None:
            self.namespaces = watch_namespaces(os.environ)
        elif isinstance(namespaces, str):
            self.namespaces = parse_namespaces(namespaces, "namespaces")
        else:
            self.namespaces = parse_namespaces(",".join(namespaces), "namespaces")
        """The watched namespaces; None: every namespace."""
        self.objects: dict[str, dict[str, dict[str, Any]]] = {key: {} for key in KINDS}
        self._versions: dict[Scope, str] = {}
        self.relists = 0
        self.errors = 0
        self.changes = 0

    @property
    def scopes(self) -> list[Scope]:
        spaces: Sequence[str | None] = self.namespaces if self.namespaces is not None else [None]
        return [(key, ns) for key in KINDS for ns in spaces]

    def snapshot(self) -> dict[str, list[Any]]:
        return {key: list(objs.values()) for key, objs in self.objects.items()}

    @staticmethod
    def _what(scope: Scope) -> str:
        key, ns = scope
        return KINDS[key].kind + (f" in {ns}" if ns else "")

    async def _list(self, scope: Scope) -> None:
        key, ns = scope
        items, version = await self.api.list(KINDS[key], namespace=ns)
        # Replace only this scope's part: other namespaces have their own list + watch.
        kept = {
            k: o
            for k, o in self.objects[key].items()
            if ns is not None and (o.get("metadata") or {}).get("namespace") != ns
        }
        kept.update({_key(o): o for o in items})
        self.objects[key] = kept
        self._versions[scope] = version

    def _publish(self) -> None:
        self.changes += 1
        try:
            self.on_change(self.snapshot())
        except Exception:  # the watches must outlive a bug in one consumer
            log.exception("applying the Kubernetes L7 configuration failed")

    async def initial(self) -> None:
        """List every kind (in every watched namespace) once and publish (start-up waits for this)."""
        for scope in self.scopes:
            await self._list(scope)
        self._publish()

    async def _watch(self, scope: Scope) -> None:
        key, ns = scope
        while True:
            try:
                async for event in self.api.watch(
                    KINDS[key], resource_version=self._versions.get(scope, ""), namespace=ns
                ):
                    if event.resource_version:
                        self._versions[scope] = event.resource_version
                    if event.type == "BOOKMARK":
                        continue
                    name = _key(event.obj)
                    if event.type == "DELETED":
                        self.objects[key].pop(name, None)
                    else:
                        self.objects[key][name] = dict(event.obj)
                    self._publish()
            except Gone:
                log.info("watch of %s expired (410 Gone); relisting", self._what(scope))
                await self._relist(scope)
                continue
            except (KubeError, OSError, ValueError) as err:
                self.errors += 1
                log.warning("watch of %s failed: %s; retrying", self._what(scope), err)
                await asyncio.sleep(self.retry_delay)
                await self._relist(scope)

    async def _relist(self, scope: Scope) -> None:
        try:
            await self._list(scope)
        except (KubeError, OSError, ValueError) as err:
            self.errors += 1
            log.warning("relist of %s failed: %s", self._what(scope), err)
            await asyncio.sleep(self.retry_delay)
            return
        self.relists += 1
        self._publish()

    async def run(self) -> None:
        """Watch all kinds in every watched namespace until cancelled."""
        await asyncio.gather(*(self._watch(scope) for scope in self.scopes))

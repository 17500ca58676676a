"""The control plane process: Kubernetes watches -> translation -> delta xDS, plus the Istio CA.

Owns `ControlPlane`: listeners on a `WatchCache` (`waypoint.manager.controller`; list + watch,
resume, relist on 410) for Namespaces, Pods, Services, EndpointSlices, AuthorizationPolicies,
PeerAuthentications, Gateways and GatewayClasses. In `waypoint manager` that cache is the one the
waypoint controller uses, so each kind is watched once per process. On any change a short debounce
coalesces bursts, then the binding table (`WatchCache.binding_table`, the same memoized computation
the waypoint controller reports on Services) and the workload API view (`translate`) are recomputed
and handed to `XdsServer` as the complete set of each type URL (the server sends every client only
what changed for it). The CA (`IstioCaService`) authenticates callers with
`authn.TokenReviewAuthenticator` and lets a node agent obtain only identities of pods on its own
node, from the same Pod cache.

Every replica serves xDS and certificates; only the waypoint controller's writes are gated by
leader election (see `waypoint.controlplane.cli`). All decisions live in the pure modules; this
module moves data between the API, them and the gRPC servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from waypoint.controlplane import authn
from waypoint.controlplane.ca_server import Authenticator, IstioCaService, Signer
from waypoint.controlplane.translate import ClusterState, TranslateConfig, Translation, translate
from waypoint.controlplane.xds_server import XdsServer
from waypoint.manager import kinds
from waypoint.manager.binding import BindingTable
from waypoint.manager.controller import Informer, WatchCache, compute_bindings
from waypoint.manager.kinds import ResourceType
from waypoint.manager.kube import KubeApi
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.xds import protos
from ztunnel.xds.convert import model_to_resources

log = logging.getLogger(__name__)

__all__ = [
    "AUTHORIZATION_POLICY",
    "ENDPOINT_SLICE",
    "PEER_AUTHENTICATION",
    "WATCHED",
    "ControlPlane",
    "ControlPlaneConfig",
    "compute_bindings",
]

ENDPOINT_SLICE: Final = ResourceType(
    group="discovery.k8s.io", version="v1", plural="endpointslices", kind="EndpointSlice"
)
AUTHORIZATION_POLICY: Final = ResourceType(
    group="security.istio.io",
    version="v1",
    plural="authorizationpolicies",
    kind="AuthorizationPolicy",
)
PEER_AUTHENTICATION: Final = ResourceType(
    group="security.istio.io", version="v1", plural="peerauthentications", kind="PeerAuthentication"
)
WATCHED: Final = (
    kinds.NAMESPACE,
    kinds.POD,
    kinds.SERVICE,
    ENDPOINT_SLICE,
    AUTHORIZATION_POLICY,
    PEER_AUTHENTICATION,
    kinds.GATEWAY,
    kinds.GATEWAY_CLASS,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlPlaneConfig:
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    debounce_seconds: float = 0.05  # coalesce event bursts into one recomputation
    watch_timeout: int = 300


class ControlPlane:
    """Watches the cluster and keeps an `XdsServer` snapshot and a CA's node view current."""

    def __init__(
        self,
        api: KubeApi,
        config: ControlPlaneConfig | None = None,
        *,
        xds: XdsServer | None = None,
        cache: WatchCache | None = None,
    ) -> None:
        self.api = api
        self.config = config or ControlPlaneConfig()
        self.xds = xds or XdsServer()
        # A shared cache belongs to the process (the waypoint controller listens to it too).
        self._owns_cache = cache is None
        self.cache = cache or WatchCache(api, watch_timeout=self.config.watch_timeout)
        self.informers: dict[str, Informer] = {rt.kind: self.cache.informer(rt) for rt in WATCHED}
        self.translation: Translation | None = None
        self.bindings = BindingTable()
        self.rebuilds = 0
        self._node_index: dict[str, frozenset[SpiffeId]] = {}
        self._dirty = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = False
        self._warned: set[str] = set()
        self._server: grpc.aio.Server | None = None

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the first snapshot from fully listed caches is published."""
        return self.translation is not None

    async def start(self, sync_timeout: float = 60.0) -> None:
        """Listen to the watches, wait for the first full list of each, publish the first snapshot."""
        for inf in self.informers.values():
            inf.add_listener(self._on_event)
        self._listening = True
        self.cache.start()
        await self.cache.wait_synced(list(self.informers.values()), timeout=sync_timeout)
        self.rebuild()
        self._tasks.append(asyncio.create_task(self._rebuild_loop(), name="cp-rebuild"))

    async def stop(self) -> None:
        if self._listening:
            for inf in self.informers.values():
                inf.remove_listener(self._on_event)
            self._listening = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(1.0)
        if self._owns_cache:
            await self.cache.stop()

    async def serve(
        self,
        address: str,
        *,
        ca: IstioCaService | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> int:
        """One gRPC server with xDS (and the CA, if given) on `address`; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("control plane already serving")
        server = grpc.aio.server()
        self.xds.add_to_server(server)
        if ca is not None:
            ca.add_to_server(server)
        port = (
            server.add_insecure_port(address)
            if credentials is None
            else server.add_secure_port(address, credentials)
        )
        if port == 0:
            raise OSError(f"control plane cannot bind {address}")
        await server.start()
        self._server = server
        return int(port)

    # --- CA wiring ---------------------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return self.informers[kinds.POD.kind].cache.get((namespace, name))

    def identities_by_node(self) -> Mapping[str, frozenset[SpiffeId]]:
        return self._node_index

    def ca_service(
        self,
        signer: Signer,
        authenticator: Authenticator,
    ) -> IstioCaService:
        """The Istio CA with the same-node impersonation rule over this control plane's pods."""
        return IstioCaService(
            signer,
            authenticator,
            may_impersonate=authn.node_impersonation(self.identities_by_node),
        )

    # --- events -> snapshot --------------------------------------------------------------------

    def _on_event(self, _event_type: str, _obj: Mapping[str, Any]) -> None:
        self._dirty.set()

    async def _rebuild_loop(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.config.debounce_seconds)
            self._dirty.clear()
            try:
                self.rebuild()
            except Exception:  # a bug must not stop serving the last good snapshot
                log.exception("control plane: rebuild failed; keeping the previous snapshot")

    def _objects(self, rt: ResourceType) -> list[dict[str, Any]]:
        return list(self.informers[rt.kind].cache.values())

    def rebuild(self) -> Translation:
        """Recompute everything from the caches and publish it."""
        pods = self._objects(kinds.POD)
        namespaces = self._objects(kinds.NAMESPACE)
        services = self._objects(kinds.SERVICE)
        self.bindings = self.cache.binding_table()
        result = translate(
            ClusterState(
                namespaces=namespaces,
                pods=pods,
                services=services,
                endpoint_slices=self._objects(ENDPOINT_SLICE),
                authorization_policies=self._objects(AUTHORIZATION_POLICY),
                peer_authentications=self._objects(PEER_AUTHENTICATION),
                bindings=self.bindings,
            ),
            self.config.translate,
        )
        for warning in result.warnings:
            if warning not in self._warned:
                log.warning("control plane: %s", warning)
        self._warned = set(result.warnings)
        resources = model_to_resources(
            result.workloads.values(), result.services.values(), result.authorizations.values()
        )
        for type_url in protos.ZTUNNEL_TYPE_URLS:
            self.xds.set_resources(type_url, resources.get(type_url, {}), replace=True)
        self._node_index = authn.identities_by_node(pods, self.config.translate.trust_domain)
        self.translation = result
        self.rebuilds += 1
        return result

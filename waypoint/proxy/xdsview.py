"""Cluster mode of the waypoint proxy: its settings, its workload view over delta xDS, its CA client.

Owns `ClusterSettings` (what a waypoint pod reads from the environment the manager's rendered
Deployment sets - ``waypoint/manager/render.py`` - with flags overriding; the same variables as
ztunnel's Kubernetes mode, ``ztunnel/kube/mode.py``), `XdsView` (an ``XdsClient`` feeding an
``XdsSource`` into the proxy's ``WorkloadStore``: Istio's workload API, the view ztunnel gets) and
`ca_client(settings)` (an ``IstioCaClient`` that authenticates with the pod's OWN projected token and
asks for the pod's own identity: no ``ImpersonatedIdentity``, since a waypoint is not a node agent and
the CA gives it nothing but its service account's identity).

Settings (env, default): ``XDS_ADDRESS`` (required; ``https://`` TLS with ``XDS_ROOT_CA``,
``http://`` plaintext), ``CA_ADDRESS`` (= XDS_ADDRESS), ``XDS_ROOT_CA``/``CA_ROOT_CA``
(``/var/run/secrets/istio/root-cert.pem``), ``ISTIO_TOKEN_PATH``
(``/var/run/secrets/tokens/istio-token``; empty: no token), ``POD_NAME``, ``POD_NAMESPACE``
(required: the identity's namespace), ``SERVICE_ACCOUNT`` (required: the identity's account),
``INSTANCE_IP``, ``NODE_NAME``, ``CLUSTER_ID`` (``Kubernetes``), ``TRUST_DOMAIN``
(``cluster.local``), ``WAYPOINT_NAME`` (the Gateway; default the service account), ``KUBECONFIG``
(else in-cluster), ``ISTIO_META_*`` (node metadata), ``XDS_HEADER_*``/``CA_HEADER_*``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError
from ztunnel.kube.mode import (
    DEFAULT_TOKEN_PATH,
    Endpoint,
    KubeModeError,
    control_plane_endpoints,
    env_headers,
)
from ztunnel.kube.pods import DEFAULT_CLUSTER_ID
from ztunnel.sources.xds import XdsSource
from ztunnel.state.store import WorkloadStore
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.session import NodeInfo

log = logging.getLogger(__name__)

__all__ = ["ClusterSettings", "ClusterSettingsError", "XdsView", "ca_client"]

# Only these settings may be overridden by flags (keys are the env names).
OVERRIDABLE: Final = (
    "XDS_ADDRESS",
    "CA_ADDRESS",
    "ISTIO_TOKEN_PATH",
    "POD_NAMESPACE",
    "SERVICE_ACCOUNT",
    "TRUST_DOMAIN",
    "WAYPOINT_NAME",
    "KUBECONFIG",
)


class ClusterSettingsError(KubeModeError):
    """A cluster-mode setting is missing or wrong; the message names the variable or flag."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSettings:
    """Everything cluster mode needs; build with ``from_env``."""

    xds: Endpoint
    ca: Endpoint
    identity: SpiffeId
    gateway_name: str
    node_info: NodeInfo
    token_path: Path | None = Path(DEFAULT_TOKEN_PATH)
    cluster_id: str = DEFAULT_CLUSTER_ID
    kubeconfig: str | None = None
    extra_xds_headers: tuple[tuple[str, str], ...] = ()
    extra_ca_headers: tuple[tuple[str, str], ...] = ()
    xds_backoff_max: float = 15.0

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> ClusterSettings:
        """Settings from ``env`` with ``overrides`` (flags by env name; None = unset) first."""
        merged = dict(env)
        for key, value in (overrides or {}).items():
            if key not in OVERRIDABLE:
                raise ValueError(f"cluster setting {key} cannot be overridden")
            if value is not None:
                merged[key] = value

        def get(name: str, default: str = "") -> str:
            return merged.get(name, default).strip()

        try:
            xds, ca = control_plane_endpoints(merged)
        except KubeModeError as err:
            raise ClusterSettingsError(str(err)) from None
        namespace, account = get("POD_NAMESPACE"), get("SERVICE_ACCOUNT")
        for var, value in (("POD_NAMESPACE", namespace), ("SERVICE_ACCOUNT", account)):
            if not value:
                raise ClusterSettingsError(
                    f"{var} is not set (the downward API sets it; it names this pod's identity)"
                )
        trust_domain = get("TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN
        try:
            identity = SpiffeId(trust_domain, namespace, account)
        except SpiffeIdError as err:
            raise ClusterSettingsError(
                f"TRUST_DOMAIN/POD_NAMESPACE/SERVICE_ACCOUNT: {err}"
            ) from None
        cluster_id = get("CLUSTER_ID") or DEFAULT_CLUSTER_ID
        try:
            info = NodeInfo.from_env({**merged, "CLUSTER_ID": cluster_id})
        except ValueError as err:
            raise ClusterSettingsError(str(err)) from None
        token = merged.get("ISTIO_TOKEN_PATH", DEFAULT_TOKEN_PATH).strip()
        return cls(
            xds=xds,
            ca=ca,
            identity=identity,
            gateway_name=get("WAYPOINT_NAME") or account,
            node_info=info,
            token_path=Path(token) if token else None,
            cluster_id=cluster_id,
            kubeconfig=get("KUBECONFIG") or None,
            extra_xds_headers=env_headers(merged, "XDS_HEADER_"),
            extra_ca_headers=env_headers(merged, "CA_HEADER_"),
        )


def ca_client(settings: ClusterSettings) -> IstioCaClient:
    """The Istio CA client of a waypoint: its own token, its own identity, no impersonation."""
    return IstioCaClient(
        settings.ca.target,
        credentials=settings.ca.credentials(),
        server_name=settings.ca.server_name,
        token_path=settings.token_path,
        cluster_id=settings.cluster_id,
        impersonate=False,
        extra_headers=settings.extra_ca_headers,
    )


class XdsView:
    """Istio's workload API from the control plane into a ``WorkloadStore`` (delta xDS)."""

    def __init__(self, settings: ClusterSettings, store: WorkloadStore) -> None:
        self.settings = settings
        self.ready = asyncio.Event()
        self.source = XdsSource(store, on_ready=self.ready.set)
        self.client = XdsClient(
            XdsClientConfig(
                address=settings.xds.target,
                node=settings.node_info,
                credentials=settings.xds.credentials(),
                server_name=settings.xds.server_name,
                token_path=settings.token_path,
                extra_headers=settings.extra_xds_headers,
                backoff_max=settings.xds_backoff_max,
            ),
            self.source,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Connect in the background (reconnects with backoff; state kept while disconnected)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.client.run(), name="xds")
            log.info(
                "waypoint xDS: %s (%s)",
                self.settings.xds.target,
                "TLS" if self.settings.xds.tls else "plaintext",
            )

    async def close(self) -> None:
        await self.client.close()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)

    def describe(self) -> dict[str, object]:
        return {
            "source": f"xds://{self.settings.xds.target}",
            "ready": self.ready.is_set(),
            "connected": self.client.connected,
            "connections": self.client.connections,
            "last_error": self.client.last_error,
            "rejections": dict(self.source.rejections),
        }

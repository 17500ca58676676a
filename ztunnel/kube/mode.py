"""Kubernetes mode: build ztunnel's xDS source, Istio CA client and pod watcher from the environment.

Owns reading the settings Istio's ztunnel reads in a cluster (the DaemonSet's env,
``deploy/ztunnel/daemonset.yaml``; flags of ``ztunnel run`` override them) and assembling:

* ``KubeConfigSource`` - the app's ``ConfigSource``: an ``XdsClient`` on ``XDS_ADDRESS`` feeding an
  ``XdsSource`` (the store), plus the two reflectors (this node's pods by
  ``fieldSelector=spec.nodeName``, every namespace) feeding the local-pods provider; ready when
  every xDS type got its first push;
* an ``IstioCaClient`` on ``CA_ADDRESS`` authenticating with the projected token and asking for
  local pods' identities (``ImpersonatedIdentity``);
* ``KubeLocalPods`` (``ztunnel.kube.provider``) as the node agent's ``local_pods``, and a rule
  programmer that never forks (``ztunnel.kube.rules``).

Addresses are Istio's URLs: ``https://host:port`` (TLS, roots from ``XDS_ROOT_CA``/``CA_ROOT_CA``: a
file path, inline PEM, or ``SYSTEM`` for the platform roots); ``http://host:port`` is plaintext
(labs, tests); a bare ``host:port`` means TLS. ``KubeModeConfig.from_env`` does the parsing (pure
apart from reading root files) and names the variable in every error.

Settings (env, default): ``XDS_ADDRESS`` (required), ``CA_ADDRESS`` (= XDS_ADDRESS),
``XDS_ROOT_CA``/``CA_ROOT_CA`` (``/var/run/secrets/istio/root-cert.pem``), ``ISTIO_TOKEN_PATH``
(``/var/run/secrets/tokens/istio-token``; empty: no token), ``NODE_NAME`` (required),
``POD_NAME``, ``POD_NAMESPACE``, ``INSTANCE_IP``, ``CLUSTER_ID`` (``Kubernetes``), ``TRUST_DOMAIN``
(``cluster.local``), ``KUBECONFIG`` (else in-cluster), ``HOST_PROC`` (``/proc``), ``POD_NETNS_DIR``
(``/var/run/netns``), ``POD_NETNS_GLOB`` (``*``), ``ISTIO_META_*``/``ISTIO_METAJSON_*`` (node
metadata).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from netfilter import PodNetfilter
from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.kube.netns import NetnsFinder
from ztunnel.kube.pods import DEFAULT_CLUSTER_ID
from ztunnel.kube.provider import KubeLocalPods
from ztunnel.kube.watch import Reflector, api_client
from ztunnel.sources.xds import XdsSource
from ztunnel.state.store import WorkloadStore
from ztunnel.xds.client import XdsClient, XdsClientConfig
from ztunnel.xds.session import NodeInfo

log = logging.getLogger(__name__)

DEFAULT_ROOT_CA: Final = "/var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN_PATH: Final = "/var/run/secrets/tokens/istio-token"
SYSTEM_ROOTS: Final = "SYSTEM"


class KubeModeError(ValueError):
    """A Kubernetes-mode setting is missing or wrong; the message names the variable or flag."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """A parsed control-plane address."""

    target: str  # host:port for gRPC
    tls: bool
    root_pem: bytes | None = None  # None with tls: the platform's roots
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.root_pem)


@dataclass(frozen=True, slots=True, kw_only=True)
class KubeModeConfig:
    """Everything Kubernetes mode needs; build with ``from_env``."""

    xds: Endpoint
    ca: Endpoint
    node: str
    node_info: NodeInfo
    token_path: Path | None = Path(DEFAULT_TOKEN_PATH)
    cluster_id: str = DEFAULT_CLUSTER_ID
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    kubeconfig: str | None = None
    netns_dir: Path | None = Path("/var/run/netns")
    host_proc: Path | None = Path("/proc")
    netns_glob: str = "*"
    extra_xds_headers: tuple[tuple[str, str], ...] = ()
    extra_ca_headers: tuple[tuple[str, str], ...] = ()
    pod_retry_interval: float = 2.0
    xds_backoff_max: float = 15.0
    channel_args: tuple[tuple[str, Any], ...] = field(default=())

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], overrides: Mapping[str, str | None] | None = None
    ) -> KubeModeConfig:
        """Settings from ``env`` (the DaemonSet's), with ``overrides`` (flags; None = unset) first.

        Keys of ``overrides`` are the env names (``XDS_ADDRESS``, ``NODE_NAME``, ...).
        """
        merged: dict[str, str] = dict(env)
        for key, value in (overrides or {}).items():
            if value is not None:
                merged[key] = value

        def get(name: str, default: str = "") -> str:
            return merged.get(name, default).strip()

        xds, ca = control_plane_endpoints(merged)
        node = get("NODE_NAME")
        if not node:
            raise KubeModeError("NODE_NAME is not set (this node's name; the DaemonSet sets it)")
        cluster_id = get("CLUSTER_ID") or DEFAULT_CLUSTER_ID
        try:
            info = NodeInfo.from_env({**merged, "CLUSTER_ID": cluster_id, "NODE_NAME": node})
        except ValueError as err:
            raise KubeModeError(str(err)) from None
        token = merged.get("ISTIO_TOKEN_PATH", DEFAULT_TOKEN_PATH).strip()
        return cls(
            xds=xds,
            ca=ca,
            node=node,
            node_info=info,
            token_path=Path(token) if token else None,
            cluster_id=cluster_id,
            trust_domain=get("TRUST_DOMAIN") or DEFAULT_TRUST_DOMAIN,
            kubeconfig=get("KUBECONFIG") or None,
            netns_dir=_optional_path(get("POD_NETNS_DIR", "/var/run/netns")),
            host_proc=_optional_path(get("HOST_PROC", "/proc")),
            netns_glob=get("POD_NETNS_GLOB") or "*",
            extra_xds_headers=env_headers(merged, "XDS_HEADER_"),
            extra_ca_headers=env_headers(merged, "CA_HEADER_"),
        )


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def env_headers(env: Mapping[str, str], prefix: str) -> tuple[tuple[str, str], ...]:
    # ztunnel's XDS_HEADER_<name> / CA_HEADER_<name>: extra gRPC metadata.
    return tuple(
        (key.removeprefix(prefix).lower().replace("_", "-"), value)
        for key, value in sorted(env.items())
        if key.startswith(prefix) and key != prefix
    )


def control_plane_endpoints(env: Mapping[str, str]) -> tuple[Endpoint, Endpoint]:
    """The xDS and CA endpoints from Istio's variables (XDS_ADDRESS, CA_ADDRESS defaulting to it,
    XDS_ROOT_CA/CA_ROOT_CA, ALT_XDS_HOSTNAME/ALT_CA_HOSTNAME); shared by ztunnel and waypoints."""

    def get(name: str, default: str = "") -> str:
        return env.get(name, default).strip()

    xds_address = get("XDS_ADDRESS")
    if not xds_address:
        raise KubeModeError("XDS_ADDRESS is not set (the control plane's https://host:port)")
    xds = parse_endpoint(
        xds_address,
        "XDS_ADDRESS",
        root=get("XDS_ROOT_CA", DEFAULT_ROOT_CA),
        root_var="XDS_ROOT_CA",
        server_name=get("ALT_XDS_HOSTNAME") or None,
    )
    ca = parse_endpoint(
        get("CA_ADDRESS") or xds_address,
        "CA_ADDRESS",
        root=get("CA_ROOT_CA", DEFAULT_ROOT_CA),
        root_var="CA_ROOT_CA",
        server_name=get("ALT_CA_HOSTNAME") or None,
    )
    return xds, ca


def parse_endpoint(
    address: str, var: str, *, root: str, root_var: str, server_name: str | None = None
) -> Endpoint:
    """``https://host:port`` / ``http://host:port`` / ``host:port`` -> Endpoint (roots read now)."""
    text = address.strip()
    tls = True
    if text.startswith("https://"):
        text = text.removeprefix("https://")
    elif text.startswith("http://"):
        text, tls = text.removeprefix("http://"), False
    elif "://" in text:
        raise KubeModeError(f"{var}={address!r}: scheme must be https:// or http://")
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KubeModeError(f"{var}={address!r}: expected scheme://host:port")
    if "/" in text:
        raise KubeModeError(f"{var}={address!r}: a path is not allowed")
    if not tls:
        return Endpoint(target=text, tls=False, server_name=server_name)
    return Endpoint(
        target=text, tls=True, root_pem=read_roots(root, root_var), server_name=server_name
    )


def read_roots(value: str, var: str) -> bytes | None:
    """Roots as ztunnel reads them: ``SYSTEM``, inline PEM, or a file path."""
    if value == SYSTEM_ROOTS:
        return None
    if value.lstrip().startswith("-----BEGIN"):
        return value.strip().encode() + b"\n"
    try:
        data = Path(value).read_bytes()
    except OSError as err:
        raise KubeModeError(
            f"{var}: cannot read root certificate {value}: {err.strerror}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise KubeModeError(f"{var}: {value} holds no PEM certificate")
    return data


class KubeConfigSource:
    """The app's ``ConfigSource`` in Kubernetes mode: xDS into the store, pod/namespace watches
    into the local-pods provider. ``start`` returns at once; ``wait_ready`` waits for xDS."""

    kind = "xds"

    def __init__(self, config: KubeModeConfig, local_pods: KubeLocalPods) -> None:
        self.config = config
        self.local_pods = local_pods
        self.xds_source: XdsSource | None = None
        self.client: XdsClient | None = None
        self._api: Any = None
        self._reflectors: list[Reflector] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()

    @property
    def node(self) -> str | None:
        return self.config.node

    async def start(self, store: WorkloadStore, on_rejected: Callable[[str], None]) -> None:
        c = self.config

        self.xds_source = XdsSource(store, on_ready=self._ready.set)
        self.client = XdsClient(
            XdsClientConfig(
                address=c.xds.target,
                node=c.node_info,
                credentials=c.xds.credentials(),
                server_name=c.xds.server_name,
                token_path=c.token_path,
                extra_headers=c.extra_xds_headers,
                backoff_max=c.xds_backoff_max,
                channel_args=c.channel_args,
            ),
            _Rejections(self.xds_source, on_rejected),
        )
        try:
            self._api = await api_client(c.kubeconfig)
        except Exception as err:
            where = c.kubeconfig or "in-cluster service account"
            raise KubeModeError(f"cannot configure the Kubernetes client ({where}): {err}") from err
        lp = self.local_pods
        self._reflectors = [
            Reflector(
                self._api,
                "/api/v1/pods",
                field_selector=f"spec.nodeName={c.node}",
                on_replace=lp.replace_pods,
                on_event=lp.on_pod,
            ),
            Reflector(
                self._api,
                "/api/v1/namespaces",
                on_replace=lp.replace_namespaces,
                on_event=lp.on_namespace,
            ),
        ]
        for reflector in self._reflectors:
            reflector.start()
        lp.start()
        self._tasks = [asyncio.get_running_loop().create_task(self.client.run(), name="xds")]
        log.info(
            "kubernetes mode: node %s, xDS %s (%s), CA %s, pods via %s",
            c.node,
            c.xds.target,
            "TLS" if c.xds.tls else "plaintext",
            c.ca.target,
            c.kubeconfig or "in-cluster config",
        )

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        for reflector in self._reflectors:
            await reflector.stop()
        await self.local_pods.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._api is not None:
            await self._api.close()
            self._api = None

    def describe(self) -> dict[str, object]:
        client, source = self.client, self.xds_source
        return {
            "source": f"xds://{self.config.xds.target}",
            "connected": bool(client and client.connected),
            "connections": client.connections if client else 0,
            "last_error": client.last_error if client else None,
            "rejections": dict(source.rejections) if source else {},
            "kubernetes": {
                "watches": {
                    r.path: {"synced": r.synced.is_set(), "relists": r.relists}
                    for r in self._reflectors
                },
                **self.local_pods.snapshot(),
            },
        }


class _Rejections:
    """Passes pushes to the XdsSource and reports NACKed resources to the app (metrics, log)."""

    def __init__(self, source: XdsSource, on_rejected: Callable[[str], None]) -> None:
        self._source = source
        self._on_rejected = on_rejected

    def on_resources(self, type_url: str, added: Any, removed: Any) -> Mapping[str, str]:
        rejected = self._source.on_resources(type_url, added, removed)
        if rejected:
            self._on_rejected("; ".join(f"{k}: {v}" for k, v in sorted(rejected.items())))
        return rejected


@dataclass(slots=True)
class KubeMode:
    """The three pieces ``AppConfig`` takes in Kubernetes mode."""

    config: KubeModeConfig
    source: KubeConfigSource
    ca_client: IstioCaClient
    local_pods: KubeLocalPods
    rules: PodNetfilter  # fork-free: this process runs gRPC (ztunnel.kube.rules)


def build(config: KubeModeConfig) -> KubeMode:
    """Assemble Kubernetes mode (nothing starts until the app starts the source)."""
    local_pods = KubeLocalPods(
        config.node,
        finder=NetnsFinder(
            netns_dir=config.netns_dir, host_proc=config.host_proc, name_glob=config.netns_glob
        ),
        cluster_id=config.cluster_id,
        trust_domain=config.trust_domain,
        retry_interval=config.pod_retry_interval,
    )
    ca_client = IstioCaClient(
        config.ca.target,
        credentials=config.ca.credentials(),
        server_name=config.ca.server_name,
        token_path=config.token_path,
        cluster_id=config.cluster_id,
        impersonate=True,
        extra_headers=config.extra_ca_headers,
    )
    return KubeMode(
        config=config,
        source=KubeConfigSource(config, local_pods),
        ca_client=ca_client,
        local_pods=local_pods,
        rules=PodNetfilter(),
    )

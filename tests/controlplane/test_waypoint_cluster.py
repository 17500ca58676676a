"""The waypoint proxy in cluster mode against the real control plane (fake API server, real gRPC).

The proxy gets its workload view over delta xDS, its certificate from the CA with its own pod
token (no impersonation), and its routes from Kubernetes; `waypoint proxy` flags/env select it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from tests.controlplane import objects as o
from waypoint.controlplane.authn import TokenReviewAuthenticator
from waypoint.controlplane.cli import api_client
from waypoint.controlplane.service import ControlPlane, ControlPlaneConfig
from waypoint.manager.client import connect
from waypoint.proxy import cli as proxy_cli
from waypoint.proxy.app import AppOptions, WaypointApp
from waypoint.proxy.xdsview import ClusterSettings, ClusterSettingsError
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(30)

TD = "cluster.local"
WAYPOINT = SpiffeId(TD, "shop", "waypoint")
TOKEN = "tok-waypoint-pod"


def reviewer(token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
    if token == TOKEN:
        return pod_token_user(
            namespace="shop",
            service_account="waypoint",
            pod_name="waypoint-1",
            pod_uid="uid-wp-1",
            node_name="node-a",
            audiences=audiences,
        )
    return TokenReviewResult(authenticated=False, error="invalid token")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[FakeApiServer, Path, int]]:
    server = FakeApiServer(bookmark_interval=0.2, token_reviewer=reviewer)
    await server.start()
    server.put_object(o.namespace("shop", ambient=True))
    server.put_object(o.service("web", selector={"app": "web"}))
    server.put_object(o.pod("web-1", labels={"app": "web"}, ip="10.1.0.5", sa="web"))
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    kube = await connect(str(kubeconfig))
    raw = await api_client(str(kubeconfig))
    plane = ControlPlane(kube, ControlPlaneConfig(debounce_seconds=0.02))
    await plane.start(sync_timeout=10)
    ca = plane.ca_service(
        LocalCa.generate(TD), TokenReviewAuthenticator(raw, plane.pod, trust_domain=TD)
    )
    port = await plane.serve("127.0.0.1:0", ca=ca)
    try:
        yield server, kubeconfig, port
    finally:
        await plane.stop()
        await raw.close()
        await kube.close()
        await server.stop()


def env(port: int, kubeconfig: Path, token: Path) -> dict[str, str]:
    """What the manager's rendered Deployment gives the pod (addresses made local)."""
    return {
        "XDS_ADDRESS": f"http://127.0.0.1:{port}",
        "POD_NAME": "waypoint-1",
        "POD_NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "waypoint",
        "INSTANCE_IP": "10.1.0.9",
        "NODE_NAME": "node-a",
        "WAYPOINT_NAME": "waypoint",
        "TRUST_DOMAIN": TD,
        "CLUSTER_ID": "Kubernetes",
        "ISTIO_TOKEN_PATH": str(token),
        "KUBECONFIG": str(kubeconfig),
    }


async def test_cluster_mode_gets_workloads_certificate_and_routes(
    cluster: tuple[FakeApiServer, Path, int], tmp_path: Path
) -> None:
    server, kubeconfig, port = cluster
    token = tmp_path / "istio-token"
    token.write_text(TOKEN + "\n")
    args = proxy_cli.parser().parse_args(
        [
            *("--listen", "127.0.0.1", "--hbone-port", "0"),
            *("--metrics-port", "0", "--readiness-port", "0"),
        ]
    )
    options = proxy_cli.build_options(args, env(port, kubeconfig, token))
    assert options.cluster is not None
    assert (options.identity, options.gateway_name, options.gateway_namespace) == (
        WAYPOINT,
        "waypoint",
        "shop",
    )
    app = WaypointApp(options)
    await app.start()
    try:
        await until(lambda: app.readiness.ready, "ready after the first xDS push")
        # Workloads and services over xDS.
        assert app.store.service_by_key("shop/web.shop.svc.cluster.local") is not None
        assert [w.name for w in app.store.workloads()] == ["web-1"]
        # Its own identity from the CA, with its own token.
        assert app.certs is not None
        cert = app.certs.cached(WAYPOINT)
        assert cert is not None
        assert cert.identity == WAYPOINT
        # Routes from Kubernetes, live.
        server.put_object(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "web-route", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                    "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
                },
            }
        )
        assert app.proxy is not None
        proxy = app.proxy

        def routed() -> bool:
            routes = proxy.config.routes.http_routes_for("Service", "shop", "web", 80)
            return [r.name for r in routes] == ["web-route"]

        await until(routed, "the HTTPRoute")
        # Later xDS changes reach the store.
        server.put_object(o.pod("web-2", labels={"app": "web"}, ip="10.1.0.6", sa="web"))
        await until(lambda: len(list(app.store.workloads())) == 2, "the second pod")
    finally:
        await asyncio.wait_for(app.drain(), 10)


async def test_cluster_mode_without_a_good_token_fails_to_start(
    cluster: tuple[FakeApiServer, Path, int], tmp_path: Path
) -> None:
    _server, kubeconfig, port = cluster
    token = tmp_path / "istio-token"
    token.write_text("someone-elses-token\n")
    settings = ClusterSettings.from_env(env(port, kubeconfig, token))
    app = WaypointApp(
        AppOptions(
            identity=settings.identity,
            gateway_name="waypoint",
            gateway_namespace="shop",
            cluster=settings,
            listen="127.0.0.1",
            hbone_port=0,
            metrics_port=0,
            readiness_port=0,
        )
    )
    try:
        with pytest.raises(Exception, match="UNAUTHENTICATED"):
            await app.start()
    finally:
        await app.close()


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {}, "local mode needs --config, --identity, --ca-dir"),
        (["--config", "c.yaml"], {"XDS_ADDRESS": "http://h:1"}, "--config: not used in cluster"),
        ([], {"XDS_ADDRESS": "http://h:1", "SERVICE_ACCOUNT": "wp"}, "POD_NAMESPACE is not set"),
        ([], {"XDS_ADDRESS": "ftp://h:1"}, "XDS_ADDRESS='ftp://h:1': scheme must be"),
        (
            ["--identity", "spiffe://cluster.local/ns/x/sa/y"],
            {"XDS_ADDRESS": "http://h:1", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "wp"},
            "cluster mode uses the pod's own identity",
        ),
        (["--config", "c", "--ca-dir", "d", "--identity", "nope"], {}, "--identity: "),
    ],
    ids=[
        "nothing",
        "config-in-cluster",
        "no-namespace",
        "bad-scheme",
        "foreign-identity",
        "bad-id",
    ],
)
def test_bad_settings_are_named(argv: list[str], environ: dict[str, str], message: str) -> None:
    args = proxy_cli.parser().parse_args(argv)
    with pytest.raises((ValueError, ClusterSettingsError), match=None) as info:
        proxy_cli.build_options(args, environ)
    assert message in str(info.value)


def test_flags_override_the_environment(tmp_path: Path) -> None:
    args = proxy_cli.parser().parse_args(
        [
            *("--xds-address", "http://10.0.0.1:15012", "--ca-address", "http://10.0.0.2:15012"),
            *("--token-path", "/t", "--name", "gw"),
        ]
    )
    options = proxy_cli.build_options(
        args, {"XDS_ADDRESS": "http://other:1", "POD_NAMESPACE": "shop", "SERVICE_ACCOUNT": "gw"}
    )
    settings = options.cluster
    assert settings is not None
    assert (settings.xds.target, settings.ca.target) == ("10.0.0.1:15012", "10.0.0.2:15012")
    assert str(settings.token_path) == "/t"
    assert options.gateway_name == "gw"
    assert options.kube  # cluster mode always reads L7 configuration from Kubernetes

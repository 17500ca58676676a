"""CA authentication: TokenReview against the fake API server, the same-node rule, and the CA over gRPC."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from tests.controlplane import objects as o
from waypoint.controlplane.authn import (
    AuthnError,
    TokenReviewAuthenticator,
    caller_from_review,
    identities_by_node,
)
from waypoint.controlplane.service import ControlPlane, ControlPlaneConfig
from waypoint.manager.client import connect
from ztunnel.identity.ca import CsrRejected, LocalCa, certificate_from_chain, make_csr
from ztunnel.identity.istio_ca import IstioCaClient
from ztunnel.identity.spiffe import SpiffeId

pytestmark = pytest.mark.timeout(30)

TD = "cluster.local"
ZTUNNEL = SpiffeId(TD, "istio-system", "ztunnel")
ALICE = SpiffeId(TD, "shop", "alice")  # runs on node-a
BOB = SpiffeId(TD, "shop", "bob")  # runs on node-b


def _ztunnel_token(pod: str, node_claim: str, uid: str) -> TokenReviewResult:
    return pod_token_user(
        namespace="istio-system",
        service_account="ztunnel",
        pod_name=pod,
        pod_uid=uid,
        node_name=node_claim,
        audiences=("istio-ca",),
    )


TOKENS: dict[str, TokenReviewResult] = {
    "tok-ztunnel-a": _ztunnel_token("ztunnel-a", "node-a", "uid-zt-a"),
    "tok-ztunnel-b": _ztunnel_token("ztunnel-b", "node-b", "uid-zt-b"),
    # A ztunnel token whose node claim disagrees with where its pod runs.
    "tok-forged-node": _ztunnel_token("ztunnel-a", "node-b", "uid-zt-a"),
    # The token of a ztunnel pod that was replaced (same name, new uid).
    "tok-stale": _ztunnel_token("ztunnel-a", "node-a", "uid-old"),
    "tok-alice": pod_token_user(
        namespace="shop", service_account="alice", pod_name="alice-1", pod_uid="uid-shop-alice-1"
    ),
}


def reviewer(token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
    return TOKENS.get(token) or TokenReviewResult(authenticated=False, error="invalid token")


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    srv = FakeApiServer(token_reviewer=reviewer)
    await srv.start()
    for ns in ("shop", "istio-system"):
        srv.put_object(o.namespace(ns))
    srv.put_object(o.pod("ztunnel-a", "istio-system", node="node-a", sa="ztunnel", uid="uid-zt-a"))
    srv.put_object(o.pod("ztunnel-b", "istio-system", node="node-b", sa="ztunnel", uid="uid-zt-b"))
    srv.put_object(o.pod("alice-1", "shop", node="node-a", sa="alice", ip="10.1.0.8"))
    srv.put_object(o.pod("bob-1", "shop", node="node-b", sa="bob", ip="10.1.0.9"))
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def plane(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[ControlPlane]:
    kube = await connect(str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    cp = ControlPlane(kube, ControlPlaneConfig(debounce_seconds=0.01))
    await cp.start(sync_timeout=10)
    try:
        yield cp
    finally:
        await cp.stop()
        await kube.close()


@pytest.fixture
async def api_client(server: FakeApiServer, tmp_path: Path) -> AsyncIterator[k8s.ApiClient]:
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(
        config_file=str(server.write_kubeconfig(tmp_path / "kc-authn")),
        client_configuration=configuration,
    )
    client = k8s.ApiClient(configuration)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def authenticator(plane: ControlPlane, api_client: k8s.ApiClient) -> TokenReviewAuthenticator:
    return TokenReviewAuthenticator(api_client, plane.pod, trust_domain=TD)


@pytest.mark.parametrize(
    ("token", "identity", "node"),
    [
        ("tok-ztunnel-a", ZTUNNEL, "node-a"),
        ("tok-ztunnel-b", ZTUNNEL, "node-b"),
        ("tok-alice", ALICE, None),  # not a node agent: its own identity only
    ],
    ids=["ztunnel-node-a", "ztunnel-node-b", "app-pod-no-node"],
)
async def test_token_review_gives_identity_and_node(
    authenticator: TokenReviewAuthenticator, token: str, identity: SpiffeId, node: str | None
) -> None:
    caller = await authenticator(token)
    assert caller is not None
    assert caller.identity == identity
    assert caller.node == node


@pytest.mark.parametrize(
    "token",
    ["not-a-token", "tok-forged-node", "tok-stale"],
    ids=["unknown-token", "node-claim-disagrees-with-pod", "pod-replaced"],
)
async def test_bad_tokens_are_refused(authenticator: TokenReviewAuthenticator, token: str) -> None:
    assert await authenticator(token) is None


async def test_successful_reviews_are_cached(authenticator: TokenReviewAuthenticator) -> None:
    await authenticator("tok-ztunnel-a")
    await authenticator("tok-ztunnel-a")
    assert authenticator.reviews == 1


def test_review_rules_pure() -> None:
    status: dict[str, Any] = {
        "authenticated": True,
        "audiences": ["other"],
        "user": {"username": "system:serviceaccount:shop:alice"},
    }
    with pytest.raises(AuthnError, match="audiences"):
        caller_from_review(
            status,
            audience="istio-ca",
            trust_domain=TD,
            trusted_node_accounts=(),
            pod_lookup=lambda _ns, _n: None,
        )
    status = {"authenticated": True, "user": {"username": "admin"}}
    with pytest.raises(AuthnError, match="not a service account"):
        caller_from_review(
            status,
            audience=None,
            trust_domain=TD,
            trusted_node_accounts=(),
            pod_lookup=lambda _ns, _n: None,
        )


def test_identities_by_node_skips_finished_and_unscheduled_pods() -> None:
    pods = [
        o.pod("a", node="n1", sa="alice"),
        o.pod("b", node="n1", sa="bob", phase="Succeeded"),
        o.pod("c", node="", sa="carol"),
    ]
    assert identities_by_node(pods, TD) == {"n1": frozenset({ALICE})}


# --- the CA over real gRPC, with the control plane's pod view ----------------------------------


@pytest.fixture
async def ca_port(
    plane: ControlPlane, authenticator: TokenReviewAuthenticator
) -> AsyncIterator[int]:
    service = plane.ca_service(LocalCa.generate(TD), authenticator)
    port = await service.start("127.0.0.1:0")
    try:
        yield port
    finally:
        await service.stop(0)


async def _sign(port: int, token: str, identity: SpiffeId, tmp_path: Path) -> list[bytes]:
    token_path = tmp_path / "token"
    token_path.write_text(token)
    client = IstioCaClient(f"127.0.0.1:{port}", token_path=token_path)
    key_pem, csr_pem = make_csr(identity)
    try:
        chain = await client.sign(identity, csr_pem, datetime.timedelta(hours=1))
    finally:
        await client.close()
    assert certificate_from_chain(identity, key_pem, chain).identity == identity
    return chain


async def test_ca_signs_identities_of_pods_on_the_callers_node(
    ca_port: int, tmp_path: Path
) -> None:
    await _sign(ca_port, "tok-ztunnel-a", ALICE, tmp_path)
    await _sign(ca_port, "tok-ztunnel-b", BOB, tmp_path)


@pytest.mark.parametrize(
    ("token", "identity", "reason"),
    [
        ("tok-ztunnel-b", ALICE, "PERMISSION_DENIED"),  # alice runs on node-a
        ("tok-forged-node", BOB, "UNAUTHENTICATED"),
        ("tok-alice", BOB, "PERMISSION_DENIED"),  # an app may not impersonate
    ],
    ids=["token-from-another-node", "forged-node-claim", "app-impersonating"],
)
async def test_ca_refuses(
    ca_port: int, tmp_path: Path, token: str, identity: SpiffeId, reason: str
) -> None:
    with pytest.raises(CsrRejected, match=reason):
        await _sign(ca_port, token, identity, tmp_path)

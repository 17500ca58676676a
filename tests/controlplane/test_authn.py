"""CA authentication: TokenReview against the fake API server, the same-node rule, and the CA over gRPC."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from tests.controlplane import objects as o
from waypoint.controlplane.authn import (
    DEFAULT_TRUSTED_NODE_ACCOUNTS,
    ISTIO_TRUSTED_NODE_ACCOUNTS,
    AuthnError,
    TokenReviewAuthenticator,
    caller_from_review,
    format_node_accounts,
    identities_by_node,
    parse_node_accounts,
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
    # A waypoint pod's own projected token (bound to its pod and node, like every pod token).
    "tok-waypoint": pod_token_user(
        namespace="shop",
        service_account="waypoint",
        pod_name="waypoint-7f9-abcde",
        pod_uid="uid-wp",
        node_name="node-a",
        audiences=("istio-ca",),
    ),
}
WAYPOINT = SpiffeId(TD, "shop", "waypoint")


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
    # These tests use Istio's node agent account (istio-system/ztunnel).
    return TokenReviewAuthenticator(
        api_client, plane.pod, trust_domain=TD, trusted_node_accounts=ISTIO_TRUSTED_NODE_ACCOUNTS
    )


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


async def _sign(
    port: int, token: str, identity: SpiffeId, tmp_path: Path, *, impersonate: bool = True
) -> list[bytes]:
    token_path = tmp_path / "token"
    token_path.write_text(token)
    client = IstioCaClient(f"127.0.0.1:{port}", token_path=token_path, impersonate=impersonate)
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


async def test_waypoint_pod_token_gets_its_own_identity_only(ca_port: int, tmp_path: Path) -> None:
    # As the waypoint proxy asks in cluster mode: its own token, its own identity, no impersonation.
    await _sign(ca_port, "tok-waypoint", WAYPOINT, tmp_path, impersonate=False)
    # Not a node agent: not even identities of pods on its own node (alice runs on node-a).
    with pytest.raises(CsrRejected, match="PERMISSION_DENIED"):
        await _sign(ca_port, "tok-waypoint", ALICE, tmp_path, impersonate=False)
    with pytest.raises(CsrRejected, match="PERMISSION_DENIED"):
        await _sign(ca_port, "tok-waypoint", ALICE, tmp_path, impersonate=True)


async def test_node_rights_follow_the_configured_accounts(
    plane: ControlPlane, api_client: k8s.ApiClient
) -> None:
    # Our manifests' default (ambient-system/ztunnel): the istio-system ztunnel is an ordinary pod.
    ours = TokenReviewAuthenticator(api_client, plane.pod, trust_domain=TD)
    caller = await ours("tok-ztunnel-a")
    assert caller is not None
    assert (caller.identity, caller.node) == (ZTUNNEL, None)


@pytest.mark.parametrize(
    ("text", "accounts"),
    [
        ("ambient-system/ztunnel", {("ambient-system", "ztunnel")}),
        (" a/b , c/d ,", {("a", "b"), ("c", "d")}),
        ("", set()),
    ],
    ids=["one", "several-with-spaces", "none"],
)
def test_parse_node_accounts(text: str, accounts: set[tuple[str, str]]) -> None:
    assert parse_node_accounts(text) == accounts


@pytest.mark.parametrize("text", ["ztunnel", "a/", "/b", "a/b/c"], ids=str)
def test_parse_node_accounts_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"--trusted-node-accounts: .* is not <namespace>/<serv"):
        parse_node_accounts(text)


def test_default_matches_our_ztunnel_manifest() -> None:
    daemonset = Path(__file__).parents[2] / "deploy" / "ztunnel" / "daemonset.yaml"
    ds = yaml.safe_load(daemonset.read_text())
    account = (ds["metadata"]["namespace"], ds["spec"]["template"]["spec"]["serviceAccountName"])
    assert {account} == DEFAULT_TRUSTED_NODE_ACCOUNTS
    assert format_node_accounts(DEFAULT_TRUSTED_NODE_ACCOUNTS) == "ambient-system/ztunnel"

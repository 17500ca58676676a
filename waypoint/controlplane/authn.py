"""Who is calling the CA: Kubernetes TokenReview authentication and istiod's same-node rule.

A ztunnel authenticates with its projected, pod-bound service-account token (audience `istio-ca`).
`TokenReviewAuthenticator` asks the API server (`authentication.k8s.io/v1` TokenReview) who the token
belongs to and returns a `ca_server.Caller`: its own SPIFFE identity and, for trusted node agents
only (`--trusted-node-accounts`, istiod's CA_TRUSTED_NODE_ACCOUNTS; default `ambient-system/ztunnel`,
the account of deploy/ztunnel, where Istio's is `istio-system/ztunnel`), the node its pod runs on.
Any other caller - a waypoint pod with its own projected token, say - gets exactly the identity of
its own service account and may impersonate nobody.
The node comes from the pod the token is bound to (pod-name/pod-uid claims), checked against the
watched Pod: a token of a deleted or replaced pod, or one whose node claim disagrees, gets no node.

`identities_by_node` and `node_impersonation` implement the rule that a node agent may obtain only
identities of pods running on its own node.

`caller_from_review` and `identities_by_node` are pure; `TokenReviewAuthenticator` is the I/O shell
(kubernetes_asyncio `ApiClient`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client.exceptions import ApiException

from waypoint.controlplane.ca_server import Caller, ImpersonationCheck, impersonation_by_node
from ztunnel.config import DEFAULT_TRUST_DOMAIN
from ztunnel.identity.spiffe import SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

CA_AUDIENCE: Final = "istio-ca"
# Our manifests run ztunnel as ambient-system/ztunnel (deploy/ztunnel); istiod's default differs.
DEFAULT_TRUSTED_NODE_ACCOUNTS: Final = frozenset({("ambient-system", "ztunnel")})
ISTIO_TRUSTED_NODE_ACCOUNTS: Final = frozenset({("istio-system", "ztunnel")})
_SA_PREFIX: Final = "system:serviceaccount:"
_POD_NAME: Final = "authentication.kubernetes.io/pod-name"
_POD_UID: Final = "authentication.kubernetes.io/pod-uid"
_NODE_NAME: Final = "authentication.kubernetes.io/node-name"

# (namespace, pod name) -> the watched Pod object, or None.
PodLookup = Callable[[str, str], Mapping[str, Any] | None]


class AuthnError(Exception):
    """A token is not accepted; the message says why (logged, never sent to the caller in full)."""


def parse_node_accounts(
    text: str, where: str = "--trusted-node-accounts"
) -> frozenset[tuple[str, str]]:
    """``ns/sa[,ns/sa...]`` (istiod's CA_TRUSTED_NODE_ACCOUNTS format) -> {(ns, sa)}.

    An empty string trusts no node agent at all. ValueError names ``where`` and the bad entry.
    """
    out: set[tuple[str, str]] = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        namespace, sep, account = entry.partition("/")
        if not sep or not namespace or not account or "/" in account:
            raise ValueError(f"{where}: {entry!r} is not <namespace>/<service account>")
        out.add((namespace, account))
    return frozenset(out)


def format_node_accounts(accounts: Collection[tuple[str, str]]) -> str:
    return ",".join(f"{ns}/{sa}" for ns, sa in sorted(accounts))


def _claim(extra: Mapping[str, Any], key: str) -> str:
    value = extra.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    return ""


def caller_from_review(
    status: Mapping[str, Any],
    *,
    audience: str | None,
    trust_domain: str,
    trusted_node_accounts: Collection[tuple[str, str]],
    pod_lookup: PodLookup,
) -> Caller:
    """The caller a TokenReview status describes; AuthnError when the token is not good enough."""
    if not status.get("authenticated"):
        raise AuthnError(f"token not authenticated: {status.get('error') or 'no reason given'}")
    audiences = status.get("audiences")
    if audience and audiences is not None and audience not in audiences:
        raise AuthnError(f"token audiences {audiences} do not include {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(_SA_PREFIX):
        raise AuthnError(f"user {username!r} is not a service account")
    namespace, sep, account = username[len(_SA_PREFIX) :].partition(":")
    if not sep:
        raise AuthnError(f"user {username!r} is not system:serviceaccount:<ns>:<sa>")
    try:
        identity = SpiffeId(trust_domain, namespace, account)
    except SpiffeIdError as err:
        raise AuthnError(f"user {username!r}: {err}") from None
    if (namespace, account) not in trusted_node_accounts:
        return Caller(identity=identity)
    extra = user.get("extra") or {}
    pod_name, pod_uid = _claim(extra, _POD_NAME), _claim(extra, _POD_UID)
    node_claim = _claim(extra, _NODE_NAME)
    if not pod_name or not pod_uid:
        log.warning("ca authn: token of %s is not bound to a pod; no node rights", username)
        return Caller(identity=identity)
    pod = pod_lookup(namespace, pod_name)
    meta = (pod or {}).get("metadata") or {}
    if pod is None or meta.get("uid") != pod_uid:
        raise AuthnError(
            f"token of {username} is bound to pod {namespace}/{pod_name} (uid {pod_uid}), "
            "which does not exist any more"
        )
    node = str(((pod.get("spec") or {}).get("nodeName")) or "")
    if not node:
        raise AuthnError(f"pod {namespace}/{pod_name} of {username} is not scheduled on a node")
    if node_claim and node_claim != node:
        raise AuthnError(
            f"token of {username} claims node {node_claim!r} but pod {namespace}/{pod_name} "
            f"runs on {node!r}"
        )
    return Caller(identity=identity, node=node)


def identities_by_node(
    pods: Collection[Mapping[str, Any]], trust_domain: str = DEFAULT_TRUST_DOMAIN
) -> dict[str, frozenset[SpiffeId]]:
    """node -> identities of the pods scheduled there that have not finished."""
    out: dict[str, set[SpiffeId]] = {}
    for pod in pods:
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed"):
            continue
        namespace = str((pod.get("metadata") or {}).get("namespace") or "")
        account = str(spec.get("serviceAccountName") or "default")
        try:
            out.setdefault(str(node), set()).add(SpiffeId(trust_domain, namespace, account))
        except SpiffeIdError:
            continue
    return {node: frozenset(ids) for node, ids in out.items()}


def node_impersonation(
    index: Callable[[], Mapping[str, Collection[SpiffeId]]],
) -> ImpersonationCheck:
    """The CA's may_impersonate predicate over a (current) node -> identities index."""
    return impersonation_by_node(lambda node: index().get(node, frozenset()))


@dataclass(slots=True)
class _Cached:
    caller: Caller
    expires: float
    pod: tuple[str, str, str] | None  # (namespace, name, uid) a node grant depends on


class TokenReviewAuthenticator:
    """An `ca_server.Authenticator` backed by the API server's TokenReview.

    Successful reviews are cached for `cache_seconds` (a CSR burst after a node restart would
    otherwise send one TokenReview per pod); failures are never cached.
    """

    def __init__(
        self,
        api_client: k8s.ApiClient,
        pod_lookup: PodLookup,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        audience: str | None = CA_AUDIENCE,
        trusted_node_accounts: Collection[tuple[str, str]] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
        cache_seconds: float = 60.0,
        max_cache: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api_client
        self._pod_lookup = pod_lookup
        self._trust_domain = trust_domain
        self._audience = audience
        self._trusted = frozenset(trusted_node_accounts)
        self._cache_seconds = cache_seconds
        self._max_cache = max_cache
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self.reviews = 0

    async def review(self, token: str) -> Mapping[str, Any]:
        """The TokenReview status for `token` (raises AuthnError if the API call fails)."""
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        if self._audience:
            body["spec"]["audiences"] = [self._audience]
        self.reviews += 1
        try:
            result = await self._api.call_api(
                "/apis/authentication.k8s.io/v1/tokenreviews",
                "POST",
                header_params={"Accept": "application/json", "Content-Type": "application/json"},
                body=body,
                response_types_map={200: "object", 201: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=10,
            )
        except ApiException as err:
            raise AuthnError(f"TokenReview failed: {err.status} {err.reason}") from None
        except Exception as err:  # transport trouble: refuse, the caller retries
            raise AuthnError(f"TokenReview failed: {err!r}") from None
        status = result.get("status") if isinstance(result, Mapping) else None
        if not isinstance(status, Mapping):
            raise AuthnError("TokenReview answer has no status")
        return status

    async def __call__(self, token: str) -> Caller | None:
        now = self._clock()
        cached = self._cache.get(token)
        if cached is not None and cached.expires > now and self._still_valid(cached):
            return cached.caller
        try:
            status = await self.review(token)
            caller = caller_from_review(
                status,
                audience=self._audience,
                trust_domain=self._trust_domain,
                trusted_node_accounts=self._trusted,
                pod_lookup=self._pod_lookup,
            )
        except AuthnError as err:
            log.info("ca authn: %s", err)
            return None
        if len(self._cache) >= self._max_cache:
            self._cache = {k: v for k, v in self._cache.items() if v.expires > now}
            if len(self._cache) >= self._max_cache:
                self._cache.clear()
        pod = None
        if caller.node is not None:
            extra = (status.get("user") or {}).get("extra") or {}
            pod = (
                caller.identity.namespace,
                _claim(extra, _POD_NAME),
                _claim(extra, _POD_UID),
            )
        self._cache[token] = _Cached(caller, now + self._cache_seconds, pod)
        return caller

    def _still_valid(self, cached: _Cached) -> bool:
        # A node grant holds only while the token's pod still exists (same uid, same node).
        if cached.pod is None:
            return True
        namespace, name, uid = cached.pod
        pod = self._pod_lookup(namespace, name)
        if pod is None or (pod.get("metadata") or {}).get("uid") != uid:
            return False
        return (pod.get("spec") or {}).get("nodeName") == cached.caller.node

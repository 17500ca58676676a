"""A fake Kubernetes API server for tests and the lab, faithful enough for the official clients.

`FakeApiServer` serves the real REST API on loopback (discovery, CRUD, patch and server-side apply,
status subresource, selectors, watch with resume/bookmarks/410, finalizers, ownerReference cascade,
TokenReview, CRDs). The project's code talks to it only through `kubernetes` / `kubernetes_asyncio`
clients configured from `write_kubeconfig()`, exactly as it would talk to a real cluster.
"""

from __future__ import annotations

from e2e.fakekube.errors import ApiError
from e2e.fakekube.registry import ResourceKind, kinds_from_crd
from e2e.fakekube.server import FakeApiServer
from e2e.fakekube.store import Store, TokenReviewer, TokenReviewResult, WatchEvent, pod_token_user

__all__ = [
    "ApiError",
    "FakeApiServer",
    "ResourceKind",
    "Store",
    "TokenReviewResult",
    "TokenReviewer",
    "WatchEvent",
    "kinds_from_crd",
    "pod_token_user",
]

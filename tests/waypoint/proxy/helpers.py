"""Shared builders for the L7 core tests: requests, destinations and route objects as dicts."""

from __future__ import annotations

import random
from typing import Any

from waypoint.proxy.normalize import normalize_request
from waypoint.proxy.request import Destination, RawRequest, Request

NS = "gateway-conformance-mesh"


def dest(name: str = "echo", port: int = 80, namespace: str = NS) -> Destination:
    return Destination(
        namespace=namespace, name=name, hostname=f"{name}.{namespace}.svc.cluster.local", port=port
    )


def req(
    target: str = "/",
    *,
    method: str = "GET",
    host: str = "echo",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    destination: Destination | None = None,
    scheme: str = "http",
) -> Request:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    raw = RawRequest(method=method, target=target, scheme=scheme, headers=[("host", host), *items])
    return normalize_request(raw, destination or dest())


def http_route(
    name: str,
    rules: list[dict[str, Any]],
    *,
    parent: str = "echo",
    port: int | None = 80,
    namespace: str = NS,
    created: str | None = None,
) -> dict[str, Any]:
    parent_ref: dict[str, Any] = {"group": "", "kind": "Service", "name": parent}
    if port is not None:
        parent_ref["port"] = port
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": meta,
        "spec": {"parentRefs": [parent_ref], "rules": rules},
    }


def backend(name: str, port: int = 8080, weight: int | None = None, **extra: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": port, **extra}
    if weight is not None:
        ref["weight"] = weight
    return ref


def rng(seed: int = 7) -> random.Random:
    return random.Random(seed)

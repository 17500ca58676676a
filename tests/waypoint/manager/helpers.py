"""Builders of Gateway API and core objects for the waypoint manager tests."""

from __future__ import annotations

from typing import Any


def gateway(
    name: str = "waypoint",
    namespace: str = "shop",
    *,
    uid: str = "0f6c2b7e-1111-4c3a-9a55-000000000001",
    class_name: str = "istio-waypoint",
    listeners: list[dict[str, Any]] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    infrastructure: dict[str, Any] | None = None,
    allowed_from: str = "Same",
    selector: dict[str, Any] | None = None,
) -> dict[str, Any]:
    namespaces: dict[str, Any] = {"from": allowed_from}
    if selector is not None:
        namespaces["selector"] = selector
    spec: dict[str, Any] = {
        "gatewayClassName": class_name,
        "listeners": listeners
        if listeners is not None
        else [
            {
                "name": "mesh",
                "port": 15008,
                "protocol": "HBONE",
                "allowedRoutes": {"namespaces": namespaces},
            }
        ],
    }
    if infrastructure is not None:
        spec["infrastructure"] = infrastructure
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid, "generation": 1}
    if labels:
        meta["labels"] = labels
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": meta,
        "spec": spec,
    }


def configmap(name: str, namespace: str = "shop", **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": dict(data),
    }

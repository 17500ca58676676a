"""Builders of the Kubernetes objects the control-plane tests feed in (plain dicts, API shape)."""

from __future__ import annotations

from typing import Any


def namespace(
    name: str, *, ambient: bool = False, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    all_labels = dict(labels or {})
    if ambient:
        all_labels["istio.io/dataplane-mode"] = "ambient"
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": all_labels},
    }


def pod(
    name: str,
    ns: str = "shop",
    *,
    ip: str = "10.1.0.5",
    node: str = "node-a",
    sa: str = "default",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    ready: bool = True,
    ports: dict[str, int] | None = None,
    uid: str | None = None,
    owner: dict[str, Any] | None = None,
    terminating: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "uid": uid or f"uid-{ns}-{name}",
        "labels": dict(labels or {}),
    }
    if owner is not None:
        meta["ownerReferences"] = [{"controller": True, **owner}]
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    container: dict[str, Any] = {"name": "app", "image": "app"}
    if ports:
        container["ports"] = [{"name": k, "containerPort": v} for k, v in ports.items()]
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [container]},
        "status": status,
    }


def service(
    name: str,
    ns: str = "shop",
    *,
    ip: str | None = "10.96.0.10",
    ports: list[dict[str, Any]] | None = None,
    selector: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": ports if ports is not None else [{"name": "http", "port": 80, "targetPort": 8080}],
        "clusterIP": ip or "None",
        "clusterIPs": [ip] if ip else ["None"],
    }
    if selector is not None:
        spec["selector"] = selector
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {})},
        "spec": spec,
    }


def endpoint_slice(
    name: str,
    service_name: str,
    ns: str = "shop",
    *,
    endpoints: list[tuple[str, str | None]],
    ports: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [ip], **({"targetRef": {"kind": "Pod", "name": p}} if p else {})}
            for ip, p in endpoints
        ],
        "ports": [{"name": k, "port": v, "protocol": "TCP"} for k, v in (ports or {}).items()],
    }


def authz(name: str, ns: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def peer_auth(
    name: str, ns: str = "shop", *, created: str = "2026-01-01T00:00:00Z", **spec: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": created},
        "spec": spec,
    }

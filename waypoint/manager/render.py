"""Render a waypoint Gateway into the objects that run it: ServiceAccount, RoleBinding, Deployment,
Service, HPA, PDB.

Owns `RenderConfig` (cluster-wide defaults the manager is started with), `render(gateway, params,
config)` returning plain dicts ready for server-side apply, and `apply_overlay` (Istio's per-kind
ConfigMap patches). Render-then-apply, as Istio's deployment controller: rendering full objects and
applying them with a fixed field manager lets a field we stop rendering disappear on the next apply
(an update or merge patch could never remove what it once set without fighting other writers).

Choices, with the pain point each answers (reference/waypoint.md §D):
* no `replicas` while an HPA exists, so the HPA owns the count; `replicas: minReplicas` when off;
* HPA `behavior.scaleDown`: a stabilization window and at most one pod per minute, selectPolicy Min,
  so long-lived HBONE streams are not reset in a scale-down sawtooth (#1, picchu#645);
* zone and node topology spread, PDB minAvailable 1 with AlwaysAllow for unhealthy pods (#3, #4);
* terminationGracePeriodSeconds >= 30 plus a preStop delay so endpoints leave ztunnel before the
  proxy drains with GOAWAY (#11); rolling updates never drop below the current replica count;
* the proxy runs in cluster mode (`waypoint.proxy.xdsview`): `XDS_ADDRESS`/`CA_ADDRESS` of the
  control plane, its own identity from the downward API (`POD_NAMESPACE`, `SERVICE_ACCOUNT`), a
  projected service-account token with audience `istio-ca` (the CA signs only the pod's own
  identity for it) and the root certificate ConfigMap that verifies the control plane's TLS
  (published in every namespace by the manager, `rootcert`);
* the pods' read access to their L7 configuration (HTTPRoute, GRPCRoute, AuthorizationPolicy,
  `waypoint.proxy.kubesource`) is a RoleBinding in the Gateway's namespace to the ClusterRole
  `ambient-waypoint-proxy` (deploy/controlplane) for the waypoint's ServiceAccount, owned by the
  Gateway like the rest; it is never overlaid from the parametersRef ConfigMap (whoever may edit a
  ConfigMap in the namespace must not be able to point it at another role). Services bound from
  other namespaces (`istio.io/use-waypoint-namespace`) keep their routes and policies there: the
  proxy watches only its own namespace unless widened, and needs a RoleBinding in each extra one.

Pure: no I/O; output is deterministic (golden-file tested).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ztunnel.config import DEFAULT_TRUST_DOMAIN

from .kinds import DEPLOYMENT, HPA, PDB, ROLE_BINDING, SERVICE, SERVICE_ACCOUNT
from .model import (
    DATAPLANE_MODE_LABEL,
    GATEWAY_API_PREFIX,
    GATEWAY_API_VERSION,
    GATEWAY_CLASS_LABEL,
    GATEWAY_NAME_LABEL,
    MANAGED_LABEL,
    MANAGED_VALUE,
    MESH_LISTENER_PORT,
    WAYPOINT_METRICS_PORT,
    WAYPOINT_READINESS_PORT,
    Gateway,
)
from .params import Params

CONTAINER_NAME: Final = "istio-proxy"
"""Istio's container name, so Istio-style `deployment` overlays and ProxyConfig selectors still match."""
PROXY_UID: Final = 1337
PRESTOP_DELAY_SECONDS: Final = 5
DEFAULT_XDS_ADDRESS: Final = "https://ambient-controlplane.ambient-system.svc:15012"
"""deploy/controlplane/service.yaml: xDS and the CA on one gRPC port."""
TOKEN_DIR: Final = "/var/run/secrets/tokens"
ROOT_CERT_DIR: Final = "/var/run/secrets/istio"
CA_AUDIENCE: Final = "istio-ca"
TOKEN_EXPIRATION_SECONDS: Final = 43200
DEFAULT_PROXY_CLUSTER_ROLE: Final = "ambient-waypoint-proxy"
"""deploy/controlplane/waypoint-proxy-clusterrole.yaml: read HTTPRoute, GRPCRoute, AuthorizationPolicy."""
"""Time for endpoint removal to reach every ztunnel before the proxy starts draining."""

# Annotations that steer the controller itself and are not copied onto rendered objects.
_NOT_COPIED: Final = frozenset(
    {
        "kubectl.kubernetes.io/last-applied-configuration",
        "gateway.istio.io/name-override",
        "gateway.istio.io/service-account",
        "gateway.istio.io/controller-version",
    }
)


class RenderError(ValueError):
    """The Gateway's parameters cannot be rendered (e.g. an overlay renames the object)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderConfig:
    """Cluster-wide settings of the manager (command-line flags)."""

    image: str = "ambient-dataplane/waypoint:latest"
    image_pull_policy: str = "IfNotPresent"
    cluster_domain: str = "cluster.local"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    xds_address: str = DEFAULT_XDS_ADDRESS
    ca_address: str = ""
    """Empty: the CA is served with xDS (XDS_ADDRESS)."""
    cluster_id: str = "Kubernetes"
    root_cert_configmap: str = "istio-ca-root-cert"
    proxy_cluster_role: str = DEFAULT_PROXY_CLUSTER_ROLE
    """ClusterRole the waypoint pods are bound to in their namespace ('' renders no RoleBinding)."""


def _infra(values: Mapping[str, str] | None, *, annotations: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in sorted((values or {}).items()):
        # GEP-1867: infrastructure keys must not claim the Gateway API prefix; Istio drops them.
        if key.startswith(GATEWAY_API_PREFIX) or (annotations and key in _NOT_COPIED):
            continue
        out[key] = value
    return out


def selector_labels(gw: Gateway) -> dict[str, str]:
    """The pod selector of the waypoint's Deployment, Service and PDB (GEP-1762)."""
    return {GATEWAY_NAME_LABEL: gw.name}


def object_labels(gw: Gateway) -> dict[str, str]:
    labels = _infra(gw.infra_labels, annotations=False)
    labels.update(
        {
            GATEWAY_NAME_LABEL: gw.name,
            GATEWAY_CLASS_LABEL: gw.class_name,
            MANAGED_LABEL: MANAGED_VALUE,
        }
    )
    return labels


def owner_reference(gw: Gateway) -> dict[str, Any]:
    return {"apiVersion": GATEWAY_API_VERSION, "kind": "Gateway", "name": gw.name, "uid": gw.uid}


def _metadata(
    gw: Gateway, name: str, extra_annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    annotations = _infra(gw.infra_annotations, annotations=True)
    annotations.update(extra_annotations or {})
    meta: dict[str, Any] = {
        "name": name,
        "namespace": gw.namespace,
        "labels": object_labels(gw),
    }
    if annotations:
        meta["annotations"] = annotations
    meta["ownerReferences"] = [owner_reference(gw)]
    return meta


def render_service_account(gw: Gateway) -> dict[str, Any]:
    return {
        "apiVersion": SERVICE_ACCOUNT.api_version,
        "kind": SERVICE_ACCOUNT.kind,
        "metadata": _metadata(gw, gw.name),
    }


def render_role_binding(gw: Gateway, config: RenderConfig) -> dict[str, Any]:
    """The waypoint's ServiceAccount may read its L7 configuration in its own namespace."""
    return {
        "apiVersion": ROLE_BINDING.api_version,
        "kind": ROLE_BINDING.kind,
        "metadata": _metadata(gw, gw.name),
        "roleRef": {
            "apiGroup": ROLE_BINDING.group,
            "kind": "ClusterRole",
            "name": config.proxy_cluster_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": gw.name, "namespace": gw.namespace}],
    }


def render_deployment(gw: Gateway, params: Params, config: RenderConfig) -> dict[str, Any]:
    pod_labels = object_labels(gw)
    pod_labels.update(
        {
            # The node proxy must not capture its own waypoint's traffic.
            DATAPLANE_MODE_LABEL: "none",
            "sidecar.istio.io/inject": "false",
            "service.istio.io/canonical-name": gw.name,
            "service.istio.io/canonical-revision": "latest",
        }
    )
    pod_annotations = _infra(gw.infra_annotations, annotations=True)
    pod_annotations.update(
        {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(WAYPOINT_METRICS_PORT),
            "prometheus.io/path": "/stats/prometheus",
        }
    )
    drain_seconds = params.termination_grace_period_seconds - PRESTOP_DELAY_SECONDS - 5
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {
            "name": "SERVICE_ACCOUNT",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
        },
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "WAYPOINT_NAME", "value": gw.name},
        {"name": "TRUST_DOMAIN", "value": config.trust_domain},
        {"name": "CLUSTER_ID", "value": config.cluster_id},
        {"name": "XDS_ADDRESS", "value": config.xds_address},
        {"name": "CA_ADDRESS", "value": config.ca_address or config.xds_address},
        {"name": "XDS_ROOT_CA", "value": f"{ROOT_CERT_DIR}/root-cert.pem"},
        {"name": "CA_ROOT_CA", "value": f"{ROOT_CERT_DIR}/root-cert.pem"},
        {"name": "ISTIO_TOKEN_PATH", "value": f"{TOKEN_DIR}/istio-token"},
        {"name": "CLUSTER_DOMAIN", "value": config.cluster_domain},
        {"name": "WAYPOINT_DRAIN_SECONDS", "value": str(drain_seconds)},
    ]
    if gw.for_service_account:
        env.append({"name": "WAYPOINT_FOR_SERVICE_ACCOUNT", "value": gw.for_service_account})

    def probe() -> dict[str, Any]:
        return {"httpGet": {"path": "/healthz/ready", "port": WAYPOINT_READINESS_PORT}}

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": params.image or config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["waypoint"],
        "args": ["proxy"],
        "env": env,
        "ports": [
            {"name": "hbone", "containerPort": MESH_LISTENER_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": WAYPOINT_METRICS_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": WAYPOINT_READINESS_PORT, "protocol": "TCP"},
        ],
        "startupProbe": {
            **probe(),
            "periodSeconds": 1,
            "failureThreshold": 60,
            "timeoutSeconds": 3,
        },
        "readinessProbe": {
            **probe(),
            "periodSeconds": 5,
            "failureThreshold": 3,
            "timeoutSeconds": 3,
        },
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_DELAY_SECONDS}}},
        "resources": {k: dict(v) for k, v in sorted(params.resources.items())},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": "istio-ca-root-cert", "mountPath": ROOT_CERT_DIR, "readOnly": True},
        ],
    }
    spec: dict[str, Any] = {}
    if not params.autoscaling:
        spec["replicas"] = params.min_replicas
    spec.update(
        {
            "selector": {"matchLabels": selector_labels(gw)},
            # Never fewer ready pods than now during a rollout: existing HBONE streams drain in peace.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": {
                    "serviceAccountName": gw.name,
                    "terminationGracePeriodSeconds": params.termination_grace_period_seconds,
                    "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": key,
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": selector_labels(gw)},
                            "matchLabelKeys": ["pod-template-hash"],
                        }
                        for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
                    ],
                    "containers": [container],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {}},
                        # Pod-bound token for xDS and the CA; kubelet rotates it.
                        {
                            "name": "istio-token",
                            "projected": {
                                "sources": [
                                    {
                                        "serviceAccountToken": {
                                            "path": "istio-token",
                                            "audience": CA_AUDIENCE,
                                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                                        }
                                    }
                                ]
                            },
                        },
                        {
                            "name": "istio-ca-root-cert",
                            "configMap": {"name": config.root_cert_configmap},
                        },
                    ],
                },
            },
        }
    )
    return {
        "apiVersion": DEPLOYMENT.api_version,
        "kind": DEPLOYMENT.kind,
        "metadata": _metadata(gw, gw.name),
        "spec": spec,
    }


def render_service(gw: Gateway) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": "ClusterIP",
        "ipFamilyPolicy": "PreferDualStack",
        "selector": selector_labels(gw),
        "ports": [
            {
                "name": "mesh",
                "port": MESH_LISTENER_PORT,
                "targetPort": MESH_LISTENER_PORT,
                "protocol": "TCP",
                "appProtocol": "hbone",
            },
            {
                "name": "status-port",
                "port": WAYPOINT_READINESS_PORT,
                "targetPort": WAYPOINT_READINESS_PORT,
                "protocol": "TCP",
                "appProtocol": "tcp",
            },
            {
                "name": "metrics",
                "port": WAYPOINT_METRICS_PORT,
                "targetPort": WAYPOINT_METRICS_PORT,
                "protocol": "TCP",
                "appProtocol": "http",
            },
        ],
    }
    for kind, value in gw.spec_addresses:
        if kind == "IPAddress" and value:
            spec["clusterIP"] = value
    return {
        "apiVersion": SERVICE.api_version,
        "kind": SERVICE.kind,
        # ztunnel prefers the closest healthy waypoint pod (network, region, zone, node).
        "metadata": _metadata(
            gw, gw.name, {"networking.istio.io/traffic-distribution": "PreferClose"}
        ),
        "spec": spec,
    }


def render_hpa(gw: Gateway, params: Params) -> dict[str, Any]:
    metrics: list[dict[str, Any]] = []
    if params.cpu_target_utilization is not None:
        metrics.append(
            {
                "type": "Resource",
                "resource": {
                    "name": "cpu",
                    "target": {
                        "type": "Utilization",
                        "averageUtilization": params.cpu_target_utilization,
                    },
                },
            }
        )
    if params.requests_per_second_target is not None:
        metrics.append(
            {
                "type": "Pods",
                "pods": {
                    "metric": {"name": params.requests_per_second_metric},
                    "target": {
                        "type": "AverageValue",
                        "averageValue": str(params.requests_per_second_target),
                    },
                },
            }
        )
    return {
        "apiVersion": HPA.api_version,
        "kind": HPA.kind,
        "metadata": _metadata(gw, gw.name),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": DEPLOYMENT.api_version,
                "kind": DEPLOYMENT.kind,
                "name": gw.name,
            },
            "minReplicas": params.min_replicas,
            "maxReplicas": params.max_replicas,
            "metrics": metrics,
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Percent", "value": 100, "periodSeconds": 15},
                        {"type": "Pods", "value": 4, "periodSeconds": 15},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": params.scale_down_stabilization_seconds,
                    "selectPolicy": "Min",
                    "policies": [
                        {
                            "type": "Pods",
                            "value": params.scale_down_pods,
                            "periodSeconds": params.scale_down_period_seconds,
                        }
                    ],
                },
            },
        },
    }


def render_pdb(gw: Gateway, params: Params) -> dict[str, Any]:
    return {
        "apiVersion": PDB.api_version,
        "kind": PDB.kind,
        "metadata": _metadata(gw, gw.name),
        "spec": {
            "minAvailable": params.min_available,
            "selector": {"matchLabels": selector_labels(gw)},
            # A crash-looping pod must not block node drains.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def merge_patch(base: Any, patch: Any, where: str) -> Any:
    """A strategic-merge subset: maps merge, null deletes, lists of named items merge by name.

    Other lists are replaced. `$patch`-style directives are not supported and are rejected.
    """
    if isinstance(patch, Mapping):
        if not isinstance(base, Mapping):
            base = {}
        out = dict(base)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                raise RenderError(f"{where}: patch directive {key!r} is not supported")
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge_patch(base.get(key), value, f"{where}.{key}")
        return out
    if (
        isinstance(patch, list)
        and isinstance(base, list)
        and all(isinstance(i, Mapping) and "name" in i for i in patch)
        and all(isinstance(i, Mapping) and "name" in i for i in base)
    ):
        merged = [dict(i) for i in base]
        index = {i["name"]: n for n, i in enumerate(merged)}
        for item in patch:
            if item["name"] in index:
                n = index[item["name"]]
                merged[n] = merge_patch(merged[n], item, f"{where}[name={item['name']}]")
            else:
                merged.append(copy.deepcopy(dict(item)))
        return merged
    return copy.deepcopy(patch)


_IMMUTABLE_META: Final = (
    "name",
    "namespace",
    "ownerReferences",
    "uid",
    "finalizers",
    "generation",
    "managedFields",
)
_OVERLAY_KEY_FOR_KIND: Final = {
    SERVICE_ACCOUNT.kind: "serviceAccount",
    DEPLOYMENT.kind: "deployment",
    SERVICE.kind: "service",
    HPA.kind: "horizontalPodAutoscaler",
    PDB.kind: "podDisruptionBudget",
}


def apply_overlay(obj: dict[str, Any], overlay: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Patch one rendered object; identity, ownership and the managed label may not change."""
    out: dict[str, Any] = merge_patch(obj, overlay, where)
    before, after = obj.get("metadata", {}), out.get("metadata", {})
    for key in _IMMUTABLE_META:
        if before.get(key) != after.get(key):
            raise RenderError(f"{where}: illegal metadata change of {key}")
    for key in (MANAGED_LABEL, GATEWAY_NAME_LABEL):
        if before.get("labels", {}).get(key) != (after.get("labels") or {}).get(key):
            raise RenderError(f"{where}: illegal change of label {key}")
    if out.get("kind") != obj.get("kind") or out.get("apiVersion") != obj.get("apiVersion"):
        raise RenderError(f"{where}: illegal change of apiVersion/kind")
    return out


def render(
    gw: Gateway, params: Params, config: RenderConfig, *, params_source: str = "parametersRef"
) -> list[dict[str, Any]]:
    """Everything a valid waypoint Gateway becomes, in apply order. HPA/PDB only when enabled."""
    objects = [render_service_account(gw)]
    if config.proxy_cluster_role:
        objects.append(render_role_binding(gw, config))
    objects += [render_deployment(gw, params, config), render_service(gw)]
    if params.autoscaling:
        objects.append(render_hpa(gw, params))
    if params.pod_disruption_budget:
        objects.append(render_pdb(gw, params))
    out = []
    for obj in objects:
        key = _OVERLAY_KEY_FOR_KIND.get(obj["kind"])  # none for the RoleBinding: see above
        overlay = params.overlays.get(key) if key else None
        out.append(apply_overlay(obj, overlay, f"{params_source} key {key!r}") if overlay else obj)
    return out

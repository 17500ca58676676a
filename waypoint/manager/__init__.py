"""The waypoint manager: Gateway API objects in, waypoint Deployments/Services/HPAs/PDBs and status out.

Pure cores: `model` (names, labels, Gateway parsing and validation), `params` (parametersRef ConfigMap),
`render` (objects), `plan` (apply/delete/foreign), `status` (conditions), `binding` (which services and
workloads use which waypoint), `rootcert` (the `istio-ca-root-cert` ConfigMap of each namespace). Shells: `client` (kubernetes_asyncio behind the `kube.KubeApi` seam) and
`controller` (informers, work queue, reconcilers). Import the shells from their modules; this package
re-exports the pure API only, so importing it never pulls in a Kubernetes client.
"""

from __future__ import annotations

from waypoint.manager.binding import (
    Binding,
    BindingTable,
    NamespaceInfo,
    ServiceInfo,
    WaypointInfo,
    WorkloadInfo,
    resolve_bindings,
    waypoint_bound_condition,
)
from waypoint.manager.kube import KubeApi
from waypoint.manager.model import Gateway, ModelError, parse_gateway, validate_gateway
from waypoint.manager.params import Params, ParamsError, parse_params
from waypoint.manager.plan import Plan, plan
from waypoint.manager.render import RenderConfig, RenderError, render
from waypoint.manager.status import gateway_status

__all__ = [
    "Binding",
    "BindingTable",
    "Gateway",
    "KubeApi",
    "ModelError",
    "NamespaceInfo",
    "Params",
    "ParamsError",
    "Plan",
    "RenderConfig",
    "RenderError",
    "ServiceInfo",
    "WaypointInfo",
    "WorkloadInfo",
    "gateway_status",
    "parse_gateway",
    "parse_params",
    "plan",
    "render",
    "resolve_bindings",
    "validate_gateway",
    "waypoint_bound_condition",
]

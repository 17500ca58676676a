"""The API resource kinds the waypoint manager reads and writes, as plain data.

Owns `ResourceType` (group/version/plural/kind/scope and the REST path it lives at) and the table of
kinds: the ones it owns (rendered per Gateway, deleted when no longer rendered) and the ones it only
watches. Pure: the Kubernetes shell builds URLs from these, the planner iterates `OWNED_KINDS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """REST path: /api/v1/namespaces/ns/services/name/status, /apis/apps/v1/deployments, ..."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


SERVICE_ACCOUNT: Final = ResourceType(
    group="", version="v1", plural="serviceaccounts", kind="ServiceAccount"
)
DEPLOYMENT: Final = ResourceType(
    group="apps", version="v1", plural="deployments", kind="Deployment"
)
SERVICE: Final = ResourceType(group="", version="v1", plural="services", kind="Service")
HPA: Final = ResourceType(
    group="autoscaling",
    version="v2",
    plural="horizontalpodautoscalers",
    kind="HorizontalPodAutoscaler",
)
PDB: Final = ResourceType(
    group="policy", version="v1", plural="poddisruptionbudgets", kind="PodDisruptionBudget"
)
ROLE_BINDING: Final = ResourceType(
    group="rbac.authorization.k8s.io", version="v1", plural="rolebindings", kind="RoleBinding"
)

GATEWAY: Final = ResourceType(
    group="gateway.networking.k8s.io", version="v1", plural="gateways", kind="Gateway"
)
GATEWAY_CLASS: Final = ResourceType(
    group="gateway.networking.k8s.io",
    version="v1",
    plural="gatewayclasses",
    kind="GatewayClass",
    namespaced=False,
)
NAMESPACE: Final = ResourceType(
    group="", version="v1", plural="namespaces", kind="Namespace", namespaced=False
)
POD: Final = ResourceType(group="", version="v1", plural="pods", kind="Pod")
CONFIG_MAP: Final = ResourceType(group="", version="v1", plural="configmaps", kind="ConfigMap")

OWNED_KINDS: Final = (SERVICE_ACCOUNT, ROLE_BINDING, DEPLOYMENT, SERVICE, HPA, PDB)
"""What a waypoint Gateway becomes, in apply order (the account and its rights before the pods)."""

BY_KIND: Final = {
    t.kind: t for t in (*OWNED_KINDS, GATEWAY, GATEWAY_CLASS, NAMESPACE, POD, CONFIG_MAP)
}

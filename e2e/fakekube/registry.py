"""The fake API server's registry of resource kinds: what exists, where it lives, which verbs it has.

Owns `ResourceKind` (one REST resource: group, version, plural, kind, scope, subresources, selectable
fields) and `Registry` (lookups by URL parts and by apiVersion/kind, discovery documents). Pure data:
the store and the HTTP shell consult it, CRD objects feed it through `kinds_from_crd`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = (
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)
CREATE_ONLY = ("create",)

# Every kind answers field selectors on these two, like the real server.
BASE_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceKind:
    """One REST resource (e.g. apps/v1 deployments)."""

    group: str
    """API group; "" for the legacy core group."""
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    has_status: bool = True
    """Whether a /status subresource exists (then the main endpoint ignores status changes)."""
    extra_fields: tuple[str, ...] = ()
    """Field-selector paths supported besides metadata.name and metadata.namespace."""
    return_deleted_object: bool = False
    """DELETE answers with the deleted object (pods, custom resources) instead of a Status."""
    virtual: bool = False
    """Create-only review kinds (tokenreviews): answered, never stored."""
    categories: tuple[str, ...] = ()
    custom: bool = False
    """Served from a CRD on a real cluster: no strategic merge patch (415), deleted object returned."""

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def selectable_fields(self) -> tuple[str, ...]:
        return BASE_FIELDS + self.extra_fields

    @property
    def resource_label(self) -> str:
        """How error messages name the resource: "pods", "deployments.apps"."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery_entries(self) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular or self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        if self.has_status and not self.virtual:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return entries


def _k(
    group: str,
    version: str,
    plural: str,
    kind: str,
    *,
    namespaced: bool = True,
    has_status: bool = True,
    short: tuple[str, ...] = (),
    fields: tuple[str, ...] = (),
    returns_object: bool = False,
    custom: bool = False,
) -> ResourceKind:
    return ResourceKind(
        group=group,
        version=version,
        plural=plural,
        kind=kind,
        namespaced=namespaced,
        has_status=has_status,
        short_names=short,
        extra_fields=fields,
        return_deleted_object=returns_object or custom,
        custom=custom,
    )


POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)

BUILTIN_KINDS: tuple[ResourceKind, ...] = (
    _k(
        "",
        "v1",
        "namespaces",
        "Namespace",
        namespaced=False,
        short=("ns",),
        fields=("status.phase",),
    ),
    _k("", "v1", "nodes", "Node", namespaced=False, short=("no",), fields=("spec.unschedulable",)),
    _k("", "v1", "pods", "Pod", short=("po",), fields=POD_FIELDS, returns_object=True),
    _k("", "v1", "services", "Service", short=("svc",)),
    _k("", "v1", "serviceaccounts", "ServiceAccount", has_status=False, short=("sa",)),
    _k("", "v1", "configmaps", "ConfigMap", has_status=False, short=("cm",)),
    _k("", "v1", "secrets", "Secret", has_status=False, fields=("type",)),
    _k("", "v1", "endpoints", "Endpoints", has_status=False, short=("ep",)),
    _k("", "v1", "events", "Event", has_status=False, short=("ev",), fields=EVENT_FIELDS),
    _k("apps", "v1", "deployments", "Deployment", short=("deploy",)),
    _k("apps", "v1", "replicasets", "ReplicaSet", short=("rs",), fields=("status.replicas",)),
    _k("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler", short=("hpa",)),
    _k("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short=("pdb",)),
    _k("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", has_status=False),
    _k("coordination.k8s.io", "v1", "leases", "Lease", has_status=False),
    # RBAC objects are stored only: the fake server authorizes nothing.
    _k("rbac.authorization.k8s.io", "v1", "roles", "Role", has_status=False),
    _k("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", has_status=False),
    _k(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterroles",
        "ClusterRole",
        namespaced=False,
        has_status=False,
    ),
    _k(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        namespaced=False,
        has_status=False,
    ),
    _k(
        "gateway.networking.k8s.io",
        "v1",
        "gatewayclasses",
        "GatewayClass",
        namespaced=False,
        short=("gc",),
        custom=True,
    ),
    _k(
        "gateway.networking.k8s.io",
        "v1",
        "gateways",
        "Gateway",
        short=("gtw",),
        custom=True,
    ),
    _k("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", custom=True),
    _k("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute", custom=True),
    _k(
        "gateway.networking.k8s.io",
        "v1beta1",
        "referencegrants",
        "ReferenceGrant",
        has_status=False,
        short=("refgrant",),
        custom=True,
    ),
    _k(
        "security.istio.io",
        "v1",
        "authorizationpolicies",
        "AuthorizationPolicy",
        short=("ap",),
        custom=True,
    ),
    _k(
        "security.istio.io",
        "v1",
        "peerauthentications",
        "PeerAuthentication",
        short=("pa",),
        custom=True,
    ),
    _k(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short=("crd", "crds"),
    ),
    ResourceKind(
        group="authentication.k8s.io",
        version="v1",
        plural="tokenreviews",
        kind="TokenReview",
        namespaced=False,
        verbs=CREATE_ONLY,
        has_status=False,
        virtual=True,
    ),
)


class UnknownKind(LookupError):
    """No registered resource matches; the shell answers 404 NotFound."""


@dataclass(slots=True)
class Registry:
    """Mutable set of resource kinds, looked up by URL parts or by apiVersion/kind."""

    _by_path: dict[tuple[str, str, str], ResourceKind] = field(default_factory=dict)

    @classmethod
    def with_builtins(cls) -> Registry:
        registry = cls()
        for kind in BUILTIN_KINDS:
            registry.add(kind)
        return registry

    def add(self, kind: ResourceKind) -> None:
        key = (kind.group, kind.version, kind.plural)
        existing = self._by_path.get(key)
        if existing is not None and existing.kind != kind.kind:
            raise ValueError(
                f"resource {kind.plural} in {kind.api_version} is already registered as kind "
                f"{existing.kind}, cannot re-register it as {kind.kind}"
            )
        self._by_path[key] = kind

    def remove(self, group: str, plural: str) -> list[ResourceKind]:
        """Drop every version of group/plural; returns what was dropped."""
        gone = [k for k in self._by_path.values() if k.group == group and k.plural == plural]
        for kind in gone:
            del self._by_path[(kind.group, kind.version, kind.plural)]
        return gone

    def lookup(self, group: str, version: str, plural: str) -> ResourceKind:
        try:
            return self._by_path[(group, version, plural)]
        except KeyError:
            raise UnknownKind(
                f"the server could not find the requested resource ({plural})"
            ) from None

    def by_kind(self, api_version: str, kind: str) -> ResourceKind:
        for candidate in self._by_path.values():
            if candidate.api_version == api_version and candidate.kind == kind:
                return candidate
        raise UnknownKind(f"no kind {kind!r} is registered for version {api_version!r}")

    def find_by_group_kind(self, group: str, kind: str) -> list[ResourceKind]:
        """Every version of group/kind (ownerReferences name apiVersion, which may be any served one)."""
        return [k for k in self._by_path.values() if k.group == group and k.kind == kind]

    def kinds(self) -> list[ResourceKind]:
        return list(self._by_path.values())

    def has_version(self, group: str, version: str) -> bool:
        return any(k.group == group and k.version == version for k in self._by_path.values())

    def groups(self) -> dict[str, list[str]]:
        """Named groups (not core) and their versions, newest registered first."""
        out: dict[str, list[str]] = {}
        for kind in self._by_path.values():
            if kind.group:
                versions = out.setdefault(kind.group, [])
                if kind.version not in versions:
                    versions.append(kind.version)
        for versions in out.values():
            versions.sort(key=_version_priority, reverse=True)
        return out

    # --- discovery documents ---------------------------------------------------------------

    def resource_list(self, group: str, version: str) -> dict[str, Any]:
        resources: list[dict[str, Any]] = []
        for kind in sorted(self._by_path.values(), key=lambda k: k.plural):
            if kind.group == group and kind.version == version:
                resources.extend(kind.discovery_entries())
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": resources,
        }

    def group_document(self, group: str) -> dict[str, Any]:
        versions = self.groups().get(group, [])
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": listed,
            "preferredVersion": listed[0] if listed else {},
        }

    def group_list(self) -> dict[str, Any]:
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {k: v for k, v in self.group_document(g).items() if k not in ("kind", "apiVersion")}
                for g in sorted(self.groups())
            ],
        }


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, then by numbers (v1 < v2, v1beta1 < v1beta2)."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if m is None:
        return (-1, 0, 0)
    stage = {"alpha": 0, "beta": 1, None: 2}[m.group(2)]
    return (stage, int(m.group(1)), int(m.group(3) or 0))


def kinds_from_crd(crd: Mapping[str, Any]) -> list[ResourceKind]:
    """The kinds a CustomResourceDefinition object serves; ValueError names the bad field."""
    name = crd.get("metadata", {}).get("name", "<unnamed>")
    spec = crd.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError(f"CustomResourceDefinition {name}: spec is required")
    group = spec.get("group")
    names = spec.get("names")
    scope = spec.get("scope")
    versions = spec.get("versions")
    if not isinstance(group, str) or not group:
        raise ValueError(f"CustomResourceDefinition {name}: spec.group is required")
    if not isinstance(names, Mapping) or not names.get("plural") or not names.get("kind"):
        raise ValueError(
            f"CustomResourceDefinition {name}: spec.names.plural and spec.names.kind are required"
        )
    if f"{names['plural']}.{group}" != name:
        raise ValueError(
            f"CustomResourceDefinition {name}: metadata.name must be spec.names.plural+'.'+spec.group "
            f"({names['plural']}.{group})"
        )
    if scope not in ("Namespaced", "Cluster"):
        raise ValueError(
            f"CustomResourceDefinition {name}: spec.scope must be Namespaced or Cluster, not {scope!r}"
        )
    if not isinstance(versions, list) or not versions:
        raise ValueError(
            f"CustomResourceDefinition {name}: spec.versions must list at least one version"
        )
    out: list[ResourceKind] = []
    for index, ver in enumerate(versions):
        if not isinstance(ver, Mapping) or not isinstance(ver.get("name"), str):
            raise ValueError(
                f"CustomResourceDefinition {name}: spec.versions[{index}].name is required"
            )
        if not ver.get("served", True):
            continue
        subresources = ver.get("subresources") or {}
        out.append(
            ResourceKind(
                group=group,
                version=ver["name"],
                plural=names["plural"],
                kind=names["kind"],
                singular=names.get("singular", ""),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                namespaced=scope == "Namespaced",
                has_status="status" in subresources,
                return_deleted_object=True,
                custom=True,
            )
        )
    return out


def iter_group_versions(kinds: Iterable[ResourceKind]) -> list[str]:
    seen: list[str] = []
    for kind in kinds:
        if kind.api_version not in seen:
            seen.append(kind.api_version)
    return seen

"""The mesh root certificate published in each namespace, as istiod does: ConfigMap `istio-ca-root-cert`.

Owns which namespaces get it (`wants_root_cert`), the object (`render_root_cert`: key `root-cert.pem`
holding the CA's current roots, the managed label) and the write decision (`plan_root_cert`).
Workloads mount this ConfigMap to verify the control plane's TLS (the waypoint Deployments the
manager renders, the ztunnel DaemonSet in ambient-system), so, like istiod, it goes into EVERY
namespace except Kubernetes' own (kube-system, kube-public, kube-node-lease): a pod may start in a
namespace before that namespace is labelled ambient or holds a waypoint, and ztunnel's namespace is
neither. A namespace being deleted gets nothing (the API server would refuse the write).

Rules, as for the waypoint objects (`plan`): missing -> created; ours (managed label) and different
(e.g. after a root rotation, when the CA returns several roots) -> applied, pinned to the
resourceVersion seen; a same-named ConfigMap WITHOUT the managed label -> never touched, reported.
Nothing is ever deleted: the ConfigMap goes with its namespace.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .kinds import CONFIG_MAP
from .model import MANAGED_LABEL, MANAGED_VALUE, ObjectKey
from .plan import Apply, Foreign, Plan, contains, is_managed

ROOT_CERT_CONFIGMAP: Final = "istio-ca-root-cert"
ROOT_CERT_KEY: Final = "root-cert.pem"
ISTIO_CONFIG_LABEL: Final = "istio.io/config"
"""istiod labels its root-certificate ConfigMaps `istio.io/config: "true"`; tools select on it."""
SKIPPED_NAMESPACES: Final = frozenset({"kube-system", "kube-public", "kube-node-lease"})


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def wants_root_cert(namespace: Mapping[str, Any] | None) -> bool:
    """Whether this Namespace object should hold the root certificate ConfigMap."""
    if namespace is None:
        return False
    name = str(_meta(namespace).get("name", ""))
    if not name or name in SKIPPED_NAMESPACES:
        return False
    terminating = _meta(namespace).get("deletionTimestamp") or (
        (namespace.get("status") or {}).get("phase") == "Terminating"
    )
    return not terminating


def render_root_cert(
    namespace: str, roots_pem: str, *, name: str = ROOT_CERT_CONFIGMAP
) -> dict[str, Any]:
    """The ConfigMap for `namespace` holding `roots_pem` (every trusted root, concatenated PEM)."""
    if "-----BEGIN CERTIFICATE-----" not in roots_pem:
        raise ValueError(f"ConfigMap {namespace}/{name}: the CA's roots are not PEM certificates")
    return {
        "apiVersion": CONFIG_MAP.api_version,
        "kind": CONFIG_MAP.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_LABEL: MANAGED_VALUE, ISTIO_CONFIG_LABEL: "true"},
        },
        "data": {ROOT_CERT_KEY: roots_pem},
    }


def plan_root_cert(
    namespace: Mapping[str, Any] | None,
    current: Mapping[str, Any] | None,
    roots_pem: str,
    *,
    name: str = ROOT_CERT_CONFIGMAP,
) -> Plan:
    """The write (if any) that makes `namespace` hold `roots_pem` in ConfigMap `name`.

    `namespace` is the Namespace object (None: gone), `current` the ConfigMap of that name in it
    (None: none). The plan has at most one apply, or one foreign report; never a delete.
    """
    if namespace is None or not wants_root_cert(namespace):
        return Plan()
    ns = str(_meta(namespace)["name"])
    key = ObjectKey(kind=CONFIG_MAP.kind, namespace=ns, name=name)
    desired = render_root_cert(ns, roots_pem, name=name)
    if current is None:
        return Plan(applies=(Apply(key=key, obj=desired, resource_version=None),))
    if not is_managed(current):
        return Plan(
            foreign=(
                Foreign(
                    key=key,
                    reason=f"{key} exists without label {MANAGED_LABEL}={MANAGED_VALUE}; "
                    "root certificate not published there",
                ),
            )
        )
    if contains(current, desired):
        return Plan(unchanged=(key,))
    rv = _meta(current).get("resourceVersion")
    return Plan(applies=(Apply(key=key, obj=desired, resource_version=str(rv) if rv else None),))

"""Which pods of this node are in the mesh: membership over cached Pod and Namespace objects (pure).

Owns the Kubernetes-mode enrolment decision (issue 7 item 4; the part istio-cni decides in Istio,
ztunnel.md section 7.1), as a pure function of the Pod and its Namespace's labels:

* a pod is in the mesh when its namespace has ``istio.io/dataplane-mode=ambient`` and the pod does
  not say ``istio.io/dataplane-mode=none`` (the pod label wins); a pod label ``ambient`` enrols the
  pod without the namespace label, as in Istio;
* never: host-network pods (they share the node's netns: capturing them would capture the node),
  terminating pods (``deletionTimestamp``), finished pods (``Succeeded``/``Failed``), pods without an
  IP yet, pods of another node, and waypoint pods (they speak HBONE themselves);
* a pod is enrolled while ``Pending`` too once it has an IP: istio-cni captures a pod in CNI ADD,
  before its containers start, so an app's first ``connect()`` is already captured.

``ClusterView`` is the watch caches' content (pods of this node, namespace labels) with the
decision applied; ``local_workload`` turns a member into the ``Workload`` the node agent serves,
preferring the control plane's view (xDS) and falling back to one built from the Pod, so a pod is
captured even before its workload arrives over xDS. The workload uid is istiod's
(``<cluster>//Pod/<ns>/<name>``), the key the xDS store uses.

No I/O: objects are plain dicts as the API server sends them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from ztunnel.config import DEFAULT_SERVICE_ACCOUNT, DEFAULT_TRUST_DOMAIN
from ztunnel.state.model import IPAddress, TunnelProtocol, Workload, WorkloadType

DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
AMBIENT: Final = "ambient"
NONE: Final = "none"
# Waypoint pods (Istio's gateway controller and the Gateway API set these): native HBONE, no capture.
WAYPOINT_LABELS: Final = ("gateway.istio.io/managed", "gateway.networking.k8s.io/gateway-name")
DEFAULT_CLUSTER_ID: Final = "Kubernetes"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _section(obj: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = obj.get(name)
    return value if isinstance(value, Mapping) else {}


def labels_of(obj: Mapping[str, Any]) -> dict[str, str]:
    labels = _meta(obj).get("labels")
    if not isinstance(labels, Mapping):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def workload_uid(cluster_id: str, namespace: str, name: str) -> str:
    """istiod's workload uid of a pod: ``<cluster>//Pod/<ns>/<name>``."""
    return f"{cluster_id}//Pod/{namespace}/{name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Membership:
    """The decision for one pod and why (``reason`` is shown in logs and config_dump)."""

    enrolled: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalPod:
    """What the node agent needs of an enrolled pod."""

    namespace: str
    name: str
    pod_uid: str  # metadata.uid: a recreated pod with the same name is a new pod
    node: str
    ips: tuple[IPAddress, ...]
    service_account: str
    labels: Mapping[str, str]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_ips(pod: Mapping[str, Any]) -> tuple[IPAddress, ...]:
    """``status.podIPs`` (or ``status.podIP``) as addresses; entries that are not IPs are skipped."""
    status = _section(pod, "status")
    raw: list[str] = []
    for entry in status.get("podIPs") or []:
        if isinstance(entry, Mapping) and entry.get("ip"):
            raw.append(str(entry["ip"]))
    if not raw and status.get("podIP"):
        raw.append(str(status["podIP"]))
    out: list[IPAddress] = []
    for text in raw:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip not in out:
            out.append(ip)
    return tuple(out)


def membership(
    pod: Mapping[str, Any], namespace_labels: Mapping[str, str] | None, node: str
) -> Membership:
    """Is ``pod`` a mesh pod that ``node``'s ztunnel must capture and serve? (see module docstring)

    ``namespace_labels`` None means the Namespace is not (yet) known: treated as unlabelled.
    """
    meta, spec, status = _meta(pod), _section(pod, "spec"), _section(pod, "status")
    if str(spec.get("nodeName") or "") != node:
        return Membership(
            enrolled=False, reason=f"scheduled on {spec.get('nodeName') or 'no node'}"
        )
    if spec.get("hostNetwork"):
        return Membership(enrolled=False, reason="host network")
    if meta.get("deletionTimestamp"):
        return Membership(enrolled=False, reason="terminating")
    phase = str(status.get("phase") or "Pending")
    if phase not in ("Pending", "Running"):
        return Membership(enrolled=False, reason=f"phase {phase}")
    labels = labels_of(pod)
    if any(k in labels for k in WAYPOINT_LABELS):
        return Membership(enrolled=False, reason="waypoint pod (native HBONE)")
    pod_mode = labels.get(DATAPLANE_MODE_LABEL)
    if pod_mode == NONE:
        return Membership(enrolled=False, reason=f"pod label {DATAPLANE_MODE_LABEL}={NONE}")
    if pod_mode == AMBIENT:
        decision = Membership(enrolled=True, reason=f"pod label {DATAPLANE_MODE_LABEL}={AMBIENT}")
    elif namespace_labels is None:
        return Membership(enrolled=False, reason="namespace not known yet")
    elif namespace_labels.get(DATAPLANE_MODE_LABEL) == AMBIENT:
        decision = Membership(enrolled=True, reason=f"namespace {DATAPLANE_MODE_LABEL}={AMBIENT}")
    else:
        return Membership(enrolled=False, reason="namespace not ambient")
    if not pod_ips(pod):
        return Membership(enrolled=False, reason="no pod IP yet")
    return decision


def local_pod(pod: Mapping[str, Any]) -> LocalPod:
    meta, spec = _meta(pod), _section(pod, "spec")
    return LocalPod(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        pod_uid=str(meta.get("uid") or ""),
        node=str(spec.get("nodeName") or ""),
        ips=pod_ips(pod),
        service_account=str(
            spec.get("serviceAccountName") or spec.get("serviceAccount") or DEFAULT_SERVICE_ACCOUNT
        ),
        labels=labels_of(pod),
    )


class ClusterView:
    """The pods of one node and every namespace's labels, as the watches last reported them.

    ``apply_*`` return whether membership could have changed, so the shell wakes the agent only
    then (status churn of a pod, e.g. its conditions, does not touch the membership inputs).
    """

    def __init__(self, node: str) -> None:
        self.node = node
        self._pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._namespaces: dict[str, dict[str, str]] = {}

    # --- feeding ---------------------------------------------------------------------------

    def apply_pod(self, event_type: str, pod: Mapping[str, Any]) -> bool:
        meta = _meta(pod)
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        before = self._pods.get(key)
        if event_type == "DELETED":
            self._pods.pop(key, None)
            return before is not None
        self._pods[key] = pod
        return before is None or _inputs(before) != _inputs(pod)

    def apply_namespace(self, event_type: str, namespace: Mapping[str, Any]) -> bool:
        name = str(_meta(namespace).get("name") or "")
        before = self._namespaces.get(name)
        if event_type == "DELETED":
            self._namespaces.pop(name, None)
        else:
            self._namespaces[name] = labels_of(namespace)
        return before != self._namespaces.get(name) and any(ns == name for ns, _ in self._pods)

    def replace_pods(self, pods: Iterable[Mapping[str, Any]]) -> None:
        self._pods = {}
        for pod in pods:
            self.apply_pod("ADDED", pod)

    def replace_namespaces(self, namespaces: Iterable[Mapping[str, Any]]) -> None:
        self._namespaces = {}
        for namespace in namespaces:
            self.apply_namespace("ADDED", namespace)

    # --- reading ---------------------------------------------------------------------------

    def decisions(self) -> dict[str, Membership]:
        """``ns/name`` -> the decision, for every pod of this node (config_dump, tests)."""
        return {
            f"{ns}/{name}": membership(pod, self._namespaces.get(ns), self.node)
            for (ns, name), pod in sorted(self._pods.items())
        }

    def members(self) -> dict[str, LocalPod]:
        """``ns/name`` -> the enrolled pods of this node."""
        out: dict[str, LocalPod] = {}
        for (ns, name), pod in sorted(self._pods.items()):
            if membership(pod, self._namespaces.get(ns), self.node).enrolled:
                out[f"{ns}/{name}"] = local_pod(pod)
        return out

    @property
    def pod_count(self) -> int:
        return len(self._pods)


def _inputs(pod: Mapping[str, Any]) -> tuple[object, ...]:
    """What membership and the local workload depend on (not conditions, not resourceVersion)."""
    meta, spec, status = _meta(pod), _section(pod, "spec"), _section(pod, "status")
    return (
        meta.get("uid"),
        bool(meta.get("deletionTimestamp")),
        tuple(sorted(labels_of(pod).items())),
        spec.get("nodeName"),
        bool(spec.get("hostNetwork")),
        spec.get("serviceAccountName"),
        status.get("phase"),
        pod_ips(pod),
    )


def local_workload(
    pod: LocalPod,
    *,
    netns: str,
    xds: Workload | None,
    cluster_id: str = DEFAULT_CLUSTER_ID,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
) -> Workload:
    """The workload the node agent serves for an enrolled pod, with its netns path.

    The control plane's workload (``xds``, same uid) is preferred: it carries services, policies
    and the waypoint. Until it arrives - or while the control plane still says the pod is outside
    the mesh (a label change it has not pushed yet) - the pod's own facts are used; this node
    decided the pod is enrolled, so it is served as HBONE either way.
    """
    if xds is not None and xds.namespace == pod.namespace and xds.name == pod.name:
        return dataclasses.replace(
            xds,
            netns=netns,
            node=pod.node,
            tunnel_protocol=TunnelProtocol.HBONE,
            addresses=xds.addresses or pod.ips,
        )
    return Workload(
        uid=workload_uid(cluster_id, pod.namespace, pod.name),
        name=pod.name,
        namespace=pod.namespace,
        addresses=pod.ips,
        tunnel_protocol=TunnelProtocol.HBONE,
        trust_domain=trust_domain,
        service_account=pod.service_account,
        node=pod.node,
        workload_type=WorkloadType.POD,
        workload_name=pod.name,
        canonical_name=pod.labels.get("app.kubernetes.io/name") or pod.labels.get("app") or "",
        cluster_id=cluster_id,
        netns=netns,
    )

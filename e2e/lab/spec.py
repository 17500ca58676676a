"""The lab's spec file and everything derived from it without touching the system (pure).

Owns the spec format (YAML: ``nodes``, ``pods``, ``services``, ``policies``, ``waypoints``; unknown
keys rejected, every error naming the file, the object and the field), the address plan, the names
of network namespaces, and the rendering of each node's ztunnel configuration in the local-config
format (docs/local-config.md) -- which is checked with ztunnel's own parser, so a spec that renders
a config ztunnel would reject fails here, at ``up``, with the spec's name in the message.

Address plan (the lab owns these ranges, and they exist only inside its namespaces: nothing is
routable from the root netns): nodes ``10.240.0.<10+i>/24`` on the fabric bridge; node ``i``'s pod
CIDR ``10.241.<i>.0/24``, pod ``j`` of that node ``10.241.<i>.<10+j>/32``; service VIPs
``10.96.0.<10+k>``. ``i``, ``j`` and ``k`` count from 1 in spec order.

Spec format::

    trustDomain: cluster.local          # optional
    nodes: [{name: n1}, {name: n2}]
    pods:
      - {name: client, namespace: demo, serviceAccount: client, node: n1, labels: {app: client}}
      - {name: legacy, namespace: legacy, node: n1, mesh: false}   # outside the mesh
    services:
      - {name: server, namespace: demo, selector: {app: server}, ports: {80: 8080}}
    policies:                            # local-config policies; `selector` = WorkloadSelector scope
      - {name: deny-intruder, namespace: demo, scope: Namespace, action: Deny,
         rules: [[[{principals: [{exact: cluster.local/ns/demo/sa/intruder}]}]]]}
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ztunnel.sources.localfile import LocalConfigError, parse_local_config

NODE_NET = ipaddress.IPv4Network("10.240.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.241.0.0/16")
VIP_NET = ipaddress.IPv4Network("10.96.0.0/24")
POD_GATEWAY = ipaddress.IPv4Address("169.254.1.1")
"""The pods' default gateway: a link-local next hop answered by the node's veth (proxy ARP)."""

MAX_NODES = 200
MAX_PODS_PER_NODE = 200
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabSpecError(ValueError):
    """The spec is invalid; the message names the file, the object and the field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeSpec:
    name: str
    index: int
    ip: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSpec:
    name: str
    namespace: str
    service_account: str
    node: str
    labels: Mapping[str, str]
    mesh: bool
    ip: ipaddress.IPv4Address
    index: int
    """1-based index among the pods of its node (names its veth: ``p<index>``)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def uid(self) -> str:
        return f"Kubernetes//Pod/{self.namespace}/{self.name}"

    def identity(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceSpec:
    name: str
    namespace: str
    selector: Mapping[str, str]
    ports: Mapping[int, int]
    vip: ipaddress.IPv4Address

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True, slots=True, kw_only=True)
class LabSpec:
    source: str
    trust_domain: str
    nodes: tuple[NodeSpec, ...]
    pods: tuple[PodSpec, ...]
    services: tuple[ServiceSpec, ...] = ()
    policies: tuple[Mapping[str, Any], ...] = ()
    selectors: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Policy key -> label selector, for policies given with ``selector`` (WorkloadSelector)."""

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r} in {self.source}")

    def pod(self, name: str) -> PodSpec:
        """A pod by name or ``namespace/name``."""
        for p in self.pods:
            if name in (p.name, p.key):
                return p
        raise KeyError(f"no pod {name!r} in {self.source}")

    def pods_on(self, node: str) -> tuple[PodSpec, ...]:
        return tuple(p for p in self.pods if p.node == node)


@dataclass(frozen=True, slots=True, kw_only=True)
class Names:
    """Network namespace names of one lab run (``<prefix>-...``)."""

    prefix: str

    @property
    def fabric(self) -> str:
        return f"{self.prefix}-fabric"

    def node(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def pod(self, pod: PodSpec) -> str:
        return f"{self.prefix}-{pod.node}-{pod.name}"

    def all(self, spec: LabSpec) -> list[str]:
        """Every namespace in creation order (fabric, nodes, pods)."""
        return [
            self.fabric,
            *(self.node(n.name) for n in spec.nodes),
            *(self.pod(p) for p in spec.pods),
        ]


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


# --- parsing ----------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> LabSpecError:
        return LabSpecError(f"{self.source}: {where}: {message}")

    def mapping(
        self, value: Any, where: str, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise self.fail(where, f"unknown key(s) {unknown} (allowed: {sorted(allowed)})")
        missing = sorted(required - set(value))
        if missing:
            raise self.fail(where, f"missing key(s) {missing}")
        return value

    def name(self, value: Any, where: str, pattern: re.Pattern[str] = _NAME) -> str:
        if not isinstance(value, str) or not pattern.match(value):
            raise self.fail(where, f"{value!r} is not a valid name ({pattern.pattern})")
        return value

    def labels(self, value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float) for k, v in value.items()
        ):
            raise self.fail(where, f"expected a mapping of strings, got {value!r}")
        return {k: str(v) for k, v in value.items()}

    def list(self, value: Any, where: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(where, f"expected a list, got {type(value).__name__}")
        return value


def load_spec(path: str | Path) -> LabSpec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LabSpecError(f"{path}: cannot read the spec: {exc.strerror}") from None
    return parse_spec(text, source=str(path))


def parse_spec(text: str, *, source: str = "<spec>") -> LabSpec:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise LabSpecError(f"{source}: not valid YAML: {exc}") from None
    return spec_from_dict(doc, source=source)


def spec_from_dict(doc: Any, *, source: str = "<spec>") -> LabSpec:
    """Validate a spec given as plain data (tests build specs in code this way)."""
    c = _Ctx(source)
    top = c.mapping(
        doc,
        "top level",
        {"trustDomain", "nodes", "pods", "services", "policies", "waypoints", "name"},
        {"nodes", "pods"},
    )
    trust_domain = top.get("trustDomain", "cluster.local")
    if not isinstance(trust_domain, str) or not trust_domain:
        raise c.fail("trustDomain", f"{trust_domain!r} is not a trust domain")
    if c.list(top.get("waypoints"), "waypoints"):
        raise c.fail("waypoints", "waypoints are not supported by the lab yet (leave it empty)")

    nodes: list[NodeSpec] = []
    raw_nodes = c.list(top["nodes"], "nodes")
    if not raw_nodes:
        raise c.fail("nodes", "a lab needs at least one node")
    if len(raw_nodes) > MAX_NODES:
        raise c.fail("nodes", f"at most {MAX_NODES} nodes")
    for i, raw in enumerate(raw_nodes, start=1):
        where = f"nodes[{i - 1}]"
        m = c.mapping(raw, where, {"name"}, {"name"})
        name = c.name(m["name"], f"{where}.name", _NODE_NAME)
        if any(n.name == name for n in nodes):
            raise c.fail(f"{where}.name", f"duplicate node {name!r}")
        nodes.append(
            NodeSpec(
                name=name,
                index=i,
                ip=NODE_NET.network_address + 9 + i,
                pod_cidr=ipaddress.IPv4Network(f"10.241.{i}.0/24"),
            )
        )
    node_by_name = {n.name: n for n in nodes}

    pods: list[PodSpec] = []
    per_node: dict[str, int] = {}
    for j, raw in enumerate(c.list(top["pods"], "pods")):
        where = f"pods[{j}]"
        m = c.mapping(
            raw,
            where,
            {"name", "namespace", "serviceAccount", "node", "labels", "mesh"},
            {"name", "node"},
        )
        name = c.name(m["name"], f"{where}.name")
        where = f"{where} ({name})"
        namespace = c.name(m.get("namespace", "default"), f"{where}.namespace")
        sa = c.name(m.get("serviceAccount", "default"), f"{where}.serviceAccount")
        node = m["node"]
        if node not in node_by_name:
            raise c.fail(
                f"{where}.node", f"{node!r} is not a node of this lab ({sorted(node_by_name)})"
            )
        mesh = m.get("mesh", True)
        if not isinstance(mesh, bool):
            raise c.fail(f"{where}.mesh", f"{mesh!r} is not true/false")
        if any(p.name == name for p in pods):
            raise c.fail(f"{where}.name", "pod names must be unique in a lab (they name netns)")
        idx = per_node.get(node, 0) + 1
        if idx > MAX_PODS_PER_NODE:
            raise c.fail(where, f"at most {MAX_PODS_PER_NODE} pods per node")
        per_node[node] = idx
        pods.append(
            PodSpec(
                name=name,
                namespace=namespace,
                service_account=sa,
                node=node,
                labels=c.labels(m.get("labels"), f"{where}.labels"),
                mesh=mesh,
                ip=node_by_name[node].pod_cidr.network_address + 9 + idx,
                index=idx,
            )
        )

    services: list[ServiceSpec] = []
    for k, raw in enumerate(c.list(top.get("services"), "services"), start=1):
        where = f"services[{k - 1}]"
        m = c.mapping(
            raw, where, {"name", "namespace", "selector", "ports", "vip"}, {"name", "ports"}
        )
        name = c.name(m["name"], f"{where}.name")
        where = f"{where} ({name})"
        ports = m["ports"]
        if not isinstance(ports, dict) or not ports:
            raise c.fail(f"{where}.ports", "expected a mapping {servicePort: targetPort}")
        for sp, tp in ports.items():
            for what, port in (("service port", sp), ("target port", tp)):
                if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                    raise c.fail(f"{where}.ports", f"{what} {port!r} is not a port number")
        vip_raw = m.get("vip")
        try:
            vip = ipaddress.IPv4Address(vip_raw) if vip_raw else VIP_NET.network_address + 9 + k
        except ValueError:
            raise c.fail(f"{where}.vip", f"{vip_raw!r} is not an IPv4 address") from None
        services.append(
            ServiceSpec(
                name=name,
                namespace=c.name(m.get("namespace", "default"), f"{where}.namespace"),
                selector=c.labels(m.get("selector"), f"{where}.selector"),
                ports=dict(ports),
                vip=vip,
            )
        )

    policies: list[dict[str, Any]] = []
    selectors: dict[str, dict[str, str]] = {}
    for n, raw in enumerate(c.list(top.get("policies"), "policies")):
        where = f"policies[{n}]"
        if not isinstance(raw, dict):
            raise c.fail(where, "expected a mapping")
        policy = dict(raw)
        selector = policy.pop("selector", None)
        if selector is not None:
            key = f"{policy.get('namespace', '')}/{policy.get('name', '')}"
            selectors[key] = c.labels(selector, f"{where}.selector")
            policy["scope"] = "WorkloadSelector"
        policies.append(policy)

    spec = LabSpec(
        source=source,
        trust_domain=trust_domain,
        nodes=tuple(nodes),
        pods=tuple(pods),
        services=tuple(services),
        policies=tuple(policies),
        selectors=selectors,
    )
    # Let ztunnel's own parser judge the rendered config now, naming the spec on failure.
    try:
        parse_local_config(
            yaml.safe_dump(render_config(spec, nodes[0].name, Names(prefix="x"))), source=source
        )
    except LocalConfigError as exc:
        raise LabSpecError(
            f"{source}: the ztunnel config rendered from it is invalid:\n{exc}"
        ) from None
    return spec


# --- rendering --------------------------------------------------------------------------------


def _selected(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def render_config(spec: LabSpec, node: str, names: Names) -> dict[str, Any]:
    """The local-config document (docs/local-config.md) for the ztunnel of ``node``."""
    services = [
        {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [f"/{s.vip}"],
            "ports": {int(k): int(v) for k, v in s.ports.items()},
        }
        for s in spec.services
    ]
    workloads: list[dict[str, Any]] = []
    for p in spec.pods:
        w: dict[str, Any] = {
            "uid": p.uid,
            "name": p.name,
            "namespace": p.namespace,
            "serviceAccount": p.service_account,
            "trustDomain": spec.trust_domain,
            "workloadIps": [str(p.ip)],
            "protocol": "HBONE" if p.mesh else "TCP",
            "node": p.node,
            "canonicalName": p.labels.get("app", p.name),
            "canonicalRevision": p.labels.get("version", "latest"),
            "workloadName": p.name,
            "clusterId": "Kubernetes",
        }
        if p.mesh:
            w["netns"] = netns_path(names.pod(p))
        members: dict[str, dict[int, int]] = {
            f"{s.namespace}/{s.hostname}": {}
            for s in spec.services
            if s.namespace == p.namespace and _selected(s.selector, p.labels)
        }
        if members:
            w["services"] = members
        refs = [
            key
            for key, sel in spec.selectors.items()
            if key.split("/", 1)[0] == p.namespace and _selected(sel, p.labels)
        ]
        if refs:
            w["authorizationPolicies"] = refs
        workloads.append(w)
    return {
        "node": node,
        "workloads": workloads,
        "services": services,
        "policies": [dict(pol) for pol in spec.policies],
    }

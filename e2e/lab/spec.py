"""The lab's spec file and everything derived from it without touching the system (pure).

Owns the spec format (YAML: ``nodes``, ``pods``, ``services``, ``policies``, ``waypoints``,
``routes``, ``l7Policies``; unknown keys rejected, every error naming the file, the object and the
field), the address plan, the names of network namespaces, and the rendering of each node's ztunnel
configuration in the local-config format (docs/local-config.md) -- which is checked with ztunnel's
own parser (and the L7 objects with the waypoint's), so a spec that renders a config ztunnel or a
waypoint would reject fails here, at ``up``, with the spec's name in the message.

Waypoints: each ``waypoints[]`` entry is a Gateway of class ``istio-waypoint``. Its replicas are
pods ``<name>-<r>`` on its node (appended after the spec's pods, so they never move the address of
a spec pod), in the mesh but **not captured** (``istio.io/dataplane-mode: none``: the waypoint speaks
HBONE itself), rendered as a native-tunnel HBONE workload of the waypoint's Service
``<name>.<ns>.svc.cluster.local`` (ports 15008 and 15021, a VIP after the spec's services). Each
Service listed in ``services`` is bound to it (the ``istio.io/use-waypoint`` label), i.e. rendered
with ``waypoint: {destination: {namespace, hostname}, hboneMtlsPort: 15008}``, so ztunnel sends its
VIP's traffic to a waypoint pod. ``routes`` (HTTPRoute, GRPCRoute) and ``l7Policies``
(AuthorizationPolicy) are Kubernetes objects written to every node's config, which the waypoint
processes read (``httpRoutes``/``grpcRoutes``/``authorizationPolicies``).

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
    waypoints:                           # Gateway-like; serviceAccount defaults to name, replicas to 1
      - {name: waypoint, namespace: demo, serviceAccount: waypoint, node: n1, replicas: 1,
         services: [reviews]}            # use-waypoint: these services (same namespace) bind to it
    routes:                              # HTTPRoute / GRPCRoute objects (parentRefs: a bound Service)
      - {apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute,
         metadata: {name: reviews, namespace: demo},
         spec: {parentRefs: [{group: "", kind: Service, name: reviews, port: 80}],
                rules: [{backendRefs: [{name: reviews-v1, port: 80, weight: 80},
                                       {name: reviews-v2, port: 80, weight: 20}]}]}}
    l7Policies:                          # AuthorizationPolicy objects (targetRefs: Service/Gateway)
      - {apiVersion: security.istio.io/v1, kind: AuthorizationPolicy,
         metadata: {name: no-admin, namespace: demo},
         spec: {targetRefs: [{kind: Service, group: "", name: reviews}], action: DENY,
                rules: [{to: [{operation: {paths: ["/admin*"]}}]}]}}
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from waypoint.proxy.config import parse_local_config as parse_l7_config
from waypoint.proxy.routes import GRPCRoute, HTTPRoute
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
    waypoint: str | None = None
    """For a waypoint replica: the name of its waypoint (same namespace). Such a pod is in the mesh
    but not captured: the ``waypoint proxy`` in it terminates and originates HBONE itself."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def captured(self) -> bool:
        """Does this pod get in-pod capture rules and ztunnel listeners?"""
        return self.mesh and self.waypoint is None

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
    waypoint: str | None = None
    """The waypoint (same namespace) this service is bound to (``istio.io/use-waypoint``)."""

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


WAYPOINT_PORTS: Mapping[int, int] = {15008: 15008, 15021: 15021}
"""The waypoint Service's ports (Istio: ``mesh`` 15008 HBONE and ``status-port`` 15021)."""
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


@dataclass(frozen=True, slots=True, kw_only=True)
class WaypointSpec:
    """A waypoint Gateway (class ``istio-waypoint``): its replicas are pods running ``waypoint proxy``."""

    name: str
    namespace: str
    service_account: str
    node: str
    replicas: int
    services: tuple[str, ...]
    """Names of the services (in ``namespace``) bound to it."""
    vip: ipaddress.IPv4Address
    """The VIP of the waypoint's own Service."""
    pods: tuple[str, ...]
    """Names of its replica pods (``<name>-<r>``)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def identity(self, trust_domain: str) -> str:
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


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
    waypoints: tuple[WaypointSpec, ...] = ()
    routes: tuple[Mapping[str, Any], ...] = ()
    """HTTPRoute and GRPCRoute objects, as given."""
    l7_policies: tuple[Mapping[str, Any], ...] = ()
    """AuthorizationPolicy objects, as given."""

    def waypoint(self, name: str) -> WaypointSpec:
        """A waypoint by name or ``namespace/name``."""
        for w in self.waypoints:
            if name in (w.name, w.key):
                return w
        raise KeyError(f"no waypoint {name!r} in {self.source}")

    def service(self, name: str) -> ServiceSpec:
        """A service by name or ``namespace/name``."""
        for s in self.services:
            if name in (s.name, f"{s.namespace}/{s.name}"):
                return s
        raise KeyError(f"no service {name!r} in {self.source}")

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
        {
            "trustDomain",
            "nodes",
            "pods",
            "services",
            "policies",
            "waypoints",
            "routes",
            "l7Policies",
            "name",
        },
        {"nodes", "pods"},
    )
    trust_domain = top.get("trustDomain", "cluster.local")
    if not isinstance(trust_domain, str) or not trust_domain:
        raise c.fail("trustDomain", f"{trust_domain!r} is not a trust domain")

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

    waypoints = _waypoints(c, top.get("waypoints"), node_by_name, pods, services, per_node)
    bound = {(s, w.namespace): w.name for w in waypoints for s in w.services}
    services = [
        replace(s, waypoint=bound.get((s.name, s.namespace)))
        if (s.name, s.namespace) in bound
        else s
        for s in services
    ]
    routes = _l7_objects(c, top.get("routes"), "routes", ROUTE_KINDS, services)
    l7_policies = _l7_objects(c, top.get("l7Policies"), "l7Policies", POLICY_KINDS, services)

    spec = LabSpec(
        source=source,
        trust_domain=trust_domain,
        nodes=tuple(nodes),
        pods=tuple(pods),
        services=tuple(services),
        policies=tuple(policies),
        selectors=selectors,
        waypoints=tuple(waypoints),
        routes=tuple(routes),
        l7_policies=tuple(l7_policies),
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


MAX_REPLICAS = 8
ROUTE_KINDS = {"HTTPRoute": "httpRoutes", "GRPCRoute": "grpcRoutes"}
POLICY_KINDS = {"AuthorizationPolicy": "authorizationPolicies"}


def _waypoints(
    c: _Ctx,
    raw_list: Any,
    node_by_name: Mapping[str, NodeSpec],
    pods: list[PodSpec],
    services: list[ServiceSpec],
    per_node: dict[str, int],
) -> list[WaypointSpec]:
    """Validate ``waypoints``; appends each replica's PodSpec to ``pods`` (after the spec's pods)."""
    out: list[WaypointSpec] = []
    bound_to: dict[tuple[str, str], str] = {}
    for i, raw in enumerate(c.list(raw_list, "waypoints")):
        where = f"waypoints[{i}]"
        m = c.mapping(
            raw,
            where,
            {"name", "namespace", "serviceAccount", "node", "replicas", "services", "vip"},
            {"name", "node"},
        )
        name = c.name(m["name"], f"{where}.name")
        where = f"{where} ({name})"
        namespace = c.name(m.get("namespace", "default"), f"{where}.namespace")
        if any(w.key == f"{namespace}/{name}" for w in out):
            raise c.fail(f"{where}.name", f"duplicate waypoint {namespace}/{name}")
        sa = c.name(m.get("serviceAccount", name), f"{where}.serviceAccount")
        node = m["node"]
        if node not in node_by_name:
            raise c.fail(
                f"{where}.node", f"{node!r} is not a node of this lab ({sorted(node_by_name)})"
            )
        replicas = m.get("replicas", 1)
        if (
            isinstance(replicas, bool)
            or not isinstance(replicas, int)
            or not 1 <= replicas <= MAX_REPLICAS
        ):
            raise c.fail(f"{where}.replicas", f"{replicas!r} is not a count in 1..{MAX_REPLICAS}")
        bound: list[str] = []
        known = sorted(s.name for s in services if s.namespace == namespace)
        for j, svc in enumerate(c.list(m.get("services"), f"{where}.services")):
            at = f"{where}.services[{j}]"
            if not isinstance(svc, str) or svc not in known:
                raise c.fail(
                    at, f"{svc!r} is not a service in namespace {namespace!r} (services: {known})"
                )
            if (namespace, svc) in bound_to:
                raise c.fail(
                    at,
                    f"service {namespace}/{svc} is already bound to waypoint "
                    f"{bound_to[(namespace, svc)]!r} (a service uses one waypoint)",
                )
            bound_to[(namespace, svc)] = name
            bound.append(svc)
        vip_raw = m.get("vip")
        try:
            vip = (
                ipaddress.IPv4Address(vip_raw)
                if vip_raw
                else VIP_NET.network_address + 10 + len(services) + i
            )
        except ValueError:
            raise c.fail(f"{where}.vip", f"{vip_raw!r} is not an IPv4 address") from None
        replica_names: list[str] = []
        for r in range(1, replicas + 1):
            pod_name = f"{name}-{r}"
            if not _NAME.match(pod_name):
                raise c.fail(f"{where}.name", f"replica pod name {pod_name!r} is too long")
            if any(p.name == pod_name for p in pods):
                raise c.fail(
                    f"{where}.name",
                    f"its replica pod {pod_name!r} has the name of another pod of the lab",
                )
            idx = per_node.get(node, 0) + 1
            if idx > MAX_PODS_PER_NODE:
                raise c.fail(where, f"at most {MAX_PODS_PER_NODE} pods per node")
            per_node[node] = idx
            pods.append(
                PodSpec(
                    name=pod_name,
                    namespace=namespace,
                    service_account=sa,
                    node=node,
                    labels={GATEWAY_NAME_LABEL: name, "istio.io/dataplane-mode": "none"},
                    mesh=True,
                    ip=node_by_name[node].pod_cidr.network_address + 9 + idx,
                    index=idx,
                    waypoint=name,
                )
            )
            replica_names.append(pod_name)
        out.append(
            WaypointSpec(
                name=name,
                namespace=namespace,
                service_account=sa,
                node=node,
                replicas=replicas,
                services=tuple(bound),
                vip=vip,
                pods=tuple(replica_names),
            )
        )
    vips: dict[ipaddress.IPv4Address, str] = {}
    for what, vip in [*((f"service {s.name}", s.vip) for s in services),
                      *((f"waypoint {w.name}", w.vip) for w in out)]:  # fmt: skip
        if vip in vips:
            raise c.fail("services/waypoints", f"{what} and {vips[vip]} share the VIP {vip}")
        vips[vip] = what
    return out


def _l7_objects(
    c: _Ctx, raw_list: Any, key: str, kinds: Mapping[str, str], services: list[ServiceSpec]
) -> list[dict[str, Any]]:
    """Validate Kubernetes-shaped L7 objects with the waypoint's own parser, plus the lab's
    references: a route's Service parents must be bound to a waypoint (else it would never
    apply), and its Service backends must exist."""
    by_key = {f"{s.namespace}/{s.name}": s for s in services}
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for i, raw in enumerate(c.list(raw_list, key)):
        where = f"{key}[{i}]"
        if not isinstance(raw, dict):
            raise c.fail(where, f"expected a Kubernetes object (mapping), got {type(raw).__name__}")
        kind = raw.get("kind")
        if not isinstance(kind, str) or kind not in kinds:
            raise c.fail(f"{where}.kind", f"{kind!r} is not one of {sorted(kinds)}")
        meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
        ident = f"{meta.get('namespace', 'default')}/{meta.get('name', '?')}"
        where = f"{where} ({kind} {ident})"
        if (kind, ident) in seen:
            raise c.fail(f"{where}.metadata.name", f"duplicate {kind} {ident}")
        seen.add((kind, ident))
        config = parse_l7_config({kinds[kind]: [raw]}, source=c.source)
        if config.errors:
            raise c.fail(where, "; ".join(f"{e.field}: {e.message}" for e in config.errors))
        routes: list[HTTPRoute | GRPCRoute] = [*config.routes.http, *config.routes.grpc]
        for route in routes:
            for n, parent in enumerate(route.parent_refs):
                if parent.kind != "Service":
                    continue
                svc = by_key.get(f"{parent.namespace}/{parent.name}")
                at = f"{where}.spec.parentRefs[{n}]"
                if svc is None:
                    raise c.fail(at, f"no service {parent.namespace}/{parent.name} in the lab")
                if svc.waypoint is None:
                    raise c.fail(
                        at,
                        f"service {parent.namespace}/{parent.name} is not bound to a waypoint "
                        "(list it in a waypoints[].services), so this route would never apply",
                    )
            for rule in route.rules:
                for b, backend in enumerate(rule.backend_refs):
                    if (
                        backend.kind == "Service"
                        and f"{backend.namespace}/{backend.name}" not in by_key
                    ):
                        raise c.fail(
                            f"{where}.spec.rules[{rule.index}].backendRefs[{b}]",
                            f"no service {backend.namespace}/{backend.name} in the lab",
                        )
        out.append(raw)
    return out


# --- rendering --------------------------------------------------------------------------------


def _selected(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def render_config(spec: LabSpec, node: str, names: Names) -> dict[str, Any]:
    """The local-config document (docs/local-config.md) for the ztunnel of ``node``."""
    services: list[dict[str, Any]] = []
    for s in spec.services:
        svc: dict[str, Any] = {
            "name": s.name,
            "namespace": s.namespace,
            "hostname": s.hostname,
            "vips": [f"/{s.vip}"],
            "ports": {int(k): int(v) for k, v in s.ports.items()},
        }
        if s.waypoint is not None:
            wp = spec.waypoint(f"{s.namespace}/{s.waypoint}")
            svc["waypoint"] = {
                "destination": {"namespace": wp.namespace, "hostname": wp.hostname},
                "hboneMtlsPort": 15008,
            }
        services.append(svc)
    services += [
        {
            "name": w.name,
            "namespace": w.namespace,
            "hostname": w.hostname,
            "vips": [f"/{w.vip}"],
            "ports": dict(WAYPOINT_PORTS),
        }
        for w in spec.waypoints
    ]
    workloads: list[dict[str, Any]] = []
    for p in spec.pods:
        if p.waypoint is not None:
            wp = spec.waypoint(f"{p.namespace}/{p.waypoint}")
            workloads.append(
                {
                    "uid": p.uid,
                    "name": p.name,
                    "namespace": p.namespace,
                    "serviceAccount": p.service_account,
                    "trustDomain": spec.trust_domain,
                    "workloadIps": [str(p.ip)],
                    # HBONE, native: no netns, so no node agent captures it (dataplane-mode none).
                    "protocol": "HBONE",
                    "nativeTunnel": True,
                    "node": p.node,
                    "canonicalName": wp.name,
                    "canonicalRevision": "latest",
                    "workloadName": wp.name,
                    "clusterId": "Kubernetes",
                    "services": {f"{wp.namespace}/{wp.hostname}": {}},
                }
            )
            continue
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
    doc: dict[str, Any] = {
        "node": node,
        "workloads": workloads,
        "services": services,
        "policies": [dict(pol) for pol in spec.policies],
    }
    # The waypoint processes read the same file; ztunnel ignores these sections.
    for kind, section in ROUTE_KINDS.items():
        objects = [dict(r) for r in spec.routes if r.get("kind") == kind]
        if objects:
            doc[section] = objects
    if spec.l7_policies:
        doc["authorizationPolicies"] = [dict(p) for p in spec.l7_policies]
    return doc

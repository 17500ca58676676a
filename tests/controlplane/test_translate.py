"""Table tests of the pure translation: Kubernetes objects -> workload API model."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from tests.controlplane import objects as o
from waypoint.controlplane.translate import (
    ClusterState,
    PolicyError,
    TranslateConfig,
    convert_authorization_policy,
    translate,
)
from waypoint.manager.binding import Binding, BindingTable
from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    HealthStatus,
    Match,
    NamespacedHostname,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    TunnelProtocol,
    WorkloadType,
)
from ztunnel.xds.convert import authorization_from_proto, model_to_resources

UID = "Kubernetes//Pod/shop/a"
SVC = "shop/web.shop.svc.cluster.local"


def run(**state: Any) -> Any:
    return translate(ClusterState(**state), TranslateConfig())


def exact(v: str) -> StringMatch:
    return StringMatch(kind=StringMatchKind.EXACT, value=v)


# --- pods -> workloads ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ns_ambient", "pod_labels", "expected"),
    [
        (True, {}, TunnelProtocol.HBONE),
        (False, {}, TunnelProtocol.NONE),
        (True, {"istio.io/dataplane-mode": "none"}, TunnelProtocol.NONE),
        (False, {"istio.io/dataplane-mode": "ambient"}, TunnelProtocol.HBONE),
    ],
    ids=["namespace-ambient", "namespace-unlabelled", "pod-opts-out", "pod-opts-in"],
)
def test_mesh_membership(ns_ambient: bool, pod_labels: dict[str, str], expected: Any) -> None:
    out = run(
        namespaces=[o.namespace("shop", ambient=ns_ambient)], pods=[o.pod("a", labels=pod_labels)]
    )
    assert out.workloads[UID].tunnel_protocol is expected
    assert not out.workloads[UID].native_tunnel


@pytest.mark.parametrize(
    "pod",
    [
        o.pod("a", phase="Pending"),
        o.pod("a", phase="Succeeded"),
        o.pod("a", terminating=True),
        o.pod("a", ip=""),
    ],
    ids=["pending", "succeeded", "terminating", "no-ip"],
)
def test_pods_that_are_not_workloads(pod: dict[str, Any]) -> None:
    assert run(namespaces=[o.namespace("shop", ambient=True)], pods=[pod]).workloads == {}


def test_workload_fields() -> None:
    pod = o.pod(
        "web-7d4b9-x2x",
        ip="10.1.0.5",
        node="node-a",
        sa="web",
        ready=False,
        labels={"app": "web", "version": "v2", "pod-template-hash": "7d4b9"},
        owner={"kind": "ReplicaSet", "name": "web-7d4b9"},
    )
    w = run(namespaces=[o.namespace("shop", ambient=True)], pods=[pod]).workloads[
        "Kubernetes//Pod/shop/web-7d4b9-x2x"
    ]
    assert w.addresses == (ipaddress.ip_address("10.1.0.5"),)
    assert (w.service_account, w.node, w.cluster_id) == ("web", "node-a", "Kubernetes")
    assert w.status is HealthStatus.UNHEALTHY
    assert (w.workload_name, w.workload_type) == ("web", WorkloadType.DEPLOYMENT)
    assert (w.canonical_name, w.canonical_revision) == ("web", "v2")


@pytest.mark.parametrize(
    "labels",
    [
        {"gateway.istio.io/managed": "istio.io-mesh-controller", "istio.io/dataplane-mode": "none"},
        {"gateway.networking.k8s.io/gateway-name": "waypoint"},
    ],
    ids=["managed-label", "gateway-name-label"],
)
def test_waypoint_pods_are_native_tunnel(labels: dict[str, str]) -> None:
    w = run(namespaces=[o.namespace("shop")], pods=[o.pod("a", labels=labels)]).workloads[UID]
    assert w.tunnel_protocol is TunnelProtocol.HBONE
    assert w.native_tunnel


# --- services ------------------------------------------------------------------------------------


def test_service_ports_vips_and_named_target_ports_per_endpoint() -> None:
    svc = o.service(
        "web",
        selector={"app": "web"},
        ports=[
            {"name": "http", "port": 80, "targetPort": "http"},
            {"name": "admin", "port": 9000, "targetPort": 9001},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "plain", "port": 7000},
        ],
    )
    a = o.pod("a", labels={"app": "web"}, ports={"http": 8080})
    b = o.pod("b", ip="10.1.0.6", labels={"app": "web"})  # no containerPort named http
    c = o.pod("c", ip="10.1.0.7", labels={"app": "db"})
    out = run(namespaces=[o.namespace("shop", ambient=True)], pods=[a, b, c], services=[svc])
    service = out.services[SVC]
    assert dict(service.ports) == {80: 0, 9000: 9001, 7000: 7000}
    assert [str(v.address) for v in service.vips] == ["10.96.0.10"]
    assert dict(out.workloads[UID].services[SVC]) == {80: 8080, 9000: 9001, 7000: 7000}
    # A pod without the named port keeps membership but not that port (istiod).
    assert dict(out.workloads["Kubernetes//Pod/shop/b"].services[SVC]) == {9000: 9001, 7000: 7000}
    assert out.workloads["Kubernetes//Pod/shop/c"].services == {}


def test_endpoint_slices_decide_membership_when_present() -> None:
    svc = o.service(
        "web", selector={"app": "web"}, ports=[{"name": "http", "port": 80, "targetPort": "http"}]
    )
    pods = [
        o.pod("a", labels={"app": "web"}),  # in the slice by targetRef
        o.pod("b", ip="10.1.0.6", labels={"app": "web"}),  # selected, but not in any slice
        o.pod("c", ip="10.1.0.7", labels={"other": "x"}),  # in the slice by address only
    ]
    slices = [
        o.endpoint_slice(
            "web-1", "web", endpoints=[("10.1.0.5", "a"), ("10.1.0.7", None)], ports={"http": 8081}
        )
    ]
    out = run(namespaces=[o.namespace("shop")], pods=pods, services=[svc], endpoint_slices=slices)
    assert dict(out.workloads[UID].services[SVC]) == {80: 8081}
    assert out.workloads["Kubernetes//Pod/shop/b"].services == {}
    assert dict(out.workloads["Kubernetes//Pod/shop/c"].services[SVC]) == {80: 8081}


def test_headless_and_external_name_services() -> None:
    headless = o.service("db", ip=None, selector={"app": "db"})
    external = o.service("ext")
    external["spec"] = {"type": "ExternalName", "externalName": "example.com"}
    out = run(services=[headless, external])
    assert out.services["shop/db.shop.svc.cluster.local"].vips == ()
    assert "shop/ext.shop.svc.cluster.local" not in out.services


def test_bad_service_is_skipped_with_a_warning() -> None:
    bad = o.service("web", ports=[{"name": "http", "port": 70000}])
    out = run(services=[bad, o.service("ok")])
    assert "shop/ok.shop.svc.cluster.local" in out.services
    assert SVC not in out.services
    assert any("Service shop/web: spec.ports[0].port 70000" in w for w in out.warnings)


def test_waypoints_from_the_binding_table() -> None:
    table = BindingTable(
        services={
            ("shop", "web"): Binding(
                kind="service",
                namespace="shop",
                name="web",
                waypoint=("shop", "waypoint"),
                reason="WaypointAccepted",
                hostname="waypoint.shop.svc.cluster.local",
            )
        },
        workloads={
            ("shop", "a"): Binding(
                kind="workload",
                namespace="shop",
                name="a",
                waypoint=("infra", "wp"),
                reason="WaypointAccepted",
            )
        },
    )
    out = run(
        namespaces=[o.namespace("shop", ambient=True)],
        pods=[o.pod("a")],
        services=[o.service("web")],
        bindings=table,
    )
    svc_wp = out.services[SVC].waypoint
    assert svc_wp is not None
    assert svc_wp.destination == NamespacedHostname(
        namespace="shop", hostname="waypoint.shop.svc.cluster.local"
    )
    assert svc_wp.hbone_mtls_port == 15008
    wl_wp = out.workloads[UID].waypoint
    assert wl_wp is not None
    # No hostname published: the waypoint's own Service name is used.
    assert wl_wp.destination == NamespacedHostname(
        namespace="infra", hostname="wp.infra.svc.cluster.local"
    )


def test_selector_policies_attach_to_matching_workloads() -> None:
    policies = [
        o.authz("web-only", selector={"matchLabels": {"app": "web"}}, rules=[{}]),
        o.authz("db-only", selector={"matchLabels": {"app": "db"}}, rules=[{}]),
        o.authz("mesh-web", "istio-system", selector={"matchLabels": {"app": "web"}}, rules=[{}]),
        o.authz("other-ns", "other", selector={"matchLabels": {"app": "web"}}, rules=[{}]),
        o.authz("ns-wide", rules=[{}]),
    ]
    out = run(pods=[o.pod("a", labels={"app": "web"})], authorization_policies=policies)
    assert out.workloads[UID].authorization_policies == ("istio-system/mesh-web", "shop/web-only")
    assert out.authorizations["shop/ns-wide"].scope is Scope.NAMESPACE


def test_whole_translation_encodes_to_protobuf() -> None:
    out = run(
        namespaces=[o.namespace("shop", ambient=True)],
        pods=[o.pod("a", labels={"app": "web"})],
        services=[o.service("web", selector={"app": "web"})],
        authorization_policies=[
            o.authz("p", rules=[{"from": [{"source": {"principals": ["*"]}}]}])
        ],
        peer_authentications=[o.peer_auth("strict", "istio-system", mtls={"mode": "STRICT"})],
    )
    resources = model_to_resources(
        out.workloads.values(), out.services.values(), out.authorizations.values()
    )
    # workload + service, the AuthorizationPolicy + istiod's static STRICT policy
    assert sum(len(v) for v in resources.values()) == 4
    assert out.workloads[UID].authorization_policies == (
        "istio-system/istio_converted_static_strict",
    )
    for key, msg in resources["type.googleapis.com/istio.security.Authorization"].items():
        assert authorization_from_proto(msg) == out.authorizations[key]  # type: ignore[arg-type]


# --- AuthorizationPolicy conversion (ztunnel.md §6.2) ----------------------------------------------


def convert(spec: dict[str, Any], ns: str = "shop") -> tuple[Authorization | None, list[str]]:
    return convert_authorization_policy(o.authz("p", ns, **spec), "istio-system")


FROM_ALL = {
    "from": [
        {
            "source": {
                "principals": ["cluster.local/ns/a/sa/b", "*"],
                "notPrincipals": ["*/sa/evil"],
                "namespaces": ["team-*"],
                "notNamespaces": ["kube-system"],
                "ipBlocks": ["10.0.0.0/8", "192.168.1.7"],
                "notIpBlocks": ["10.9.0.0/16"],
                "serviceAccounts": ["bob", "other/alice"],
            }
        },
        {"source": {"namespaces": ["prod"]}},
    ]
}


@pytest.mark.parametrize(
    ("spec", "rules"),
    [
        pytest.param(
            FROM_ALL,
            (
                Rule(
                    clauses=(
                        Clause(
                            matches=(
                                Match(
                                    principals=(
                                        exact("cluster.local/ns/a/sa/b"),
                                        StringMatch(kind=StringMatchKind.PRESENCE),
                                    ),
                                    not_principals=(
                                        StringMatch(kind=StringMatchKind.SUFFIX, value="/sa/evil"),
                                    ),
                                    namespaces=(
                                        StringMatch(kind=StringMatchKind.PREFIX, value="team-"),
                                    ),
                                    not_namespaces=(exact("kube-system"),),
                                    source_ips=(
                                        ipaddress.ip_network("10.0.0.0/8"),
                                        ipaddress.ip_network("192.168.1.7/32"),
                                    ),
                                    not_source_ips=(ipaddress.ip_network("10.9.0.0/16"),),
                                    service_accounts=(
                                        ServiceAccountMatch(
                                            namespace="shop", service_account="bob"
                                        ),
                                        ServiceAccountMatch(
                                            namespace="other", service_account="alice"
                                        ),
                                    ),
                                ),
                                Match(namespaces=(exact("prod"),)),
                            )
                        ),
                    )
                ),
            ),
            id="from-all-fields",
        ),
        pytest.param(
            {
                "rules": [
                    {
                        "to": [{"operation": {"ports": ["80", "x"], "notPorts": ["81"]}}],
                        "from": [{"source": {"namespaces": ["a"]}}],
                        "when": [
                            {"key": "source.ip", "values": ["10.0.0.1"]},
                            {"key": "destination.port", "notValues": ["22"]},
                        ],
                    }
                ]
            },
            (
                Rule(
                    clauses=(
                        Clause(
                            matches=(Match(destination_ports=(80,), not_destination_ports=(81,)),)
                        ),
                        Clause(matches=(Match(namespaces=(exact("a"),)),)),
                        Clause(matches=(Match(source_ips=(ipaddress.ip_network("10.0.0.1/32"),)),)),
                        Clause(matches=(Match(not_destination_ports=(22,)),)),
                    )
                ),
            ),
            id="to-from-when-clauses",
        ),
        pytest.param({"rules": [{}]}, (Rule(),), id="empty-rule-matches-all"),
        pytest.param({}, (), id="no-rules-never-matches"),
    ],
)
def test_allow_conversion(spec: dict[str, Any], rules: tuple[Rule, ...]) -> None:
    if "from" in spec:
        spec = {"rules": [spec]}
    pol, _ = convert(spec)
    assert pol is not None
    assert pol.action is Action.ALLOW
    assert pol.rules == rules


@pytest.mark.parametrize(
    ("action", "rule", "expected_rules", "dropped"),
    [
        pytest.param(
            "ALLOW",
            {"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
            (),
            True,
            id="allow-l7-rule-dropped",
        ),
        pytest.param(
            "ALLOW",
            {"from": [{"source": {"requestPrincipals": ["*"]}}]},
            (),
            True,
            id="allow-request-principals-dropped",
        ),
        pytest.param(
            "ALLOW",
            {"when": [{"key": "request.headers[x]", "values": ["1"]}]},
            (),
            True,
            id="allow-l7-when-dropped",
        ),
        pytest.param(
            "DENY",
            {"to": [{"operation": {"paths": ["/admin"], "ports": ["8080"]}}]},
            (Rule(clauses=(Clause(matches=(Match(destination_ports=(8080,)),)),)),),
            False,
            id="deny-l7-stripped-keeps-ports",
        ),
        pytest.param(
            "DENY",
            {"to": [{"operation": {"methods": ["DELETE"]}}]},
            (Rule(clauses=(Clause(matches=(Match(),)),)),),
            False,
            id="deny-only-l7-has-no-effect",
        ),
        pytest.param(
            "DENY",
            {"from": [{"source": {"remoteIpBlocks": ["1.2.3.4"], "namespaces": ["x"]}}]},
            (Rule(clauses=(Clause(matches=(Match(namespaces=(exact("x"),)),)),)),),
            False,
            id="deny-remote-ip-stripped",
        ),
    ],
)
def test_l7_attributes(
    action: str, rule: dict[str, Any], expected_rules: tuple[Rule, ...], dropped: bool
) -> None:
    pol, warnings = convert({"action": action, "rules": [rule]})
    assert pol is not None
    assert pol.rules == expected_rules
    assert pol.l7_rules_dropped is dropped
    assert len(warnings) == 1
    assert "ztunnel does not support HTTP attributes" in warnings[0]


def test_allow_keeps_l4_rules_next_to_dropped_l7_ones() -> None:
    pol, _ = convert(
        {
            "rules": [
                {"to": [{"operation": {"methods": ["GET"]}}]},
                {"from": [{"source": {"namespaces": ["a"]}}]},
            ]
        }
    )
    assert pol is not None
    assert pol.rules == (Rule(clauses=(Clause(matches=(Match(namespaces=(exact("a"),)),)),)),)


@pytest.mark.parametrize(
    ("spec", "ns", "scope"),
    [
        ({"selector": {"matchLabels": {"app": "x"}}}, "shop", Scope.WORKLOAD_SELECTOR),
        ({}, "shop", Scope.NAMESPACE),
        ({}, "istio-system", Scope.GLOBAL),
        ({"selector": {"matchLabels": {"app": "x"}}}, "istio-system", Scope.WORKLOAD_SELECTOR),
    ],
    ids=["selector", "namespace", "root-namespace-global", "root-namespace-selector"],
)
def test_scopes(spec: dict[str, Any], ns: str, scope: Scope) -> None:
    pol, _ = convert(spec, ns)
    assert pol is not None
    assert pol.scope is scope


@pytest.mark.parametrize(
    ("spec", "warning"),
    [
        ({"targetRef": {"kind": "Gateway", "name": "waypoint"}}, None),
        ({"targetRefs": [{"kind": "Service", "name": "web"}]}, None),
        ({"action": "CUSTOM", "provider": {"name": "ext"}}, "CUSTOM"),
        ({"action": "AUDIT"}, "AUDIT"),
    ],
    ids=["targetRef", "targetRefs", "custom", "audit"],
)
def test_policies_not_sent_to_ztunnel(spec: dict[str, Any], warning: str | None) -> None:
    pol, warnings = convert(spec)
    assert pol is None
    if warning is None:
        assert warnings == []
    else:
        assert warning in warnings[0]


@pytest.mark.parametrize(
    ("spec", "where"),
    [
        ({"action": "MAYBE"}, "spec.action"),
        ({"rules": {"from": []}}, "spec.rules must be a list"),
        (
            {"rules": [{"from": [{"source": {"principals": "x"}}]}]},
            "spec.rules[0].from[0].source.principals",
        ),
        ({"rules": [{"when": [{"values": ["x"]}]}]}, "spec.rules[0].when[0].key"),
    ],
    ids=["bad-action", "rules-not-list", "principals-not-list", "when-without-key"],
)
def test_malformed_policies_name_the_field(spec: dict[str, Any], where: str) -> None:
    with pytest.raises(PolicyError, match="AuthorizationPolicy shop/p") as err:
        convert(spec)
    assert where in str(err.value)


def test_malformed_policy_is_skipped_in_translation() -> None:
    out = run(authorization_policies=[o.authz("bad", action="MAYBE"), o.authz("good")])
    assert list(out.authorizations) == ["shop/good"]
    assert any("shop/bad" in w and "not sent" in w for w in out.warnings)


def test_invalid_ports_and_ips_are_ignored_with_a_warning() -> None:
    pol, warnings = convert(
        {
            "rules": [
                {
                    "to": [{"operation": {"ports": ["http"]}}],
                    "from": [{"source": {"ipBlocks": ["nope"]}}],
                }
            ]
        }
    )
    assert pol is not None
    assert pol.rules[0].clauses[0].matches[0] == Match()
    assert any("'http' is not a port" in w for w in warnings)
    assert any("'nope' is not an IP" in w for w in warnings)

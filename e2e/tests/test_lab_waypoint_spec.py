"""The lab spec's waypoint parts (pure): validation naming the field, and rendering of the waypoint
workload, its Service, the bound services and the L7 objects into the shared config file."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from e2e.lab.cluster import DEFAULT_SPEC
from e2e.lab.spec import LabSpecError, Names, load_spec, render_config, spec_from_dict
from waypoint.proxy.app import split_document
from waypoint.proxy.config import parse_local_config as parse_l7
from ztunnel.sources.localfile import parse_local_config

BASE: dict[str, Any] = {
    "nodes": [{"name": "n1"}, {"name": "n2"}],
    "pods": [
        {"name": "c", "namespace": "d", "node": "n1"},
        {"name": "s1", "namespace": "d", "node": "n2", "labels": {"app": "s", "version": "v1"}},
    ],
    "services": [
        {"name": "s", "namespace": "d", "selector": {"app": "s"}, "ports": {80: 8080}},
        {"name": "s-v1", "namespace": "d", "selector": {"version": "v1"}, "ports": {80: 8080}},
    ],
    "waypoints": [{"name": "wp", "namespace": "d", "node": "n1", "services": ["s"]}],
}


def route(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", "namespace": "d"}, "spec": spec}  # fmt: skip


PARENT = [{"group": "", "kind": "Service", "name": "s", "port": 80}]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"waypoints": [{"name": "wp", "namespace": "d", "node": "n9"}]},
         "waypoints[0] (wp).node: 'n9' is not a node"),
        ({"waypoints": [{"name": "wp", "namespace": "d", "node": "n1", "services": ["nope"]}]},
         "waypoints[0] (wp).services[0]: 'nope' is not a service in namespace 'd'"),
        ({"waypoints": [{"name": "a", "namespace": "d", "node": "n1", "services": ["s"]},
                        {"name": "b", "namespace": "d", "node": "n1", "services": ["s"]}]},
         "waypoints[1] (b).services[0]: service d/s is already bound to waypoint 'a'"),
        ({"waypoints": [{"name": "wp", "node": "n1", "replicas": 0}]},
         "waypoints[0] (wp).replicas: 0 is not a count"),
        ({"pods": [*BASE["pods"], {"name": "wp-1", "node": "n2"}]},
         "waypoints[0] (wp).name: its replica pod 'wp-1' has the name of another pod"),
        ({"waypoints": [{"name": "wp", "node": "n1", "color": "red"}]},
         "waypoints[0]: unknown key(s) ['color']"),
        ({"waypoints": [{"name": "wp", "namespace": "d", "node": "n1", "vip": "10.96.0.10"}]},
         "share the VIP 10.96.0.10"),
        ({"routes": [{"kind": "TCPRoute"}]}, "routes[0].kind: 'TCPRoute' is not one of"),
        ({"routes": [route(parentRefs=PARENT, rules=[{"matches": [{"path": {"value": "x"}}]}])]},
         "routes[0] (HTTPRoute d/r): spec.rules[0].matches[0].path.value"),
        ({"routes": [route(parentRefs=[{"group": "", "kind": "Service", "name": "s-v1"}])]},
         "routes[0] (HTTPRoute d/r).spec.parentRefs[0]: service d/s-v1 is not bound to a waypoint"),
        ({"routes": [route(parentRefs=PARENT, rules=[{"backendRefs": [{"name": "gone", "port": 80}]}])]},
         "routes[0] (HTTPRoute d/r).spec.rules[0].backendRefs[0]: no service d/gone"),
        ({"routes": [route(parentRefs=PARENT), route(parentRefs=PARENT)]},
         "routes[1] (HTTPRoute d/r).metadata.name: duplicate HTTPRoute d/r"),
        ({"l7Policies": [{"kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": "d"},
                          "spec": {"action": "MAYBE"}}]},
         "l7Policies[0] (AuthorizationPolicy d/p): spec.action"),
    ],
    ids=["unknown-node", "unknown-service", "bound-twice", "zero-replicas", "pod-name-clash",
         "unknown-key", "vip-clash", "route-kind", "route-invalid", "parent-not-bound",
         "backend-unknown", "route-duplicate", "policy-invalid"],
)  # fmt: skip
def test_bad_waypoint_specs_name_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(LabSpecError) as err:
        spec_from_dict(BASE | change, source="lab.yaml")
    assert str(err.value).startswith("lab.yaml: ")
    assert message in str(err.value)


def test_waypoint_rendering() -> None:
    spec = spec_from_dict(
        BASE | {"routes": [route(parentRefs=PARENT, rules=[{"backendRefs": [{"name": "s-v1", "port": 80}]}])]},
    )  # fmt: skip
    (wp,) = spec.waypoints
    assert wp.pods == ("wp-1",)
    assert wp.service_account == "wp"
    pod = spec.pod("wp-1")
    assert pod.node == "n1"
    assert pod.mesh
    assert not pod.captured
    assert str(pod.ip) == "10.241.1.11"  # after the spec's own pods of n1
    assert str(wp.vip) == "10.96.0.12"  # after the spec's services
    cfg = render_config(spec, "n2", Names(prefix="zt00"))
    workloads = {w["name"]: w for w in cfg["workloads"]}
    w = workloads["wp-1"]
    assert w["protocol"] == "HBONE"
    assert w["nativeTunnel"] is True
    assert "netns" not in w  # no node agent captures it
    assert w["services"] == {"d/wp.d.svc.cluster.local": {}}
    services = {s["name"]: s for s in cfg["services"]}
    assert services["s"]["waypoint"] == {
        "destination": {"namespace": "d", "hostname": "wp.d.svc.cluster.local"},
        "hboneMtlsPort": 15008,
    }
    assert "waypoint" not in services["s-v1"]
    assert services["wp"]["ports"] == {15008: 15008, 15021: 15021}
    assert cfg["httpRoutes"][0]["metadata"]["name"] == "r"
    text = yaml.safe_dump(cfg)
    # Both readers of the shared file accept it: ztunnel (ignores L7) and the waypoint.
    local = parse_local_config(text, source="cfg")
    assert {str(s.key) for s in local.services} >= {"d/wp.d.svc.cluster.local"}
    split = split_document(text, "cfg")
    l7 = parse_l7(split.l7_objects, source="cfg")
    assert not l7.errors
    assert len(l7.routes.http) == 1


def test_default_spec_has_the_l7_demo() -> None:
    spec = load_spec(DEFAULT_SPEC)
    assert str(spec.pod("client").ip) == "10.241.1.10"  # waypoint pods never move spec pods
    assert spec.waypoint("demo/waypoint").services == ("reviews", "ratings", "flaky")
    assert {r["kind"] for r in spec.routes} == {"HTTPRoute", "GRPCRoute"}
    assert [p["metadata"]["name"] for p in spec.l7_policies] == ["reviews-no-admin"]
    assert spec.service("reviews").waypoint == "waypoint"
    assert spec.service("server").waypoint is None

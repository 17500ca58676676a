"""The local config document: routes and policies from YAML, errors reported, the rest kept."""

from __future__ import annotations

import ipaddress
import random

import pytest

from tests.waypoint.proxy.helpers import dest, req
from waypoint.proxy.authz import AuthzContext, WaypointScope, evaluate
from waypoint.proxy.config import ConfigDocumentError, parse_local_config
from waypoint.proxy.routing import Forward, decide

DOC = """
workloads: []          # the ztunnel's keys are ignored here
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: split, namespace: gateway-conformance-mesh, creationTimestamp: 2024-01-01T00:00:00Z}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /v2}}]
      backendRefs: [{name: echo-v2, port: 8080}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: broken, namespace: gateway-conformance-mesh}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules:
    - matches: [{path: {type: Exact, value: no-slash}}]
grpcRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: GRPCRoute
  metadata: {name: grpc, namespace: gateway-conformance-mesh}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules:
    - backendRefs: [{name: echo-v1, port: 7070}]
authorizationPolicies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: deny-admin, namespace: gateway-conformance-mesh}
  spec:
    targetRefs: [{kind: Service, group: "", name: echo}]
    action: DENY
    rules:
    - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
"""


def test_parse_local_config():
    cfg = parse_local_config(DOC, source="lab.yaml")
    assert [r.name for r in cfg.routes.http] == ["split"]
    assert [r.name for r in cfg.routes.grpc] == ["grpc"]
    assert [str(e) for e in cfg.errors] == [
        "HTTPRoute gateway-conformance-mesh/broken: spec.rules[0].matches[0].path.value: "
        "'no-slash' must be an absolute path starting with '/'"
    ]
    d = decide(req("/v2/x"), cfg.routes, random.Random(1))
    assert isinstance(d, Forward)
    assert d.backend.name == "echo-v2"
    assert cfg.routes.http[0].created is not None
    scope = WaypointScope(namespace="gateway-conformance-mesh", name="waypoint")
    ctx = AuthzContext(request=req("/admin/x"), source_ip=ipaddress.ip_address("10.1.1.1"))
    assert not evaluate(cfg.policies, ctx, scope).allowed
    ctx = AuthzContext(request=req("/public", destination=dest()))
    assert evaluate(cfg.policies, ctx, scope).allowed


def test_empty_document():
    cfg = parse_local_config("")
    assert (cfg.routes.http, cfg.policies, cfg.errors) == ((), (), ())


@pytest.mark.parametrize("text", ["[1, 2]", "a: [", "just text"])
def test_unusable_document(text):
    with pytest.raises(ConfigDocumentError, match=r"lab\.yaml"):
        parse_local_config(text, source="lab.yaml")


def test_section_of_wrong_type():
    cfg = parse_local_config({"httpRoutes": {"not": "a list"}}, source="lab.yaml")
    assert (
        str(cfg.errors[0]) == "ConfigFile lab.yaml: httpRoutes: must be a list of objects, got dict"
    )

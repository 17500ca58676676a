"""L7 authorization: scope (which policies a waypoint enforces), DENY/ALLOW mixes, matching rules."""

from __future__ import annotations

import ipaddress

import pytest

from tests.waypoint.proxy.helpers import dest, req
from waypoint.proxy.authz import (
    AuthzContext,
    WaypointScope,
    evaluate,
    parse_authorization_policies,
)

NS = "app"
SCOPE = WaypointScope(namespace=NS, name="waypoint")
SLEEP = "spiffe://cluster.local/ns/app/sa/sleep"
OTHER = "spiffe://cluster.local/ns/other/sa/client"


def policy(name, spec, namespace=NS):
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def svc_target(name="echo"):
    return {"targetRefs": [{"group": "", "kind": "Service", "name": name}]}


def gw_target():
    return {
        "targetRefs": [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}
        ]
    }


def ctx(
    target="/",
    *,
    principal=SLEEP,
    method="GET",
    headers=None,
    source_ip="10.0.0.5",
    service="echo",
    host="echo",
    **kw,
):
    request = req(
        target,
        method=method,
        headers=headers,
        host=host,
        destination=dest(service, 80, namespace=NS),
    )
    return AuthzContext(
        request=request,
        source_principal=principal,
        source_ip=ipaddress.ip_address(source_ip) if source_ip else None,
        **kw,
    )


def decide(policies, context, scope=SCOPE):
    parsed, errors = parse_authorization_policies(policies)
    return evaluate(parsed, context, scope), errors


def test_no_policies_allows():
    d, _ = decide([], ctx())
    assert d.allowed


@pytest.mark.parametrize(
    ("policies", "context", "allowed", "deciding"),
    [
        pytest.param(
            [
                policy(
                    "deny-admin",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
                    },
                )
            ],
            ctx("/admin/x"),
            False,
            "app/deny-admin",
            id="deny by path prefix",
        ),
        pytest.param(
            [
                policy(
                    "deny-admin",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
                    },
                )
            ],
            ctx("/public"),
            True,
            None,
            id="deny not matching allows",
        ),
        pytest.param(
            [
                policy(
                    "allow-sleep",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "from": [
                                    {"source": {"principals": ["cluster.local/ns/app/sa/sleep"]}}
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(principal=OTHER),
            False,
            None,
            id="allow exists but does not match",
        ),
        pytest.param(
            [
                policy(
                    "allow-sleep",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "from": [
                                    {"source": {"principals": ["cluster.local/ns/app/sa/sleep"]}}
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(),
            True,
            "app/allow-sleep",
            id="allow matches exact principal",
        ),
        pytest.param(
            [
                policy("allow-all", {**svc_target(), "rules": [{}]}),
                policy(
                    "deny-post",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}],
                    },
                ),
            ],
            ctx(method="post"),
            False,
            "app/deny-post",
            id="deny wins over allow, lower-case method normalised",
        ),
        pytest.param(
            [policy("allow-nothing", {**svc_target()})],
            ctx(),
            False,
            None,
            id="allow with no rules denies everything",
        ),
        pytest.param(
            [policy("deny-nothing", {**svc_target(), "action": "DENY"})],
            ctx(),
            True,
            None,
            id="deny with no rules never matches",
        ),
        pytest.param(
            [policy("other-svc", {**svc_target("other"), "rules": []})],
            ctx(),
            True,
            None,
            id="policy for another service does not apply",
        ),
        pytest.param(
            [
                policy(
                    "gw",
                    {
                        **gw_target(),
                        "action": "DENY",
                        "rules": [{"from": [{"source": {"notNamespaces": ["app"]}}]}],
                    },
                )
            ],
            ctx(principal=OTHER),
            False,
            "app/gw",
            id="waypoint-targeted policy applies to every service",
        ),
        pytest.param(
            [
                policy(
                    "gw",
                    {
                        **gw_target(),
                        "action": "DENY",
                        "rules": [{"from": [{"source": {"notNamespaces": ["app"]}}]}],
                    },
                    namespace="elsewhere",
                )
            ],
            ctx(principal=OTHER),
            True,
            None,
            id="gateway targetRef must be in the gateway namespace",
        ),
        pytest.param(
            [
                policy(
                    "mesh-default-deny",
                    {
                        "targetRefs": [
                            {
                                "group": "gateway.networking.k8s.io",
                                "kind": "GatewayClass",
                                "name": "istio-waypoint",
                            }
                        ]
                    },
                    namespace="istio-system",
                )
            ],
            ctx(),
            False,
            None,
            id="GatewayClass policy in the root namespace",
        ),
        pytest.param(
            [policy("ns-wide", {"action": "DENY", "rules": [{}]})],
            ctx(),
            True,
            None,
            id="namespace-wide policies are ztunnel's by default",
        ),
        pytest.param(
            [
                policy(
                    "sel",
                    {"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY", "rules": [{}]},
                )
            ],
            ctx(),
            True,
            None,
            id="selector policies are never enforced here",
        ),
        pytest.param(
            [
                policy(
                    "deny-plaintext",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}],
                    },
                )
            ],
            ctx(principal=None),
            False,
            "app/deny-plaintext",
            id="notPrincipals * denies no identity",
        ),
        pytest.param(
            [
                policy(
                    "deny-plaintext",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"from": [{"source": {"notPrincipals": ["*"]}}]}],
                    },
                )
            ],
            ctx(),
            True,
            None,
            id="notPrincipals * allows an identity",
        ),
        pytest.param(
            [
                policy(
                    "allow-ns",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "from": [{"source": {"namespaces": ["ot*"]}}],
                                "to": [{"operation": {"ports": ["80"], "hosts": ["ECHO"]}}],
                            }
                        ],
                    },
                )
            ],
            ctx(principal=OTHER, host="Echo:80"),
            True,
            "app/allow-ns",
            id="namespace prefix, port, case-insensitive host without port",
        ),
        pytest.param(
            [
                policy(
                    "allow-ip",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "from": [
                                    {
                                        "source": {
                                            "ipBlocks": ["10.0.0.0/24"],
                                            "notIpBlocks": ["10.0.0.5"],
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(),
            False,
            None,
            id="notIpBlocks excludes an address inside ipBlocks",
        ),
        pytest.param(
            [
                policy(
                    "allow-remote",
                    {
                        **svc_target(),
                        "rules": [{"from": [{"source": {"remoteIpBlocks": ["192.168.0.0/16"]}}]}],
                    },
                )
            ],
            ctx(remote_ip=ipaddress.ip_address("192.168.1.1")),
            True,
            "app/allow-remote",
            id="remoteIpBlocks uses the original client",
        ),
        pytest.param(
            [
                policy(
                    "when",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "when": [
                                    {"key": "request.headers[x-env]", "values": ["prod"]},
                                    {"key": "source.ip", "values": ["10.0.0.0/8"]},
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(headers={"X-Env": "prod"}),
            True,
            "app/when",
            id="when conditions are ANDed",
        ),
        pytest.param(
            [
                policy(
                    "when",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "when": [
                                    {"key": "request.headers[x-env]", "values": ["prod"]},
                                    {"key": "source.ip", "values": ["192.0.2.0/24"]},
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(headers={"X-Env": "prod"}),
            False,
            None,
            id="one failing when condition fails the rule",
        ),
        pytest.param(
            [
                policy(
                    "deny-evil",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [
                            {"when": [{"key": "request.headers[x-role]", "values": ["evil"]}]}
                        ],
                    },
                )
            ],
            ctx(headers=[("x-role", "good"), ("x-role", "evil")]),
            False,
            "app/deny-evil",
            id="duplicate header: any value triggers a DENY",
        ),
        pytest.param(
            [
                policy(
                    "allow-admin",
                    {
                        **svc_target(),
                        "rules": [
                            {"when": [{"key": "request.headers[x-role]", "values": ["admin"]}]}
                        ],
                    },
                )
            ],
            ctx(headers=[("x-role", "admin"), ("x-role", "guest")]),
            False,
            None,
            id="duplicate header: ALLOW needs every value",
        ),
        pytest.param(
            [
                policy(
                    "deny-not-json",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [
                            {
                                "when": [
                                    {
                                        "key": "request.headers[content-type]",
                                        "notValues": ["application/json"],
                                    }
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(),
            False,
            "app/deny-not-json",
            id="notValues on a missing header holds",
        ),
        pytest.param(
            [
                policy(
                    "principal-suffix",
                    {
                        **svc_target(),
                        "rules": [{"from": [{"source": {"principals": ["*/sa/sleep"]}}]}],
                    },
                )
            ],
            ctx(principal="spiffe://evil.domain/ns/x/sa/sleep"),
            True,
            "app/principal-suffix",
            id="suffix pattern is a plain suffix",
        ),
        pytest.param(
            [
                policy(
                    "dots",
                    {
                        **svc_target(),
                        "rules": [
                            {
                                "from": [
                                    {"source": {"principals": ["cluster.local/ns/app/sa/sleep"]}}
                                ]
                            }
                        ],
                    },
                )
            ],
            ctx(principal="spiffe://clusterXlocal/ns/app/sa/sleep"),
            False,
            None,
            id="dots are not regex wildcards (CVE-2026-39350)",
        ),
        pytest.param(
            [
                policy(
                    "deny-bad",
                    {
                        **svc_target(),
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"pathz": ["/x"]}}]}],
                    },
                )
            ],
            ctx("/anything"),
            False,
            "app/deny-bad",
            id="invalid policy fails closed for its scope",
        ),
        pytest.param(
            [
                policy(
                    "custom",
                    {
                        **svc_target(),
                        "action": "CUSTOM",
                        "provider": {"name": "ext"},
                        "rules": [{}],
                    },
                )
            ],
            ctx(),
            False,
            "app/custom",
            id="CUSTOM is rejected and fails closed",
        ),
        pytest.param(
            [policy("audit", {**svc_target(), "action": "AUDIT", "rules": [{}]})],
            ctx(),
            True,
            None,
            id="AUDIT is rejected and ignored",
        ),
    ],
)
def test_decisions(policies, context, allowed, deciding):
    d, _ = decide(policies, context)
    assert d.allowed is allowed, d
    assert d.policy == deciding


def test_namespace_policies_with_layered_enforcement():
    scope = WaypointScope(namespace=NS, name="waypoint", enforce_namespace_policies=True)
    d, _ = decide([policy("ns-wide", {"action": "DENY", "rules": [{}]})], ctx(), scope)
    assert not d.allowed
    d, _ = decide(
        [policy("root", {"action": "DENY", "rules": [{}]}, namespace="istio-system")], ctx(), scope
    )
    assert not d.allowed
    d, _ = decide(
        [policy("foreign", {"action": "DENY", "rules": [{}]}, namespace="other")], ctx(), scope
    )
    assert d.allowed


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"action": "AUDIT"}, "spec.action", "AUDIT"),
        ({"action": "CUSTOM"}, "spec.action", "CUSTOM"),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a*b*"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "'*'",
        ),
        (
            {"rules": [{"to": [{"operation": {"paths": ["/a/{*}/b"]}}]}]},
            "spec.rules[0].to[0].operation.paths[0]",
            "templates",
        ),
        (
            {"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]},
            "spec.rules[0].to[0].operation.ports[0]",
            "port",
        ),
        (
            {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300/8"]}}]}]},
            "spec.rules[0].from[0].source.ipBlocks[0]",
            "CIDR",
        ),
        (
            {"rules": [{"when": [{"key": "request.magic", "values": ["x"]}]}]},
            "spec.rules[0].when[0].key",
            "unsupported",
        ),
        ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0].values", "values"),
        (
            {"selector": {"matchLabels": {}}, "targetRefs": [{"kind": "Service", "name": "x"}]},
            "spec.targetRefs",
            "mutually exclusive",
        ),
        ({"targetRefs": [{"kind": "Pod", "name": "x"}]}, "spec.targetRefs[0].kind", "Pod"),
        (
            {"targetRefs": [{"kind": "Gateway", "name": "waypoint"}]},
            "spec.targetRefs[0].group",
            "gateway.networking.k8s.io",
        ),
        (
            {"targetRefs": [{"kind": "Service", "name": "x", "namespace": "other"}]},
            "spec.targetRefs[0].namespace",
            "own namespace",
        ),
    ],
)
def test_policy_errors_name_the_field(spec, field, message):
    _, errors = parse_authorization_policies([policy("bad", spec)])
    assert errors
    assert any(e.field == field and message in e.message for e in errors), [str(e) for e in errors]
    assert str(errors[0]).startswith("AuthorizationPolicy app/bad: ")


def test_duplicate_policy_reported():
    p = policy("dup", {**svc_target(), "rules": [{}]})
    parsed, errors = parse_authorization_policies([p, p])
    assert len(parsed) == 1
    assert "duplicate" in errors[0].message

"""Routing decisions: Gateway API mesh conformance cases, precedence, filters, weights, gRPC."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.waypoint.proxy.helpers import NS, backend, dest, http_route, req, rng
from waypoint.proxy.config import build_routes
from waypoint.proxy.routing import (
    DirectResponse,
    Forward,
    Redirect,
    choose_weighted,
    decide,
)


def table(*objs, grpc=()):
    t, errors, _ = build_routes(objs, grpc)
    assert not errors, [str(e) for e in errors]
    return t


def forward(decision) -> Forward:
    assert isinstance(decision, Forward), decision
    return decision


# --- MeshHTTPRouteMatching -------------------------------------------------------------------

MATCHING = table(
    http_route(
        "mesh-matching",
        [
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/"}},
                    {"headers": [{"name": "version", "value": "one"}]},
                ],
                "backendRefs": [backend("echo-v1")],
            },
            {
                "matches": [
                    {"path": {"type": "PathPrefix", "value": "/v2"}},
                    {"headers": [{"name": "version", "value": "two"}]},
                ],
                "backendRefs": [backend("echo-v2")],
            },
        ],
    )
)


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/", {}, "echo-v1"),
        ("/example", {}, "echo-v1"),
        ("/", {"Version": "one"}, "echo-v1"),
        ("/v2", {}, "echo-v2"),
        ("/v2/example", {}, "echo-v2"),
        ("/", {"Version": "two"}, "echo-v2"),
        ("/v2/", {}, "echo-v2"),
        ("/v2example", {}, "echo-v1"),
        ("/foo/v2/example", {}, "echo-v1"),
    ],
    ids=lambda v: repr(v),
)
def test_mesh_matching(path, headers, expected):
    assert forward(decide(req(path, headers=headers), MATCHING, rng())).backend.name == expected


# --- MeshHTTPRouteQueryParamMatching ----------------------------------------------------------


def _q(name, value):
    return {"name": name, "value": value}


QUERY = table(
    http_route(
        "mesh-query-param-matching",
        [
            {
                "matches": [{"queryParams": [_q("animal", "whale")]}],
                "backendRefs": [backend("echo-v1")],
            },
            {
                "matches": [{"queryParams": [_q("animal", "dolphin")]}],
                "backendRefs": [backend("echo-v2")],
            },
            {
                "matches": [{"path": {"value": "/path1"}, "queryParams": [_q("animal", "whale")]}],
                "backendRefs": [backend("echo-v1")],
            },
            {
                "matches": [
                    {"headers": [_q("version", "one")], "queryParams": [_q("animal", "whale")]}
                ],
                "backendRefs": [backend("echo-v2")],
            },
            {
                "matches": [
                    {"path": {"value": "/path3"}, "queryParams": [_q("animal", "shark")]},
                    {
                        "path": {"value": "/path4"},
                        "headers": [_q("version", "three")],
                        "queryParams": [_q("animal", "kraken")],
                    },
                ],
                "backendRefs": [backend("echo-v1")],
            },
            {"matches": [{"path": {"value": "/path5"}}], "backendRefs": [backend("echo-v1")]},
            {
                "matches": [{"queryParams": [_q("animal", "hydra")]}],
                "backendRefs": [backend("echo-v2")],
            },
        ],
    )
)


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        ("/?animal=whale", {}, "echo-v1"),
        ("/?animal=dolphin", {}, "echo-v2"),
        ("/?animal=whale&otherparam=irrelevant", {}, "echo-v1"),
        ("/?animal=dolphin&color=yellow", {}, "echo-v2"),
        ("/?color=blue", {}, 404),
        ("/?animal=dog", {}, 404),
        ("/?animal=whaledolphin", {}, 404),
        ("/", {}, 404),
        ("/path1?animal=whale", {}, "echo-v1"),
        ("/?animal=whale", {"version": "one"}, "echo-v2"),
        ("/path3?animal=shark", {}, "echo-v1"),
        ("/path4?animal=kraken", {"version": "three"}, "echo-v1"),
        ("/path4?animal=kraken", {}, 404),
        ("/path5?animal=hydra", {}, "echo-v1"),
        ("/?animal=hydra", {}, "echo-v2"),
    ],
    ids=lambda v: repr(v),
)
def test_mesh_query_param_matching(target, headers, expected):
    decision = decide(req(target, headers=headers), QUERY, rng())
    if expected == 404:
        assert isinstance(decision, DirectResponse)
        assert decision.status == 404
    else:
        assert forward(decision).backend.name == expected


# --- Precedence across rules and routes -------------------------------------------------------


def _rule(backend_name, **match):
    return {"matches": [match], "backendRefs": [backend(backend_name)]}


@pytest.mark.parametrize(
    ("routes", "request_kwargs", "expected"),
    [
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule("prefix", path={"value": "/a"}),
                        _rule("exact", path={"type": "Exact", "value": "/a"}),
                    ],
                )
            ],
            {"target": "/a"},
            "exact",
            id="exact beats prefix of the same path",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [_rule("short", path={"value": "/a"}), _rule("long", path={"value": "/a/b"})],
                )
            ],
            {"target": "/a/b/c"},
            "long",
            id="longest prefix wins",
        ),
        pytest.param(
            [
                http_route(
                    "r", [_rule("hdr", headers=[_q("x", "1")]), _rule("method", method="POST")]
                )
            ],
            {"target": "/", "method": "POST", "headers": {"x": "1"}},
            "method",
            id="method beats headers",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule("one", headers=[_q("x", "1")]),
                        _rule("two", headers=[_q("x", "1"), _q("y", "2")]),
                    ],
                )
            ],
            {"target": "/", "headers": {"x": "1", "y": "2"}},
            "two",
            id="more headers win",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule("hdr", headers=[_q("x", "1")]),
                        _rule("query", queryParams=[_q("q", "1"), _q("p", "2")]),
                    ],
                )
            ],
            {"target": "/?q=1&p=2", "headers": {"x": "1"}},
            "hdr",
            id="headers beat query params",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule("one", queryParams=[_q("q", "1")]),
                        _rule("two", queryParams=[_q("q", "1"), _q("p", "2")]),
                    ],
                )
            ],
            {"target": "/?q=1&p=2"},
            "two",
            id="more query params win",
        ),
        pytest.param(
            [
                http_route(
                    "newer", [_rule("newer", path={"value": "/"})], created="2024-05-01T00:00:00Z"
                ),
                http_route(
                    "older", [_rule("older", path={"value": "/"})], created="2023-05-01T00:00:00Z"
                ),
            ],
            {"target": "/x"},
            "older",
            id="oldest route wins a tie",
        ),
        pytest.param(
            [
                http_route("b", [_rule("b", path={"value": "/"})], created="2024-05-01T00:00:00Z"),
                http_route("a", [_rule("a", path={"value": "/"})], created="2024-05-01T00:00:00Z"),
            ],
            {"target": "/x"},
            "a",
            id="then namespace/name alphabetical",
        ),
        pytest.param(
            [
                http_route(
                    "old", [_rule("old", path={"value": "/"})], created="2020-01-01T00:00:00Z"
                ),
                http_route(
                    "new", [_rule("new", path={"value": "/x"})], created="2024-01-01T00:00:00Z"
                ),
            ],
            {"target": "/x"},
            "new",
            id="match criteria beat route age",
        ),
        pytest.param(
            [
                http_route(
                    "r", [_rule("first", path={"value": "/"}), _rule("second", path={"value": "/"})]
                )
            ],
            {"target": "/x"},
            "first",
            id="first rule in list order wins inside a route",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule("prefix", path={"value": "/api/v1"}),
                        _rule(
                            "regex", path={"type": "RegularExpression", "value": "/api/v[0-9]+/.*"}
                        ),
                    ],
                )
            ],
            {"target": "/api/v1/users"},
            "regex",
            id="regex ranks between exact and prefix (Istio)",
        ),
        pytest.param(
            [
                http_route(
                    "r", [_rule("regex", path={"type": "RegularExpression", "value": "/api/.*"})]
                )
            ],
            {"target": "/other"},
            404,
            id="regex is a full match",
        ),
        pytest.param(
            [
                http_route(
                    "r",
                    [
                        _rule(
                            "hdr",
                            headers=[
                                {
                                    "type": "RegularExpression",
                                    "name": "X-Env",
                                    "value": "prod-[a-z]+",
                                }
                            ],
                        )
                    ],
                )
            ],
            {"target": "/", "headers": {"x-env": "prod-eu"}},
            "hdr",
            id="header regex, case-insensitive name",
        ),
    ],
)
def test_precedence(routes, request_kwargs, expected):
    decision = decide(req(**request_kwargs), table(*routes), rng())
    if expected == 404:
        assert isinstance(decision, DirectResponse)
        assert decision.status == 404
    else:
        assert forward(decision).backend.name == expected


# --- MeshPorts / MeshFrontend / no route -----------------------------------------------------

PORTS = table(
    http_route(
        "mesh-split-v1",
        [
            {
                "filters": [
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"set": [_q("X-Header-Set", "v1")]},
                    }
                ],
                "backendRefs": [backend("echo-v1", 80)],
            }
        ],
        parent="echo-v1",
        port=80,
    ),
    http_route(
        "mesh-split-v2",
        [
            {
                "filters": [
                    {
                        "type": "ResponseHeaderModifier",
                        "responseHeaderModifier": {"set": [_q("X-Header-Set", "v2")]},
                    }
                ],
                "backendRefs": [backend("echo-v2", 80)],
            }
        ],
        parent="echo-v2",
        port=None,
    ),
)


@pytest.mark.parametrize(
    ("service", "port", "header"),
    [
        ("echo-v1", 80, "v1"),
        ("echo-v1", 8080, None),
        ("echo-v2", 80, "v2"),
        ("echo-v2", 8080, "v2"),
    ],
    ids=["explicit port", "excluded port", "no port set (80)", "no port set (8080)"],
)
def test_mesh_ports(service, port, header):
    d = forward(decide(req("/", host=service, destination=dest(service, port)), PORTS, rng()))
    assert d.backend.name == service
    if header is None:
        assert d.rule is None
        assert d.backend.port == port  # default: the addressed Service itself
        assert d.response_modifiers == ()
    else:
        assert d.response_modifiers[0].set == (("X-Header-Set", header),)


def test_no_route_forwards_to_the_addressed_service():
    d = forward(decide(req("/any"), table(), rng()))
    assert (d.backend.namespace, d.backend.name, d.backend.port, d.rule) == (NS, "echo", 80, None)


def test_route_of_another_namespace_does_not_apply():
    t = table(http_route("r", [_rule("x")], namespace="other"))
    assert forward(decide(req("/"), t, rng())).rule is None


# --- Redirects --------------------------------------------------------------------------------


def _redirect_rule(prefix, **redirect):
    return {
        "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
        "filters": [{"type": "RequestRedirect", "requestRedirect": redirect}],
    }


REDIRECTS = table(
    http_route(
        "mesh-redirects",
        [
            _redirect_rule("/port", port=8083),
            _redirect_rule("/port-and-host", hostname="example.org", port=8083),
            _redirect_rule("/port-and-status", port=8083, statusCode=301),
            _redirect_rule("/scheme", scheme="https"),
            _redirect_rule("/scheme-and-host", scheme="https", hostname="example.org"),
            _redirect_rule("/scheme-and-status", scheme="https", statusCode=301),
            _redirect_rule(
                "/original-prefix",
                path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"},
            ),
            _redirect_rule(
                "/full",
                path={"type": "ReplaceFullPath", "replaceFullPath": "/full-path-replacement"},
            ),
            _redirect_rule(
                "/path-and-host",
                hostname="example.org",
                path={"type": "ReplacePrefixMatch", "replacePrefixMatch": "/replacement-prefix"},
            ),
            _redirect_rule("/host-and-status", hostname="example.org", statusCode=301),
            _redirect_rule("/s303", statusCode=303),
            _redirect_rule("/s307", statusCode=307),
            _redirect_rule("/s308", statusCode=308),
            _redirect_rule("/http-port", scheme="http", port=80),
        ],
    )
)


@pytest.mark.parametrize(
    ("target", "status", "location"),
    [
        ("/port", 302, "http://echo:8083/port"),
        ("/port-and-host", 302, "http://example.org:8083/port-and-host"),
        ("/port-and-status", 301, "http://echo:8083/port-and-status"),
        ("/scheme", 302, "https://echo/scheme"),
        ("/scheme-and-host", 302, "https://example.org/scheme-and-host"),
        ("/scheme-and-status", 301, "https://echo/scheme-and-status"),
        ("/original-prefix/lemon", 302, "http://echo/replacement-prefix/lemon"),
        ("/full/path/original", 302, "http://echo/full-path-replacement"),
        ("/path-and-host", 302, "http://example.org/replacement-prefix"),
        ("/host-and-status", 301, "http://example.org/host-and-status"),
        ("/s303", 303, "http://echo/s303"),
        ("/s307?a=1", 307, "http://echo/s307?a=1"),
        ("/s308", 308, "http://echo/s308"),
        ("/http-port", 302, "http://echo/http-port"),
    ],
)
def test_redirects(target, status, location):
    d = decide(req(target), REDIRECTS, rng())
    assert isinstance(d, Redirect), d
    assert (d.status, d.location) == (status, location)


def test_redirect_keeps_non_default_service_port():
    t = table(http_route("r", [_redirect_rule("/", hostname="example.org")], port=None))
    d = decide(req("/x", host="echo:8080", destination=dest(port=8080)), t, rng())
    assert isinstance(d, Redirect)
    assert d.location == "http://example.org:8080/x"


# --- Rewrites and header modifiers ------------------------------------------------------------

HEADER_MOD = {
    "type": "RequestHeaderModifier",
    "requestHeaderModifier": {
        "set": [_q("X-Header-Set", "set-overwrites-values")],
        "add": [_q("X-Header-Add", "header-val-1"), _q("X-Header-Add-Append", "header-val-2")],
        "remove": ["X-Header-Remove"],
    },
}


def _rewrite_rule(prefix, path, extra=()):
    return {
        "matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
        "filters": [{"type": "URLRewrite", "urlRewrite": {"path": path}}, *extra],
        "backendRefs": [backend("echo-v1", 80)],
    }


REWRITES = table(
    http_route(
        "mesh-rewrite-path",
        [
            _rewrite_rule(
                "/prefix/one", {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/one"}
            ),
            _rewrite_rule(
                "/strip-prefix", {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
            ),
            _rewrite_rule("/full/one", {"type": "ReplaceFullPath", "replaceFullPath": "/one"}),
            _rewrite_rule(
                "/full/rewrite-path-and-modify-headers",
                {"type": "ReplaceFullPath", "replaceFullPath": "/test"},
                [HEADER_MOD],
            ),
            _rewrite_rule(
                "/prefix/rewrite-path-and-modify-headers",
                {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/prefix"},
                [HEADER_MOD],
            ),
            {
                "matches": [{"path": {"value": "/host"}}],
                "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"hostname": "rewritten.example"}}
                ],
                "backendRefs": [backend("echo-v1", 80)],
            },
        ],
    )
)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/prefix/one/two", "/one/two"),
        ("/strip-prefix/three", "/three"),
        ("/strip-prefix", "/"),
        ("/full/one/two", "/one"),
        ("/full/rewrite-path-and-modify-headers/test", "/test"),
        ("/prefix/rewrite-path-and-modify-headers/one", "/prefix/one"),
        ("/prefix/one/two?x=1", "/one/two"),
    ],
)
def test_rewrite_path(target, path):
    d = forward(decide(req(target), REWRITES, rng()))
    assert d.request.path == path
    assert d.request.query == target.partition("?")[2]


def test_rewrite_with_header_modifier():
    headers = [
        ("X-Header-Remove", "remove-val"),
        ("X-Header-Add-Append", "append-val-1"),
        ("X-Header-Set", "set-val"),
    ]
    d = forward(
        decide(req("/full/rewrite-path-and-modify-headers/test", headers=headers), REWRITES, rng())
    )
    r = d.request
    assert r.header_values("x-header-set") == ["set-overwrites-values"]
    assert r.header_values("x-header-add") == ["header-val-1"]
    assert r.header_values("x-header-add-append") == ["append-val-1", "header-val-2"]
    assert r.header_values("x-header-remove") == []


def test_rewrite_hostname():
    d = forward(decide(req("/host", host="echo:80"), REWRITES, rng()))
    assert d.request.authority == "rewritten.example"


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/x", "/", "/api", "/api/x"),
    ],
)
def test_replace_prefix_spec_table(path, prefix, replacement, expected):
    from waypoint.proxy.filters import replace_prefix

    assert replace_prefix(path, prefix, replacement) == expected


def test_backend_request_header_modifier():
    route = http_route(
        "backend-mod",
        [
            {
                "backendRefs": [
                    backend(
                        "echo-v1",
                        filters=[
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {"set": [_q("X-Backend", "v1")]},
                            }
                        ],
                    )
                ],
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {"add": [_q("X-Rule", "r")]},
                    }
                ],
            }
        ],
    )
    d = forward(decide(req("/"), table(route), rng()))
    assert d.request.header_values("x-backend") == ["v1"]
    assert d.request.header_values("x-rule") == ["r"]


def test_named_rule_is_reported():
    t = table(
        http_route(
            "mesh-http-named-rules",
            [
                {
                    "name": "named-rule",
                    "matches": [{"path": {"value": "/named"}}],
                    "backendRefs": [backend("echo-v1")],
                },
                {"matches": [{"path": {"value": "/unnamed"}}], "backendRefs": [backend("echo-v2")]},
            ],
        )
    )
    named = forward(decide(req("/named"), t, rng()))
    unnamed = forward(decide(req("/unnamed"), t, rng()))
    assert named.rule is not None
    assert unnamed.rule is not None
    assert (named.backend.name, named.rule.rule_name) == ("echo-v1", "named-rule")
    assert (unnamed.backend.name, unnamed.rule.rule_name, unnamed.rule.rule_index) == (
        "echo-v2",
        None,
        1,
    )


# --- Backends: weights, invalid, mirrors, timeouts -------------------------------------------


def test_weights_proportions_with_seeded_rng():
    t = table(
        http_route(
            "w",
            [
                {
                    "backendRefs": [
                        backend("a", weight=70),
                        backend("b", weight=30),
                        backend("c", weight=0),
                    ]
                }
            ],
        )
    )
    r = random.Random(1234)
    counts = Counter(forward(decide(req("/"), t, r)).backend.name for _ in range(4000))
    assert counts["c"] == 0
    assert abs(counts["a"] / 4000 - 0.7) < 0.03


@given(
    weights=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=6).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_weighted_choice_proportions(weights, seed):
    r = random.Random(seed)
    n = 2000
    counts = Counter(choose_weighted(weights, r) for _ in range(n))
    total = sum(weights)
    for i, w in enumerate(weights):
        if w == 0:
            assert counts[i] == 0
        else:
            # 5 standard deviations of a binomial: never flaky, still catches a wrong choice.
            p = w / total
            assert abs(counts[i] - n * p) <= 5 * (n * p * (1 - p)) ** 0.5 + 1


@pytest.mark.parametrize(
    ("rule", "reason"),
    [
        ({"backendRefs": [backend("a", weight=0), backend("b", weight=0)]}, "weight 0"),
        ({"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "x"}]}, "InvalidKind"),
        ({"backendRefs": [backend("a", namespace="other")]}, "RefNotPermitted"),
        ({"matches": [{"path": {"value": "/"}}]}, "no backendRefs"),
        (
            {
                "filters": [
                    {
                        "type": "ExtensionRef",
                        "extensionRef": {"group": "x.io", "kind": "K", "name": "n"},
                    }
                ],
                "backendRefs": [backend("a")],
            },
            "ExtensionRef",
        ),
    ],
    ids=["all weights zero", "unsupported kind", "cross-namespace", "no backends", "extension ref"],
)
def test_500_cases(rule, reason):
    d = decide(req("/"), table(http_route("r", [rule])), rng())
    assert isinstance(d, DirectResponse)
    assert d.status == 500
    assert reason in d.reason


def test_invalid_backend_gets_its_share_of_500s():
    t = table(
        http_route("r", [{"backendRefs": [backend("good"), backend("bad", namespace="other")]}])
    )
    r = random.Random(5)
    results = Counter(type(decide(req("/"), t, r)).__name__ for _ in range(2000))
    assert 0.4 < results["DirectResponse"] / 2000 < 0.6


def test_backend_validity_callback():
    t = table(http_route("r", [{"backendRefs": [backend("missing")]}]))
    d = decide(req("/"), t, rng(), backend_valid=lambda b: b.name != "missing")
    assert isinstance(d, DirectResponse)
    assert "not found" in d.reason


def test_mirror_percent_and_timeouts_and_retry():
    rule = {
        "filters": [
            {
                "type": "RequestMirror",
                "requestMirror": {"backendRef": backend("shadow"), "percent": 25},
            },
            {"type": "RequestMirror", "requestMirror": {"backendRef": backend("always")}},
        ],
        "backendRefs": [backend("echo-v1")],
        "timeouts": {"request": "10s", "backendRequest": "1500ms"},
        "retry": {"attempts": 3, "codes": [503, 502], "backoff": "100ms"},
    }
    t = table(http_route("r", [rule]))
    r = random.Random(99)
    decisions = [forward(decide(req("/"), t, r)) for _ in range(2000)]
    shadow = sum(any(m.name == "shadow" for m in d.mirrors) for d in decisions)
    assert all(any(m.name == "always" for m in d.mirrors) for d in decisions)
    assert 0.2 < shadow / 2000 < 0.3
    d = decisions[0]
    assert (d.timeouts.request, d.timeouts.backend_request) == (10.0, 1.5)
    assert d.retry is not None
    assert (d.retry.attempts, d.retry.codes, d.retry.backoff) == (3, (503, 502), 0.1)


# --- GRPCRoute --------------------------------------------------------------------------------


def grpc_route(name, rules, *, created=None):
    obj = http_route(name, rules, created=created, port=None)
    obj["kind"] = "GRPCRoute"
    return obj


GRPC = {"content-type": "application/grpc"}


def test_grpc_method_precedence_and_header_modifier():
    routes = [
        grpc_route(
            "g",
            [
                {
                    "matches": [{"method": {"service": "pkg.Echo"}}],
                    "backendRefs": [backend("service-only", 7070)],
                },
                {
                    "matches": [{"method": {"service": "pkg.Echo", "method": "Ping"}}],
                    "backendRefs": [backend("service-method", 7070)],
                },
                {
                    "matches": [{"method": {"type": "RegularExpression", "method": "Get.*"}}],
                    "backendRefs": [backend("regex", 7070)],
                },
                {
                    "matches": [{"headers": [_q("x-tenant", "a")]}],
                    "filters": [
                        {
                            "type": "RequestHeaderModifier",
                            "requestHeaderModifier": {"set": [_q("x-mod", "1")]},
                        }
                    ],
                    "backendRefs": [backend("by-header", 7070)],
                },
            ],
        )
    ]
    t = table(grpc=routes)
    assert (
        forward(decide(req("/pkg.Echo/Ping", method="POST", headers=GRPC), t, rng())).backend.name
        == "service-method"
    )
    assert (
        forward(decide(req("/pkg.Echo/Other", method="POST", headers=GRPC), t, rng())).backend.name
        == "service-only"
    )
    assert (
        forward(decide(req("/x.Y/GetThing", method="POST", headers=GRPC), t, rng())).backend.name
        == "regex"
    )
    d = forward(decide(req("/x.Y/Z", method="POST", headers={**GRPC, "x-tenant": "a"}), t, rng()))
    assert (d.backend.name, d.request.header_values("x-mod")) == ("by-header", ["1"])
    miss = decide(req("/x.Y/Z", method="POST", headers=GRPC), t, rng())
    assert isinstance(miss, DirectResponse)
    assert miss.status == 404
    # Non-gRPC traffic ignores GRPCRoutes: no HTTPRoute -> the Service itself.
    assert forward(decide(req("/pkg.Echo/Ping"), t, rng())).rule is None


def test_grpc_weights():
    t = table(
        grpc=[
            grpc_route(
                "w",
                [
                    {
                        "backendRefs": [
                            backend("v1", 7070, weight=70),
                            backend("v2", 7070, weight=30),
                            backend("v3", 7070, weight=0),
                        ]
                    }
                ],
            )
        ]
    )
    r = random.Random(3)
    counts = Counter(
        forward(decide(req("/a.B/C", method="POST", headers=GRPC), t, r)).backend.name
        for _ in range(2000)
    )
    assert counts["v3"] == 0
    assert 0.65 < counts["v1"] / 2000 < 0.75

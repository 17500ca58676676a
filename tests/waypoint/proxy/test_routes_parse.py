"""Route validation: bad routes are rejected with errors naming object, rule and field."""

from __future__ import annotations

import pytest

from tests.waypoint.proxy.helpers import backend, http_route
from waypoint.proxy.config import build_routes
from waypoint.proxy.parsing import InvalidObjectError, parse_duration
from waypoint.proxy.routes import (
    HTTPRouteMatch,
    PathMatchType,
    parse_grpc_route,
    parse_http_route,
)


def errors_of(rule=None, *, spec=None):
    obj = http_route("bad", [rule] if rule is not None else [])
    if spec is not None:
        obj["spec"] = spec
    with pytest.raises(InvalidObjectError) as info:
        parse_http_route(obj)
    return info.value.errors


@pytest.mark.parametrize(
    ("rule", "field", "message"),
    [
        (
            {"matches": [{"path": {"type": "Exact", "value": "foo"}}]},
            "spec.rules[0].matches[0].path.value",
            "starting with '/'",
        ),
        (
            {"matches": [{"path": {"value": "/a//b"}}]},
            "spec.rules[0].matches[0].path.value",
            "'//'",
        ),
        (
            {"matches": [{"path": {"value": "/a/../b"}}]},
            "spec.rules[0].matches[0].path.value",
            "'/../'",
        ),
        (
            {"matches": [{"path": {"value": "/a%2fb"}}]},
            "spec.rules[0].matches[0].path.value",
            "%2F",
        ),
        ({"matches": [{"path": {"value": "/a#b"}}]}, "spec.rules[0].matches[0].path.value", "'#'"),
        (
            {"matches": [{"path": {"type": "Glob", "value": "/"}}]},
            "spec.rules[0].matches[0].path.type",
            "unsupported value",
        ),
        (
            {"matches": [{"path": {"type": "RegularExpression", "value": "(a"}}]},
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression",
        ),
        (
            {"matches": [{"path": {"type": "RegularExpression", "value": "a" * 1025}}]},
            "spec.rules[0].matches[0].path.value",
            "1024",
        ),
        (
            {"matches": [{"headers": [{"name": "bad name", "value": "x"}]}]},
            "spec.rules[0].matches[0].headers[0].name",
            "header name",
        ),
        (
            {"matches": [{"headers": [{"name": "x"}]}]},
            "spec.rules[0].matches[0].headers[0].value",
            "required",
        ),
        ({"matches": [{"method": "FETCH"}]}, "spec.rules[0].matches[0].method", "FETCH"),
        ({"matches": [{"pathh": {"value": "/"}}]}, "spec.rules[0].matches[0].pathh", "unknown"),
        ({"backendRefs": [{"name": "svc"}]}, "spec.rules[0].backendRefs[0].port", "Service"),
        (
            {"backendRefs": [backend("a", weight=-1)]},
            "spec.rules[0].backendRefs[0].weight",
            "out of range",
        ),
        (
            {"backendRefs": [backend("a", weight=True)]},
            "spec.rules[0].backendRefs[0].weight",
            "integer",
        ),
        (
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 304}}]},
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "304",
        ),
        (
            {"filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "ftp"}}]},
            "spec.rules[0].filters[0].requestRedirect.scheme",
            "ftp",
        ),
        (
            {
                "filters": [{"type": "RequestRedirect", "requestRedirect": {}}],
                "backendRefs": [backend("a")],
            },
            "spec.rules[0].filters",
            "backendRefs",
        ),
        (
            {
                "filters": [
                    {"type": "RequestRedirect", "requestRedirect": {}},
                    {"type": "URLRewrite", "urlRewrite": {}},
                ]
            },
            "spec.rules[0].filters",
            "not both",
        ),
        (
            {
                "filters": [
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {}},
                ]
            },
            "spec.rules[0].filters",
            "cannot be repeated",
        ),
        (
            {"filters": [{"type": "RequestHeaderModifier", "responseHeaderModifier": {}}]},
            "spec.rules[0].filters[0].responseHeaderModifier",
            "must not be set",
        ),
        (
            {"filters": [{"type": "RequestHeaderModifier"}]},
            "spec.rules[0].filters[0].requestHeaderModifier",
            "must be specified",
        ),
        (
            {"filters": [{"type": "CORS", "cors": {}}]},
            "spec.rules[0].filters[0].type",
            "not supported",
        ),
        (
            {
                "matches": [{"path": {"type": "Exact", "value": "/a"}}],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}
                        },
                    }
                ],
            },
            "spec.rules[0].matches",
            "exactly one PathPrefix",
        ),
        (
            {
                "filters": [
                    {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplaceFullPath"}}}
                ]
            },
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "must be specified",
        ),
        (
            {
                "filters": [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {
                            "backendRef": backend("m"),
                            "percent": 10,
                            "fraction": {"numerator": 1},
                        },
                    }
                ]
            },
            "spec.rules[0].filters[0].requestMirror.fraction",
            "only one",
        ),
        (
            {
                "filters": [
                    {
                        "type": "RequestHeaderModifier",
                        "requestHeaderModifier": {
                            "set": [{"name": "X", "value": "1"}, {"name": "x", "value": "2"}]
                        },
                    }
                ]
            },
            "spec.rules[0].filters[0].requestHeaderModifier.set[1].name",
            "twice",
        ),
        ({"timeouts": {"request": "10 seconds"}}, "spec.rules[0].timeouts.request", "duration"),
        (
            {"timeouts": {"request": "1s", "backendRequest": "2s"}},
            "spec.rules[0].timeouts.backendRequest",
            "greater",
        ),
        ({"retry": {"codes": [200]}}, "spec.rules[0].retry.codes[0]", "400-599"),
        ({"name": "Bad_Name"}, "spec.rules[0].name", "rule name"),
        ({"sessionPersistence": {}}, "spec.rules[0].sessionPersistence", "unsupported"),
    ],
)
def test_rule_errors(rule, field, message):
    errors = errors_of(rule)
    assert any(e.field == field and message in e.message for e in errors), [str(e) for e in errors]
    assert all(str(e).startswith("HTTPRoute gateway-conformance-mesh/bad: ") for e in errors)


def test_duplicate_rule_names():
    obj = http_route("bad", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(InvalidObjectError, match="unique"):
        parse_http_route(obj)


def test_missing_metadata_name_and_spec():
    with pytest.raises(InvalidObjectError) as info:
        parse_http_route({"metadata": {}, "kind": "HTTPRoute"})
    fields = {e.field for e in info.value.errors}
    assert {"metadata.name", "spec"} <= fields


def test_defaults():
    route, warnings = parse_http_route(http_route("ok", [{"backendRefs": [backend("a")]}]))
    assert not warnings
    rule = route.rules[0]
    assert rule.matches == (HTTPRouteMatch(),)
    assert rule.matches[0].path.type is PathMatchType.PATH_PREFIX
    assert rule.backend_refs[0].weight == 1
    assert route.parent_refs[0].is_mesh


def test_invalid_backend_is_a_warning_not_a_rejection():
    route, warnings = parse_http_route(
        http_route("ok", [{"backendRefs": [backend("a", namespace="other")]}])
    )
    assert route.rules[0].backend_refs[0].invalid
    assert "RefNotPermitted" in warnings[0].message


def test_one_bad_route_does_not_affect_others():
    good = http_route("good", [{"backendRefs": [backend("a")]}])
    bad = http_route("bad", [{"matches": [{"path": {"value": "nope"}}]}])
    table, errors, _ = build_routes([bad, good, good])
    assert [r.name for r in table.http] == ["good"]
    assert {(e.name, e.field) for e in errors} == {
        ("bad", "spec.rules[0].matches[0].path.value"),
        ("good", "metadata.name"),
    }


@pytest.mark.parametrize(
    ("method", "field"),
    [
        ({}, "spec.rules[0].matches[0].method"),
        ({"service": "bad/service"}, "spec.rules[0].matches[0].method.service"),
        ({"method": "1bad"}, "spec.rules[0].matches[0].method.method"),
        ({"type": "RegularExpression", "method": "(x"}, "spec.rules[0].matches[0].method.method"),
    ],
)
def test_grpc_method_errors(method, field):
    obj = http_route("g", [{"matches": [{"method": method}]}])
    obj["kind"] = "GRPCRoute"
    with pytest.raises(InvalidObjectError) as info:
        parse_grpc_route(obj)
    assert any(e.field == field for e in info.value.errors), [str(e) for e in info.value.errors]


def test_grpc_route_rejects_http_only_filters():
    obj = http_route("g", [{"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}])
    with pytest.raises(InvalidObjectError, match="unsupported filter type 'URLRewrite'"):
        parse_grpc_route(obj)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1h30m", 5400.0), ("500ms", 0.5), ("0s", 0.0), ("1m1s1ms", 61.001)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "1.5s", "-1s", "123456s", "1d", "1s1s1s1s1s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)

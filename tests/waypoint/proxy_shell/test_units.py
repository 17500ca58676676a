"""Pure helpers of the waypoint shell: protocol sniffing, Forwarded, traceparent, L4 view of policies,
splitting the shared config file."""

from __future__ import annotations

import ipaddress

import pytest

from waypoint.proxy.app import ConfigFileError, merge_l7, split_document
from waypoint.proxy.authz import AuthorizationPolicy, WaypointScope, parse_authorization_policy
from waypoint.proxy.l4authz import evaluate_tcp
from waypoint.proxy.request import Destination
from waypoint.proxy.server import detect_protocol, forwarded_for
from waypoint.proxy.telemetry import child_traceparent


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "h2"),
        (b"PRI * HTTP/2", None),
        (b"GET / HTTP/1.1\r\nHost: x\r\n", "http/1.1"),
        (b"GET /long/pa", None),
        (b"POST /x HTTP/1.0\n", "http/1.1"),
        (b"\x16\x03\x01\x02\x00", "tcp"),
        (b"SSH-2.0-OpenSSH\r\n", "tcp"),
        (b"GET / FTP/1.1\r\n", "tcp"),
    ],
    ids=[
        "h2-preface",
        "h2-partial",
        "http1",
        "http1-partial",
        "http10-lf",
        "tls",
        "ssh",
        "not-http",
    ],
)
def test_detect_protocol(prefix: bytes, expected: str | None) -> None:
    assert detect_protocol(prefix) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('for="10.0.0.1"', "10.0.0.1"),
        ("for=10.0.0.1:1234;proto=http", "10.0.0.1"),
        ('for="[2001:db8::1]:80", for=1.2.3.4', "2001:db8::1"),
        ("by=1.1.1.1;for=unknown", None),
        (None, None),
    ],
    ids=["quoted", "with-port", "v6", "obfuscated", "absent"],
)
def test_forwarded_for(header: str | None, expected: str | None) -> None:
    got = forwarded_for(header)
    assert got == (ipaddress.ip_address(expected) if expected else None)


def test_traceparent_child_keeps_trace_and_flags() -> None:
    ids = iter(["b" * 16])
    parent = "00-" + "a" * 32 + "-" + "c" * 16 + "-00"
    assert (
        child_traceparent(parent, lambda n: next(ids)) == "00-" + "a" * 32 + "-" + "b" * 16 + "-00"
    )


@pytest.mark.parametrize(
    "incoming", [None, "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"], ids=str
)
def test_traceparent_created_when_missing_or_invalid(incoming: str | None) -> None:
    out = child_traceparent(incoming, lambda n: "f" * (2 * n))
    assert out == "00-" + "f" * 32 + "-" + "f" * 16 + "-01"


DEST = Destination(
    namespace="default", name="echo", hostname="echo.default.svc.cluster.local", port=80
)
SCOPE = WaypointScope(namespace="default", name="waypoint")


def _policy(action: str, rules: list) -> AuthorizationPolicy:
    return parse_authorization_policy(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                "action": action,
                "rules": rules,
            },
        }
    )


@pytest.mark.parametrize(
    ("action", "rules", "allowed"),
    [
        ("DENY", [{"to": [{"operation": {"paths": ["/admin"]}}]}], False),
        ("ALLOW", [{"to": [{"operation": {"methods": ["GET"]}}]}], False),
        ("ALLOW", [{"from": [{"source": {"namespaces": ["client-ns"]}}]}], True),
        ("DENY", [{"from": [{"source": {"namespaces": ["other"]}}]}], True),
    ],
    ids=[
        "deny-http-fields-fail-closed",
        "allow-http-fields-never-match",
        "allow-l4",
        "deny-l4-miss",
    ],
)
def test_tcp_authorization_view(action: str, rules: list, allowed: bool) -> None:
    decision = evaluate_tcp(
        [_policy(action, rules)],
        destination=DEST,
        scope=SCOPE,
        source_principal="spiffe://cluster.local/ns/client-ns/sa/client",
        source_ip=None,
        destination_ip=None,
    )
    assert decision.allowed is allowed


def test_split_document_and_bad_route_rejected_alone() -> None:
    text = """
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["10.96.0.10"]
  ports: {80: 8080}
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: good, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules: [{backendRefs: [{name: echo, port: 80}]}]
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: bad, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo}]
    rules: [{matches: [{path: {type: Exact, value: "no-slash"}}]}]
"""
    split = split_document(text, "lab.yaml")
    assert [s.name for s in split.mesh.services] == ["echo"]
    config = merge_l7(split.l7_objects, source="lab.yaml")
    assert len(config.errors) == 1
    assert "HTTPRoute default/bad" in str(config.errors[0])
    assert "spec.rules[0].matches[0].path.value" in str(config.errors[0])
    assert config.routes.http_routes_for("Service", "default", "echo", 80)


def test_split_document_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigFileError, match="unknown top-level key"):
        split_document("httproutes: []\n", "lab.yaml")


def _record(status: int, *, identity: str | None = "spiffe://cluster.local/ns/a/sa/b") -> object:
    from waypoint.proxy.telemetry import RequestRecord
    from ztunnel.identity.spiffe import SpiffeId

    return RequestRecord(
        source_workload=None,
        source_identity=SpiffeId.parse(identity) if identity else None,
        source_addr="10.0.0.1",
        destination_workload=None,
        destination_identity=None,
        destination_addr=None,
        service=None,
        hbone_authority="10.0.0.2:80",
        method="GET",
        path="/",
        authority="svc",
        protocol="HTTP/1.1",
        grpc=False,
        status=status,
        grpc_status=None,
        flags="-",
        request_bytes=0,
        response_bytes=5,
        duration=0.001,
    )


def test_telemetry_cached_children_match_uncached_labels() -> None:
    """The per-label-set child cache counts exactly what fresh labels(**...) calls would."""
    from waypoint.proxy.telemetry import Telemetry, request_labels

    lines: list[str] = []
    t = Telemetry(access_log=lines.append)
    records = [_record(200), _record(200), _record(503), _record(200, identity=None)]
    for r in records:
        t.record(r)  # type: ignore[arg-type]
    for status, identity, count in ((200, True, 2), (503, True, 1), (200, False, 1)):
        rec = _record(status, identity=None if not identity else "spiffe://cluster.local/ns/a/sa/b")
        labels = request_labels(rec)  # type: ignore[arg-type]
        assert t.value("istio_requests_total", labels) == count
        assert t.value("istio_response_bytes_sum", labels) == 5 * count
    assert len(lines) == 4
    assert all(line.startswith("request complete ") for line in lines)


def test_telemetry_access_log_formatted_only_when_enabled(caplog: pytest.LogCaptureFixture) -> None:
    from waypoint.proxy.telemetry import Telemetry

    t = Telemetry()
    with caplog.at_level("WARNING", logger="access"):
        t.record(_record(200))  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.name == "access"]
    with caplog.at_level("INFO", logger="access"):
        t.record(_record(200))  # type: ignore[arg-type]
    assert [r for r in caplog.records if r.name == "access"]

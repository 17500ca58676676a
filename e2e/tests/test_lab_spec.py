"""The lab's pure parts: spec validation (errors name file, object, field), address plan, config
rendering, and the wire analysis on hand-made segments."""

from __future__ import annotations

import pytest

from e2e.lab.cluster import DEFAULT_SPEC
from e2e.lab.spec import LabSpecError, Names, load_spec, render_config, spec_from_dict
from e2e.lab.wire import Segment, analyze

BASE = {"nodes": [{"name": "n1"}, {"name": "n2"}], "pods": [{"name": "a", "node": "n1"}]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pods": [{"name": "a", "node": "n9"}]}, "pods[0] (a).node: 'n9' is not a node"),
        ({"pods": [{"name": "A_b", "node": "n1"}]}, "pods[0].name: 'A_b' is not a valid name"),
        ({"pods": [{"name": "a", "node": "n1", "color": 1}]}, "unknown key(s) ['color']"),
        ({"nodes": []}, "nodes: a lab needs at least one node"),
        (
            {"services": [{"name": "s", "ports": {80: 70000}}]},
            "services[0] (s).ports: target port 70000",
        ),
        (
            {"policies": [{"name": "p", "namespace": "d", "scope": "Nope", "action": "Deny"}]},
            "ztunnel config rendered from it is invalid",
        ),
        (
            {"pods": [{"name": "a", "node": "n1"}, {"name": "a", "node": "n2"}]},
            "pod names must be unique",
        ),
    ],
    ids=[
        "unknown-node",
        "bad-name",
        "unknown-key",
        "no-nodes",
        "bad-port",
        "bad-policy",
        "duplicate-pod",
    ],
)
def test_bad_specs_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(LabSpecError) as err:
        spec_from_dict(BASE | change, source="lab.yaml")
    assert str(err.value).startswith("lab.yaml: ")
    assert message in str(err.value)


def test_default_spec_address_plan_and_config() -> None:
    spec = load_spec(DEFAULT_SPEC)
    assert [str(n.ip) for n in spec.nodes] == ["10.240.0.10", "10.240.0.11"]
    assert str(spec.pod("client").ip) == "10.241.1.10"
    assert str(spec.pod("server").ip) == "10.241.2.10"
    cfg = render_config(spec, "n1", Names(prefix="zt00"))
    by_name = {w["name"]: w for w in cfg["workloads"]}
    assert by_name["client"]["protocol"] == "HBONE"
    assert by_name["client"]["netns"] == "/run/netns/zt00-n1-client"
    assert by_name["legacy"]["protocol"] == "TCP"
    assert "netns" not in by_name["legacy"]
    assert by_name["server"]["services"] == {"demo/server.demo.svc.cluster.local": {}}
    assert cfg["node"] == "n1"


def test_selector_policy_becomes_workload_selector() -> None:
    spec = spec_from_dict(
        BASE | {"pods": [{"name": "a", "node": "n1", "labels": {"app": "x"}, "namespace": "d"}],
                "policies": [{"name": "p", "namespace": "d", "action": "Allow", "selector": {"app": "x"}, "rules": []}]},
    )  # fmt: skip
    cfg = render_config(spec, "n1", Names(prefix="zt00"))
    assert cfg["policies"][0]["scope"] == "WorkloadSelector"
    assert cfg["workloads"][0]["authorizationPolicies"] == ["d/p"]


def _client_hello(alpn: bytes = b"\x02h2") -> bytes:
    ext_alpn = (
        b"\x00\x10" + (len(alpn) + 2).to_bytes(2, "big") + len(alpn).to_bytes(2, "big") + alpn
    )
    body = b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(ext_alpn).to_bytes(2, "big") + ext_alpn
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def _seg(payload: bytes, *, up: bool = True, seq: int = 1, syn: bool = False) -> Segment:
    a, b = ("10.0.0.1", 40000), ("10.0.0.2", 15008)
    src, dst = (a, b) if up else (b, a)
    return Segment(
        src=src[0], sport=src[1], dst=dst[0], dport=dst[1], seq=seq, payload=payload, syn=syn
    )


def test_wire_accepts_hbone_and_flags_problems() -> None:
    hello = _client_hello()
    app = b"\x17\x03\x03\x00\x05" + b"abcde"
    good = [
        _seg(b"", syn=True, seq=0),
        _seg(hello, seq=1),
        _seg(app, seq=1 + len(hello)),
        _seg(app, up=False),
    ]
    assert analyze(good, secret=b"SECRET").ok
    assert analyze(good, secret=b"SECRET").flows[0].alpn == ("h2",)
    leaked = [*good[:2], _seg(b"xxSECRETxx", seq=1 + len(hello))]
    report = analyze(leaked, secret=b"SECRET")
    assert report.secret_seen
    assert not report.ok
    wrong_alpn = [_seg(b"", syn=True, seq=0), _seg(_client_hello(b"\x08http/1.1"), seq=1)]
    assert any("ALPN" in p for p in analyze(wrong_alpn, secret=b"S").problems)
    plain = [Segment(src="10.0.0.1", sport=1, dst="10.0.0.2", dport=80, seq=1, payload=b"GET /")]
    assert analyze(plain, secret=b"S").non_hbone_flows

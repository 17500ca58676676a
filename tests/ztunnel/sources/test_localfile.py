"""Local config file: the documented example loads; every kind of error names file, object and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.sources.localfile import LocalConfigError, load_local_config, parse_local_config
from ztunnel.state.model import Action, LbMode, Scope, StringMatchKind, TunnelProtocol
from ztunnel.state.store import WorkloadStore

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "local-config.yaml"


def test_complete_example_loads_into_a_store():
    cfg = load_local_config(EXAMPLE)
    assert cfg.node == "node-a"
    assert cfg.warnings == ()
    assert {w.name for w in cfg.workloads} >= {"echo-1", "client", "legacy-db", "waypoint-1"}
    by_name = {w.name: w for w in cfg.workloads}
    assert by_name["legacy-db"].tunnel_protocol is TunnelProtocol.NONE
    assert by_name["echo-1"].netns == "/var/run/netns/echo-1"
    assert by_name["echo-1"].services["default/echo.default.svc.cluster.local"] == {
        80: 8080,
        9090: 9091,
    }
    echo = next(s for s in cfg.services if s.name == "echo")
    assert echo.load_balancing is not None
    assert echo.load_balancing.mode is LbMode.FAILOVER
    policies = {p.name: p for p in cfg.policies}
    assert policies["deny-9999"].scope is Scope.GLOBAL
    assert policies["deny-9999"].action is Action.DENY
    assert policies["audit-plaintext"].dry_run
    first = policies["echo-allow"].rules[0].clauses[0].matches[1].namespaces[0]
    assert first.kind is StringMatchKind.PREFIX
    assert first.value == "team-"
    store = WorkloadStore()
    store.replace_all(cfg.workloads, cfg.services, cfg.policies)
    assert len(store.workloads_on_node("node-a")) == 4


@pytest.mark.parametrize("doc", ["docs/local-config.md", "README.md"])
def test_doc_embeds_the_example(doc):
    assert EXAMPLE.read_text().strip() in (ROOT / doc).read_text()


def test_istio_style_minimal_file():
    cfg = parse_local_config(
        """
workloads:
- name: local
  namespace: default
  serviceAccount: default
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  services: {}
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Allow
  dryRun: false
  rules:
  - - - notDestinationPorts: [9999]
services:
- name: svc
  namespace: default
  hostname: svc.default.svc.cluster.local
  vips: ["/127.10.0.1"]
  ports: {80: 8080}
"""
    )
    assert cfg.workloads[0].uid == "Kubernetes//Pod/default/local"
    assert cfg.policies[0].rules[0].clauses[0].matches[0].not_destination_ports == (9999,)
    assert parse_local_config("").workloads == ()


W = "workloads:\n- name: a\n  namespace: default\n  workloadIps: ['10.0.0.1']\n"


@pytest.mark.parametrize(
    ("text", "obj", "field", "message"),
    [
        ("bogus: 1\n", "document", "bogus", "unknown field"),
        (W + "  colour: blue\n", "workloads[0] (default/a)", "colour", "unknown field"),
        (W + "  protocol: QUIC\n", "workloads[0] (default/a)", "protocol", "'QUIC' is not one of"),
        ("workloads:\n- name: a\n  namespace: default\n  workloadIps: ['10.0.0.300']\n", "workloads[0] (default/a)", "workloadIps[0]", "is not an IP address"),
        ("workloads:\n- namespace: default\n  workloadIps: ['10.0.0.1']\n", "workloads[0]", "name", "is required"),
        (W + "  serviceAccount: Bad_SA\n", "workloads[0] (default/a)", "serviceAccount", "SPIFFE"),
        (W + "  services: {default/missing: {80: 8080}}\n", "workloads[0] (default/a)", "services.default/missing", "no service"),
        (W + "  services: {default/x: {80: 0}}\n", "workloads[0] (default/a)", "services.default/x.80", "out of range"),
        (W + "  capacity: yes\n", "workloads[0] (default/a)", "capacity", "must be an integer"),
        (W + "  netns: relative/path\n", "workloads[0] (default/a)", "netns", "absolute path"),
        (W + "  waypoint: {destination: '/not-an-ip'}\n", "workloads[0] (default/a)", "waypoint.destination", "not an IP"),
        (W + "- name: b\n  namespace: default\n  workloadIps: ['10.0.0.1']\n", "workloads[1] (default/b)", "workloadIps[0]", "already used by workloads[0]"),
        (W + "  authorizationPolicies: [nonamespace]\n", "workloads[0] (default/a)", "authorizationPolicies[0]", "<namespace>/<policy name>"),
        ("services:\n- name: s\n  namespace: d\n  hostname: h\n  ports: {99999: 80}\n", "services[0] (d/s)", "ports.99999", "out of range"),
        ("services:\n- name: s\n  namespace: d\n  hostname: h\n  loadBalancer: {mode: Random}\n", "services[0] (d/s)", "loadBalancer.mode", "not one of"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Namespace\n", "policies[0] (d/p)", "action", "is required"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Cluster\n  action: Allow\n", "policies[0] (d/p)", "scope", "not one of"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Namespace\n  action: Allow\n  rules: [[[{sourceIps: ['10.0.0.1/8']}]]]\n", "policies[0] (d/p)", "rules[0][0][0].sourceIps[0]", "did you mean 10.0.0.0/8"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Namespace\n  action: Allow\n  rules: [[[{principals: [{exact: 'spiffe://td/ns/a/sa/b'}]}]]]\n", "policies[0] (d/p)", "rules[0][0][0].principals[0]", "without 'spiffe://'"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Namespace\n  action: Allow\n  rules: [[[{principals: [{regex: '.*'}]}]]]\n", "policies[0] (d/p)", "rules[0][0][0].principals[0]", "not one of"),
        ("policies:\n- name: p\n  namespace: d\n  scope: Namespace\n  action: Allow\n  rules: [{clauses: [{matches: [{ports: [80]}]}]}]\n", "policies[0] (d/p)", "rules[0].clauses[0].matches[0].ports", "unknown field"),
        ("policies:\n- {name: p, namespace: d, scope: Global, action: Deny}\n- {name: p, namespace: d, scope: Global, action: Deny}\n", "policies[1] (d/p)", "name", "already defined by policies[0]"),
        ("workloads: {a: 1}\n", "document", "workloads", "must be a list"),
        ("workloads:\n- name: a\n  name: b\n", "document", "", "duplicate key 'name'"),
        ("workloads: [\n", "document", "", "invalid YAML"),
    ],
    ids=["top-unknown", "workload-unknown", "bad-enum", "bad-ip", "missing-name", "bad-identity", "unknown-service-ref",
         "zero-target", "bool-not-int", "relative-netns", "bad-waypoint", "duplicate-ip", "bad-policy-ref", "bad-port",
         "bad-lb-mode", "missing-action", "bad-scope", "cidr-host-bits", "principal-scheme", "unknown-string-match",
         "unknown-match-field", "duplicate-policy", "not-a-list", "duplicate-yaml-key", "broken-yaml"],
)  # fmt: skip
def test_errors_name_file_object_field(text, obj, field, message):
    with pytest.raises(LocalConfigError) as err:
        parse_local_config(text, source="lab.yaml")
    issues = [i for i in err.value.issues if i.obj == obj and i.field == field]
    assert issues, [str(i) for i in err.value.issues]
    assert message in issues[0].message
    assert str(err.value).startswith("lab.yaml: ") or "lab.yaml: " in str(err.value)


def test_all_errors_are_collected():
    text = (
        W
        + "  protocol: QUIC\n  capacity: -1\n- name: b\n  namespace: default\n  workloadIps: [x]\n"
    )
    with pytest.raises(LocalConfigError) as err:
        parse_local_config(text, source="f.yaml")
    assert {(i.obj, i.field) for i in err.value.issues} == {
        ("workloads[0] (default/a)", "protocol"),
        ("workloads[0] (default/a)", "capacity"),
        ("workloads[1] (default/b)", "workloadIps[0]"),
    }
    assert "3 error(s)" in str(err.value)


def test_unknown_policy_reference_is_a_warning():
    cfg = parse_local_config(W + "  authorizationPolicies: [default/nope]\n", source="f.yaml")
    assert cfg.warnings
    assert "default/nope" in cfg.warnings[0]
    assert "denied" in cfg.warnings[0]


def test_unreadable_file(tmp_path):
    with pytest.raises(LocalConfigError, match="cannot read"):
        load_local_config(tmp_path / "absent.yaml")


@given(st.text(max_size=200))
def test_arbitrary_text_is_config_or_error(text):
    issues: tuple[object, ...] = ("parsed",)
    try:
        parse_local_config(text)
    except LocalConfigError as err:
        issues = err.issues  # every failure carries at least one located issue
    assert issues


def test_l7_sections_of_a_shared_file_are_ignored():
    # The waypoint proxy reads routes and L7 policies from the same file; ztunnel skips them.
    cfg = parse_local_config(
        """
workloads: []
httpRoutes:
- {apiVersion: gateway.networking.k8s.io/v1, kind: HTTPRoute, metadata: {name: r}}
grpcRoutes: []
authorizationPolicies: []
""",
        source="shared.yaml",
    )
    assert cfg.workloads == ()

"""Offline schema validation of deploy/manager/** and of every rendered object.

Uses the `kubernetes-validate` package (the Kubernetes OpenAPI schemas as JSON Schema, shipped in the
wheel, no network) in strict mode: an unknown field is an error. GatewayClass is a CRD the package
does not know; it is checked against the Gateway API v1 field list here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from waypoint.manager import kinds
from waypoint.manager.model import parse_gateway
from waypoint.manager.render import RenderConfig, render

from .test_render import CASES

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy" / "manager"
K8S_VERSION = (
    "1.31"  # lowest version we promise: preStop `sleep` and matchLabelKeys are on by default
)


def _validate(obj: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {obj['kind']} {obj['metadata'].get('name')}: {path}: {exc.message}")


def _deploy_docs() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend((path.name, d) for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


DEPLOY_DOCS = _deploy_docs()


@pytest.mark.parametrize(
    ("where", "doc"),
    DEPLOY_DOCS,
    ids=[f"{w}:{d['kind']}/{d['metadata']['name']}" for w, d in DEPLOY_DOCS],
)
def test_deploy_manifest_is_schema_valid(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] == "GatewayClass":
        assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
        assert set(doc["spec"]) <= {"controllerName", "parametersRef", "description"}
        assert doc["spec"]["controllerName"] == "istio.io/mesh-controller"
        return
    _validate(doc, f"deploy/manager/{where}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_gateway_classes_are_published() -> None:
    names = {d["metadata"]["name"] for _, d in DEPLOY_DOCS if d["kind"] == "GatewayClass"}
    assert "istio-waypoint" in names


def test_rbac_is_least_privilege_and_sufficient() -> None:
    (role,) = [d for _, d in DEPLOY_DOCS if d["kind"] == "ClusterRole"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in (group, resource), rule
                assert "*" not in rule["verbs"], rule
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    for rt in kinds.OWNED_KINDS:
        assert {"get", "list", "watch", "create", "patch", "delete"} <= granted[
            (rt.group, rt.plural)
        ], rt.kind
    for rt in (kinds.GATEWAY, kinds.GATEWAY_CLASS, kinds.NAMESPACE, kinds.POD, kinds.CONFIG_MAP):
        assert {"get", "list", "watch"} <= granted[(rt.group, rt.plural)], rt.kind
        if rt in (kinds.NAMESPACE, kinds.POD):
            assert granted[(rt.group, rt.plural)] == {"get", "list", "watch"}, (
                f"{rt.kind} is read-only"
            )
    # Root certificates: created when missing, server-side applied; never replaced or deleted.
    assert granted[("", "configmaps")] == {"get", "list", "watch", "create", "patch"}
    # Binding the waypoint proxy's role without `bind` needs its (read-only) rights.
    for plural in ("httproutes", "grpcroutes"):
        assert granted[("gateway.networking.k8s.io", plural)] == {"list", "watch"}
    for group, plural in (
        ("gateway.networking.k8s.io", "gateways/status"),
        ("gateway.networking.k8s.io", "gatewayclasses/status"),
        ("", "services/status"),
    ):
        assert "patch" in granted[(group, plural)]
    assert not any(r.endswith("secrets") for _, r in granted), "the manager never needs secrets"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_rendered_objects_are_schema_valid(case: str) -> None:
    gw, params = CASES[case]
    for obj in render(parse_gateway(gw), params, RenderConfig()):
        _validate(obj, f"render[{case}]")


def test_validator_rejects_unknown_fields() -> None:
    obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x", "bogus": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)

"""The kustomize subset used to render deploy/**: what it applies and what it refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from .kustomize import KustomizeError, build, object_id


def _write(directory: Path, files: dict[str, object]) -> Path:
    for name, content in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            path.write_text(yaml.safe_dump_all(content))
        else:
            path.write_text(yaml.safe_dump(content))
    return directory


def _k(**fields: object) -> dict[str, object]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **fields}


SA = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}}
ROLE = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": "r"},
}
DS = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "ds", "labels": {"a": "1"}},
    "spec": {
        "selector": {"matchLabels": {"a": "1"}},
        "template": {"metadata": {"labels": {"a": "1"}}},
    },
}
SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"selector": {}}}


def test_namespace_applies_to_namespaced_objects_only(tmp_path: Path) -> None:
    _write(tmp_path, {"kustomization.yaml": _k(namespace="ns", resources=["a.yaml"])})
    _write(tmp_path, {"a.yaml": [SA, ROLE]})
    sa, role = build(tmp_path)
    assert sa["metadata"]["namespace"] == "ns"
    assert "namespace" not in role["metadata"]
    assert object_id(sa) == ("", "ServiceAccount", "ns", "sa")
    assert object_id(role) == ("rbac.authorization.k8s.io", "ClusterRole", "", "r")


def test_common_labels_reach_selectors_and_templates(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "kustomization.yaml": _k(commonLabels={"b": "2"}, resources=["ds.yaml", "svc.yaml"]),
            "ds.yaml": DS,
            "svc.yaml": SVC,
        },
    )
    ds, svc = build(tmp_path)
    assert ds["metadata"]["labels"] == {"a": "1", "b": "2"}
    assert ds["spec"]["selector"]["matchLabels"] == {"a": "1", "b": "2"}
    assert ds["spec"]["template"]["metadata"]["labels"] == {"a": "1", "b": "2"}
    assert svc["spec"]["selector"] == {"b": "2"}
    assert svc["metadata"]["labels"] == {"b": "2"}


def test_nested_directories_and_outer_namespace_wins(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "kustomization.yaml": _k(namespace="outer", resources=["inner"]),
            "inner/kustomization.yaml": _k(namespace="inner", resources=["sa.yaml"]),
            "inner/sa.yaml": SA,
        },
    )
    (sa,) = build(tmp_path)
    assert sa["metadata"]["namespace"] == "outer"


def test_sources_are_not_mutated(tmp_path: Path) -> None:
    _write(tmp_path, {"kustomization.yaml": _k(namespace="ns", resources=["a.yaml"]), "a.yaml": SA})
    first = build(tmp_path)
    first[0]["metadata"]["name"] = "changed"
    assert build(tmp_path)[0]["metadata"]["name"] == "sa"


BAD_CASES = {
    "unsupported-field": (
        {"kustomization.yaml": _k(resources=[], patches=[])},
        "unsupported field(s) patches",
    ),
    "missing-resource": (
        {"kustomization.yaml": _k(resources=["nope.yaml"])},
        "resource 'nope.yaml' does not exist",
    ),
    "remote-resource": (
        {"kustomization.yaml": _k(resources=["https://example.com/x.yaml"])},
        "remote resource",
    ),
    "duplicate": (
        {"kustomization.yaml": _k(resources=["a.yaml", "b.yaml"]), "a.yaml": SA, "b.yaml": SA},
        "duplicate object ServiceAccount/sa",
    ),
    "no-name": (
        {
            "kustomization.yaml": _k(resources=["a.yaml"]),
            "a.yaml": {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}},
        },
        "a.yaml document 0: ConfigMap has no metadata.name",
    ),
    "no-kind": (
        {"kustomization.yaml": _k(resources=["a.yaml"]), "a.yaml": {"apiVersion": "v1"}},
        "missing kind",
    ),
    "not-a-kustomization-dir": (
        {"kustomization.yaml": _k(resources=["sub"]), "sub/x": 1},
        "sub: no",
    ),
    "bad-labels": (
        {"kustomization.yaml": _k(resources=[], commonLabels={"a": 1})},
        "commonLabels must map strings to strings",
    ),
    "cycle": ({"kustomization.yaml": _k(resources=["."])}, "kustomization cycle"),
}


@pytest.mark.parametrize(("files", "message"), list(BAD_CASES.values()), ids=list(BAD_CASES))
def test_bad_input_is_refused_with_a_named_reason(
    tmp_path: Path, files: dict[str, object], message: str
) -> None:
    _write(tmp_path, files)
    with pytest.raises(KustomizeError, match=re.escape(message)):
        build(tmp_path)

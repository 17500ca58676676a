"""The fake API server's pure cores: selectors, patches, field ownership, CRD parsing."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2e.fakekube import fields
from e2e.fakekube.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from e2e.fakekube.registry import kinds_from_crd
from e2e.fakekube.selectors import (
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)

LABELS = {"app": "web", "tier": "fe", "example.com/team": "mesh"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app!=web", False),
        ("missing!=x", True),
        ("app in (web, api)", True),
        ("app notin (web)", False),
        ("missing notin (web)", True),
        ("example.com/team", True),
        ("!example.com/team", False),
        ("!missing", True),
        ("app=web,tier in (fe),!missing", True),
        ("app=web,tier=be", False),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_label_selectors(selector: str, expected: bool) -> None:
    assert labels_match(parse_label_selector(selector), LABELS) is expected


@pytest.mark.parametrize(
    "bad", ["app in (", "app in ()", "a b", "Bad Key=x", "app=in valid", ",", "x=" + "v" * 64]
)
def test_bad_label_selectors(bad: str) -> None:
    with pytest.raises(SelectorError):
        parse_label_selector(bad)


def test_field_selectors() -> None:
    pod = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"nodeName": "n1"},
        "status": {"phase": "Running"},
    }
    supported = (
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "status.phase",
        "spec.hostNetwork",
    )
    assert fields_match(
        parse_field_selector("spec.nodeName=n1,status.phase!=Pending", supported), pod
    )
    assert not fields_match(parse_field_selector("metadata.name==q", supported), pod)
    assert fields_match(
        parse_field_selector("spec.hostNetwork=", supported), pod
    )  # missing reads as ""
    with pytest.raises(SelectorError, match=r"field label not supported: spec\.other"):
        parse_field_selector("spec.other=x", supported)
    with pytest.raises(SelectorError):
        parse_field_selector("nonsense", supported)


def test_merge_patch_rfc7386_examples() -> None:
    assert merge_patch({"a": "b"}, {"a": "c"}) == {"a": "c"}
    assert merge_patch({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}) == {"a": {"b": "d"}}
    assert merge_patch({"a": [{"b": "c"}]}, {"a": [1]}) == {"a": [1]}
    assert merge_patch({"a": "foo"}, None) is None
    assert merge_patch({"e": None}, {"a": 1}) == {"e": None, "a": 1}


def test_json_patch_operations_and_atomicity() -> None:
    doc = {"a": {"b": [1, 2]}, "c": "x"}
    out = json_patch(
        doc,
        [
            {"op": "add", "path": "/a/b/-", "value": 3},
            {"op": "add", "path": "/a/b/0", "value": 0},
            {"op": "remove", "path": "/c"},
            {"op": "copy", "from": "/a/b", "path": "/d"},
            {"op": "move", "from": "/d", "path": "/e~1f"},
            {"op": "replace", "path": "/a/b/1", "value": 10},
            {"op": "test", "path": "/e~1f/3", "value": 3},
        ],
    )
    assert out == {"a": {"b": [0, 10, 2, 3]}, "e/f": [0, 1, 2, 3]}
    assert doc == {"a": {"b": [1, 2]}, "c": "x"}
    for bad in (
        [{"op": "remove", "path": "/nope"}],
        [{"op": "replace", "path": "/nope", "value": 1}],
        [{"op": "test", "path": "/c", "value": "y"}],
        [{"op": "add", "path": "/a/b/9", "value": 1}],
        [{"op": "frobnicate", "path": "/c"}],
        {"op": "add"},
    ):
        with pytest.raises(PatchError):
            json_patch(doc, bad)


def test_strategic_merge_patch_lists_by_key() -> None:
    pod = {
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "image": "a:1",
                    "ports": [{"containerPort": 80, "name": "http"}],
                    "env": [{"name": "X", "value": "1"}],
                },
                {"name": "b", "image": "b:1"},
            ],
            "tolerations": [{"key": "k"}],
        },
        "status": {"conditions": [{"type": "Ready", "status": "False"}]},
    }
    patch = {
        "spec": {
            "containers": [
                {
                    "name": "a",
                    "ports": [{"containerPort": 443, "name": "https"}],
                    "env": [{"name": "X", "value": "2"}],
                },
                {"name": "b", "$patch": "delete"},
                {"name": "c", "image": "c:1"},
            ],
            "tolerations": [{"key": "other"}],
        },
        "status": {
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "Scheduled", "status": "True"},
            ]
        },
    }
    out = strategic_merge_patch(pod, patch)
    containers = out["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a", "c"]
    assert containers[0]["image"] == "a:1"
    assert [p["containerPort"] for p in containers[0]["ports"]] == [80, 443]
    assert containers[0]["env"] == [{"name": "X", "value": "2"}]
    assert out["spec"]["tolerations"] == [{"key": "other"}]  # no merge key: replaced
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "Scheduled", "status": "True"},
    ]
    svc = {"spec": {"ports": [{"port": 80, "name": "http"}]}}
    assert strategic_merge_patch(svc, {"spec": {"ports": [{"port": 80, "targetPort": 8080}]}})[
        "spec"
    ]["ports"] == [{"port": 80, "name": "http", "targetPort": 8080}]
    replaced = strategic_merge_patch(pod, {"spec": {"$patch": "replace", "containers": []}})
    assert replaced["spec"] == {"containers": []}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)


@given(
    st.dictionaries(st.text(max_size=4), json_values, max_size=4),
    st.dictionaries(st.text(max_size=4), json_values, max_size=4),
)
def test_merge_patch_is_idempotent(target: dict[str, Any], patch: dict[str, Any]) -> None:
    once = merge_patch(target, patch)
    assert merge_patch(once, patch) == once


@given(st.dictionaries(st.text(max_size=4), json_values, max_size=4))
def test_json_patch_replace_root_and_leaf_paths_roundtrip(doc: dict[str, Any]) -> None:
    assert json_patch(doc, [{"op": "replace", "path": "", "value": {"x": 1}}]) == {"x": 1}
    for key, value in doc.items():
        pointer = "/" + key.replace("~", "~0").replace("/", "~1")
        assert json_patch(doc, [{"op": "test", "path": pointer, "value": value}]) == doc


def _deploy(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": spec}


def test_apply_ownership_conflicts_and_removal() -> None:
    now = "2024-01-01T00:00:00Z"
    live = fields.apply(None, _deploy(replicas=1, paused=False), manager="a", force=False, now=now)
    live = fields.apply(
        live, _deploy(replicas=1), manager="b", force=False, now=now
    )  # same value: shared
    owners = {
        e["manager"]: fields.from_fields_v1(e["fieldsV1"])
        for e in live["metadata"]["managedFields"]
    }
    assert ("f:spec", "f:replicas") in owners["a"] & owners["b"]
    with pytest.raises(fields.ApplyConflict) as err:
        fields.apply(live, _deploy(replicas=3), manager="b", force=False, now=now)
    assert [c.field for c in err.value.conflicts] == [".spec.replicas"]
    assert [c.manager for c in err.value.conflicts] == ["a"]
    # "a" stops applying replicas, but "b" still owns it: it stays; paused is only "a"'s: removed
    live = fields.apply(live, {**_deploy(), "spec": {}}, manager="a", force=False, now=now)
    assert live["spec"] == {"replicas": 1}


def test_apply_keyed_lists_merge_per_item() -> None:
    now = "t"
    c1 = _deploy(template={"spec": {"containers": [{"name": "main", "image": "m:1"}]}})
    c2 = _deploy(template={"spec": {"containers": [{"name": "sidecar", "image": "s:1"}]}})
    live = fields.apply(None, c1, manager="app", force=False, now=now)
    live = fields.apply(live, c2, manager="injector", force=False, now=now)
    names = [c["name"] for c in live["spec"]["template"]["spec"]["containers"]]
    assert names == ["main", "sidecar"]
    # the injector withdraws its container: only that item goes
    live = fields.apply(live, _deploy(), manager="injector", force=False, now=now)
    assert [c["name"] for c in live["spec"]["template"]["spec"]["containers"]] == ["main"]


def test_track_update_moves_ownership() -> None:
    now = "t"
    live = fields.apply(None, _deploy(replicas=1), manager="a", force=False, now=now)
    edited = copy.deepcopy(live)
    edited["spec"]["replicas"] = 4
    fields.track_update(live, edited, manager="kubectl", now=now)
    owners = {
        (e["manager"], e["operation"]): fields.from_fields_v1(e["fieldsV1"])
        for e in edited["metadata"]["managedFields"]
    }
    assert owners[("kubectl", "Update")] == {("f:spec", "f:replicas")}
    assert ("a", "Apply") not in owners  # its only field was taken over


def test_fields_v1_roundtrip() -> None:
    paths = {("f:spec", "f:replicas"), ("f:spec", "f:containers", 'k:{"name":"a"}', "f:image")}
    assert fields.from_fields_v1(fields.to_fields_v1(paths)) == paths


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["spec"].pop("group"), "spec.group"),
        (lambda c: c["spec"].update(scope="Galaxy"), "spec.scope"),
        (lambda c: c["metadata"].update(name="wrong"), "metadata.name"),
        (lambda c: c["spec"].update(versions=[]), "spec.versions"),
    ],
    ids=["no-group", "bad-scope", "wrong-name", "no-versions"],
)
def test_crd_errors_name_the_field(mutate: Any, message: str) -> None:
    crd = {
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Cluster",
            "names": {"plural": "widgets", "kind": "Widget"},
            "versions": [{"name": "v1"}],
        },
    }
    assert kinds_from_crd(crd)[0].namespaced is False
    mutate(crd)
    with pytest.raises(ValueError, match=message):
        kinds_from_crd(crd)

"""Contract tests: the fake API server as seen through BOTH official clients (sync and asyncio).

Every test runs twice via the parametrised `kube` fixture; it talks HTTP to a fresh server on loopback.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from e2e.fakekube import FakeApiServer, TokenReviewResult, pod_token_user
from tests.fakekube.conftest import Kube

MERGE = "application/merge-patch+json"
JSONPATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"
GW = ("gateway.networking.k8s.io", "v1")


def _status(exc: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def _deployment(name: str, replicas: int = 1, image: str = "app:1") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image}]},
            },
        },
    }


def _gateway(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


async def test_discovery(kube: Kube) -> None:
    core = await kube.core.get_api_resources()
    names = {r.name for r in core.resources}
    assert {"pods", "pods/status", "namespaces", "services", "configmaps"} <= names
    pods = next(r for r in core.resources if r.name == "pods")
    assert pods.namespaced
    assert pods.kind == "Pod"
    assert "watch" in pods.verbs
    groups = await kube.apis.get_api_versions()
    by_name = {g.name: g for g in groups.groups}
    assert by_name["gateway.networking.k8s.io"].preferred_version.version == "v1"
    assert {v.version for v in by_name["gateway.networking.k8s.io"].versions} == {"v1", "v1beta1"}
    version = await kube.version.get_code()
    assert version.major == "1"


async def test_crud_generate_name_and_not_found(kube: Kube) -> None:
    created = await kube.core.create_namespaced_config_map(
        "default", {"metadata": {"generateName": "cfg-"}, "data": {"a": "1"}}
    )
    name = created.metadata.name
    assert name.startswith("cfg-")
    assert len(name) == len("cfg-") + 5
    assert created.metadata.uid
    assert created.metadata.creation_timestamp
    got = await kube.core.read_namespaced_config_map(name, "default")
    assert got.data == {"a": "1"}
    assert got.metadata.resource_version == created.metadata.resource_version
    got.data["b"] = "2"
    replaced = await kube.core.replace_namespaced_config_map(name, "default", got)
    assert int(replaced.metadata.resource_version) > int(created.metadata.resource_version)
    listed = await kube.core.list_namespaced_config_map("default")
    assert [c.metadata.name for c in listed.items] == [name]
    assert int(listed.metadata.resource_version) >= int(replaced.metadata.resource_version)
    await kube.core.delete_namespaced_config_map(name, "default")
    with pytest.raises(kube.ApiException) as err:
        await kube.core.read_namespaced_config_map(name, "default")
    assert err.value.status == 404
    body = _status(err.value)
    assert body["kind"] == "Status"
    assert body["reason"] == "NotFound"
    assert body["details"] == {"name": name, "kind": "configmaps"}


async def test_create_errors(kube: Kube) -> None:
    await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "dup"}})
    with pytest.raises(kube.ApiException) as err:
        await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "dup"}})
    assert err.value.status == 409
    assert _status(err.value)["reason"] == "AlreadyExists"
    with pytest.raises(kube.ApiException) as err:
        await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "Bad_Name"}})
    assert err.value.status == 422
    assert _status(err.value)["reason"] == "Invalid"
    assert _status(err.value)["details"]["causes"][0]["field"] == "metadata.name"
    with pytest.raises(kube.ApiException) as err:
        await kube.core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert err.value.status == 404
    assert _status(err.value)["details"]["kind"] == "namespaces"
    with pytest.raises(kube.ApiException) as err:
        await kube.core.create_namespaced_config_map(
            "default", {"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "y"}}
        )
    assert err.value.status == 400


async def test_stale_update_conflicts(kube: Kube) -> None:
    first = await kube.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "c"}, "data": {"v": "1"}}
    )
    first.data["v"] = "2"
    await kube.core.replace_namespaced_config_map("c", "default", first)
    first.data["v"] = "3"  # still carries the old resourceVersion
    with pytest.raises(kube.ApiException) as err:
        await kube.core.replace_namespaced_config_map("c", "default", first)
    assert err.value.status == 409
    body = _status(err.value)
    assert body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]


async def test_patch_types(kube: Kube) -> None:
    await kube.apps.create_namespaced_deployment("default", _deployment("web"))
    # strategic merge: containers merge by name, env by name
    patched = await kube.apps.patch_namespaced_deployment(
        "web",
        "default",
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "side", "image": "side:1"},
                            {"name": "main", "env": [{"name": "A", "value": "1"}]},
                        ]
                    }
                }
            }
        },
        _content_type=STRATEGIC,
    )
    containers = {c.name: c for c in patched.spec.template.spec.containers}
    assert containers["main"].image == "app:1"
    assert containers["main"].env[0].name == "A"
    assert containers["side"].image == "side:1"
    # merge patch: lists are replaced, null deletes
    patched = await kube.apps.patch_namespaced_deployment(
        "web", "default", {"metadata": {"labels": {"app": None, "tier": "fe"}}}, _content_type=MERGE
    )
    assert patched.metadata.labels == {"tier": "fe"}
    # JSON patch
    patched = await kube.apps.patch_namespaced_deployment(
        "web",
        "default",
        [
            {"op": "replace", "path": "/spec/replicas", "value": 4},
            {"op": "add", "path": "/metadata/annotations", "value": {"x": "y"}},
        ],
        _content_type=JSONPATCH,
    )
    assert patched.spec.replicas == 4
    assert patched.metadata.annotations == {"x": "y"}
    assert patched.metadata.generation == 3  # two spec changes; the label patch did not bump it
    # a failed JSON patch test op changes nothing
    with pytest.raises(kube.ApiException) as err:
        await kube.apps.patch_namespaced_deployment(
            "web",
            "default",
            [{"op": "test", "path": "/spec/replicas", "value": 9}],
            _content_type=JSONPATCH,
        )
    assert err.value.status == 422
    # custom objects through merge patch
    gw = _gateway("wp")
    await kube.custom.create_namespaced_custom_object(*GW, "default", "gateways", gw)
    out = await kube.custom.patch_namespaced_custom_object(
        *GW, "default", "gateways", "wp", {"metadata": {"labels": {"l": "v"}}}, _content_type=MERGE
    )
    with pytest.raises(kube.ApiException) as err:
        await kube.custom.patch_namespaced_custom_object(
            *GW, "default", "gateways", "wp", {"spec": {}}, _content_type=STRATEGIC
        )
    assert err.value.status == 415
    assert out["metadata"]["labels"] == {"l": "v"}
    assert out["spec"]["gatewayClassName"] == "istio-waypoint"


async def test_server_side_apply_two_managers(kube: Kube) -> None:
    body = _deployment("ssa", replicas=2)
    applied = await kube.apps.patch_namespaced_deployment(
        "ssa", "default", body, field_manager="ctrl", _content_type=APPLY
    )
    assert applied.spec.replicas == 2
    managers = {(m.manager, m.operation) for m in applied.metadata.managed_fields}
    assert managers == {("ctrl", "Apply")}
    # a second manager owning a different field: no conflict, both recorded
    hpa_like: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ssa", "annotations": {"scaled": "yes"}},
    }
    both = await kube.apps.patch_namespaced_deployment(
        "ssa", "default", hpa_like, field_manager="hpa", _content_type=APPLY
    )
    assert {m.manager for m in both.metadata.managed_fields} == {"ctrl", "hpa"}
    assert both.spec.replicas == 2
    assert both.metadata.annotations == {"scaled": "yes"}
    # the second manager wants replicas too: conflict...
    hpa_like["spec"] = {"replicas": 5}
    with pytest.raises(kube.ApiException) as err:
        await kube.apps.patch_namespaced_deployment(
            "ssa", "default", hpa_like, field_manager="hpa", _content_type=APPLY
        )
    assert err.value.status == 409
    status = _status(err.value)
    assert status["reason"] == "Conflict"
    assert status["details"]["causes"][0]["field"] == ".spec.replicas"
    assert '"ctrl"' in status["message"]
    # ... unless forced, which moves ownership
    forced = await kube.apps.patch_namespaced_deployment(
        "ssa", "default", hpa_like, field_manager="hpa", force=True, _content_type=APPLY
    )
    assert forced.spec.replicas == 5
    owners = {m.manager: m.fields_v1 for m in forced.metadata.managed_fields}
    assert "f:replicas" in owners["hpa"]["f:spec"]
    assert "f:replicas" not in owners["ctrl"]["f:spec"]
    # re-applying without a field removes it (the manager no longer wants the annotation)
    del hpa_like["metadata"]["annotations"]
    after = await kube.apps.patch_namespaced_deployment(
        "ssa", "default", hpa_like, field_manager="hpa", _content_type=APPLY
    )
    assert not after.metadata.annotations
    # an identical re-apply is a no-op: same resourceVersion
    again = await kube.apps.patch_namespaced_deployment(
        "ssa", "default", hpa_like, field_manager="hpa", _content_type=APPLY
    )
    assert again.metadata.resource_version == after.metadata.resource_version
    # apply without fieldManager is refused
    with pytest.raises(kube.ApiException) as err:
        await kube.apps.patch_namespaced_deployment("ssa", "default", hpa_like, _content_type=APPLY)
    assert err.value.status == 400


async def test_apply_creates_custom_object(kube: Kube) -> None:
    await kube.custom.patch_namespaced_custom_object(
        *GW,
        "default",
        "gateways",
        "created",
        _gateway("created"),
        field_manager="waypoint",
        _content_type=APPLY,
    )
    # Like a real server, an apply that creates answers 201; the sync CustomObjectsApi maps only 200 and
    # returns None then, so read the object back.
    out = await kube.custom.get_namespaced_custom_object(*GW, "default", "gateways", "created")
    assert out["metadata"]["uid"]
    assert out["metadata"]["managedFields"][0]["manager"] == "waypoint"


async def test_status_subresource(kube: Kube) -> None:
    created = await kube.apps.create_namespaced_deployment(
        "default", {**_deployment("st"), "status": {"replicas": 9}}
    )
    assert created.status is None or not created.status.replicas  # status is dropped on create
    live = await kube.apps.read_namespaced_deployment("st", "default")
    live.status = {"readyReplicas": 1, "replicas": 1}
    after_status = await kube.apps.replace_namespaced_deployment_status("st", "default", live)
    assert after_status.status.ready_replicas == 1
    assert after_status.metadata.generation == 1  # status never bumps generation
    # the main endpoint ignores status changes
    after_status.status.ready_replicas = 7
    after_status.spec.replicas = 3
    main = await kube.apps.replace_namespaced_deployment("st", "default", after_status)
    assert main.status.ready_replicas == 1
    assert main.spec.replicas == 3
    assert main.metadata.generation == 2
    # /status ignores spec changes
    patched = await kube.apps.patch_namespaced_deployment_status(
        "st",
        "default",
        {"spec": {"replicas": 8}, "status": {"observedGeneration": 2}},
        _content_type=MERGE,
    )
    assert patched.spec.replicas == 3
    assert patched.status.observed_generation == 2
    # custom resource status through SSA on /status
    await kube.custom.create_namespaced_custom_object(*GW, "default", "gateways", _gateway("g"))
    status_body = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "g"},
        "status": {
            "conditions": [
                {
                    "type": "Programmed",
                    "status": "True",
                    "reason": "Programmed",
                    "message": "",
                    "lastTransitionTime": "2024-01-01T00:00:00Z",
                }
            ]
        },
    }
    out = await kube.custom.patch_namespaced_custom_object_status(
        *GW,
        "default",
        "gateways",
        "g",
        status_body,
        field_manager="waypoint-status",
        _content_type=APPLY,
    )
    assert out["status"]["conditions"][0]["type"] == "Programmed"
    assert out["metadata"]["generation"] == 1


async def test_selectors(kube: Kube) -> None:
    for name, labels, node in (
        ("a", {"app": "web", "tier": "fe"}, "n1"),
        ("b", {"app": "web", "tier": "be"}, "n2"),
        ("c", {"app": "db"}, "n1"),
    ):
        await kube.core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
            },
        )

    async def names(**kwargs: Any) -> list[str]:
        listed = await kube.core.list_namespaced_pod("default", **kwargs)
        return sorted(p.metadata.name for p in listed.items)

    assert await names(label_selector="app=web") == ["a", "b"]
    assert await names(label_selector="app==web,tier!=fe") == ["b"]
    assert await names(label_selector="tier in (fe, be)") == ["a", "b"]
    assert await names(label_selector="app notin (web)") == ["c"]
    assert await names(label_selector="tier") == ["a", "b"]
    assert await names(label_selector="!tier") == ["c"]
    assert await names(field_selector="spec.nodeName=n1") == ["a", "c"]
    assert await names(field_selector="metadata.name!=a,status.phase=Pending") == ["b", "c"]
    everywhere = await kube.core.list_pod_for_all_namespaces(
        field_selector="metadata.namespace=default"
    )
    assert len(everywhere.items) == 3
    with pytest.raises(kube.ApiException) as err:
        await names(field_selector="spec.bogus=x")
    assert err.value.status == 400
    assert "field label not supported" in _status(err.value)["message"]
    with pytest.raises(kube.ApiException) as err:
        await names(label_selector="app in (")
    assert err.value.status == 400


async def test_pagination_and_expired_continue(kube: Kube) -> None:
    for i in range(5):
        await kube.core.create_namespaced_config_map("default", {"metadata": {"name": f"p{i}"}})
    first = await kube.core.list_namespaced_config_map("default", limit=2)
    assert [c.metadata.name for c in first.items] == ["p0", "p1"]
    assert first.metadata._continue
    second = await kube.core.list_namespaced_config_map(
        "default", limit=2, _continue=first.metadata._continue
    )
    assert [c.metadata.name for c in second.items] == ["p2", "p3"]
    await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "later"}})
    kube.server.compact_history()
    with pytest.raises(kube.ApiException) as err:
        await kube.core.list_namespaced_config_map(
            "default", limit=2, _continue=second.metadata._continue
        )
    assert err.value.status == 410
    assert _status(err.value)["reason"] == "Expired"


async def test_watch_initial_state_and_resume(kube: Kube) -> None:
    a = await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "a"}})
    # list-then-watch without a resourceVersion: synthetic ADDED for what exists
    initial = await kube.watch(
        "core", "list_namespaced_config_map", "default", timeout_seconds=1, max_events=1
    )
    assert [(e["type"], e["object"].metadata.name) for e in initial] == [("ADDED", "a")]
    a.data = {"k": "v"}
    await kube.core.replace_namespaced_config_map("a", "default", a)
    await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "b"}})
    await kube.core.delete_namespaced_config_map("a", "default")
    # resume after the create: exactly the later events, in order
    events = await kube.watch(
        "core",
        "list_namespaced_config_map",
        "default",
        resource_version=a.metadata.resource_version,
        timeout_seconds=1,
        max_events=3,
    )
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "a"),
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]
    rvs = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in events]
    assert rvs == sorted(rvs)
    assert rvs[0] > int(a.metadata.resource_version)


async def test_watch_live_events_and_label_transitions(kube: Kube, server: FakeApiServer) -> None:
    listed = await kube.core.list_namespaced_config_map("default")
    rv = listed.metadata.resource_version

    async def writer() -> None:
        await asyncio.sleep(0.2)
        await kube.core.create_namespaced_config_map(
            "default", {"metadata": {"name": "x", "labels": {"sel": "yes"}}}
        )
        await kube.core.patch_namespaced_config_map(
            "x", "default", {"metadata": {"labels": {"sel": "no"}}}, _content_type=MERGE
        )
        server.put_object(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "y", "namespace": "default", "labels": {"sel": "yes"}},
            }
        )

    task = asyncio.create_task(writer())
    events = await kube.watch(
        "core",
        "list_namespaced_config_map",
        "default",
        resource_version=rv,
        label_selector="sel=yes",
        timeout_seconds=3,
        max_events=3,
    )
    await task
    assert [(e["type"], e["raw_object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "x"),
        ("DELETED", "x"),  # stopped matching the selector
        ("ADDED", "y"),  # written directly into the store, as a kubelet would
    ]


async def test_watch_bookmarks(kube: Kube) -> None:
    listed = await kube.core.list_namespaced_config_map("default")
    events = await kube.watch(
        "core",
        "list_namespaced_config_map",
        "default",
        resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=2,
        max_events=1,
    )
    assert events[0]["type"] == "BOOKMARK"
    assert (
        events[0]["raw_object"]["metadata"]["resourceVersion"] == listed.metadata.resource_version
    )


async def test_watch_gone_after_compaction(kube: Kube) -> None:
    old = await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "old"}})
    await kube.core.create_namespaced_config_map("default", {"metadata": {"name": "new"}})
    kube.server.compact_history()
    # With timeout_seconds both clients give up instead of retrying, and surface the 410.
    with pytest.raises(kube.ApiException) as err:
        await kube.watch(
            "core",
            "list_namespaced_config_map",
            "default",
            resource_version=old.metadata.resource_version,
            timeout_seconds=1,
        )
    assert err.value.status == 410
    # a fresh list-then-watch works again
    listed = await kube.core.list_namespaced_config_map("default")
    events = await kube.watch(
        "core",
        "list_namespaced_config_map",
        "default",
        resource_version=listed.metadata.resource_version,
        allow_watch_bookmarks=True,
        timeout_seconds=1,
        max_events=1,
    )
    assert events
    assert events[0]["type"] == "BOOKMARK"


async def _owned_chain(kube: Kube) -> tuple[Any, Any, Any]:
    dep = await kube.apps.create_namespaced_deployment("default", _deployment("own"))
    rs_body = {
        "metadata": {
            "name": "own-1",
            "labels": {"app": "own"},
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": "own",
                    "uid": dep.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "selector": {"matchLabels": {"app": "own"}},
            "template": {
                "metadata": {"labels": {"app": "own"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]},
            },
        },
    }
    rs = await kube.apps.create_namespaced_replica_set("default", rs_body)
    pod = await kube.core.create_namespaced_pod(
        "default",
        {
            "metadata": {
                "name": "own-1-abcde",
                "labels": {"app": "own"},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": "own-1",
                        "uid": rs.metadata.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": {"containers": [{"name": "c", "image": "i"}]},
        },
    )
    return dep, rs, pod


@pytest.mark.parametrize("policy", ["Background", "Foreground"])
async def test_cascade_delete(kube: Kube, policy: str) -> None:
    await _owned_chain(kube)
    body = kube.lib.client.V1DeleteOptions(propagation_policy=policy)
    await kube.apps.delete_namespaced_deployment("own", "default", body=body)
    srv = kube.server
    assert srv.get_object("apps/v1", "Deployment", "own", "default") is None
    assert srv.get_object("apps/v1", "ReplicaSet", "own-1", "default") is None
    assert srv.get_object("v1", "Pod", "own-1-abcde", "default") is None


async def test_foreground_waits_for_blocking_dependents(kube: Kube) -> None:
    await _owned_chain(kube)
    await kube.apps.patch_namespaced_replica_set(
        "own-1", "default", {"metadata": {"finalizers": ["example.com/hold"]}}, _content_type=MERGE
    )
    await kube.apps.delete_namespaced_deployment("own", "default", propagation_policy="Foreground")
    dep = kube.server.get_object("apps/v1", "Deployment", "own", "default")
    assert dep is not None
    assert dep["metadata"]["deletionTimestamp"]
    assert "foregroundDeletion" in dep["metadata"]["finalizers"]
    await kube.apps.patch_namespaced_replica_set(
        "own-1",
        "default",
        [{"op": "remove", "path": "/metadata/finalizers"}],
        _content_type=JSONPATCH,
    )
    assert kube.server.get_object("apps/v1", "ReplicaSet", "own-1", "default") is None
    assert kube.server.get_object("apps/v1", "Deployment", "own", "default") is None


async def test_orphan_delete(kube: Kube) -> None:
    await _owned_chain(kube)
    await kube.apps.delete_namespaced_deployment("own", "default", propagation_policy="Orphan")
    assert kube.server.get_object("apps/v1", "Deployment", "own", "default") is None
    rs = await kube.apps.read_namespaced_replica_set("own-1", "default")
    assert not rs.metadata.owner_references
    assert kube.server.get_object("v1", "Pod", "own-1-abcde", "default") is not None


async def test_finalizers(kube: Kube) -> None:
    await kube.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "fin", "finalizers": ["example.com/keep"]}}
    )
    await kube.core.delete_namespaced_config_map("fin", "default")
    held = await kube.core.read_namespaced_config_map("fin", "default")
    assert held.metadata.deletion_timestamp is not None
    rv = held.metadata.resource_version
    await kube.core.patch_namespaced_config_map(
        "fin", "default", {"metadata": {"finalizers": None}}, _content_type=MERGE
    )
    with pytest.raises(kube.ApiException) as err:
        await kube.core.read_namespaced_config_map("fin", "default")
    assert err.value.status == 404
    events = await kube.watch(
        "core",
        "list_namespaced_config_map",
        "default",
        resource_version=rv,
        timeout_seconds=1,
        max_events=1,
    )
    assert events[0]["type"] == "DELETED"


async def test_namespace_deletion_cascades(kube: Kube) -> None:
    await kube.core.create_namespace({"metadata": {"name": "tmp"}})
    await kube.core.create_namespaced_config_map("tmp", {"metadata": {"name": "inside"}})
    sa = await kube.core.read_namespaced_service_account("default", "tmp")
    assert sa.metadata.name == "default"
    await kube.core.delete_namespace("tmp")
    with pytest.raises(kube.ApiException) as err:
        await kube.core.read_namespace("tmp")
    assert err.value.status == 404
    assert kube.server.get_object("v1", "ConfigMap", "inside", "tmp") is None


async def test_delete_collection(kube: Kube) -> None:
    for name, app in (("d1", "a"), ("d2", "a"), ("d3", "b")):
        await kube.core.create_namespaced_config_map(
            "default", {"metadata": {"name": name, "labels": {"app": app}}}
        )
    await kube.core.delete_collection_namespaced_config_map("default", label_selector="app=a")
    remaining = await kube.core.list_namespaced_config_map("default")
    assert [c.metadata.name for c in remaining.items] == ["d3"]


async def test_token_review_hook(kube: Kube) -> None:
    def reviewer(token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
        if token != "good":
            return TokenReviewResult(authenticated=False, error="bad")
        return pod_token_user(
            namespace="default",
            service_account="sa",
            pod_name="p",
            pod_uid="u-1",
            node_name="node-1",
            audiences=audiences,
        )

    kube.server.set_token_reviewer(reviewer)
    review = await kube.auth.create_token_review(
        {"spec": {"token": "good", "audiences": ["istio-ca"]}}
    )
    assert review.status.authenticated
    assert review.status.user.username == "system:serviceaccount:default:sa"
    assert review.status.user.extra["authentication.kubernetes.io/node-name"] == ["node-1"]
    assert review.status.audiences == ["istio-ca"]
    denied = await kube.auth.create_token_review({"spec": {"token": "bad"}})
    assert not denied.status.authenticated
    assert denied.status.error == "bad"


async def test_crd_registration(kube: Kube) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {
                "plural": "widgets",
                "singular": "widget",
                "kind": "Widget",
                "listKind": "WidgetList",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object"}},
                }
            ],
        },
    }
    created = await kube.ext.create_custom_resource_definition(crd)
    assert any(c.type == "Established" and c.status == "True" for c in created.status.conditions)
    discovered = {g.name for g in (await kube.apis.get_api_versions()).groups}
    assert "example.com" in discovered
    await kube.custom.create_namespaced_custom_object(
        "example.com",
        "v1",
        "default",
        "widgets",
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 1},
        },
    )
    listed = await kube.custom.list_namespaced_custom_object(
        "example.com", "v1", "default", "widgets"
    )
    assert listed["kind"] == "WidgetList"
    assert [w["metadata"]["name"] for w in listed["items"]] == ["w"]
    await kube.ext.delete_custom_resource_definition("widgets.example.com")
    with pytest.raises(kube.ApiException) as err:
        await kube.custom.list_namespaced_custom_object("example.com", "v1", "default", "widgets")
    assert err.value.status == 404

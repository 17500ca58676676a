"""Wire-level checks with a plain HTTP client: paths and behaviours the generated clients rarely use."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from e2e.fakekube import FakeApiServer, ResourceKind


@pytest.fixture
async def http(server: FakeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        base_url=server.url, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        yield session


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.read())


async def _lines(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    out = []
    async for raw in resp.content:
        if raw.strip():
            out.append(json.loads(raw))
    return out


async def test_legacy_watch_path_and_send_initial_events(http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        "/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "one"}}
    )
    assert resp.status == 201
    async with http.get(
        "/api/v1/watch/namespaces/default/configmaps/one", params={"timeoutSeconds": "1"}
    ) as watch:
        assert watch.headers["Content-Type"].startswith("application/json")
        events = await _lines(watch)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "one")]
    async with http.get(
        "/api/v1/namespaces/default/configmaps",
        params={
            "watch": "1",
            "sendInitialEvents": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "1",
            "resourceVersionMatch": "NotOlderThan",
        },
    ) as watch:
        events = await _lines(watch)
    assert events[0]["type"] == "ADDED"
    assert events[1]["type"] == "BOOKMARK"
    assert events[1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_watch_error_event_when_history_is_exceeded() -> None:
    async with (
        FakeApiServer(history_limit=3) as small,
        aiohttp.ClientSession(base_url=small.url) as session,
    ):
        first = await _json(
            await session.post(
                "/api/v1/namespaces/default/configmaps", json={"metadata": {"name": "c0"}}
            )
        )
        for i in range(1, 6):
            await session.post(
                "/api/v1/namespaces/default/configmaps", json={"metadata": {"name": f"c{i}"}}
            )
        async with session.get(
            "/api/v1/namespaces/default/configmaps",
            params={
                "watch": "true",
                "resourceVersion": first["metadata"]["resourceVersion"],
                "timeoutSeconds": "1",
            },
        ) as watch:
            assert watch.status == 200
            events = await _lines(watch)
    assert len(events) == 1
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    assert "too old resource version" in status["message"]


async def test_method_and_path_errors_are_status_objects(http: aiohttp.ClientSession) -> None:
    resp = await http.get("/apis/nope.example.com/v1/things")
    assert resp.status == 404
    assert (await _json(resp))["kind"] == "Status"
    resp = await http.post("/api/v1/pods", json={"metadata": {"name": "x"}})
    assert resp.status == 405
    assert (await _json(resp))["reason"] == "MethodNotAllowed"
    resp = await http.patch(
        "/api/v1/namespaces/default/configmaps/absent",
        data=b"{}",
        headers={"Content-Type": "text/plain"},
    )
    assert resp.status == 415
    resp = await http.post(
        "/apis/authentication.k8s.io/v1/tokenreviews", json={"spec": {"token": "t"}}
    )
    assert resp.status == 200
    assert (await _json(resp))["status"]["authenticated"] is False
    resp = await http.get("/apis/authentication.k8s.io/v1/tokenreviews")
    assert resp.status == 405


async def test_dry_run_persists_nothing(http: aiohttp.ClientSession, server: FakeApiServer) -> None:
    before = server.store.resource_version
    resp = await http.post(
        "/api/v1/namespaces/default/configmaps",
        params={"dryRun": "All"},
        json={"metadata": {"name": "dry"}},
    )
    assert resp.status == 201
    assert server.get_object("v1", "ConfigMap", "dry", "default") is None
    assert server.store.resource_version == before


async def test_register_kind_from_python(
    http: aiohttp.ClientSession, server: FakeApiServer
) -> None:
    server.register_kind(
        ResourceKind(
            group="networking.istio.io",
            version="v1",
            plural="serviceentries",
            kind="ServiceEntry",
            namespaced=True,
        )
    )
    listing = await _json(await http.get("/apis/networking.istio.io/v1"))
    assert {r["name"] for r in listing["resources"]} == {"serviceentries", "serviceentries/status"}
    resp = await http.post(
        "/apis/networking.istio.io/v1/namespaces/default/serviceentries",
        json={
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "se"},
            "spec": {"hosts": ["a.example"]},
        },
    )
    assert resp.status == 201
    group = await _json(await http.get("/apis/networking.istio.io"))
    assert group["preferredVersion"]["version"] == "v1"


async def test_put_object_bumps_generation_only_for_spec(server: FakeApiServer) -> None:
    created = server.put_object(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "d", "namespace": "default"},
            "spec": {"replicas": 1},
        }
    )
    assert created["metadata"]["generation"] == 1
    created["status"] = {"readyReplicas": 1}
    status_only = server.put_object(created)
    assert status_only["metadata"]["generation"] == 1
    status_only["spec"]["replicas"] = 2
    assert server.put_object(status_only)["metadata"]["generation"] == 2


async def test_service_gets_cluster_ip(http: aiohttp.ClientSession) -> None:
    resp = await http.post(
        "/api/v1/namespaces/default/services",
        json={"metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}},
    )
    svc = await _json(resp)
    assert svc["spec"]["clusterIP"].startswith("10.96.")
    assert svc["spec"]["ports"][0]["targetPort"] == 80
    assert svc["spec"]["type"] == "ClusterIP"

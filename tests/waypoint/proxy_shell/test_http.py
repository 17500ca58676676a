"""HTTP/1.1 through a real waypoint over HBONE: routing, authorization, retries, LB, telemetry."""

from __future__ import annotations

import aiohttp
import pytest

from tests.waypoint.proxy_shell.harness import ECHO_VIP, Mesh, start_mesh

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def mesh():
    m = await start_mesh()
    try:
        yield m
    finally:
        await m.close()


async def _session(mesh: Mesh, limit: int = 1) -> tuple[aiohttp.ClientSession, str]:
    port = await mesh.forwarder(ECHO_VIP, 80)
    connector = aiohttp.TCPConnector(limit=limit, force_close=False)
    return aiohttp.ClientSession(connector=connector), f"http://127.0.0.1:{port}"


async def test_default_backend_round_trip(mesh: Mesh) -> None:
    session, base = await _session(mesh)
    async with session, session.get(base + "/hello?x=1", headers={"host": "echo"}) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["path"] == "/hello?x=1"
    assert data["pod"] in ("pod-1", "pod-2")
    assert data["headers"]["traceparent"].startswith("00-")
    assert mesh.requests_total(response_code="200", reporter="waypoint") == 1
    assert len(mesh.access_lines) == 1


SPLIT = """
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: split, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{headers: [{name: x-version, value: v2}]}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /}}]
      backendRefs:
      - {name: echo-v1, port: 80, weight: 80}
      - {name: echo-v2, port: 80, weight: 20}
"""


async def _get_many(session: aiohttp.ClientSession, url: str, n: int, **kw) -> list[dict]:
    out = []
    for _ in range(n):
        async with session.get(url, **kw) as resp:
            assert resp.status == 200, await resp.text()
            out.append(await resp.json())
    return out


async def test_weighted_split_80_20_over_1000_requests(mesh: Mesh) -> None:
    mesh.set_routes(SPLIT)
    session, base = await _session(mesh, limit=8)
    async with session:
        import asyncio

        batches = await asyncio.gather(*(_get_many(session, base + "/s", 125) for _ in range(8)))
    pods = [d["pod"] for batch in batches for d in batch]
    assert len(pods) == 1000
    share_v1 = pods.count("pod-1") / 10
    assert 75 <= share_v1 <= 85, share_v1
    assert mesh.requests_total(reporter="waypoint", response_code="200") == 1000
    assert mesh.telemetry.total("istio_request_duration_milliseconds_count") == 1000


async def test_header_match_routes_to_v2(mesh: Mesh) -> None:
    mesh.set_routes(SPLIT)
    session, base = await _session(mesh)
    async with session:
        got = await _get_many(session, base + "/h", 20, headers={"x-version": "v2"})
    assert {d["pod"] for d in got} == {"pod-2"}


DENY = """
authorizationPolicies:
- apiVersion: security.istio.io/v1
  kind: AuthorizationPolicy
  metadata: {name: no-admin, namespace: default}
  spec:
    targetRefs: [{kind: Service, group: "", name: echo}]
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
"""


async def test_l7_deny_on_path(mesh: Mesh) -> None:
    mesh.set_routes(DENY)
    session, base = await _session(mesh)
    async with session:
        async with session.get(base + "/admin/users") as resp:
            assert resp.status == 403
            assert "RBAC: access denied" in await resp.text()
        # Encoded and dotted variants normalise to the same path (or are rejected outright).
        async with session.get(base + "/public/../admin/users") as resp:
            assert resp.status == 403
        async with session.get(base + "/ok") as resp:
            assert resp.status == 200
    assert mesh.requests_total(response_code="403", response_flags="RBAC") == 2
    assert all(
        not p.requests or all("/admin" not in r["path"] for r in p.requests)
        for p in mesh.pods.values()
    )


RETRY = """
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: retry, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - backendRefs: [{name: echo, port: 80}]
      retry: {attempts: 2, codes: [503], backoff: 10ms}
"""


async def test_retry_turns_first_503_into_200(mesh: Mesh) -> None:
    mesh.set_routes(RETRY)
    mesh.shared["fail"] = 1  # whichever pod is tried first answers 503
    session, base = await _session(mesh)
    async with session, session.post(base + "/r", data=b"payload" * 100) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["body"] == 700
    assert sum(len(p.requests) for p in mesh.pods.values()) == 2
    assert mesh.requests_total(response_code="200") == 1
    assert "attempts=2" in mesh.access_lines[-1]


async def test_no_retry_without_policy_returns_503(mesh: Mesh) -> None:
    mesh.shared["fail"] = 1
    session, base = await _session(mesh)
    async with session, session.get(base + "/r") as resp:
        assert resp.status == 503


async def test_keepalive_connection_spread_over_both_endpoints(mesh: Mesh) -> None:
    session, base = await _session(mesh, limit=1)
    async with session:
        got = await _get_many(session, base + "/k", 40)
    pods = [d["pod"] for d in got]
    assert pods.count("pod-1") >= 8, pods
    assert pods.count("pod-2") >= 8, pods
    # One downstream HBONE connection and one tunnel carried all of them.
    assert mesh.waypoint.connections_accepted == 1
    assert mesh.requests_total() == 40


async def test_filters_and_redirect(mesh: Mesh) -> None:
    mesh.set_routes("""
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: f, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
      - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-added, value: "yes"}]}}
      - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-resp, value: r}]}}
      - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
      backendRefs: [{name: echo-v1, port: 80}]
""")
    session, base = await _session(mesh)
    async with session:
        async with session.get(base + "/old/x", allow_redirects=False) as resp:
            assert resp.status == 301
            assert resp.headers["location"].endswith("/new")
        async with session.get(base + "/api/items?q=1") as resp:
            assert resp.status == 200
            assert resp.headers["x-resp"] == "r"
            data = await resp.json()
    assert data["path"] == "/v2/items?q=1"
    assert data["headers"]["x-added"] == "yes"
    assert data["pod"] == "pod-1"


async def test_request_timeout_gives_504(mesh: Mesh) -> None:
    mesh.set_routes("""
httpRoutes:
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: t, namespace: default}
  spec:
    parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
    rules:
    - backendRefs: [{name: echo, port: 80}]
      timeouts: {request: 200ms}
""")
    # Make every endpoint unreachable in a slow way: pause the pods' HBONE accept.
    for pod in mesh.pods.values():
        pod.hbone._on_connect = _slow
    session, base = await _session(mesh)
    async with session, session.get(base + "/slow") as resp:
        assert resp.status == 504
    assert mesh.requests_total(response_code="504", response_flags="UT") == 1


async def _slow(request):
    import asyncio

    await asyncio.sleep(5)
    raise AssertionError("not reached")


async def test_non_http_is_passed_through_as_tcp(mesh: Mesh) -> None:
    stream = await mesh.client_pool.connect(mesh.client_key(), f"{ECHO_VIP}:80")
    stream.write(b"\x16\x03\x01 not http\r\n\r\n")
    # Read the answer before half-closing: an HTTP server may drop a request whose EOF arrives
    # with it, and this test is about the bytes crossing unchanged, not about that race.
    received = b""
    while chunk := await stream.read():
        received += chunk
    stream.write_eof()
    # The pod's HTTP server saw our raw bytes unchanged and answered them itself.
    assert received.startswith(b"HTTP/1.")
    assert b" 400 " in received.split(b"\r\n", 1)[0]
    assert mesh.requests_total() == 0


async def test_unknown_authority_is_rejected(mesh: Mesh) -> None:
    from ztunnel.proxy.pool import HboneStatusError

    with pytest.raises(HboneStatusError) as info:
        await mesh.client_pool.connect(mesh.client_key(), "10.99.99.99:80")
    assert info.value.status == 503


async def test_drain_finishes_in_flight_request(mesh: Mesh) -> None:
    import asyncio

    session, base = await _session(mesh)
    async with session:
        async with session.get(base + "/before") as resp:
            assert resp.status == 200
        mesh.proxy.start_drain()
        async with session.get(base + "/during") as resp:
            assert resp.status == 200
            assert resp.headers.get("connection", "").lower() == "close"
        await asyncio.wait_for(mesh.waypoint.drain(5.0), 10)

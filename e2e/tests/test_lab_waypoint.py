"""Waypoints in the lab, end to end: real namespaces, rules, ztunnels and a `waypoint proxy` pod.

The default spec binds ``reviews``, ``ratings`` and ``flaky`` (namespace ``demo``) to the waypoint
``waypoint`` (pod ``waypoint-1`` on n1). Clients are unmodified: curl, Python's ``http.client`` on a
socket inside the client pod, and grpcio. One lab serves the whole module (one ``up``).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from e2e.demo import curl, get_many, get_parallel, metric_sum, who
from e2e.lab.cluster import Lab

pytestmark = pytest.mark.timeout(120)

SPLIT_REQUESTS = 1000


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up()
    try:
        for pod in ("reviews-v1", "reviews-v2"):
            lab.start_app(pod, "http", 8080)
            lab.start_app(pod, "grpc", 9090)
        for pod in ("ratings-1", "ratings-2"):
            lab.start_app(pod, "http", 8080)
        yield lab
    finally:
        assert lab.down() == []


def vip(lab: Lab, service: str) -> str:
    return str(lab.spec.service(service).vip)


def requests_total(lab: Lab, **labels: str) -> float:
    return metric_sum(lab.waypoint_metrics("waypoint"), "istio_requests_total", **labels)


def test_waypoint_is_ready_and_bound(lab: Lab) -> None:
    status = lab.status()
    (wp,) = status["waypoints"]
    assert wp["identity"] == "spiffe://cluster.local/ns/demo/sa/waypoint"
    assert [r["ready"] for r in wp["replicas"]] == [True]
    assert {s["name"]: s["waypoint"] for s in status["services"]}["reviews"] == "waypoint"
    # Not captured (dataplane-mode none): no in-pod rules, and ztunnel does not serve it.
    pod = next(p for p in status["pods"] if p["name"] == "waypoint-1")
    assert pod["captured"] is False
    assert pod["identity"] == wp["identity"]


def test_weighted_split_80_20_over_1000_requests(lab: Lab) -> None:
    results = get_parallel(lab, "client", vip(lab, "reviews"), SPLIT_REQUESTS, connections=8)
    assert all(status == 200 for status, _ in results), Counter(s for s, _ in results)
    counts = Counter(who(body) for _, body in results)
    share_v1 = counts["reviews-v1"] / SPLIT_REQUESTS
    assert set(counts) == {"reviews-v1", "reviews-v2"}
    assert 0.75 <= share_v1 <= 0.85, counts
    # The backends saw the waypoint, not the client: the request really went through it.
    assert f"you are {lab.ip('waypoint-1')}:" in results[0][1]


def test_header_match_routes_to_the_right_version(lab: Lab) -> None:
    for version in ("v2", "v2", "v2", "v2", "v2"):
        call = curl(lab, "client", f"http://{vip(lab, 'reviews')}/", headers={"x-version": version})
        assert call.status == "200", call
        assert who(call.body) == f"reviews-{version}"


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/admin", "403"), ("/admin/users", "403"), ("//admin/./users", "403"), ("/products", "200"),
     ("/administrator", "200")],
    ids=["exact", "prefix", "unnormalised", "other-path", "similar-path"],
)  # fmt: skip
def test_l7_deny_on_a_path(lab: Lab, path: str, expected: str) -> None:
    call = curl(lab, "client", f"http://{vip(lab, 'reviews')}{path}", path_as_is=True)
    assert call.status == expected, call
    if expected == "403":
        assert "hello from" not in call.body


def test_grpc_unary_and_streaming_through_the_waypoint(lab: Lab) -> None:
    before = requests_total(lab, request_protocol="grpc", grpc_response_status="0")
    proc = lab.exec(
        "client",
        [lab.python, "-m", "e2e.lab.apps", "grpc-client", "--target", f"{vip(lab, 'reviews')}:9090",
         "--calls", "20", "--messages", "5"],
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["errors"] == []
    # One HTTP/2 connection from the client; the waypoint balances each call.
    assert set(result["unary"]) == {"reviews-v1", "reviews-v2"}
    chat = result["chat"]
    assert [r.partition(":")[2] for r in chat] == [f"m{i}" for i in range(5)]
    assert len({r.partition(":")[0] for r in chat}) == 1  # one stream stays on one pod
    wait_for(lambda: requests_total(lab, request_protocol="grpc", grpc_response_status="0"),
             before + 21)  # fmt: skip


def test_retry_turns_first_attempt_503_into_200(lab: Lab) -> None:
    app = lab.start_app("flaky", "http", 8080, args=["--fail-first", "1"])
    try:
        call = curl(lab, "client", f"http://{vip(lab, 'flaky')}/")
        assert call.status == "200", call
        assert "request 2" in call.body  # the app failed request 1: the waypoint retried
        assert requests_total(lab, destination_service_name="flaky", response_code="503") == 0
    finally:
        app.terminate()
        app.wait(timeout=5)


def test_request_metrics_match_requests_sent(lab: Lab) -> None:
    labels = {"destination_service_name": "ratings", "reporter": "waypoint"}
    before = requests_total(lab, **labels)
    before_ok = requests_total(lab, response_code="200", **labels)
    sent = 37
    results = get_many(lab, "client", vip(lab, "ratings"), sent)
    assert [s for s, _ in results] == [200] * sent
    wait_for(lambda: requests_total(lab, **labels), before + sent)
    assert requests_total(lab, response_code="200", **labels) == before_ok + sent


def test_one_keepalive_connection_is_spread_over_both_pods(lab: Lab) -> None:
    results = get_many(lab, "client", vip(lab, "ratings"), 40)
    counts = Counter(who(body) for _, body in results)
    assert set(counts) == {"ratings-1", "ratings-2"}, counts
    assert min(counts.values()) >= 5, counts


def wait_for(read: object, want: float, timeout: float = 5.0) -> None:
    """Poll ``read()`` until it equals ``want`` (metrics are recorded as requests finish)."""
    assert callable(read)
    deadline = time.monotonic() + timeout
    got = read()
    while got != want and time.monotonic() < deadline:
        time.sleep(0.05)
        got = read()
    assert got == want

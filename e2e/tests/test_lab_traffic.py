"""The lab end to end: real namespaces, rules, ztunnels; unmodified curl and a Python HTTP server.

One lab (the default spec) serves every test of this module, so the module costs one `up` (~2 s).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from e2e.demo import curl, metric_sum
from e2e.lab.cluster import Lab
from e2e.lab.wire import analyze, segments_from_pcap

SECRET = "e2e-secret-payload-0451"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab.up()
    try:
        lab.start_app("server", "http", 8080)
        lab.start_app("local", "http", 8080)
        lab.start_app("external", "http", 8080)
        yield lab
    finally:
        assert lab.down() == []


def test_inter_node_link_carries_only_tls_h2_to_15008(lab: Lab) -> None:
    # First test of the module: the HBONE connection is opened (and its handshake seen) in the capture.
    with lab.capture("n1", name="e2e-wire") as pcap:
        for _ in range(3):
            assert (
                curl(lab, "client", f"http://{lab.ip('server')}:8080/", data=SECRET).status == "200"
            )
    report = analyze(segments_from_pcap(str(pcap)), secret=SECRET.encode())
    assert report.ok, report.problems
    assert ("h2",) in {f.alpn for f in report.flows}, "no TLS handshake captured"
    assert all(f.server.endswith(":15008") for f in report.flows)


def test_rules_verified_live_after_up(lab: Lab) -> None:
    assert lab.verify_rules() == []
    status = lab.status()
    assert all(n["ztunnel"]["ready"] for n in status["nodes"])
    ids = {p["name"]: p["identity"] for p in status["pods"]}
    assert ids["client"] == "spiffe://cluster.local/ns/demo/sa/client"
    assert ids["legacy"] is None


@pytest.mark.parametrize("dst", ["server", "local"], ids=["cross-node", "same-node"])
def test_mesh_traffic_keeps_client_ip(lab: Lab, dst: str) -> None:
    call = curl(lab, "client", f"http://{lab.ip(dst)}:8080/")
    assert call.status == "200", call
    assert f"you are {lab.ip('client')}:" in call.body
    dump = lab.config_dump(lab.pod(dst).node)
    assert any(
        c.get("identity") == f"spiffe://cluster.local/ns/demo/sa/{dst}"
        for c in dump["certificates"]
    )


def test_capture_sees_plaintext_without_mesh(lab: Lab) -> None:
    """Control: the same check flags a plain connection, so the test above can fail."""
    with lab.capture("n1", name="e2e-plain") as pcap:
        assert (
            curl(lab, "legacy", f"http://{lab.ip('external')}:8080/", data=SECRET).status == "200"
        )
    report = analyze(segments_from_pcap(str(pcap)), secret=SECRET.encode())
    assert report.secret_seen
    assert not report.ok


def test_deny_by_principal_resets_and_is_counted(lab: Lab) -> None:
    before = metric_sum(
        lab.metrics("n2"),
        "istio_tcp_connections_closed_total",
        response_flags="DENY",
        source_workload="intruder",
    )
    sock = lab.socket_in("intruder")
    sock.settimeout(5)
    try:
        sock.connect((lab.ip("server"), 8080))  # accepted locally by the intruder's 15001
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            data = sock.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", "a denied client must see a reset or close, never a response"
    finally:
        sock.close()
    deadline = time.monotonic() + 5
    after = before
    while time.monotonic() < deadline:
        after = metric_sum(
            lab.metrics("n2"),
            "istio_tcp_connections_closed_total",
            response_flags="DENY",
            source_workload="intruder",
        )
        if after > before:
            break
        time.sleep(0.05)
    assert after == before + 1
    # Another identity is not affected by the DENY.
    assert curl(lab, "client", f"http://{lab.ip('server')}:8080/").status == "200"


def test_plain_client_outside_mesh_reaches_mesh_pod_via_15006(lab: Lab) -> None:
    call = curl(lab, "legacy", f"http://{lab.ip('server')}:8080/")
    assert call.status == "200"
    assert f"you are {lab.ip('legacy')}:" in call.body
    m = lab.metrics("n2")
    assert (
        metric_sum(
            m,
            "istio_tcp_connections_opened_total",
            source_workload="legacy",
            connection_security_policy="unknown",
        )
        >= 1
    )


def test_mesh_pod_reaches_destination_outside_mesh(lab: Lab) -> None:
    call = curl(lab, "client", f"http://{lab.ip('external')}:8080/")
    assert call.status == "200"
    assert f"you are {lab.ip('client')}:" in call.body


def test_service_vip_through_mesh(lab: Lab) -> None:
    call = curl(lab, "client", f"http://{lab.spec.services[0].vip}/")
    assert call.status == "200"
    assert "hello from server" in call.body

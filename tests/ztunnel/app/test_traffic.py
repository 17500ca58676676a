"""Two ztunnels carrying real connections over HBONE between loopback "pods"."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from ztunnel.accesslog import parse_text_line

from .harness import Echo, SocksRefused, get, mesh, roundtrip, socks_connect, until, watcher

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


def tcp_labels(reporter: str, flags: str = "-", **extra: str) -> dict[str, str]:
    """The full label set of the client -> server connection (every label asserted)."""
    labels = {
        "reporter": reporter,
        "source_workload": "client",
        "source_canonical_service": "client-app",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "default",
        "source_principal": CLIENT_ID,
        "source_app": "client-app",
        "source_version": "v1",
        "source_cluster": "unknown",
        "destination_service": "unknown",
        "destination_service_namespace": "unknown",
        "destination_service_name": "unknown",
        "destination_workload": "server",
        "destination_canonical_service": "server-app",
        "destination_canonical_revision": "v2",
        "destination_workload_namespace": "default",
        "destination_principal": SERVER_ID,
        "destination_app": "server-app",
        "destination_version": "v2",
        "destination_cluster": "unknown",
        "request_protocol": "tcp",
        "response_flags": flags,
        "connection_security_policy": "mutual_tls",
    }
    labels.update(extra)
    return labels


async def test_allowed_traffic_flows_over_hbone_with_metrics_and_access_logs(tmp_path):
    async with mesh(tmp_path) as m:
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"hello mesh") == b"hello mesh"
        writer.write_eof()
        assert await reader.read() == b""
        writer.close()
        # The app saw the client pod's IP (spoofed source), not ztunnel's.
        assert m.echo.peers[0][0] == m.client_ip
        await until(lambda: m.logs_a and m.logs_b, what="access logs")

        inbound = parse_text_line(m.logs_b[-1])
        assert inbound["src.addr"].startswith(f"{m.client_ip}:")
        assert inbound["src.workload"] == "client"
        assert inbound["src.namespace"] == "default"
        assert inbound["src.identity"] == CLIENT_ID
        assert inbound["dst.addr"] == f"{m.server_ip}:8080"
        assert inbound["dst.hbone_addr"] == f"{m.server_ip}:8080"
        assert inbound["dst.workload"] == "server"
        assert inbound["dst.identity"] == SERVER_ID
        assert inbound["direction"] == "inbound"
        assert (inbound["bytes_sent"], inbound["bytes_recv"]) == ("10", "10")
        assert inbound["duration"].endswith("ms")
        assert "error" not in inbound

        outbound = parse_text_line(m.logs_a[-1])
        assert outbound["src.addr"].startswith(f"{m.client_ip}:")
        assert outbound["direction"] == "outbound"
        assert outbound["src.identity"] == CLIENT_ID
        assert outbound["dst.addr"] == f"{m.server_ip}:15008"
        assert outbound["dst.hbone_addr"] == f"{m.server_ip}:8080"
        assert outbound["dst.identity"] == SERVER_ID
        assert (outbound["bytes_sent"], outbound["bytes_recv"]) == ("10", "10")

        dst = tcp_labels("destination")
        src = tcp_labels("source")
        for app, labels in ((m.b, dst), (m.a, src)):
            assert app.metrics.value("istio_tcp_connections_opened_total", labels) == 1
            assert app.metrics.value("istio_tcp_connections_closed_total", labels) == 1
            assert app.metrics.value("istio_tcp_received_bytes_total", labels) == 10
            assert app.metrics.value("istio_tcp_sent_bytes_total", labels) == 10

        # The same values on the wire, from /stats/prometheus.
        status, text = await get(m.b.url("metrics") + "/stats/prometheus")
        assert status == 200
        assert 'istio_tcp_connections_opened_total{connection_security_policy="mutual_tls"' in text
        assert 'istio_build{component="ztunnel",tag="0.1.0"} 1.0' in text


async def test_service_vip_is_load_balanced_to_the_endpoint(tmp_path):
    async with mesh(tmp_path) as m:
        reader, writer = await socks_connect(m.client_ip, f"{m.prefix}.200", 80)
        assert await roundtrip(reader, writer, b"via vip") == b"via vip"
        writer.close()
        await until(lambda: m.logs_a, what="outbound log")
        await until(
            lambda: (
                m.b.metrics.value("istio_tcp_connections_closed_total", tcp_labels("destination"))
                == 1
            ),
            what="close",
        )
        outbound = parse_text_line(m.logs_a[-1])
        assert outbound["dst.service"] == "server.default.svc.cluster.local"
        assert outbound["dst.hbone_addr"] == f"{m.server_ip}:8080"
        labels = tcp_labels(
            "source",
            destination_service="server.default.svc.cluster.local",
            destination_service_namespace="default",
            destination_service_name="server",
        )
        assert m.a.metrics.value("istio_tcp_connections_opened_total", labels) == 1


DENY_CLIENT = """\
- name: deny-client
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[{principals: [{exact: "cluster.local/ns/default/sa/client"}]}]]]
"""


async def test_denied_connection_gets_401_closed_and_counted(tmp_path):
    async with mesh(tmp_path, policies=DENY_CLIENT) as m:
        with pytest.raises(SocksRefused) as refused:
            await socks_connect(m.client_ip, m.server_ip, 8080)
        assert refused.value.code == 2  # "connection not allowed by ruleset"
        await until(lambda: m.logs_a and m.logs_b, what="access logs")
        assert m.echo.peers == []  # the app was never dialled

        inbound = parse_text_line(m.logs_b[-1])
        assert inbound["error"] == "policy denied: explicitly denied by default/deny-client"
        outbound = parse_text_line(m.logs_a[-1])
        assert outbound["error"] == "HBONE CONNECT rejected with status 401"

        denied = tcp_labels("destination", flags="DENY")
        assert m.b.metrics.value("istio_tcp_connections_failed_total", denied) == 1
        assert m.b.metrics.value("istio_tcp_connections_closed_total", denied) == 1
        assert (
            m.b.metrics.value("istio_tcp_connections_opened_total", tcp_labels("destination")) == 1
        )
        assert m.b.metrics.value("istio_tcp_received_bytes_total", denied) == 0
        src_denied = tcp_labels("source", flags="DENY")
        assert m.a.metrics.value("istio_tcp_connections_failed_total", src_denied) == 1


async def test_unknown_referenced_policy_denies_and_is_counted(tmp_path):
    async with mesh(tmp_path) as m:
        text = m.config_path.read_text().replace(
            "    services:\n      default/server",
            "    authorizationPolicies: [default/missing]\n    services:\n      default/server",
        )
        m.write_config(text)
        await until(lambda: watcher(m.b).reloads_ok == 1, what="reload")
        with pytest.raises(SocksRefused):
            await socks_connect(m.client_ip, m.server_ip, 8080)
        await until(
            lambda: (
                m.b.metrics.value(
                    "istio_unknown_policy_denials_total", {"policy": "default/missing"}
                )
                == 1
            ),
            what="unknown-policy counter",
        )


async def test_config_dump_shows_live_connection_and_policy_change_closes_it(tmp_path):
    async with mesh(tmp_path) as m:
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"ping") == b"ping"

        status, body = await get(m.b.url("admin") + "/config_dump")
        assert status == 200
        dump = json.loads(body)
        (conn,) = dump["connections"]
        assert conn["direction"] == "inbound"
        assert conn["src_identity"] == CLIENT_ID
        assert conn["dst"] == f"{m.server_ip}:8080"
        assert conn["hbone_target"] == f"{m.server_ip}:8080"
        assert {w["name"] for w in dump["workloads"]} == {"client", "server"}
        assert [c["state"] for c in dump["certificates"]] == ["Available"]
        assert dump["certificates"][0]["identity"] == SERVER_ID
        assert dump["certificates"][0]["not_after"]
        status, body = await get(m.a.url("admin") + "/config_dump")
        assert [c["direction"] for c in json.loads(body)["connections"]] == ["outbound"]

        loop = asyncio.get_running_loop()
        changed = loop.time()
        m.set_policies(DENY_CLIENT)
        # The connection is closed by the destination ztunnel within 1 s of the change.
        data = await asyncio.wait_for(reader.read(), 3)
        closed = loop.time()
        assert data == b""
        assert closed - changed < 1.0
        writer.close()
        await until(lambda: m.logs_b, what="inbound access log")
        entry = parse_text_line(m.logs_b[-1])
        assert entry["error"].startswith("authorization policy late rejection: explicitly denied")
        assert (
            m.b.metrics.value(
                "istio_authorization_late_rejections_total", {"reporter": "destination"}
            )
            == 1
        )
        denied = tcp_labels("destination", flags="DENY")
        assert m.b.metrics.value("istio_tcp_connections_closed_total", denied) == 1
        assert m.b.metrics.value("istio_tcp_received_bytes_total", denied) == 4
        assert len(m.b.tracker) == 0


async def test_bad_config_reload_keeps_old_config_and_is_counted(tmp_path):
    async with mesh(tmp_path) as m:
        m.write_config(m.config_path.read_text().replace("workloadIps: [", "workloadIps: [bogus, "))
        await until(lambda: watcher(m.b).reloads_failed == 1, what="rejected reload")
        assert m.b.metrics.value("istio_config_reload_failures_total", {"source": "local"}) == 1
        _status, body = await get(m.b.url("admin") + "/config_dump")
        cfg = json.loads(body)["config"]
        assert cfg["reloads_failed"] == 1
        assert "is not an IP address" in cfg["last_error"]
        # The previous configuration is still in force: traffic flows.
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"still") == b"still"
        writer.close()


async def test_passthrough_to_non_mesh_destination(tmp_path):
    async with mesh(tmp_path) as m:
        outside = Echo(f"{m.prefix}.3", 9090)
        await outside.start()
        try:
            reader, writer = await socks_connect(m.client_ip, outside.host, 9090)
            assert await roundtrip(reader, writer, b"plain") == b"plain"
            writer.close()
            assert outside.peers[0][0] == m.client_ip
            await until(lambda: m.logs_a, what="outbound log")
            entry = parse_text_line(m.logs_a[-1])
            assert entry["dst.addr"] == f"{m.prefix}.3:9090"
            assert "dst.hbone_addr" not in entry
            labels = {
                "reporter": "source",
                "source_workload": "client",
                "destination_workload": "unknown",
                "connection_security_policy": "unknown",
                "response_flags": "-",
            }
            assert (
                m.a.metrics.registry.get_sample_value(
                    "istio_tcp_connections_opened_total",
                    labels
                    | {
                        k: v
                        for k, v in tcp_labels("source").items()
                        if k.startswith("source_") and k != "source_principal"
                    }
                    | {
                        "source_principal": "unknown",
                        "destination_canonical_service": "unknown",
                        "destination_canonical_revision": "unknown",
                        "destination_workload_namespace": "unknown",
                        "destination_principal": "unknown",
                        "destination_app": "unknown",
                        "destination_version": "unknown",
                        "destination_cluster": "unknown",
                        "destination_service": "unknown",
                        "destination_service_namespace": "unknown",
                        "destination_service_name": "unknown",
                        "request_protocol": "tcp",
                    },
                )
                == 1
            )
        finally:
            await outside.close()


@pytest.mark.parametrize(
    ("host", "port"),
    [("127.0.0.1", 15008), ("self", 15001), ("self", 15006), ("127.0.0.1", 15080)],
    ids=["loopback-hbone", "own-ip-outbound", "own-ip-plaintext", "loopback-socks"],
)
async def test_self_call_is_refused(tmp_path, host, port):
    async with mesh(tmp_path) as m:
        target = m.client_ip if host == "self" else host
        with pytest.raises(SocksRefused):
            await socks_connect(m.client_ip, target, port)
        await until(lambda: m.logs_a, what="access log")
        assert parse_text_line(m.logs_a[-1])["error"].startswith("self-call to")


async def test_plaintext_inbound_under_policy(tmp_path):
    from ztunnel.proxy.socket_factory import Endpoint, local_endpoint

    allow_p4 = """\
- name: allow-p4
  namespace: default
  scope: Namespace
  action: Allow
  rules: [[[{sourceIps: ["%s.4/32"]}]]]
"""

    def original_dst(sock: socket.socket) -> Endpoint:
        # No capture rules in loopback tests: 15006 on the pod IP stands for the app's port 8080.
        local = local_endpoint(sock)
        return Endpoint(local.ip, 8080)

    prefix_box: list[str] = []

    async with mesh(
        tmp_path, policies="", b_overrides={"plaintext_original_dst": original_dst}
    ) as m:
        prefix_box.append(m.prefix)
        m.set_policies(allow_p4 % m.prefix)
        await until(lambda: watcher(m.b).reloads_ok == 1, what="reload")

        async def plain_from(source: str) -> bytes:
            sock = socket.socket()
            sock.bind((source, 0))
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, (m.server_ip, 15006))
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(b"plaintext")
                writer.write_eof()
                return await asyncio.wait_for(reader.read(), 5)
            except OSError:  # reset: the denial closed it
                return b""
            finally:
                writer.close()

        assert await plain_from(f"{m.prefix}.4") == b"plaintext"
        assert m.echo.peers[-1][0] == f"{m.prefix}.4"  # client IP preserved
        assert await plain_from(f"{m.prefix}.5") == b""
        await until(lambda: len(m.logs_b) == 2, what="two access logs")
        allowed, denied = (parse_text_line(x) for x in m.logs_b)
        assert "src.identity" not in allowed
        assert "error" not in allowed
        assert denied["error"] == "policy denied: allow policies exist, but none allowed"
        labels = {
            "reporter": "destination",
            "response_flags": "DENY",
            "connection_security_policy": "unknown",
        }
        samples = [
            s
            for metric in m.b.metrics.registry.collect()
            if metric.name == "istio_tcp_connections_failed"
            for s in metric.samples
            if s.name.endswith("_total")
        ]
        assert [s.value for s in samples if labels.items() <= s.labels.items()] == [1.0]


async def test_no_source_certificate_refuses_with_identity_error(tmp_path):
    from ztunnel.app import App
    from ztunnel.identity.ca import LocalCaClient

    from .harness import CA, app_config, base_config, random_prefix

    prefix = random_prefix()
    path = tmp_path / "mesh.yaml"
    path.write_text(base_config(prefix))
    ca = LocalCaClient(CA)
    ca.fail_next(1000)  # the CA never issues the client's certificate
    logs: list[str] = []
    a = App(app_config(path, "node-a", logs, ca_client=ca))
    await a.start()
    try:
        with pytest.raises(SocksRefused) as refused:
            await socks_connect(f"{prefix}.1", f"{prefix}.2", 8080)
        assert refused.value.code != 0
        await until(lambda: logs, what="access log")
        line = parse_text_line(logs[-1])
        assert line["error"].startswith(f"no certificate for {CLIENT_ID}")
        flagged = tcp_labels("source", flags="IDENTITY_ERROR")
        assert a.metrics.value("istio_tcp_connections_failed_total", flagged) == 1
    finally:
        a.drain.deadline = 0.2
        await asyncio.wait_for(a.stop(), 10)


async def test_hbone_listener_limits_and_counters_are_wired(tmp_path):
    from ztunnel.hbone.guard import ListenerLimits

    limits = ListenerLimits(max_connections=7, max_connections_per_identity=3)
    async with mesh(tmp_path, b_overrides={"listener_limits": limits}) as m:
        reader, writer = await socks_connect(m.client_ip, m.server_ip, 8080)
        assert await roundtrip(reader, writer, b"counted") == b"counted"
        writer.close()
        servers = [s for proxy in m.b.proxies.values() for s in proxy.servers]
        assert servers
        assert all(s.caps.limits == limits for s in servers)
        # The pooled HBONE connection from node A stays open; nothing was refused or cut off.
        assert m.b.metrics.value("ztunnel_hbone_connections_accepted_total") == 1
        assert m.b.metrics.value("ztunnel_hbone_connections_open") == 1
        for cap in ("global", "identity"):
            assert m.b.metrics.value("ztunnel_hbone_connections_rejected_total", {"cap": cap}) == 0
        assert m.b.metrics.value("ztunnel_hbone_guard_trips_total") == 0
        assert b"ztunnel_hbone_connections_accepted_total 1.0" in m.b.metrics.render()

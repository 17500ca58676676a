"""Unit tests of the app's pure parts and small shells: SOCKS5, access log, labels, admin, drain,
readiness, the connection tracker, the socket factory and the CLI tables."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.accesslog import AccessEntry, AccessLog, LogFormat, format_entry, parse_text_line
from ztunnel.admin import LoggingSpecError, parse_level_spec, serialize
from ztunnel.cli import render_table
from ztunnel.drain import Drain
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.metrics import Metrics, Reporter, ResponseFlags, traffic_labels
from ztunnel.proxy import socks5
from ztunnel.proxy.connections import ConnectionTracker
from ztunnel.proxy.socket_factory import (
    DefaultSocketFactory,
    Endpoint,
    NetnsSocketFactory,
    SocketSetupError,
    original_destination,
)
from ztunnel.readiness import Readiness
from ztunnel.state.authz import ConnectionAttrs
from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    StringMatch,
    StringMatchKind,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import WorkloadStore

# ----------------------------------------------------------------------------------- SOCKS5


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90",
            Endpoint(ipaddress.ip_address("127.0.0.1"), 8080),
        ),
        (
            b"\x05\x01\x00\x04" + ipaddress.IPv6Address("::1").packed + b"\x00\x50",
            Endpoint(ipaddress.ip_address("::1"), 80),
        ),
    ],
    ids=["ipv4", "ipv6"],
)
def test_socks5_request_parses(data, expected):
    assert socks5.parse_request(data).destination == expected


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50", socks5.REP_COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x03abc\x00\x50", socks5.REP_ATYP_NOT_SUPPORTED),
        (b"\x05\x01\x00\x09", socks5.REP_ATYP_NOT_SUPPORTED),
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", socks5.REP_FAILURE),
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00", socks5.REP_FAILURE),
    ],
    ids=["bind-command", "domain-name", "unknown-atyp", "socks4", "port-zero"],
)
def test_socks5_bad_requests_name_the_reply_code(data, code):
    with pytest.raises(socks5.Socks5Error) as err:
        socks5.parse_request(data)
    assert err.value.reply_code == code


@given(st.binary(max_size=40))
def test_socks5_parsers_never_crash(data):
    for parse in (socks5.parse_greeting, socks5.parse_request):
        try:
            parse(data)
        except (socks5.Socks5Error, socks5.Incomplete):
            pass


@given(st.ip_addresses(), st.integers(1, 65535))
def test_socks5_request_roundtrip(ip, port):
    atyp = b"\x04" if ip.version == 6 else b"\x01"
    req = b"\x05\x01\x00" + atyp + ip.packed + struct.pack("!H", port)
    for cut in range(len(req)):
        with pytest.raises(socks5.Incomplete):
            socks5.parse_request(req[:cut])
    parsed = socks5.parse_request(req + b"extra")
    assert parsed.destination == Endpoint(ip, port)
    assert parsed.consumed == len(req)


def test_socks5_greeting_and_reply():
    assert socks5.parse_greeting(b"\x05\x02\x02\x00") == (True, 4)
    assert socks5.parse_greeting(b"\x05\x01\x02") == (False, 3)
    assert (
        socks5.reply(0, Endpoint(ipaddress.ip_address("10.0.0.1"), 80))
        == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x00\x50"
    )


# ----------------------------------------------------------------------------------- access log


ENTRY = AccessEntry(
    direction="inbound",
    src_addr="10.0.0.1:3456",
    src_workload="client",
    src_namespace="default",
    src_identity="spiffe://cluster.local/ns/default/sa/client",
    dst_addr="10.0.0.2:15008",
    dst_hbone_addr="10.0.0.2:8080",
    dst_workload="server",
    dst_namespace="default",
    dst_identity="spiffe://cluster.local/ns/default/sa/server",
    bytes_sent=12,
    bytes_recv=34,
    duration_ms=56,
)


def test_access_log_text_line_by_value():
    assert format_entry(ENTRY, LogFormat.TEXT) == (
        'connection complete src.addr="10.0.0.1:3456" src.workload="client" src.namespace="default" '
        'src.identity="spiffe://cluster.local/ns/default/sa/client" dst.addr="10.0.0.2:15008" '
        'dst.hbone_addr="10.0.0.2:8080" dst.workload="server" dst.namespace="default" '
        'dst.identity="spiffe://cluster.local/ns/default/sa/server" direction="inbound" '
        'bytes_sent=12 bytes_recv=34 duration="56ms"'
    )


def test_access_log_json_line_by_value_and_error_level():
    lines: list[str] = []
    AccessLog(LogFormat.JSON, sink=lines.append).write(
        AccessEntry(direction="outbound", src_addr="a", dst_addr="b", error='denied "x"')
    )
    assert json.loads(lines[0]) == {
        "level": "error",
        "scope": "access",
        "message": "connection complete",
        "src.addr": "a",
        "dst.addr": "b",
        "direction": "outbound",
        "bytes_sent": 0,
        "bytes_recv": 0,
        "duration": "0ms",
        "error": 'denied "x"',
    }


@given(st.text(min_size=0, max_size=30))
def test_access_log_text_roundtrip_any_error_text(error):
    entry = AccessEntry(direction="inbound", src_addr="1.2.3.4:5", dst_addr="x y=z", error=error)
    parsed = parse_text_line(format_entry(entry, LogFormat.TEXT))
    assert parsed["error"] == error
    assert parsed["dst.addr"] == "x y=z"


# ----------------------------------------------------------------------------------- metrics


def _workload(name: str, sa: str) -> Workload:
    return Workload(
        uid=f"Kubernetes//Pod/default/{name}",
        name=name,
        namespace="default",
        service_account=sa,
        addresses=(ipaddress.ip_address("10.0.0.1"),),
        tunnel_protocol=TunnelProtocol.HBONE,
        canonical_name=f"{name}-app",
        cluster_id="Kubernetes",
    )


def test_traffic_labels_unknowns_and_plaintext():
    labels = traffic_labels(
        reporter=Reporter.DESTINATION,
        source=None,
        source_identity=None,
        destination=_workload("server", "server"),
        destination_identity=SpiffeId("cluster.local", "default", "server"),
        service=None,
        mtls=False,
        flags=ResponseFlags.DENY,
    ).values()
    assert labels["source_workload"] == "unknown"
    assert labels["source_principal"] == "unknown"
    assert labels["destination_workload"] == "server"
    assert labels["destination_app"] == "server-app"
    assert labels["destination_version"] == "latest"
    assert labels["destination_cluster"] == "Kubernetes"
    assert labels["response_flags"] == "DENY"
    assert labels["connection_security_policy"] == "unknown"
    assert labels["request_protocol"] == "tcp"


def test_metrics_counters_by_value():
    m = Metrics()
    labels = traffic_labels(
        reporter=Reporter.SOURCE,
        source=_workload("client", "client"),
        source_identity=SpiffeId("cluster.local", "default", "client"),
        destination=None,
        destination_identity=None,
        service=None,
        mtls=True,
    )
    m.connection_opened(labels)
    m.connection_closed(labels, request_bytes=7, response_bytes=9)
    m.config_reload_failed("local")
    values = labels.values()
    assert m.value("istio_tcp_connections_opened_total", values) == 1
    assert m.value("istio_tcp_received_bytes_total", values) == 7
    assert m.value("istio_tcp_sent_bytes_total", values) == 9
    assert m.value("istio_config_reload_failures_total", {"source": "local"}) == 1
    assert m.value("istio_build", {"component": "ztunnel", "tag": "0.1.0"}) == 1
    assert b'source_principal="spiffe://cluster.local/ns/default/sa/client"' in m.render()


# ----------------------------------------------------------------------------------- admin, readiness


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("info", {"": 20}),
        ("access=debug,warn", {"access": 10, "": 30}),
        ("ztunnel.proxy=trace", {"ztunnel.proxy": 10}),
    ],
    ids=["root", "per-logger", "trace-is-debug"],
)
def test_logging_spec(spec, expected):
    assert parse_level_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "loud", "access=loud", ","], ids=["empty", "bad", "bad-per-logger", "comma"]
)
def test_logging_spec_errors(spec):
    with pytest.raises(LoggingSpecError):
        parse_level_spec(spec)


def test_serialize_model_values():
    w = _workload("client", "client")
    data = serialize(w)
    assert data["addresses"] == ["10.0.0.1"]
    assert data["tunnel_protocol"] == "HBONE"
    json.dumps(data)


def test_readiness_lists_pending_and_stays_ready():
    r = Readiness()
    r.register("config", "a.yaml")
    r.register("certificate x")
    assert r.status() == (500, "not ready, pending: certificate x, config (a.yaml)\n")
    r.done("config")
    r.done("certificate x")
    assert r.status() == (200, "ready\n")
    r.register("certificate y")  # later work does not revoke readiness
    assert r.ready


async def test_drain_waits_for_tasks_then_forces_at_deadline():
    drain = Drain(deadline=0.2)
    calls: list[str] = []

    async def stop() -> None:
        calls.append("stop")

    async def force() -> None:
        calls.append("force")

    drain.on_stop_accepting(stop)
    drain.on_force_close(force)
    quick = asyncio.ensure_future(asyncio.sleep(0.01))
    stuck = asyncio.ensure_future(asyncio.sleep(30))
    drain.track(quick)
    drain.track(stuck)
    runner = asyncio.ensure_future(drain.run())
    drain.trigger("test")
    drain.trigger("again")  # idempotent
    await asyncio.wait_for(runner, 5)
    assert calls == ["stop", "force"]
    assert drain.forced == 1
    assert stuck.cancelled()
    assert drain.reason == "test"


# ----------------------------------------------------------------------------------- tracker


def _deny_all(ns: str) -> Authorization:
    return Authorization(
        name="deny",
        namespace=ns,
        scope=Scope.NAMESPACE,
        action=Action.DENY,
        rules=(
            Rule(
                clauses=(
                    Clause(
                        matches=(Match(namespaces=(StringMatch(kind=StringMatchKind.PRESENCE),)),)
                    ),
                )
            ),
        ),
    )


def test_tracker_rechecks_on_policy_change_and_closes_denied():
    store = WorkloadStore()
    server = _workload("server", "server")
    store.replace_all([server], [], [])
    tracker = ConnectionTracker(store)
    tracker.start()
    closed: list[str] = []
    attrs = ConnectionAttrs(
        source_ip=ipaddress.ip_address("10.0.0.9"),
        source_identity=SpiffeId("cluster.local", "other", "sa"),
        destination=server,
        destination_ip=server.addresses[0],
        destination_port=8080,
    )
    conn = tracker.register(
        direction="inbound",
        src="10.0.0.9:1",
        dst="10.0.0.1:8080",
        local_workload=server.uid,
        attrs=attrs,
        close=closed.append,
    )
    plain = tracker.register(
        direction="inbound",
        src="10.0.0.8:1",
        dst="10.0.0.1:8080",
        local_workload=server.uid,
        close=closed.append,
        attrs=ConnectionAttrs(
            source_ip=ipaddress.ip_address("10.0.0.8"),
            source_identity=None,
            destination=server,
            destination_ip=server.addresses[0],
            destination_port=8080,
        ),
    )
    assert tracker.check(conn).allowed
    store.upsert_policy(_deny_all("default"))  # registered before: the change is seen
    assert closed == ["explicitly denied by default/deny"]
    assert conn.denied_reason == "explicitly denied by default/deny"
    assert plain.denied_reason is None  # no identity, no namespace: presence does not match
    assert [c["direction"] for c in tracker.snapshot()] == ["inbound", "inbound"]
    tracker.unregister(conn)
    tracker.stop()
    assert len(tracker) == 1


# ----------------------------------------------------------------------------------- sockets


def test_listener_has_reuseport_and_original_dst_falls_back_to_local_address():
    factory = DefaultSocketFactory()
    listener = factory.listener(Endpoint(ipaddress.ip_address("127.0.0.1"), 0))
    try:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=2)
        listener.setblocking(True)
        conn, _ = listener.accept()
        with client, conn:
            assert original_destination(conn) == Endpoint(ipaddress.ip_address("127.0.0.1"), port)
    finally:
        listener.close()


def test_upstream_binds_source_and_sets_nodelay():
    factory = DefaultSocketFactory()
    sock = factory.upstream(socket.AF_INET, source=ipaddress.ip_address("127.0.0.7"), spoof=True)
    with sock:
        assert sock.getsockname()[0] == "127.0.0.7"
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_netns_factory_names_a_missing_namespace(tmp_path):
    factory = NetnsSocketFactory(str(tmp_path / "no-such-netns"))
    try:
        with pytest.raises(SocketSetupError, match="no-such-netns"):
            factory.listener(Endpoint(ipaddress.ip_address("127.0.0.1"), 0))
    finally:
        factory.close()


def test_bind_conflict_is_a_clear_error():
    factory = DefaultSocketFactory()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: the factory's bind must fail
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SocketSetupError, match=f"cannot bind listener 127.0.0.1:{port}"):
            factory.listener(Endpoint(ipaddress.ip_address("127.0.0.1"), port))


# ----------------------------------------------------------------------------------- CLI


def test_cli_tables_from_a_dump():
    dump = {
        "workloads": [
            {
                "namespace": "default",
                "name": "web",
                "addresses": ["10.0.0.1"],
                "node": "n1",
                "waypoint": {
                    "destination": {
                        "namespace": "default",
                        "hostname": "wp.default.svc.cluster.local",
                    }
                },
                "tunnel_protocol": "HBONE",
                "services": {"default/web.default.svc.cluster.local": {}},
            }
        ],
        "services": [
            {
                "namespace": "default",
                "name": "web",
                "hostname": "web.default.svc.cluster.local",
                "vips": [{"network": "", "address": "10.96.0.1"}],
                "waypoint": None,
            }
        ],
        "policies": [
            {"namespace": "default", "name": "deny", "action": "DENY", "scope": "NAMESPACE"}
        ],
    }
    assert render_table("workloads", dump) == (
        "NAMESPACE   POD NAME   ADDRESS    NODE   WAYPOINT   PROTOCOL\n"
        "default     web        10.0.0.1   n1     wp         HBONE\n"
    )
    assert render_table("services", dump).splitlines()[1].split() == [
        "default",
        "web",
        "10.96.0.1",
        "None",
        "1",
    ]
    assert render_table("policies", dump).splitlines()[1].split() == [
        "default",
        "deny",
        "DENY",
        "NAMESPACE",
    ]

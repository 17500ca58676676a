"""`make demo`: bring up the default lab, send real traffic, print a report a person can read, tear down.

What it shows, each from evidence the system itself produces:
* connections carried as HBONE with the identities of both ends (ztunnel access logs and metrics);
* what the DENY policy refused (the client's view: reset; ztunnel's: 401 and ``response_flags=DENY``);
* a client outside the mesh reaching a mesh pod through 15006, a mesh pod reaching a pod outside it;
* bytes and latency through the mesh next to the same requests between two pods outside the mesh;
* the wire: a capture on node n1's link shows only TLS to port 15008 with ALPN h2, and the payload
  sent never appears in clear;
* L7 at the waypoint (services ``reviews``/``ratings``/``flaky`` bound to waypoint ``demo/waypoint``):
  an HTTPRoute's 80/20 weighted split measured over many requests, a header match, and an
  AuthorizationPolicy's path DENY answered 403 while other paths get 200 -- from the clients'
  view, the waypoint's metrics (15020) and its access log.

Traffic stays inside the lab's namespaces. Ctrl-C or SIGTERM still tears everything down.
"""

from __future__ import annotations

import math
import shlex
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from e2e.lab.cli import interrupt_on_sigterm
from e2e.lab.cluster import DEFAULT_SPEC, Lab
from e2e.lab.spec import load_spec
from e2e.lab.wire import analyze, segments_from_pcap
from ztunnel.accesslog import parse_text_line

SECRET = "TOP-SECRET-PAYLOAD-7f3a9c"
REQUESTS = 60
"""Timed requests per path: enough that p90 is not the maximum (with 20, "p99" was just the max)."""


@dataclass
class Call:
    src: str
    url: str
    code: int
    status: str
    body: str
    seconds: float


def curl(
    lab: Lab,
    src: str,
    url: str,
    *,
    data: str | None = None,
    headers: Mapping[str, str] | None = None,
    path_as_is: bool = False,
) -> Call:
    argv = ["curl", "-s", "-m", "5", "-w", "\n%{http_code} %{time_total}", url]
    if data is not None:
        argv += ["--data-binary", data]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if path_as_is:
        argv.append("--path-as-is")  # send the path exactly as written (no ./ or ../ squashing)
    proc = lab.exec(src, argv, timeout=15)
    body, _, tail = proc.stdout.rpartition("\n")
    status, _, seconds = tail.partition(" ")
    return Call(src, url, proc.returncode, status, body.strip(), float(seconds or 0))


def get_many(lab: Lab, src: str, host: str, n: int, path: str = "/") -> list[tuple[int, str]]:
    """``n`` GETs over one keep-alive ``http.client`` connection from pod ``src`` to ``host:80``."""
    conn = lab.http_connection(src, host, 80)
    out = []
    try:
        for _ in range(n):
            conn.request("GET", path)
            resp = conn.getresponse()
            out.append((resp.status, resp.read().decode()))
    finally:
        conn.close()
    return out


def get_parallel(lab: Lab, src: str, host: str, n: int, connections: int) -> list[tuple[int, str]]:
    """``n`` GETs spread over ``connections`` keep-alive connections used at the same time."""
    share = [n // connections + (i < n % connections) for i in range(connections)]
    with ThreadPoolExecutor(connections) as pool:
        parts = list(pool.map(lambda k: get_many(lab, src, host, k), share))
    return [r for part in parts for r in part]


def who(body: str) -> str:
    """The pod that answered an ``e2e.lab.apps http`` request (``hello from <pod>; ...``)."""
    return body.split(";", 1)[0].removeprefix("hello from ").strip()


def waypoint_access_fields(line: str) -> dict[str, str]:
    """``key=value`` fields of a waypoint access-log line (``... request complete k=v k="v w"``)."""
    rest = line.split("request complete", 1)[-1]
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    return dict(w.split("=", 1) for w in words if "=" in w)


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of ``values``; 0 when there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def latency(ms: Sequence[float]) -> str:
    """p50 / p90 / max of ``ms``: with ~60 samples a p99 would only be the maximum again."""
    if not ms:
        return "no successful requests"
    return (
        f"p50 {statistics.median(ms):6.2f} ms  p90 {pct(ms, 0.90):6.2f} ms  "
        f"max {max(ms):6.2f} ms  (n={len(ms)})"
    )


def access_entries(lab: Lab) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for z in lab.ztunnels.values():
        for line in z.log_path.read_text(errors="replace").splitlines():
            if " access " in line and "connection complete" in line:
                fields = parse_text_line(line[line.index("connection complete") :])
                fields["node"] = z.node
                out.append(fields)
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def short(identity: str | None) -> str:
    return (identity or "-").replace("spiffe://cluster.local/", "")


def run(lab: Lab, out: list[str]) -> bool:
    say = out.append
    server, external = lab.ip("server"), lab.ip("external")
    lab.start_app("server", "http", 8080)
    lab.start_app("external", "http", 8080)

    # 1. Traffic: mesh cross-node (with a capture on n1's link), VIP, denial, plaintext in, passthrough out.
    with lab.capture("n1", name="demo") as pcap:
        # Warm-up, not timed: the first request dials the pool's mTLS connection (the capture must
        # still see it, for the ClientHello); the timed ones measure a new TCP connection per request.
        warm = curl(lab, "client", f"http://{server}:8080/", data=SECRET)
        mesh = [curl(lab, "client", f"http://{server}:8080/", data=SECRET) for _ in range(REQUESTS)]
    vip = curl(lab, "client", "http://10.96.0.10/")
    denied = curl(lab, "intruder", f"http://{server}:8080/")
    plain_in = curl(lab, "legacy", f"http://{server}:8080/")
    out_of_mesh = curl(lab, "client", f"http://{external}:8080/")
    curl(lab, "legacy", f"http://{external}:8080/", data=SECRET)  # same warm-up (ARP, caches)
    direct = [curl(lab, "legacy", f"http://{external}:8080/", data=SECRET) for _ in range(REQUESTS)]
    time.sleep(0.3)  # access log lines are written when connections close

    ok = True

    def check(cond: bool, text: str) -> None:
        nonlocal ok
        ok &= cond
        say(f"  [{'ok' if cond else 'FAIL'}] {text}")

    say("Traffic (curl in one pod -> python HTTP server in another; neither knows about the mesh)")
    good = [c for c in mesh if c.status == "200"]
    check(warm.status == "200" and len(good) == REQUESTS, f"client (n1) -> server (n2) {server}:8080: {len(good)}/{REQUESTS} x 200; "
          f"server says: {good[0].body if good else '-'!r}")  # fmt: skip
    check(
        vip.status == "200",
        f"client -> service VIP 10.96.0.10:80 (server.demo): {vip.status or vip.code}",
    )
    check(
        denied.status != "200",
        f"intruder -> server: refused by policy deny-intruder (curl exit {denied.code}: connection reset)",
    )
    check(plain_in.status == "200" and lab.ip("legacy") in plain_in.body,
          f"legacy (outside the mesh) -> server via 15006: {plain_in.status}; server saw {plain_in.body.split('you are ')[-1]!r}")  # fmt: skip
    check(
        out_of_mesh.status == "200",
        f"client -> external (outside the mesh): plain TCP passthrough, {out_of_mesh.status}",
    )

    say("")
    say("HBONE connections seen by the ztunnels (access logs)")
    entries = access_entries(lab)
    seen: dict[tuple[str, ...], int] = {}
    for e in entries:
        key = (e.get("node", ""), e.get("direction", ""), e.get("src.workload", "-"), e.get("dst.workload", "-"),
               short(e.get("src.identity")), short(e.get("dst.identity")), e.get("dst.addr", ""),
               e.get("error", ""))  # fmt: skip
        seen[key] = seen.get(key, 0) + 1
    say(
        f"  {'node':<4} {'dir':<8} {'from':<9} {'to':<9} {'n':>3}  {'src identity':<22} {'dst identity':<22} next hop / error"
    )
    for (node, direction, src, dst, sid, did, hop, err), n in sorted(seen.items()):
        tail = err if err else hop
        say(f"  {node:<4} {direction:<8} {src:<9} {dst:<9} {n:>3}  {sid:<22} {did:<22} {tail}")
    hbone = [e for e in entries if e.get("dst.addr", "").endswith(":15008") and not e.get("error")]
    check(
        bool(hbone) and all(e.get("src.identity") for e in hbone),
        "every mesh connection went to :15008 with a verified client identity",
    )

    say("")
    say("Policy (metrics of the server's ztunnel on n2)")
    metrics = lab.metrics("n2")
    deny_n = metric_sum(
        metrics,
        "istio_tcp_connections_closed_total",
        response_flags="DENY",
        source_workload="intruder",
    )
    allow_n = metric_sum(
        metrics, "istio_tcp_connections_opened_total", source_workload="client", response_flags="-"
    )
    say(
        f"  istio_tcp_connections_closed_total{{source_workload=intruder,response_flags=DENY}} = {deny_n:.0f}"
    )
    say(
        f"  istio_tcp_connections_opened_total{{source_workload=client,response_flags=-}}   = {allow_n:.0f}"
    )
    check(deny_n >= 1, "the denial is counted with response_flags=DENY")

    say("")
    say(
        f"Bytes and latency ({REQUESTS} requests each after one warm-up, curl time_total, new TCP "
        "connection per request)"
    )
    recv = metric_sum(
        metrics, "istio_tcp_received_bytes_total", source_workload="client", reporter="destination"
    )
    sent = metric_sum(
        metrics, "istio_tcp_sent_bytes_total", source_workload="client", reporter="destination"
    )
    m_t = [c.seconds * 1000 for c in good]
    d_t = [c.seconds * 1000 for c in direct if c.status == "200"]
    say(f"  through the mesh : {latency(m_t)}; client->server {recv:.0f} B, server->client {sent:.0f} B")  # fmt: skip
    say(f"  direct (no mesh) : {latency(d_t)}")

    say("")
    say(
        f"The wire (tcpdump on node n1's link to the other node, during the {REQUESTS + 1} mesh requests)"
    )
    report = analyze(segments_from_pcap(str(pcap)), secret=SECRET.encode())
    say(f"  {report.summary()}")
    for f in report.flows[:3]:
        say(
            f"  flow {f.client} -> {f.server}: {f.tls_records} TLS records, {f.bytes_up}+{f.bytes_down} B, ALPN {list(f.alpn)}, SNI {f.sni or 'none'}"
        )
    check(report.ok, "only TLS to 15008 with ALPN h2; the payload never crossed in clear"
          + ("" if report.ok else f": {report.problems}"))  # fmt: skip
    say("")
    ok &= run_l7(lab, out)
    return ok


SPLIT_REQUESTS = 500


def run_l7(lab: Lab, out: list[str]) -> bool:
    """The waypoint part: weighted split, header match, L7 denial."""
    say = out.append
    ok = True

    def check(cond: bool, text: str) -> None:
        nonlocal ok
        ok &= cond
        say(f"  [{'ok' if cond else 'FAIL'}] {text}")

    wp = lab.spec.waypoint("demo/waypoint")
    reviews = lab.spec.service("demo/reviews")
    wp_ip = lab.ip(wp.pods[0])
    for pod in ("reviews-v1", "reviews-v2"):
        lab.start_app(pod, "http", 8080)
    say(f"L7 at the waypoint {wp.key} (pod {wp.pods[0]} {wp_ip} on {wp.node}, identity "
        f"{short(wp.identity(lab.spec.trust_domain))}); bound services: {', '.join(wp.services)}")  # fmt: skip

    results = get_parallel(lab, "client", str(reviews.vip), SPLIT_REQUESTS, connections=4)
    counts = Counter(who(body) for status, body in results if status == 200)
    share = 100 * counts["reviews-v1"] / SPLIT_REQUESTS
    check(
        sum(counts.values()) == SPLIT_REQUESTS and abs(share - 80) <= 7,
        f"HTTPRoute demo/reviews weights 80/20: {SPLIT_REQUESTS} requests to {reviews.vip}:80 "
        f"(4 keep-alive connections) -> reviews-v1 {counts['reviews-v1']} ({share:.1f} %), "
        f"reviews-v2 {counts['reviews-v2']} ({100 - share:.1f} %)",
    )
    via = sum(f"you are {wp_ip}:" in body for _, body in results)
    check(via == SPLIT_REQUESTS, f"the backends saw every request come from the waypoint ({via})")
    pinned = curl(lab, "client", f"http://{reviews.vip}/", headers={"x-version": "v2"})
    check(
        pinned.status == "200" and who(pinned.body) == "reviews-v2",
        f"header match x-version: v2 -> {who(pinned.body) or pinned.status}",
    )
    admin = curl(lab, "client", f"http://{reviews.vip}/admin/users")
    sneaky = curl(lab, "client", f"http://{reviews.vip}//admin/./users", path_as_is=True)
    other = curl(lab, "client", f"http://{reviews.vip}/products")
    check(admin.status == "403" and sneaky.status == "403" and other.status == "200",
          f"AuthorizationPolicy demo/reviews-no-admin (DENY /admin*): GET /admin/users -> "
          f"{admin.status} {admin.body!r}, GET //admin/./users -> {sneaky.status}, "
          f"GET /products -> {other.status}")  # fmt: skip

    metrics = lab.waypoint_metrics(wp.key)
    by_backend = {
        name: metric_sum(
            metrics, "istio_requests_total", destination_service_name=name, response_code="200"
        )
        for name in ("reviews-v1", "reviews-v2")
    }
    denied = metric_sum(
        metrics, "istio_requests_total", destination_service_name="reviews", response_code="403",
        response_flags="RBAC",
    )  # fmt: skip
    say("  waypoint metrics (15020) istio_requests_total: "
        + ", ".join(f"{{destination_service_name={k},response_code=200}} {v:.0f}" for k, v in by_backend.items())
        + f", {{destination_service_name=reviews,response_code=403,response_flags=RBAC}} {denied:.0f}")  # fmt: skip
    check(
        sum(by_backend.values()) == SPLIT_REQUESTS + 2 and denied == 2,
        f"the waypoint counted every request ({SPLIT_REQUESTS + 2} routed, 2 denied)",
    )
    log = lab.waypoints[wp.pods[0]].log_path.read_text(errors="replace").splitlines()
    line = next((x for x in log if "response_code=403" in x), "")
    fields = waypoint_access_fields(line) if line else {}
    say(f"  waypoint access log of the denial: src {short(fields.get('src.identity'))} "
        f"{fields.get('method', '-')} {fields.get('path', '-')} -> {fields.get('response_code', '-')} "
        f"policy={fields.get('policy', '-')}")  # fmt: skip
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    interrupt_on_sigterm()
    started = time.monotonic()
    spec = load_spec(DEFAULT_SPEC)
    print(
        f"ambient demo: building a lab ({len(spec.nodes)} nodes, {len(spec.pods)} pods, "
        f"{len(spec.nodes)} ztunnels, {len(spec.waypoints)} waypoint, capture rules in every mesh "
        "pod)...",
        flush=True,
    )
    lab = Lab.up(spec)
    out: list[str] = []
    try:
        print(
            f"lab {lab.prefix} up in {time.monotonic() - started:.1f} s; rules verified live in every mesh pod\n",
            flush=True,
        )
        ok = run(lab, out)
    finally:
        print("\n".join(out), flush=True)
        problems = lab.down()
        print(f"\nlab torn down ({problems or 'clean'}); logs kept in {lab.run_dir}")
    print(f"demo {'PASSED' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

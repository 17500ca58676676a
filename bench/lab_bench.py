"""The lab benchmark: pod-to-pod across nodes, direct vs through the mesh vs a stunnel TLS pair,
and HTTP through a waypoint vs the L4-only mesh vs direct.

One lab (the default spec), one run, three paths between two nodes:
* **direct**: ``legacy`` (n1) -> ``external`` (n2), both outside the mesh: plain TCP, the floor;
* **mesh**: ``client`` (n1) -> ``server`` (n2): captured by the rules, HBONE between the ztunnels;
* **stunnel**: ``legacy`` -> ``external`` through a stunnel client in ``legacy`` and a stunnel server
  in ``external`` (mutual TLS 1.3, ECDSA P-256 certificates from the same lab CA): what a user would
  otherwise pick.

For each: iperf3 throughput (one stream), and request/response rate and p50/p99 latency from a
Python load generator (``bench.lab_load``, 16 connections, 64-byte echo), and the new-connection rate
(``bench.lab_load connect``: a fresh connection per 64-byte exchange; stunnel then pays a TLS handshake
per connection, the mesh reuses pooled HBONE connections). Printed as a table with ratios to direct,
plus ztunnel CPU milliseconds per new mesh connection, ztunnel CPU seconds per GB moved (both nodes' ztunnels during the mesh
iperf3) and ztunnel RSS per open connection (200 idle connections held through the mesh).

L7 (HTTP/1.1 keep-alive, ``bench.lab_load http``, 8 connections, ``GET /`` answered by the same
``e2e.lab.apps http`` server on n2 in each case), three paths in the same run:
* **direct**: ``legacy`` (n1) -> ``external`` (n2) pod IP, no mesh;
* **mesh L4**: ``client`` (n1) -> service ``server`` VIP: ztunnels only (HBONE n1 -> n2);
* **waypoint**: ``client`` (n1) -> service ``flaky`` VIP (bound to the waypoint; its one pod is on
  n2, its app started without failures): ztunnel -> waypoint pod (n1) -> HTTP parsed, routed
  (HTTPRoute ``demo/flaky``), authorized, recorded -> HBONE to the pod's ztunnel on n2;
printed as requests per second and p50/p99 latency with ratios to direct, plus the waypoint's CPU
milliseconds per request.

Everything shares 2 cores, so compare ratios from this run, not absolutes (performance.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

from e2e.lab.cluster import Lab
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId

IPERF_PORT, ECHO_PORT, HTTP_PORT = 5201, 9000, 8080
HTTP_CONNS = 8
ST_IPERF, ST_ECHO = 15201, 15202  # stunnel client ports (loopback in the client pod)
ST_TLS_IPERF, ST_TLS_ECHO = 15443, 15444


def _stunnel_conf(lab: Lab, role: str) -> Path:
    ca = _ca(lab)
    d = lab.run_dir / f"stunnel-{role}"
    d.mkdir(exist_ok=True)
    cert = ca.issue(SpiffeId(lab.spec.trust_domain, "bench", f"stunnel-{role}"))
    (d / "cert.pem").write_bytes(cert.chain_pem)
    (d / "key.pem").write_bytes(cert.key_pem)
    (d / "ca.pem").write_bytes(cert.roots_pem)
    common = [
        "foreground = yes", "pid =", "syslog = no", "debug = 3",
        f"cert = {d / 'cert.pem'}", f"key = {d / 'key.pem'}", f"CAfile = {d / 'ca.pem'}",
        "verifyChain = yes", "sslVersionMin = TLSv1.3",
    ]  # fmt: skip
    ext = lab.ip("external")
    if role == "client":
        svc = [
            "[iperf]", "client = yes", f"accept = 127.0.0.1:{ST_IPERF}", f"connect = {ext}:{ST_TLS_IPERF}",
            "[echo]", "client = yes", f"accept = 127.0.0.1:{ST_ECHO}", f"connect = {ext}:{ST_TLS_ECHO}",
        ]  # fmt: skip
    else:
        svc = [
            "[iperf]", f"accept = 0.0.0.0:{ST_TLS_IPERF}", f"connect = 127.0.0.1:{IPERF_PORT}",
            "[echo]", f"accept = 0.0.0.0:{ST_TLS_ECHO}", f"connect = 127.0.0.1:{ECHO_PORT}",
        ]  # fmt: skip
    path = d / "stunnel.conf"
    path.write_text("\n".join(common + svc) + "\n")
    return path


def _ca(lab: Lab) -> LocalCa:
    return LocalCa.load(lab.ca_dir)


@contextmanager
def _procs(procs: list[subprocess.Popen[str]]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_port(lab: Lab, pod: str, host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = lab.socket_in(pod)
        sock.settimeout(0.5)
        try:
            sock.connect((host, port))
            return
        except OSError:
            time.sleep(0.05)
        finally:
            sock.close()
    raise RuntimeError(f"{host}:{port} not reachable from pod {pod}")


def _iperf(lab: Lab, pod: str, host: str, port: int, seconds: float) -> tuple[float, int]:
    proc = lab.exec(
        pod, ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"], timeout=seconds + 30
    )
    data = json.loads(proc.stdout or "{}")
    if "error" in data or proc.returncode != 0:
        raise RuntimeError(
            f"iperf3 from {pod} to {host}:{port}: {data.get('error') or proc.stderr}"
        )
    end = data["end"]
    return float(end["sum_received"]["bits_per_second"]), int(end["sum_received"]["bytes"])


def _rr(lab: Lab, pod: str, host: str, port: int, seconds: float) -> dict[str, float]:
    proc = lab.exec(
        pod,
        [
            lab.python,
            "-m",
            "bench.lab_load",
            "rr",
            "--host",
            host,
            "--port",
            str(port),
            "--conns",
            "16",
            "--seconds",
            str(seconds),
        ],
        timeout=seconds + 30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"load generator in {pod}: {proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def _connect_rate(lab: Lab, pod: str, host: str, port: int, seconds: float) -> dict[str, float]:
    """``bench.lab_load connect``: a new TCP connection per 64-byte exchange (per-connection cost)."""
    argv = [lab.python, "-m", "bench.lab_load", "connect", "--host", host, "--port", str(port),
            "--conns", "16", "--seconds", str(seconds)]  # fmt: skip
    proc = lab.exec(pod, argv, timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"connect load generator in {pod}: {proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def _http(lab: Lab, pod: str, host: str, port: int, seconds: float) -> dict[str, float]:
    argv = [lab.python, "-m", "bench.lab_load", "http", "--host", host, "--port", str(port),
            "--conns", str(HTTP_CONNS), "--seconds", str(seconds)]  # fmt: skip
    proc = lab.exec(pod, argv, timeout=seconds + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"HTTP load generator in {pod}: {proc.stderr}")
    result: dict[str, float] = json.loads(proc.stdout)
    return result


def run_l7(lab: Lab, seconds: float) -> dict[str, dict[str, float]]:
    """HTTP request rate and latency: direct, L4 mesh, through the waypoint (same run)."""
    apps = [lab.start_app(pod, "http", HTTP_PORT) for pod in ("external", "server", "flaky")]
    with _procs(apps):
        paths = {
            "direct": ("legacy", lab.ip("external"), HTTP_PORT),
            "mesh L4": ("client", str(lab.spec.service("demo/server").vip), 80),
            "waypoint": ("client", str(lab.spec.service("demo/flaky").vip), 80),
        }
        waypoint = [psutil.Process(w.pid) for w in lab.waypoints.values()]
        results: dict[str, dict[str, float]] = {}
        for name, (pod, host, port) in paths.items():
            _http(lab, pod, host, port, 0.3)  # warm-up: pooled HBONE connections, caches
            cpu0 = _cpu(waypoint)
            r = _http(lab, pod, host, port, seconds)
            cpu = _cpu(waypoint) - cpu0
            r["waypoint_cpu_ms_per_req"] = cpu * 1000 / r["requests"] if r["requests"] else 0.0
            results[name] = r
    return results


def _ztunnels(lab: Lab) -> list[psutil.Process]:
    out = []
    for z in lab.ztunnels.values():
        p = psutil.Process(z.pid)
        # `ip netns exec` execs, so the pid is python itself; children, if any, count too.
        out += [p, *p.children(recursive=True)]
    return out


def _cpu(procs: list[psutil.Process]) -> float:
    return float(sum(p.cpu_times().user + p.cpu_times().system for p in procs))


def _rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs)


def run(seconds: float, hold_conns: int, *, l7_only: bool = False) -> dict[str, object]:
    lab = Lab.up(log_level="warning")
    try:
        l7 = run_l7(lab, seconds)
        if l7_only:
            return {"l7": l7}
        ext, srv = lab.ip("external"), lab.ip("server")
        servers = [
            lab.popen(
                "external",
                ["iperf3", "-s", "-p", str(IPERF_PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            lab.popen(
                "server",
                ["iperf3", "-s", "-p", str(IPERF_PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            lab.start_app("external", "echo", ECHO_PORT),
            lab.start_app("server", "echo", ECHO_PORT),
            lab.popen(
                "external",
                ["stunnel", str(_stunnel_conf(lab, "server"))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            lab.popen(
                "legacy",
                ["stunnel", str(_stunnel_conf(lab, "client"))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
        ]
        with _procs(servers):
            _wait_port(lab, "legacy", ext, IPERF_PORT)
            _wait_port(lab, "legacy", "127.0.0.1", ST_IPERF)
            _wait_port(lab, "legacy", ext, ST_TLS_IPERF)
            paths = {
                "direct": ("legacy", ext, IPERF_PORT, ECHO_PORT),
                "mesh": ("client", srv, IPERF_PORT, ECHO_PORT),
                "stunnel": ("legacy", "127.0.0.1", ST_IPERF, ST_ECHO),
            }
            results: dict[str, dict[str, float]] = {}
            zt = _ztunnels(lab)
            cpu_per_gb = 0.0
            cpu_per_conn_ms = float("nan")
            for name, (pod, host, iport, eport) in paths.items():
                cpu0 = _cpu(zt)
                bps, nbytes = _iperf(lab, pod, host, iport, seconds)
                if name == "mesh":
                    cpu_per_gb = (_cpu(zt) - cpu0) / (nbytes / 1e9) if nbytes else 0.0
                rr = _rr(lab, pod, host, eport, seconds)
                cpu0 = _cpu(zt)
                conn = _connect_rate(lab, pod, host, eport, seconds)
                if name == "mesh" and conn["requests"]:
                    cpu_per_conn_ms = (_cpu(zt) - cpu0) * 1000 / conn["requests"]
                results[name] = {"gbps": bps / 1e9, **rr, "conn_rps": conn["rps"]}
            # RSS per open connection through the mesh.
            rss0 = _rss(zt)
            holder = subprocess.Popen(
                lab.pod_argv("client", [lab.python, "-m", "bench.lab_load", "hold", "--host", srv,
                                        "--port", str(ECHO_PORT), "--conns", str(hold_conns)]),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert holder.stdout is not None
            assert holder.stdin is not None
            line = holder.stdout.readline()
            time.sleep(0.5)  # let the ztunnels settle their per-connection buffers
            rss1 = _rss(zt)
            holder.stdin.close()  # the holder closes its connections and exits
            holder.wait(timeout=10)
            rss_per_conn = (rss1 - rss0) / hold_conns if line.startswith("held") else float("nan")
        return {
            "l7": l7,
            "paths": results,
            "cpu_s_per_gb": cpu_per_gb,
            "cpu_ms_per_conn": cpu_per_conn_ms,
            "rss_per_conn_kib": rss_per_conn / 1024,
            "held": line.strip(),
        }
    finally:
        lab.down()


def l7_table(l7: dict[str, dict[str, float]]) -> str:
    d = l7["direct"]
    lines = [
        f"HTTP/1.1 keep-alive, {HTTP_CONNS} connections, GET / (client n1 -> server pod n2)",
        f"{'path':<9} {'req/s':>9} {'x direct':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}",
    ]
    for name, r in l7.items():
        lines.append(
            f"{name:<9} {r['rps']:>9.0f} {r['rps'] / d['rps']:>8.2f} {r['p50_us'] / 1000:>8.2f} "
            f"{r['p99_us'] / 1000:>8.2f} {r['errors']:>6.0f}"
        )
    w, m = l7["waypoint"], l7["mesh L4"]
    lines += [
        f"waypoint vs mesh L4: request rate x{w['rps'] / m['rps']:.2f}, "
        f"p50 +{(w['p50_us'] - m['p50_us']) / 1000:.2f} ms",
        f"waypoint CPU per request (its process): {w['waypoint_cpu_ms_per_req']:.2f} ms",
    ]
    return "\n".join(lines)


def table(res: dict[str, object]) -> str:
    l7 = res["l7"]
    assert isinstance(l7, dict)
    if "paths" not in res:
        return l7_table(l7)
    paths = res["paths"]
    assert isinstance(paths, dict)
    d = paths["direct"]
    lines = [
        f"{'path':<9} {'iperf3 Gb/s':>11} {'x direct':>8} {'req/s':>9} {'x direct':>8} {'p50 us':>8} {'p99 us':>8} {'errors':>6} {'new conn/s':>10} {'x direct':>8}",
    ]
    for name, r in paths.items():
        lines.append(
            f"{name:<9} {r['gbps']:>11.2f} {r['gbps'] / d['gbps']:>8.2f} {r['rps']:>9.0f} {r['rps'] / d['rps']:>8.2f} "
            f"{r['p50_us']:>8.0f} {r['p99_us']:>8.0f} {r['errors']:>6.0f} {r['conn_rps']:>10.0f} {r['conn_rps'] / d['conn_rps']:>8.2f}"
        )
    m, s = paths["mesh"], paths["stunnel"]
    lines += [
        "",
        f"mesh vs stunnel: throughput x{m['gbps'] / s['gbps']:.2f}, request rate x{m['rps'] / s['rps']:.2f}, "
        f"new connections x{m['conn_rps'] / s['conn_rps']:.2f}",
        f"ztunnel CPU per new mesh connection (both nodes): {res['cpu_ms_per_conn']:.2f} ms",
        f"ztunnel CPU seconds per GB (both nodes, mesh iperf3): {res['cpu_s_per_gb']:.2f}",
        f"ztunnel RSS per open connection (both nodes, {res['held']}): {res['rss_per_conn_kib']:.1f} KiB",
        "",
        l7_table(l7),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench lab_bench")
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="per measurement (default %(default)s)"
    )
    parser.add_argument("--hold", type=int, default=200, help="idle mesh connections for RSS")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--l7-only", action="store_true", help="only the HTTP comparison (waypoint, mesh, direct)"
    )
    args = parser.parse_args(list(argv or []))
    res = run(args.seconds, args.hold, l7_only=args.l7_only)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))

"""A running lab: its run directory, state file, CA, ztunnel configs and processes, and teardown.

Owns the life cycle of one lab run:

``up``: write the state file (prefix, namespaces, pids: enough for ``down`` to clean after a killed
``up``), build the network (``topology``), generate and save a local CA, render one ztunnel config
per node, program the capture rules of every mesh pod (the istio-cni role: the node agent in rules
mode, so a pod is captured before any listener exists in it -- fail closed, never bypassed), start
one ztunnel per node in its node netns, start every waypoint replica (``waypoint proxy`` in its
own pod netns, not captured, with its SPIFFE identity, reading its node's config file), wait until
each ztunnel and waypoint reports ready, and verify the rules live. Any failure tears everything
down before the error propagates.

``down``: stop the ztunnels and waypoints (SIGTERM, then SIGKILL), kill whatever still runs in lab
namespaces, delete the namespaces (their links, rules and routes go with them) and the state file.

The run directory (default ``/tmp/ambient-lab/<prefix>``) holds ``state.json``, ``ca/``,
``<node>/config.yaml``, ``<node>/ztunnel.<gen>.log`` and ``waypoints/<pod>.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from e2e.lab import topology
from e2e.lab.spec import LabSpec, Names, PodSpec, load_spec, netns_path, render_config
from e2e.netns import in_netns, new_run_prefix
from netfilter import InpodConfig, PodNetfilter
from ztunnel.identity.ca import LocalCa
from ztunnel.node.agent import NodeAgent
from ztunnel.sources.localfile import parse_local_config
from ztunnel.state.store import WorkloadStore

DEFAULT_BASE = Path(os.environ.get("AMBIENT_LAB_DIR", "/tmp/ambient-lab"))
DEFAULT_SPEC = Path(__file__).parent / "specs" / "default.yaml"
STATE_FILE = "state.json"
READY_TIMEOUT = 30.0
ADMIN, METRICS, READINESS = 15000, 15020, 15021
# A second ztunnel on a node (hitless restart) needs its own admin ports in the node netns.
SURGE_PORTS = (15100, 15120, 15121)


WAYPOINT_PORTS = (15008, 15020, 15021)
"""HBONE, metrics, readiness of a waypoint pod (in its own netns)."""


class LabError(RuntimeError):
    """The lab could not be built or used; the message says what and where (node, pod, file)."""


@dataclass
class ZtunnelProc:
    node: str
    pid: int
    generation: int
    ports: tuple[int, int, int]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True


@dataclass
class WaypointProc:
    """One waypoint replica: ``waypoint proxy`` running in pod ``pod`` of waypoint ``waypoint``."""

    pod: str
    waypoint: str
    pid: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return topology._alive(self.pid)


@dataclass
class Lab:
    """One lab run. Build with ``Lab.up(...)``; attach to a running one with ``Lab.attach(run_dir)``."""

    spec: LabSpec
    run_dir: Path
    names: Names
    ztunnels: dict[str, ZtunnelProc] = field(default_factory=dict)
    waypoints: dict[str, WaypointProc] = field(default_factory=dict)
    """By pod name."""
    namespaces: list[str] = field(default_factory=list)
    inpod: InpodConfig = field(default_factory=InpodConfig)
    python: str = sys.executable
    ztunnel_args: tuple[str, ...] = ()
    """Extra ``ztunnel run`` flags for every ztunnel this lab starts (e.g. ``--recheck-interval``)."""

    # --- construction --------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        spec: LabSpec | str | Path = DEFAULT_SPEC,
        *,
        run_dir: Path | None = None,
        prefix: str | None = None,
        ztunnel: bool = True,
        log_level: str = "info",
        ztunnel_args: Sequence[str] = (),
    ) -> Lab:
        if not isinstance(spec, LabSpec):
            spec = load_spec(spec)
        prefix = prefix or new_run_prefix()
        run_dir = Path(run_dir or DEFAULT_BASE / prefix)
        if (run_dir / STATE_FILE).exists():
            raise LabError(f"{run_dir}: a lab is already recorded there (run `ambient-lab down`)")
        run_dir.mkdir(parents=True, exist_ok=True)
        lab = cls(
            spec=spec, run_dir=run_dir, names=Names(prefix=prefix), ztunnel_args=tuple(ztunnel_args)
        )
        lab._save_state()
        try:
            topology.build(spec, lab.names, record=lab._record)
            lab._write_ca_and_configs()
            if not ztunnel:
                lab.program_rules()  # with ztunnel, its node agent programs the rules itself
            if ztunnel:
                for node in spec.nodes:
                    lab.start_ztunnel(node.name, log_level=log_level)
                for w in spec.waypoints:
                    for pod in w.pods:
                        lab.start_waypoint(pod, log_level=log_level)
                lab.wait_ready()
                lab.wait_waypoints_ready()
            drifts = lab.verify_rules()
            if drifts:
                raise LabError("capture rules differ after up: " + "; ".join(drifts))
        except BaseException:
            lab.down()
            raise
        return lab

    @classmethod
    def attach(cls, run_dir: Path) -> Lab:
        """The lab recorded in ``run_dir/state.json`` (for ``down``/``status``/``exec`` from the CLI)."""
        path = Path(run_dir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LabError(f"{path}: no readable lab state ({exc})") from None
        spec = load_spec(state["spec_file"]) if state.get("spec_file") else None
        if spec is None:
            raise LabError(f"{path}: state has no spec file")
        lab = cls(spec=spec, run_dir=Path(run_dir), names=Names(prefix=state["prefix"]))
        lab.namespaces = list(state.get("namespaces", []))
        lab.ztunnel_args = tuple(state.get("ztunnel_args", ()))
        for z in state.get("ztunnels", []):
            lab.ztunnels[z["node"]] = ZtunnelProc(
                node=z["node"],
                pid=z["pid"],
                generation=z.get("generation", 0),
                ports=tuple(z.get("ports", (ADMIN, METRICS, READINESS))),
                log_path=Path(z["log"]),
            )
        for w in state.get("waypoints", []):
            lab.waypoints[w["pod"]] = WaypointProc(
                pod=w["pod"], waypoint=w["waypoint"], pid=w["pid"], log_path=Path(w["log"])
            )
        return lab

    def _record(self, namespaces: list[str]) -> None:
        self.namespaces = list(namespaces)
        self._save_state()

    def _save_state(self) -> None:
        spec_file = self.run_dir / "spec.yaml"
        if not spec_file.exists():
            src = Path(self.spec.source)
            if src.exists():
                spec_file.write_text(src.read_text())
        state = {
            "prefix": self.names.prefix,
            "spec_file": str(spec_file) if spec_file.exists() else "",
            "namespaces": self.namespaces,
            "ztunnel_args": list(self.ztunnel_args),
            "ztunnels": [
                {
                    "node": z.node,
                    "pid": z.pid,
                    "generation": z.generation,
                    "ports": list(z.ports),
                    "log": str(z.log_path),
                }
                for z in self.ztunnels.values()
            ],
            "waypoints": [
                {"pod": w.pod, "waypoint": w.waypoint, "pid": w.pid, "log": str(w.log_path)}
                for w in self.waypoints.values()
            ],
            "created": time.time(),
        }
        tmp = self.run_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.run_dir / STATE_FILE)

    def _write_ca_and_configs(self) -> None:
        ca = LocalCa.generate(self.spec.trust_domain)
        ca.save(self.ca_dir)
        for node in self.spec.nodes:
            doc = render_config(self.spec, node.name, self.names)
            text = yaml.safe_dump(doc, sort_keys=False)
            path = self.config_path(node.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            parse_local_config(text, source=str(path))  # fail here, naming the file
            path.write_text(text)

    # --- paths and names ------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self.names.prefix

    @property
    def ca_dir(self) -> Path:
        return self.run_dir / "ca"

    def config_path(self, node: str) -> Path:
        return self.run_dir / node / "config.yaml"

    def node_netns(self, node: str) -> str:
        return self.names.node(node)

    def pod_netns(self, pod: str | PodSpec) -> str:
        p = pod if isinstance(pod, PodSpec) else self.spec.pod(pod)
        return self.names.pod(p)

    def pod(self, name: str) -> PodSpec:
        return self.spec.pod(name)

    def ip(self, pod: str) -> str:
        return str(self.spec.pod(pod).ip)

    # --- rules (the istio-cni role) -------------------------------------------------------

    def program_rules(self) -> None:
        """Capture every mesh pod with the node agent in rules mode (before any ztunnel listens)."""

        async def one_node(node: str) -> None:
            store = WorkloadStore()
            cfg = parse_local_config(
                self.config_path(node).read_text(), source=str(self.config_path(node))
            )
            store.replace_all(cfg.workloads, cfg.services, cfg.policies)
            agent = NodeAgent(node=node, store=store, proxies=None, inpod=self.inpod)
            await agent.reconcile()
            failed = {uid: up for uid, up in agent.pods().items() if not up}
            if failed:
                raise LabError(f"node {node}: could not program rules: {failed}")

        async def all_nodes() -> None:
            for node in self.spec.nodes:
                await one_node(node.name)

        asyncio.run(all_nodes())

    def verify_rules(self) -> list[str]:
        """Drift of every mesh pod's rules (``[]`` = all live and as wanted)."""
        nf = PodNetfilter()
        out: list[str] = []
        for p in self.spec.pods:
            if p.captured:
                out += [
                    f"{p.key}: {d}" for d in nf.verify(netns_path(self.pod_netns(p)), self.inpod)
                ]
        return out

    # --- ztunnel processes ----------------------------------------------------------------

    def ztunnel_argv(self, node: str, ports: tuple[int, int, int], log_level: str) -> list[str]:
        admin, metrics, ready = ports
        return [
            "ip", "netns", "exec", self.node_netns(node),
            self.python, "-m", "ztunnel.cli", "run",
            "--config", str(self.config_path(node)),
            "--node", node,
            "--ca-dir", str(self.ca_dir),
            "--placement", "inpod",
            "--admin-port", str(admin),
            "--metrics-port", str(metrics),
            "--readiness-port", str(ready),
            "--log-level", log_level,
            *self.ztunnel_args,
        ]  # fmt: skip

    def start_ztunnel(
        self,
        node: str,
        *,
        ports: tuple[int, int, int] = (ADMIN, METRICS, READINESS),
        log_level: str = "info",
    ) -> ZtunnelProc:
        old = self.ztunnels.get(node)
        gen = old.generation + 1 if old else 0
        log_path = self.run_dir / node / f"ztunnel.{gen}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                self.ztunnel_argv(node, ports, log_level),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in the terminal reaches the lab, not the ztunnels
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        proc = ZtunnelProc(
            node=node, pid=popen.pid, generation=gen, ports=ports, log_path=log_path, popen=popen
        )
        self.ztunnels[node] = proc
        self._save_state()
        return proc

    def wait_ready(
        self, nodes: Sequence[str] | None = None, timeout: float = READY_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes or [n.name for n in self.spec.nodes]:
            proc = self.ztunnels[node]
            last = ""
            while True:
                if not proc.alive():
                    raise LabError(
                        f"ztunnel of node {node} exited; log {proc.log_path}:\n{tail(proc.log_path)}"
                    )
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, body = self.http_node(
                        node, proc.ports[2], "/healthz/ready", timeout=1.0
                    )
                    if status == 200:
                        break
                    last = body.strip()
                if time.monotonic() > deadline:
                    raise LabError(
                        f"ztunnel of node {node} not ready after {timeout:.0f} s ({last}); log {proc.log_path}:\n{tail(proc.log_path)}"
                    )
                time.sleep(0.05)

    def restart_ztunnel(self, node: str, *, log_level: str = "info") -> tuple[float, float]:
        """Hitless restart: start a new ztunnel beside the old one (SO_REUSEPORT), wait until it is
        ready, then SIGTERM the old one. Returns (monotonic time ready, time old one exited)."""
        old = self.ztunnels[node]
        ports = SURGE_PORTS if old.ports[0] == ADMIN else (ADMIN, METRICS, READINESS)
        self.start_ztunnel(node, ports=ports, log_level=log_level)
        try:
            self.wait_ready([node])
        except BaseException:
            self.ztunnels[node] = old
            raise
        ready_at = time.monotonic()
        topology.kill_pids([old.pid], grace=10.0)
        if old.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.popen.wait(timeout=1)
        return ready_at, time.monotonic()

    # --- talking to a node's ztunnel --------------------------------------------------------

    def http_node(
        self, node: str, port: int, path: str, *, method: str = "GET", timeout: float = 5.0
    ) -> tuple[int, str]:
        """An HTTP request to 127.0.0.1:port inside the node netns (admin/metrics/readiness)."""
        return _http_in(self.node_netns(node), port, path, method=method, timeout=timeout)

    def http_pod(
        self, pod: str, port: int, path: str, *, method: str = "GET", timeout: float = 5.0
    ) -> tuple[int, str]:
        """An HTTP request to 127.0.0.1:port inside a pod's netns (a waypoint's 15020/15021)."""
        return _http_in(self.pod_netns(pod), port, path, method=method, timeout=timeout)

    def config_dump(self, node: str) -> dict[str, Any]:
        status, body = self.http_node(node, self.ztunnels[node].ports[0], "/config_dump")
        if status != 200:
            raise LabError(f"node {node}: /config_dump answered {status}: {body[:200]}")
        data: dict[str, Any] = json.loads(body)
        return data

    def metrics(self, node: str) -> str:
        status, body = self.http_node(node, self.ztunnels[node].ports[1], "/metrics")
        if status != 200:
            raise LabError(f"node {node}: /metrics answered {status}")
        return body

    # --- waypoint processes -----------------------------------------------------------------

    def waypoint_argv(self, pod: str, log_level: str, extra_args: Sequence[str] = ()) -> list[str]:
        p = self.spec.pod(pod)
        if p.waypoint is None:
            raise LabError(f"pod {pod} is not a waypoint replica")
        w = self.spec.waypoint(f"{p.namespace}/{p.waypoint}")
        hbone, metrics, ready = WAYPOINT_PORTS
        return [
            "ip", "netns", "exec", self.pod_netns(p),
            "env", f"POD_NAME={p.name}",
            self.python, "-m", "waypoint.cli", "proxy",
            "--config", str(self.config_path(p.node)),
            "--identity", w.identity(self.spec.trust_domain),
            "--ca-dir", str(self.ca_dir),
            "--name", w.name,
            "--namespace", w.namespace,
            "--hbone-port", str(hbone),
            "--metrics-port", str(metrics),
            "--readiness-port", str(ready),
            "--log-level", log_level,
            *extra_args,
        ]  # fmt: skip

    def start_waypoint(
        self, pod: str, *, log_level: str = "info", extra_args: Sequence[str] = ()
    ) -> WaypointProc:
        """Start ``waypoint proxy`` in the waypoint replica ``pod`` (not waiting for readiness;
        ``wait_waypoints_ready`` does). ``extra_args`` go to ``waypoint proxy`` (e.g. ``--kube``)."""
        p = self.spec.pod(pod)
        log_path = self.run_dir / "waypoints" / f"{pod}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.waypoint_argv(pod, log_level, extra_args)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]),
            )  # fmt: skip
        proc = WaypointProc(
            pod=pod, waypoint=p.waypoint or "", pid=popen.pid, log_path=log_path, popen=popen
        )
        self.waypoints[pod] = proc
        self._save_state()
        return proc

    def wait_waypoints_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every waypoint replica answers 200 on 15021 ``/healthz/ready``."""
        deadline = time.monotonic() + timeout
        for proc in self.waypoints.values():
            last = ""
            while True:
                if not proc.alive():
                    raise LabError(
                        f"waypoint {proc.waypoint} (pod {proc.pod}) exited; log {proc.log_path}:\n"
                        f"{tail(proc.log_path)}"
                    )
                with contextlib.suppress(OSError, http.client.HTTPException):
                    status, body = self.http_pod(
                        proc.pod, WAYPOINT_PORTS[2], "/healthz/ready", timeout=1.0
                    )
                    if status == 200:
                        break
                    last = body.strip()
                if time.monotonic() > deadline:
                    raise LabError(
                        f"waypoint {proc.waypoint} (pod {proc.pod}) not ready after {timeout:.0f} s"
                        f" ({last}); log {proc.log_path}:\n{tail(proc.log_path)}"
                    )
                time.sleep(0.05)

    def waypoint_metrics(self, waypoint: str) -> str:
        """``/metrics`` (15020) of every replica of ``waypoint`` (name or ``ns/name``), concatenated."""
        try:
            w = self.spec.waypoint(waypoint)
        except KeyError as exc:
            raise LabError(str(exc.args[0])) from None
        out = []
        for pod in w.pods:
            status, body = self.http_pod(pod, WAYPOINT_PORTS[1], "/metrics")
            if status != 200:
                raise LabError(f"waypoint pod {pod}: /metrics answered {status}")
            out.append(body)
        return "\n".join(out)

    # --- running things in pods -------------------------------------------------------------

    def pod_argv(self, pod: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.pod_netns(pod), *argv]

    def exec(
        self,
        pod: str,
        argv: Sequence[str],
        *,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.pod_argv(pod, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"in pod {pod}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def popen(
        self,
        pod: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.pod_argv(pod, argv),
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def start_app(
        self,
        pod: str,
        kind: str = "http",
        port: int = 8080,
        *,
        args: Sequence[str] = (),
        timeout: float = 10.0,
    ) -> subprocess.Popen[str]:
        """Start ``e2e.lab.apps`` (``http``, ``echo`` or ``grpc``) in a pod and wait until it
        listens. ``args`` go to the app (e.g. ``["--fail-first", "1"]``)."""
        argv = [
            "env",
            f"POD_NAME={pod}",
            self.python,
            "-m",
            "e2e.lab.apps",
            kind,
            "--port",
            str(port),
            *args,
        ]
        proc = subprocess.Popen(
            self.pod_argv(pod, argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True,
            cwd=str(Path(__file__).resolve().parents[2]),
        )  # fmt: skip
        assert proc.stdout is not None
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            line = proc.stdout.readline()
        finally:
            timer.cancel()
        if line.strip() != "ready":
            proc.kill()
            raise LabError(f"app {kind} in pod {pod} did not start (exit {proc.poll()})")
        return proc

    def socket_in(self, pod: str, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket living in the pod's netns (usable from any thread)."""
        return in_netns(
            netns_path(self.pod_netns(pod)), lambda: socket.socket(family, socket.SOCK_STREAM)
        )

    def http_connection(
        self, pod: str, host: str, port: int = 80, *, timeout: float = 10.0
    ) -> http.client.HTTPConnection:
        """A plain ``http.client`` keep-alive connection from inside ``pod`` (captured like any
        app's connection), already connected to ``host:port``."""
        sock = self.socket_in(pod)
        sock.settimeout(timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn.sock = sock
        return conn

    @contextlib.contextmanager
    def server_in(self, pod: str, port: int) -> Iterator[socket.socket]:
        """A listening socket on the pod's IP (``0.0.0.0``) inside its netns."""
        sock = in_netns(
            netns_path(self.pod_netns(pod)),
            lambda: socket.create_server(("0.0.0.0", port), reuse_port=True, backlog=512),
        )
        try:
            yield sock
        finally:
            sock.close()

    @contextlib.contextmanager
    def capture(self, node: str, *, iface: str = "eth0", name: str = "capture") -> Iterator[Path]:
        """tcpdump on ``iface`` of the node netns (its link to the fabric) for the ``with`` body."""
        path = self.run_dir / f"{name}-{node}.pcap"
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.node_netns(node), "tcpdump", "-i", iface, "-U", "--immediate-mode", "-s", "0",
             "-n", "-w", str(path), "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # tcpdump says "listening on" once the socket is attached: only then start traffic.
            assert proc.stderr is not None
            line = proc.stderr.readline().decode(errors="replace")
            if "listening" not in line:
                raise LabError(f"tcpdump in node {node} did not start: {line.strip()}")
            yield path
        finally:
            time.sleep(0.2)  # let the last segments reach the file (-U flushes per packet)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    # --- status and teardown ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        nodes = []
        for n in self.spec.nodes:
            z = self.ztunnels.get(n.name)
            ready = False
            if z is not None and z.alive():
                with contextlib.suppress(OSError, http.client.HTTPException):
                    ready = (
                        self.http_node(n.name, z.ports[2], "/healthz/ready", timeout=1.0)[0] == 200
                    )
            nodes.append(
                {
                    "name": n.name,
                    "ip": str(n.ip),
                    "podCidr": str(n.pod_cidr),
                    "netns": self.node_netns(n.name),
                    "ztunnel": {
                        "pid": z.pid,
                        "alive": z.alive(),
                        "ready": ready,
                        "log": str(z.log_path),
                    }
                    if z
                    else None,
                }
            )
        pods = [
            {
                "name": p.name,
                "namespace": p.namespace,
                "node": p.node,
                "ip": str(p.ip),
                "mesh": p.mesh,
                "captured": p.captured,
                "waypoint": p.waypoint,
                "identity": p.identity(self.spec.trust_domain) if p.mesh else None,
                "serviceAccount": p.service_account,
                "labels": dict(p.labels),
                "netns": self.pod_netns(p),
            }
            for p in self.spec.pods
        ]
        services = [
            {
                "name": s.name,
                "namespace": s.namespace,
                "vip": str(s.vip),
                "ports": {str(k): v for k, v in s.ports.items()},
                "waypoint": s.waypoint,
            }
            for s in self.spec.services
        ]
        waypoints = []
        for w in self.spec.waypoints:
            replicas = []
            for pod in w.pods:
                proc = self.waypoints.get(pod)
                ready = False
                if proc is not None and proc.alive():
                    with contextlib.suppress(OSError, http.client.HTTPException):
                        ready = (
                            self.http_pod(pod, WAYPOINT_PORTS[2], "/healthz/ready", timeout=1.0)[0]
                            == 200
                        )
                replicas.append(
                    {
                        "pod": pod,
                        "ip": str(self.spec.pod(pod).ip),
                        "pid": proc.pid if proc else None,
                        "alive": bool(proc and proc.alive()),
                        "ready": ready,
                        "log": str(proc.log_path) if proc else None,
                    }
                )
            waypoints.append(
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "identity": w.identity(self.spec.trust_domain),
                    "node": w.node,
                    "vip": str(w.vip),
                    "services": list(w.services),
                    "replicas": replicas,
                }
            )
        return {
            "prefix": self.prefix,
            "runDir": str(self.run_dir),
            "nodes": nodes,
            "pods": pods,
            "services": services,
            "waypoints": waypoints,
        }

    def down(self) -> list[str]:
        """Remove everything; returns problems (empty = clean). Safe to call twice."""
        pids = [z.pid for z in self.ztunnels.values()] + [w.pid for w in self.waypoints.values()]
        topology.kill_pids(pids, grace=3.0)
        procs: list[ZtunnelProc | WaypointProc] = [
            *self.ztunnels.values(),
            *self.waypoints.values(),
        ]
        for proc in procs:
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=1)
        problems = topology.destroy(self.prefix, self.namespaces)
        if not problems:
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / STATE_FILE).unlink()
        return problems

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def down_run_dir(run_dir: Path) -> list[str]:
    """``down`` from a state file alone (after a killed ``up`` too)."""
    path = Path(run_dir) / STATE_FILE
    state = json.loads(path.read_text())
    topology.kill_pids(
        [int(z["pid"]) for z in state.get("ztunnels", []) + state.get("waypoints", [])]
    )
    problems = topology.destroy(state["prefix"], state.get("namespaces", []))
    if not problems:
        path.unlink()
    return problems


def _http_in(
    netns: str, port: int, path: str, *, method: str = "GET", timeout: float = 5.0
) -> tuple[int, str]:
    """An HTTP request to 127.0.0.1:port inside the named netns."""
    sock = in_netns(
        netns_path(netns), lambda: socket.create_connection(("127.0.0.1", port), timeout=timeout)
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request(method, path, headers={"Host": f"127.0.0.1:{port}"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

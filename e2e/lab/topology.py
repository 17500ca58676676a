"""Build and remove the lab's network: a fabric netns with a bridge, node netns, pod netns.

Owns the kernel side of the address plan in ``spec``:

* fabric ``<prefix>-fabric``: bridge ``br0``; each node's link ends there as ``<node>`` (enslaved);
* node ``<prefix>-<node>``: ``eth0`` on the bridge (``10.240.0.x/24``), forwarding on, a route to
  every other node's pod CIDR via that node, a ``/32`` route per local pod on its veth ``p<j>``,
  whose address ``169.254.1.1`` is the pods' gateway;
* pod ``<prefix>-<node>-<pod>``: ``eth0`` with the pod IP ``/32`` and a default route via
  ``169.254.1.1``.

Every link is created directly inside its namespaces (``ip link add ... netns``), so nothing of the
lab ever exists in the root netns: no lab address is routable from the host. Commands run as one
``ip -batch`` per namespace. The namespaces are recorded in the run's state file *before* they are
made, so ``destroy`` can clean after an ``up`` that was killed half-way; ``destroy`` also finds
stragglers by prefix and kills every process still inside a lab namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable

from e2e.lab.spec import POD_GATEWAY, LabSpec, Names

IP_TIMEOUT = 30.0


class TopologyError(RuntimeError):
    """A command building or removing the lab failed; the message names the namespace and the command."""


def _run(argv: list[str], *, stdin: str | None = None, what: str) -> str:
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"{what}: {' '.join(argv)}: {exc}") from None
    if proc.returncode != 0:
        raise TopologyError(f"{what}: {' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _batch(netns: str | None, lines: list[str], *, what: str) -> None:
    """One `ip -batch` (inside ``netns`` if given); the error names the failing line."""
    if not lines:
        return
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    try:
        _run(argv, stdin="\n".join(lines) + "\n", what=what)
    except TopologyError as exc:
        raise TopologyError(f"{exc}\n  batch was:\n    " + "\n    ".join(lines)) from None


def _sysctl(netns: str, settings: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in settings.items()]
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *args], what=f"sysctl in {netns}")


def build(spec: LabSpec, names: Names, *, record: Callable[[list[str]], None]) -> None:
    """Create the whole network. ``record`` is called with every namespace name before creation."""
    all_ns = names.all(spec)
    record(all_ns)
    _batch(None, [f"netns add {ns}" for ns in all_ns], what="creating namespaces")

    fabric = names.fabric
    fab = ["link set lo up", "link add br0 type bridge", "link set br0 up"]
    for node in spec.nodes:
        # eth0 lives in the node; its peer is created straight into the fabric.
        _batch(
            names.node(node.name),
            [f"link add eth0 type veth peer name {node.name} netns {fabric}"],
            what=f"link of node {node.name}",
        )
        fab += [f"link set {node.name} master br0", f"link set {node.name} up"]
    _batch(fabric, fab, what="fabric bridge")

    for node in spec.nodes:
        ns = names.node(node.name)
        lines = [
            "link set lo up",
            f"addr add {node.ip}/24 dev eth0",
            "link set eth0 up",
        ]
        for other in spec.nodes:
            if other.name != node.name:
                lines.append(f"route add {other.pod_cidr} via {other.ip} dev eth0")
        sysctls = {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
        }
        for pod in spec.pods_on(node.name):
            pod_ns = names.pod(pod)
            veth = f"p{pod.index}"
            _batch(
                pod_ns,
                [f"link add eth0 type veth peer name {veth} netns {ns}"],
                what=f"link of pod {pod.key}",
            )
            _batch(
                pod_ns,
                [
                    "link set lo up",
                    f"addr add {pod.ip}/32 dev eth0",
                    "link set eth0 up",
                    f"route add {POD_GATEWAY} dev eth0 scope link",
                    f"route add default via {POD_GATEWAY} dev eth0",
                ],
                what=f"pod {pod.key}",
            )
            lines += [
                f"addr add {POD_GATEWAY}/32 dev {veth}",
                f"link set {veth} up",
                f"route add {pod.ip}/32 dev {veth}",
            ]
        _batch(ns, lines, what=f"node {node.name}")
        _sysctl(ns, sysctls)


def list_namespaces(prefix: str) -> list[str]:
    """Existing namespaces whose name starts with ``<prefix>-``."""
    out = _run(["ip", "netns", "list"], what="listing namespaces")
    found = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [ns for ns in found if ns.startswith(f"{prefix}-")]


def netns_pids(netns: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", netns],
        capture_output=True,
        text=True,
        timeout=IP_TIMEOUT,
        check=False,
    )
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_pids(pids: Iterable[int], *, grace: float = 3.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL what is left."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone: reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def destroy(prefix: str, recorded: Iterable[str] = ()) -> list[str]:
    """Kill every process in the lab's namespaces, delete them; returns what could not be removed."""
    if not prefix:
        raise TopologyError("refusing to destroy with an empty prefix")
    targets = sorted(set(recorded) | set(list_namespaces(prefix)))
    existing = set(list_namespaces(prefix))
    targets = [ns for ns in targets if ns in existing]
    kill_pids(pid for ns in targets for pid in netns_pids(ns))
    problems: list[str] = []
    for ns in reversed(targets):
        proc = subprocess.run(
            ["ip", "netns", "del", ns],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            problems.append(f"{ns}: {proc.stderr.strip()}")
    # Nothing of ours should ever be in the root netns; remove anything carrying the prefix anyway.
    links = _run(["ip", "-o", "link", "show"], what="listing links")
    for line in links.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            ifname = parts[1].strip().split("@")[0]
            if ifname.startswith(prefix):
                subprocess.run(["ip", "link", "del", ifname], capture_output=True, check=False)
    return problems

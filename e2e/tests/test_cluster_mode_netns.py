"""Netns discovery against real network namespaces (root): pinned files, the /proc fallback, IP moves.

Each test makes its own namespaces under a per-run prefix (``e2e.netns``) and narrows the finder to
that prefix with the name glob, so namespaces of other runs on the machine never interfere.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.netns import NetnsSet, netns_path, netns_set, run
from ztunnel.kube.netns import NetnsFinder, NetnsNotFound, stat_id

IP = ipaddress.ip_address


@pytest.fixture
def nss() -> Iterator[NetnsSet]:
    with netns_set() as s:
        yield s


def _add_ip(ns: str, ip: str) -> None:
    run(["ip", "addr", "add", f"{ip}/32", "dev", "lo"], netns=ns)


def test_finds_pinned_netns_by_pod_ip(nss: NetnsSet) -> None:
    a, b = nss.add_netns("pa"), nss.add_netns("pb")
    _add_ip(a, "10.77.0.1")
    _add_ip(b, "10.77.0.2")
    run(["ip", "addr", "add", "fd77::2/128", "dev", "lo"], netns=b)
    finder = NetnsFinder(host_proc=None, name_glob=f"{nss.prefix}-*")
    found = finder.find([IP("10.77.0.2")], "pod app/b")
    assert found.path == str(Path("/var/run/netns") / b)
    assert found.netns_id == stat_id(netns_path(b))
    assert IP("fd77::2") in found.addresses
    # Dual-stack pod: the v6 address alone finds it too.
    assert finder.find([IP("fd77::2")], "pod app/b").path == found.path
    with pytest.raises(NetnsNotFound, match=r"pod app/c: no network namespace holds 10\.77\.0\.3"):
        finder.find([IP("10.77.0.3")], "pod app/c")


def test_ip_added_later_and_moved(nss: NetnsSet) -> None:
    a, b = nss.add_netns("ma"), nss.add_netns("mb")
    finder = NetnsFinder(host_proc=None, name_glob=f"{nss.prefix}-*")
    with pytest.raises(NetnsNotFound):
        finder.find([IP("10.77.1.1")], "pod x")
    _add_ip(a, "10.77.1.1")  # the CNI configures the IP after the netns exists
    assert finder.find([IP("10.77.1.1")], "pod x").path.endswith(a)
    run(["ip", "addr", "del", "10.77.1.1/32", "dev", "lo"], netns=a)
    _add_ip(b, "10.77.1.1")  # sandbox recreated: the IP lives elsewhere now
    assert finder.find([IP("10.77.1.1")], "pod x").path.endswith(b)


def test_proc_fallback_finds_a_process_netns(nss: NetnsSet, tmp_path: Path) -> None:
    ns = nss.add_netns("pr")
    _add_ip(ns, "10.77.2.1")
    # An unpinned netns: a process holds it; the pinned file is then removed (runtimes that do
    # not pin to /var/run/netns look like this).
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        deadline = 50
        pids: list[str] = []
        while not pids and deadline:
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            deadline -= 1
            if not pids:
                subprocess.run(["sleep", "0.05"], check=False)
        assert pids, "the sleeper did not enter the namespace"
        empty = tmp_path / "netns"
        empty.mkdir()
        finder = NetnsFinder(netns_dir=empty, host_proc=Path("/proc"))
        found = finder.find([IP("10.77.2.1")], "pod p")
        assert found.path.startswith("/proc/")
        assert found.path.endswith("/ns/net")
        assert found.netns_id == stat_id(netns_path(ns))
    finally:
        proc.kill()
        proc.wait(timeout=5)

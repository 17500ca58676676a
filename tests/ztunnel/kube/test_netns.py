"""Netns choice (pure) and the finder's search order and caching, with fake address listings.

Discovery against real namespaces needs root: e2e/tests/test_cluster_mode_netns.py.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ztunnel.kube.netns import (
    Candidate,
    NetnsAmbiguous,
    NetnsFinder,
    NetnsNotFound,
    choose,
)

IP = ipaddress.ip_address


def cand(path: str, ino: int, *ips: str) -> Candidate:
    return Candidate(path=path, netns_id=(4, ino), addresses=frozenset(IP(i) for i in ips))


CHOOSE = [
    ("single", [cand("/a", 1, "10.0.0.1")], ["10.0.0.1"], "/a"),
    ("first-path-of-same-netns", [cand("/a", 1, "10.0.0.1"), cand("/b", 1, "10.0.0.1")], ["10.0.0.1"], "/a"),
    ("v6-of-dual-stack", [cand("/a", 1, "fd00::1")], ["10.0.0.1", "fd00::1"], "/a"),
    ("others-ignored", [cand("/a", 1, "10.0.0.9"), cand("/b", 2, "10.0.0.1")], ["10.0.0.1"], "/b"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("cands", "ips", "path"), [c[1:] for c in CHOOSE], ids=[c[0] for c in CHOOSE]
)
def test_choose(cands: list[Candidate], ips: list[str], path: str) -> None:
    assert choose(cands, [IP(i) for i in ips], "pod app/web").path == path


def test_choose_errors_name_the_pod() -> None:
    with pytest.raises(NetnsNotFound, match=r"pod app/web: no network namespace holds 10\.0\.0\.1"):
        choose([cand("/a", 1, "10.0.0.2")], [IP("10.0.0.1")], "pod app/web")
    with pytest.raises(NetnsAmbiguous, match=r"pod app/web: .* /a, /b"):
        choose(
            [cand("/a", 1, "10.0.0.1"), cand("/b", 2, "10.0.0.1")], [IP("10.0.0.1")], "pod app/web"
        )
    with pytest.raises(NetnsNotFound, match="no IP"):
        choose([], [], "pod app/web")


class FakeHost:
    """A netns directory with files and what each namespace (by path) holds."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "netns"
        self.dir.mkdir()
        self.proc = tmp / "proc"
        self.proc.mkdir()
        self.addresses: dict[str, set[str]] = {}
        self.ids: dict[str, int] = {}
        self.listed: list[str] = []

    def add(self, name: str, ino: int, *ips: str) -> str:
        path = self.dir / name
        path.touch()
        self.addresses[str(path)] = set(ips)
        self.ids[str(path)] = ino
        return str(path)

    def add_proc(self, pid: int, ino: int, *ips: str) -> str:
        path = self.proc / str(pid) / "ns" / "net"
        path.parent.mkdir(parents=True)
        path.touch()
        self.addresses[str(path)] = set(ips)
        self.ids[str(path)] = ino
        return str(path)

    def addresses_of(self, path: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        self.listed.append(path)
        if path not in self.addresses:
            raise FileNotFoundError(path)
        return frozenset(IP(a) for a in self.addresses[path])

    def stat(self, path: str) -> tuple[int, int] | None:
        return (4, self.ids[path]) if path in self.ids and Path(path).exists() else None

    def finder(self, **kw: object) -> NetnsFinder:
        args: dict[str, object] = {"netns_dir": self.dir, "host_proc": self.proc, **kw}
        return NetnsFinder(
            addresses_of=self.addresses_of,
            stat_id=self.stat,
            **args,  # type: ignore[arg-type]
        )


def test_finder_prefers_pinned_files_and_caches(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    a = host.add("cni-a", 1, "10.0.0.1")
    host.add("cni-b", 2, "10.0.0.2")
    host.add_proc(100, 1, "10.0.0.1")
    finder = host.finder()
    assert finder.find([IP("10.0.0.1")], "pod a").path == a
    first = len(host.listed)
    # Second lookup: the cache answers, only the chosen netns is re-listed (confirmation).
    assert finder.find([IP("10.0.0.1")], "pod a").path == a
    assert host.listed[first:] == [a]


def test_finder_relists_on_miss(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    a = host.add("cni-a", 1)
    finder = host.finder(host_proc=None)
    with pytest.raises(NetnsNotFound, match=r"pod a: .*looked in .*netns/\*"):
        finder.find([IP("10.0.0.1")], "pod a")
    host.addresses[a].add("10.0.0.1")  # the CNI assigns the IP after creating the netns
    assert finder.find([IP("10.0.0.1")], "pod a").path == a


def test_finder_falls_back_to_proc(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.add("cni-a", 1, "10.0.0.9")
    p = host.add_proc(4242, 7, "10.0.0.1")
    host.add_proc(4243, 7, "10.0.0.1")  # same netns, second process
    assert host.finder().find([IP("10.0.0.1")], "pod x").path == p


def test_finder_glob_keeps_other_namespaces_out(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    host.add("other-lab-pod", 1, "10.0.0.1")
    mine = host.add("mine-pod", 2, "10.0.0.1")
    with pytest.raises(NetnsAmbiguous):
        host.finder(host_proc=None).find([IP("10.0.0.1")], "pod x")
    assert host.finder(host_proc=None, name_glob="mine-*").find([IP("10.0.0.1")], "x").path == mine


def test_finder_skips_unreadable_and_vanished(tmp_path: Path) -> None:
    host = FakeHost(tmp_path)
    gone = host.add("cni-gone", 1, "10.0.0.1")
    del host.addresses[gone]  # listing fails (EACCES / vanished)
    ok = host.add("cni-ok", 2, "10.0.0.1")
    assert host.finder(host_proc=None).find([IP("10.0.0.1")], "x").path == ok

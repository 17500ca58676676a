"""netfilter on a real kernel: apply, verify, idempotence, drift, repair, removal, failure rollback.

Each test makes its own namespace (per-run prefix) and removes it in a fixture, even on failure.
Both backends (iptables-nft and native nft) and both inbound modes are covered.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from e2e.netns import netns_path, netns_set, run
from netfilter.apply import ApplyError, PodNetfilter
from netfilter.executor import ExecResult, SubprocessExecutor
from netfilter.model import Backend, Family, InboundMode, InpodConfig, RouteSpec
from netfilter.render import iptables_command
from netfilter.routes import Pyroute2RouteOps, RouteError
from netfilter.rules import inpod_ruleset

BACKENDS = [Backend.IPTABLES, Backend.NFT]


@pytest.fixture
def pod() -> Iterator[tuple[str, str]]:
    """(netns name, netns path) of a fresh namespace with lo up."""
    with netns_set() as nss:
        name = nss.add_netns("pod")
        yield name, netns_path(name)


def _state(name: str) -> str:
    """Everything netfilter/routing-related in the netns, minus timestamps and nft handles."""
    parts = [
        run(["iptables-save"], netns=name).stdout,
        run(["ip6tables-save"], netns=name).stdout,
        _sorted_chains(run(["nft", "list", "ruleset"], netns=name).stdout),
        run(["ip", "rule"], netns=name).stdout,
        run(["ip", "-6", "rule"], netns=name).stdout,
        run(["ip", "route", "show", "table", "all"], netns=name).stdout,
        run(["ip", "-6", "route", "show", "table", "all"], netns=name).stdout,
    ]
    return re.sub(r"^#.*$", "", "\n".join(parts), flags=re.MULTILINE)


def _sorted_chains(listing: str) -> str:
    """`nft list ruleset` with each table's chain blocks sorted: re-creating a chain moves it to
    the end of the listing without changing anything that matters."""
    out: list[str] = []
    for table in re.split(r"(?m)^(?=table )", listing):
        head, *chains = re.split(r"(?m)^(?=\tchain )", table)
        out.append(head + "".join(sorted(c.rstrip("\n}") + "\n" for c in chains)))
    return "".join(out)


def _assert_no_residue(name: str) -> None:
    for tool in ("iptables-save", "ip6tables-save"):
        assert "ZT_" not in run([tool], netns=name).stdout
    assert "table ip zt" not in run(["nft", "list", "ruleset"], netns=name).stdout
    assert "table ip6 zt" not in run(["nft", "list", "ruleset"], netns=name).stdout
    for fam in ("-4", "-6"):
        assert "lookup 100" not in run(["ip", fam, "rule"], netns=name).stdout
        out = run(["ip", fam, "route", "show", "table", "100"], netns=name, check=False)
        assert out.stdout.strip() == ""


def _delete_outbound_rule(name: str, backend: Backend, cfg: InpodConfig) -> None:
    """Delete the outbound REDIRECT rule by hand, as an operator (or another tool) might."""
    rule = next(
        r for r in inpod_ruleset(cfg).rules if r.family is Family.V4 and "outbound TCP" in r.comment
    )
    if backend is Backend.IPTABLES:
        run(iptables_command(rule, "-D"), netns=name)
        return
    listing = run(["nft", "-a", "list", "chain", "ip", "zt", "nat_ZT_OUTPUT"], netns=name).stdout
    handle = next(
        line.rsplit("# handle ", 1)[1].strip()
        for line in listing.splitlines()
        if "outbound TCP" in line
    )
    run(["nft", "delete", "rule", "ip", "zt", "nat_ZT_OUTPUT", "handle", handle], netns=name)


@pytest.mark.parametrize("mode", list(InboundMode), ids=lambda m: m.value)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_lifecycle(pod, backend: Backend, mode: InboundMode) -> None:
    name, path = pod
    cfg = InpodConfig(backend=backend, inbound_mode=mode, dns_capture=True)
    nf = PodNetfilter()
    assert nf.verify(path, cfg)  # nothing there yet

    assert nf.program(path, cfg)
    assert nf.verify(path, cfg) == []
    # The loaded rules are Istio's shape, under our prefix.
    if backend is Backend.IPTABLES:
        save = run(["iptables-save"], netns=name).stdout
        assert '-A OUTPUT -m comment --comment "zt: hook nat OUTPUT" -j ZT_OUTPUT' in save
        assert "REDIRECT --to-ports 15001" in save
    else:
        assert "redirect to :15001" in run(["nft", "list", "table", "ip", "zt"], netns=name).stdout
    assert "fwmark 0x111/0xfff lookup 100" in run(["ip", "rule"], netns=name).stdout
    assert "local default dev lo" in run(["ip", "route", "show", "table", "100"], netns=name).stdout

    # Applying again changes nothing at all.
    before = _state(name)
    assert nf.program(path, cfg) == []
    assert _state(name) == before

    # Drift by hand: verify names it, repair fixes it.
    _delete_outbound_rule(name, backend, cfg)
    run(["ip", "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100"], netns=name)
    drifts = nf.verify(path, cfg)
    assert sorted(d.kind for d in drifts) == ["missing_ip_rule", "missing_rule"], drifts
    assert any("REDIRECT --to-ports 15001" in d.detail for d in drifts)
    assert nf.program(path, cfg) == drifts
    assert nf.verify(path, cfg) == []

    nf.unprogram(path, cfg)
    _assert_no_residue(name)
    assert nf.verify(path, cfg)  # everything missing again


def test_switching_backend_removes_the_other(pod) -> None:
    name, path = pod
    nf = PodNetfilter()
    nf.program(path, InpodConfig(backend=Backend.IPTABLES))
    nft_cfg = InpodConfig(backend=Backend.NFT)
    drifts = nf.verify(path, nft_cfg)
    assert any(d.where.startswith("iptables") and d.kind == "extra_chain" for d in drifts)
    nf.program(path, nft_cfg)
    assert nf.verify(path, nft_cfg) == []
    assert "ZT_" not in run(["iptables-save"], netns=name).stdout
    nf.unprogram(path, nft_cfg)
    _assert_no_residue(name)


def test_other_peoples_rules_are_kept(pod) -> None:
    name, path = pod
    run(["iptables", "-t", "nat", "-N", "KUBE-TEST"], netns=name)
    run(["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "KUBE-TEST"], netns=name)
    run(["nft", "add", "table", "ip", "other"], netns=name)
    run(["ip", "rule", "add", "fwmark", "0x5", "lookup", "200"], netns=name)
    nf = PodNetfilter()
    for backend in BACKENDS:
        cfg = InpodConfig(backend=backend)
        nf.program(path, cfg)
        nf.unprogram(path, cfg)
    save = run(["iptables-save"], netns=name).stdout
    assert "-A OUTPUT -p udp -j KUBE-TEST" in save
    assert ":KUBE-TEST" in save
    assert "table ip other" in run(["nft", "list", "tables"], netns=name).stdout
    assert "lookup 200" in run(["ip", "rule"], netns=name).stdout
    _assert_no_residue(name)


class _FailingRoutes(Pyroute2RouteOps):
    """Real netlink, but adding the v6 ip rule fails (after the v4 route and rule went in)."""

    def change(self, netns: str, *, add: RouteSpec, delete: RouteSpec) -> None:
        if any(r.family is Family.V6 for r in add.rules):
            v4 = RouteSpec(
                rules=tuple(r for r in add.rules if r.family is Family.V4),
                routes=tuple(r for r in add.routes if r.family is Family.V4),
            )
            super().change(netns, add=v4, delete=delete)
            raise RouteError("injected: ipv6 ip rule refused")
        super().change(netns, add=add, delete=delete)


class _InjectingExecutor(SubprocessExecutor):
    """Real tools, but one write gets a rule the kernel rejects appended to its input."""

    def __init__(self, tool: str, bad: str) -> None:
        self.tool, self.bad = tool, bad

    def run(self, argv, *, netns=None, stdin=None, timeout=30.0) -> ExecResult:
        if argv[0] == self.tool and stdin and not stdin.startswith("{") and self.bad:
            if argv[0].endswith("-restore"):
                # Into the last table (nat) of the input, where TPROXY is invalid.
                head, _, tail = stdin.rpartition("COMMIT\n")
                stdin = head + self.bad + "\nCOMMIT\n" + tail
            else:
                stdin = stdin + self.bad + "\n"
            self.bad = ""  # only the first write; rollback must go through
        return super().run(argv, netns=netns, stdin=stdin, timeout=timeout)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_route_failure_rolls_back_rules(pod, backend: Backend) -> None:
    name, path = pod
    before = _state(name)
    nf = PodNetfilter(route_ops=_FailingRoutes())
    with pytest.raises(ApplyError) as err:
        nf.program(path, InpodConfig(backend=backend))
    assert err.value.step == "policy routing"
    assert err.value.rolled_back
    assert "ipv6 ip rule refused" in str(err.value)
    _assert_no_residue(name)
    assert _state(name) == before


@pytest.mark.parametrize(
    ("backend", "tool", "bad"),
    [
        # ip6tables-restore runs after iptables-restore succeeded: v4 must be rolled back.
        (
            Backend.IPTABLES,
            "ip6tables-restore",
            "-A ZT_OUTPUT -p tcp -j TPROXY --on-port 1 --tproxy-mark 0x1/0x1",
        ),
        # TPROXY is only valid in prerouting: the kernel refuses it in an output-hook chain.
        (Backend.NFT, "nft", "add rule ip zt mangle_ZT_OUTPUT meta l4proto tcp tproxy to :1"),
    ],
    ids=["iptables", "nft"],
)
def test_kernel_rejection_rolls_back(pod, backend: Backend, tool: str, bad: str) -> None:
    name, path = pod
    before = _state(name)
    nf = PodNetfilter(executor=_InjectingExecutor(tool, bad))
    with pytest.raises(ApplyError) as err:
        nf.program(path, InpodConfig(backend=backend))
    assert err.value.rolled_back, err.value
    assert tool.removesuffix("-restore") in err.value.step
    # The tool's complaint names the rule (nft quotes it, iptables names line and chain).
    assert "tproxy to :1" in str(err.value) or "rule in chain ZT_OUTPUT" in str(err.value)
    _assert_no_residue(name)
    assert _state(name) == before


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_failed_update_keeps_previous_version(pod, backend: Backend) -> None:
    name, path = pod
    nf = PodNetfilter()
    old = InpodConfig(backend=backend)
    nf.program(path, old)
    before = _state(name)
    new = InpodConfig(backend=backend, inbound_mode=InboundMode.TPROXY, dns_capture=True)
    with pytest.raises(ApplyError):
        PodNetfilter(route_ops=_FailingRoutes()).program(
            path, InpodConfig(backend=backend, inbound_mode=new.inbound_mode, route_table=101)
        )
    assert _state(name) == before
    assert nf.verify(path, old) == []
    nf.unprogram(path, old)
    _assert_no_residue(name)


def test_auto_backend_and_proc_pid_path(pod) -> None:
    """`/proc/<pid>/ns/net` paths work as well as /run/netns ones; AUTO picks nft here."""
    name, _ = pod
    sleeper = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "30"])
    try:
        path = f"/proc/{sleeper.pid}/ns/net"
        target = os.stat(netns_path(name)).st_ino
        for _ in range(500):  # until `ip netns exec` has entered the netns (bounded, ~5 s)
            if os.stat(path).st_ino == target:
                break
            time.sleep(0.01)
        assert os.stat(path).st_ino == target
        cfg = InpodConfig()
        nf = PodNetfilter()
        assert nf.backend(cfg) is Backend.NFT
        nf.program(path, cfg)
        assert "table ip zt" in run(["nft", "list", "tables"], netns=name).stdout
        assert nf.verify(netns_path(name), cfg) == []
        nf.unprogram(path, cfg)
        _assert_no_residue(name)
    finally:
        sleeper.kill()
        sleeper.wait(timeout=5)

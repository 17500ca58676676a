"""The apply shell against fakes: an in-memory iptables, a recording nft and in-memory routes."""

from __future__ import annotations

import pytest

from netfilter.apply import ApplyError, PodNetfilter, detect_backend
from netfilter.executor import Call, ExecResult, RecordingExecutor
from netfilter.model import Backend, Family, InboundMode, InpodConfig
from netfilter.plan import EMPTY, iptables_transition, owned_from_ruleset
from netfilter.render import iptables_rule_line
from netfilter.routes import FakeRouteOps
from netfilter.rules import inpod_routes, inpod_ruleset
from tests.netfilter.fakes import FakeIptables

NS = "/"  # exists on every machine; the fakes never enter it
IPT = InpodConfig(backend=Backend.IPTABLES, dns_capture=True)


def _pod(fake: FakeIptables, routes: FakeRouteOps | None = None, *, nft: bool = False):
    ex = RecordingExecutor(handler=fake)
    tools = (lambda name: True) if nft else (lambda name: not name.startswith("nft"))
    return PodNetfilter(ex, routes or FakeRouteOps(), tool_exists=tools), ex


def test_program_verify_idempotent_unprogram() -> None:
    fake, routes = FakeIptables(), FakeRouteOps()
    pod, ex = _pod(fake, routes)
    assert pod.verify(NS, IPT)  # nothing there yet
    fixed = pod.program(NS, IPT)
    assert {d.kind for d in fixed} >= {
        "missing_chain",
        "missing_rule",
        "missing_ip_rule",
        "missing_route",
    }
    assert pod.verify(NS, IPT) == []
    writes = len(fake.restores)
    assert pod.program(NS, IPT) == []  # second apply: nothing to do, nothing written
    assert len(fake.restores) == writes
    assert routes.live[NS] == inpod_routes(IPT)
    pod.unprogram(NS, IPT)
    assert pod.verify(NS, InpodConfig(backend=Backend.IPTABLES)) != []
    for tool in ("iptables", "ip6tables"):
        assert "ZT_" not in fake.save(tool)
    assert routes.live[NS].rules == ()
    assert routes.live[NS].routes == ()
    assert all(c.netns == NS for c in ex.calls if "--version" not in c.argv)


def test_other_peoples_rules_survive() -> None:
    fake = FakeIptables()
    fake._tables("iptables")["nat"]["OUTPUT"].append("-A OUTPUT -p tcp -j KUBE-X")
    fake._tables("iptables")["nat"]["KUBE-X"] = ["-A KUBE-X -j ACCEPT"]
    pod, _ = _pod(fake)
    pod.program(NS, IPT)
    pod.unprogram(NS, IPT)
    save = fake.save("iptables")
    assert "-A OUTPUT -p tcp -j KUBE-X" in save
    assert "-A KUBE-X -j ACCEPT" in save
    assert all(":KUBE-X" not in line or "ZT" not in line for line in save.splitlines())
    # Our restore input never declares (flushes) a built-in chain.
    for text in fake.restores:
        assert not any(
            line in text.splitlines() for line in (":OUTPUT - [0:0]", ":PREROUTING - [0:0]")
        )


def test_drift_detected_and_repaired() -> None:
    fake = FakeIptables()
    pod, _ = _pod(fake)
    pod.program(NS, IPT)
    nat = fake._tables("iptables")["nat"]
    removed = nat["ZT_OUTPUT"].pop()  # the outbound REDIRECT
    nat["ZT_OUTPUT"].append("-A ZT_OUTPUT -j ACCEPT")
    nat["OUTPUT"].append(nat["OUTPUT"][0])  # duplicated hook
    drifts = pod.verify(NS, IPT)
    kinds = sorted(d.kind for d in drifts)
    assert kinds == ["extra_rule", "extra_rule", "missing_rule"], drifts
    assert any("REDIRECT --to-ports 15001" in d.detail for d in drifts if d.kind == "missing_rule")
    assert pod.program(NS, IPT) == drifts
    assert pod.verify(NS, IPT) == []
    assert fake._tables("iptables")["nat"]["ZT_OUTPUT"][-1] == removed


def test_reorder_is_drift() -> None:
    fake = FakeIptables()
    pod, _ = _pod(fake)
    pod.program(NS, IPT)
    chain = fake._tables("iptables")["nat"]["ZT_OUTPUT"]
    chain.reverse()
    assert [d.kind for d in pod.verify(NS, IPT)] == ["misordered"]


def test_rejected_rule_rolls_back_and_names_it() -> None:
    fake = FakeIptables()
    # v4 loads, then ip6tables-restore rejects the outbound REDIRECT line.
    pod, _ = _pod(fake)
    fake.reject = "::1/128 -p tcp -m mark ! --mark 0x539/0xfff"
    before = {t: fake.save(t) for t in ("iptables", "ip6tables")}
    with pytest.raises(ApplyError) as err:
        pod.program(NS, IPT)
    assert err.value.step == "ip6tables-restore"
    assert err.value.rolled_back
    assert "REDIRECT --to-ports 15001" in str(err.value)
    fake.reject = None
    assert {t: fake.save(t) for t in ("iptables", "ip6tables")} == before


def test_route_failure_after_rules_rolls_back_everything() -> None:
    fake, routes = FakeIptables(), FakeRouteOps(fail_on="ipv6 rule")
    pod, _ = _pod(fake, routes)
    with pytest.raises(
        ApplyError, match="policy routing failed: injected failure adding ipv6 rule"
    ):
        pod.program(NS, IPT)
    assert all("ZT_" not in fake.save(t) for t in ("iptables", "ip6tables"))
    assert routes.live[NS].rules == ()
    assert routes.live[NS].routes == ()


def test_rollback_restores_previous_version_not_just_empty() -> None:
    fake, routes = FakeIptables(), FakeRouteOps()
    pod, _ = _pod(fake, routes)
    pod.program(NS, IPT)
    before = fake.save("iptables")
    routes.fail_on = "ipv4 route"
    tproxy = InpodConfig(backend=Backend.IPTABLES, inbound_mode=InboundMode.TPROXY, route_table=101)
    with pytest.raises(ApplyError):
        pod.program(NS, tproxy)
    assert fake.save("iptables") == before
    assert routes.live[NS] == inpod_routes(IPT)


def test_no_ipv6_on_lo_skips_v6_routes() -> None:
    routes = FakeRouteOps(v6=False)
    pod, _ = _pod(FakeIptables(), routes)
    pod.program(NS, IPT)
    assert {r.family for r in routes.live[NS].rules} == {Family.V4}
    assert pod.verify(NS, IPT) == []


def test_missing_netns_is_a_clear_error() -> None:
    pod, _ = _pod(FakeIptables())
    with pytest.raises(Exception, match="'/run/netns/nope-zz' does not exist"):
        pod.program("/run/netns/nope-zz", IPT)


def test_nft_backend_commands_and_error_names_line() -> None:
    sent: list[str] = []

    def handler(call: Call) -> ExecResult:
        if call.argv[:2] == ("nft", "-f"):
            sent.append(call.stdin or "")
            bad = (
                (call.stdin or "")
                .splitlines()
                .index(
                    next(x for x in (call.stdin or "").splitlines() if "redirect to :15001" in x)
                )
            )
            return ExecResult(
                returncode=1, stderr=f"/dev/stdin:{bad + 1}:3-9: Error: Could not process rule"
            )
        if call.argv[:3] == ("nft", "-j", "list"):
            return ExecResult(returncode=0, stdout='{"nftables": []}')
        if call.argv[:2] == ("nft", "-j"):
            sent.append("ROLLBACK " + (call.stdin or ""))
            return ExecResult(returncode=0)
        return ExecResult(returncode=1, stderr="no iptables here")

    pod = PodNetfilter(RecordingExecutor(handler=handler), FakeRouteOps())
    with pytest.raises(ApplyError) as err:
        pod.program(NS, InpodConfig(backend=Backend.NFT))
    assert err.value.step == "nft -f"
    assert "redirect to :15001" in str(err.value)
    assert "outbound TCP to ztunnel" in str(err.value)
    assert sent[0].startswith("table ip zt\ndelete table ip zt\ntable ip zt {")
    assert sent[-1].startswith("ROLLBACK ")


def test_detect_backend() -> None:
    ok = RecordingExecutor()
    assert detect_backend(ok) is Backend.NFT
    no_nft = RecordingExecutor(
        handler=lambda c: ExecResult(returncode=0 if c.argv[0] != "nft" else 1)
    )
    assert detect_backend(no_nft) is Backend.IPTABLES
    nothing = RecordingExecutor(handler=lambda c: ExecResult(returncode=127))
    with pytest.raises(Exception, match="no usable netfilter backend"):
        detect_backend(nothing)


def test_transition_from_empty_and_back() -> None:
    target = owned_from_ruleset(inpod_ruleset(IPT), Family.V4)
    up = iptables_transition(EMPTY, target)
    assert up.text.count("COMMIT") == 3
    assert "-D " not in up.text
    assert "-X " not in up.text
    assert up.describe_line(2).startswith("create/flush chain raw/")
    # From the state just created back to empty: jumps deleted before chains go.
    down = iptables_transition(target, EMPTY).text.splitlines()
    nat = down[down.index("*nat") :]
    first_x = min(i for i, line in enumerate(nat) if line.startswith("-X "))
    assert all(i < first_x for i, line in enumerate(nat) if line.startswith("-D "))
    assert not any(line.startswith(":") for line in down)
    jump = next(r for r in inpod_ruleset(IPT).rules if r.builtin and r.family is Family.V4)
    assert iptables_rule_line(jump, "-D") in down

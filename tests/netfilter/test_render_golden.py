"""Golden files for the rendered rules: v4/v6 x iptables/nft x (redirect, tproxy) x (dns on/off).

Regenerate after an intended change with `UPDATE_GOLDEN=1 pytest tests/netfilter`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netfilter.model import Family, InboundMode, InpodConfig
from netfilter.parse import parse_iptables_save
from netfilter.render import to_iptables_restore, to_nft
from netfilter.rules import inpod_routes, inpod_ruleset

GOLDEN = Path(__file__).parent / "golden"

CASES = {
    "redirect": InpodConfig(),
    "redirect_dns": InpodConfig(dns_capture=True),
    "tproxy": InpodConfig(inbound_mode=InboundMode.TPROXY),
    "tproxy_dns": InpodConfig(inbound_mode=InboundMode.TPROXY, dns_capture=True),
    "ingress_vif": InpodConfig(ingress_mode=True, virtual_interfaces=("virt0",)),
}


def _check(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 to accept)"


@pytest.mark.parametrize("family", list(Family), ids=["v4", "v6"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_golden(case: str, family: Family, backend: str) -> None:
    rs = inpod_ruleset(CASES[case])
    suffix = "v4" if family is Family.V4 else "v6"
    if backend == "iptables":
        text = to_iptables_restore(rs, family)
    else:
        text = to_nft(rs, "zt", families=(family,))
    _check(f"{case}_{suffix}.{backend}", text)


def test_render_is_deterministic_and_parses_back() -> None:
    for cfg in CASES.values():
        rs = inpod_ruleset(cfg)
        assert inpod_ruleset(cfg) == rs
        for family in Family:
            text = to_iptables_restore(rs, family)
            assert text == to_iptables_restore(inpod_ruleset(cfg), family)
            live = parse_iptables_save(text, family=family, prefix="ZT")
            assert live.foreign == ()
            assert live.ruleset == rs.for_family(family)


def test_every_rule_has_a_why_comment() -> None:
    for cfg in CASES.values():
        assert all(
            r.comment.startswith("zt: ") and len(r.comment) > 8 for r in inpod_ruleset(cfg).rules
        )


def test_istio_shape_of_default_rules() -> None:
    """Spot checks against Istio's default.golden (prefix ISTIO -> ZT)."""
    text = to_iptables_restore(inpod_ruleset(InpodConfig()), Family.V4)
    assert (
        "-A ZT_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff"
        in text
    )
    assert "-j REDIRECT --to-ports 15006" in text
    assert "-j REDIRECT --to-ports 15001" in text
    assert "-j CONNMARK --set-xmark 0x111/0xfff" in text
    assert "--restore-mark --nfmask 0xffffffff --ctmask 0xffffffff" in text
    v6 = to_iptables_restore(inpod_ruleset(InpodConfig()), Family.V6)
    assert "! -d ::1/128" in v6
    assert "-s fd16:9254:7127:1337:ffff:ffff:ffff:ffff/128" in v6


def test_only_our_chains_declared_and_ipv4_only_config() -> None:
    rs = inpod_ruleset(InpodConfig(ipv6=False))
    assert to_iptables_restore(rs, Family.V6) == ""
    text = to_iptables_restore(rs, Family.V4)
    declared = [line for line in text.splitlines() if line.startswith(":")]
    assert declared
    assert all(line.startswith(":ZT_") for line in declared)


def test_routes_spec() -> None:
    spec = inpod_routes(InpodConfig())
    assert [str(r) for r in spec.rules] == [
        "ipv4 rule fwmark 0x111/0xfff pref 32764 lookup 100",
        "ipv6 rule fwmark 0x111/0xfff pref 32764 lookup 100",
    ]
    assert [str(r) for r in spec.routes] == [
        "ipv4 route local 0.0.0.0/0 dev lo table 100",
        "ipv6 route local ::/0 dev lo table 100",
    ]

"""Model validation, InpodConfig parsing and the constants shared with ztunnel/config.py."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from netfilter.model import (
    Accept,
    Backend,
    ChainRef,
    Cond,
    ConfigError,
    Family,
    InboundMode,
    InpodConfig,
    Jump,
    Mark,
    Match,
    Redirect,
    Rule,
    Ruleset,
    TProxy,
)
from ztunnel import config as zc


def test_defaults_match_ztunnel_constants() -> None:
    cfg = InpodConfig()
    assert cfg.outbound_port == zc.OUTBOUND_CAPTURE_PORT
    assert cfg.inbound_plaintext_port == zc.INBOUND_PLAINTEXT_PORT
    assert cfg.inbound_hbone_port == zc.INBOUND_HBONE_PORT
    assert cfg.dns_port == zc.DNS_CAPTURE_PORT
    assert (cfg.inpod_mark, cfg.inpod_mask) == (zc.INPOD_MARK, zc.INPOD_MASK)
    assert cfg.tproxy_mark == zc.TPROXY_MARK
    assert cfg.route_table == zc.TPROXY_ROUTE_TABLE
    assert str(cfg.probe_snat_v4) == zc.PROBE_SNAT_IPV4
    assert str(cfg.probe_snat_v6) == zc.PROBE_SNAT_IPV6


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"prefix": "zt"}, "InpodConfig.prefix"),
        ({"prefix": "TOOLONGPREFIX"}, "InpodConfig.prefix"),
        ({"outbound_port": 0}, "InpodConfig.outbound_port"),
        ({"dns_port": 70000}, "InpodConfig.dns_port"),
        ({"inpod_mark": 0x1539, "inpod_mask": 0xFFF}, "outside its mask"),
        ({"route_table": 254}, "InpodConfig.route_table"),
        ({"ipv4": False, "ipv6": False}, "at least one"),
        ({"virtual_interfaces": ("bad name",)}, "virtual_interfaces"),
    ],
    ids=[
        "lower-prefix",
        "long-prefix",
        "port-0",
        "port-high",
        "mark-mask",
        "main-table",
        "no-family",
        "iface",
    ],
)
def test_config_errors_name_the_field(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        InpodConfig(**kwargs)


def test_from_mapping() -> None:
    cfg = InpodConfig.from_mapping(
        {
            "backend": "nft",
            "inbound_mode": "tproxy",
            "dns_capture": True,
            "probe_snat_v4": "169.254.1.1",
        }
    )
    assert cfg.backend is Backend.NFT
    assert cfg.inbound_mode is InboundMode.TPROXY
    assert cfg.dns_capture
    assert cfg.probe_snat_v4 == ipaddress.IPv4Address("169.254.1.1")
    with pytest.raises(ConfigError, match=r"pod.yaml: unknown key 'dsn_capture'"):
        InpodConfig.from_mapping({"dsn_capture": True}, source="pod.yaml")
    with pytest.raises(ConfigError, match=r"pod.yaml.backend: 'ebpf'"):
        InpodConfig.from_mapping({"backend": "ebpf"}, source="pod.yaml")
    with pytest.raises(ConfigError, match=r"pod.yaml.probe_snat_v6: .*not an IPv6"):
        InpodConfig.from_mapping({"probe_snat_v6": "1.2.3.4"}, source="pod.yaml")
    with pytest.raises(ConfigError, match=r"pod.yaml.dns_capture: expected true/false"):
        InpodConfig.from_mapping({"dns_capture": "yes"}, source="pod.yaml")


def _rule(**kw) -> Rule:
    base: dict[str, Any] = {
        "family": Family.V4,
        "table": "nat",
        "chain": "ZT_OUTPUT",
        "target": Accept(),
    }
    base.update(kw)
    return Rule(**base)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"table": "mangle", "target": Redirect(port=1)}, "only valid in"),
        ({"target": Redirect(port=15001)}, "needs proto"),
        (
            {
                "table": "mangle",
                "chain": "OUTPUT",
                "match": Match(proto="tcp"),
                "target": TProxy(port=1, mark=Mark(value=1)),
            },
            "PREROUTING",
        ),
        ({"match": Match(dst=Cond(value=ipaddress.ip_network("::1/128")))}, "is not ipv4"),
        ({"comment": "it's"}, "comment"),
        ({"table": "filter"}, "ChainRef.table"),
    ],
    ids=[
        "redirect-in-mangle",
        "redirect-no-proto",
        "tproxy-output",
        "v6-addr-in-v4",
        "quote",
        "filter-table",
    ],
)
def test_rule_validation(kwargs, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        _rule(**kwargs)


def test_match_validation() -> None:
    with pytest.raises(ConfigError, match=r"Match\.dport: a port match needs proto"):
        Match(dport=Cond(value=53))
    with pytest.raises(ConfigError, match=r"Match\.ctstate"):
        Match(ctstate=frozenset({"BOGUS"}))


def test_ruleset_canonical_order_and_validation() -> None:
    a = _rule(comment="a")
    b = _rule(comment="b")
    jump = _rule(chain="OUTPUT", target=Jump(chain="ZT_OUTPUT"))
    chains = frozenset({ChainRef(family=Family.V4, table="nat", name="ZT_OUTPUT")})
    rs1 = Ruleset(chains=chains, rules=(a, jump, b))
    rs2 = Ruleset(chains=chains, rules=(jump, a, b))
    assert rs1 == rs2
    assert rs1.rules[0] == jump
    assert Ruleset(chains=chains, rules=(b, a)) != rs1
    with pytest.raises(ConfigError, match="chain is not declared"):
        Ruleset(rules=(a,))
    with pytest.raises(ConfigError, match="jump to undeclared chain"):
        Ruleset(rules=(_rule(chain="OUTPUT", target=Jump(chain="ZT_X")),))


def test_hook_context_errors_before_the_kernel_sees_them() -> None:
    zt = ChainRef(family=Family.V4, table="nat", name="ZT_PRERT")
    hook = _rule(chain="PREROUTING", target=Jump(chain="ZT_PRERT"))
    out_iface = _rule(chain="ZT_PRERT", match=Match(out_iface=Cond(value="lo")))
    with pytest.raises(ConfigError, match=r"-o/oifname is reached from \['PREROUTING'\]"):
        Ruleset(chains=frozenset({zt}), rules=(hook, out_iface))
    loop = _rule(chain="ZT_PRERT", target=Jump(chain="ZT_PRERT"))
    with pytest.raises(ConfigError, match="jump loop"):
        Ruleset(chains=frozenset({zt}), rules=(loop,))
    mangle = ChainRef(family=Family.V4, table="mangle", name="ZT_OUTPUT")
    tp = Rule(
        family=Family.V4,
        table="mangle",
        chain="ZT_OUTPUT",
        match=Match(proto="tcp"),
        target=TProxy(port=1, mark=Mark(value=1)),
    )
    out_hook = Rule(
        family=Family.V4, table="mangle", chain="OUTPUT", target=Jump(chain="ZT_OUTPUT")
    )
    with pytest.raises(ConfigError, match=r"TProxy is reached from \['OUTPUT'\]"):
        Ruleset(chains=frozenset({mangle}), rules=(out_hook, tp))
    with pytest.raises(ConfigError, match="matches everything"):
        Match(dst=Cond(value=ipaddress.ip_network("0.0.0.0/0")))

"""Builds the in-pod capture rule set and its policy routing from an `InpodConfig` (pure).

The rules follow Istio's in-pod rules (istio/istio `cni/pkg/iptables/iptables.go`), with our chain prefix.
Every rule is preceded by a `CLI:` line (the literal iptables form, v4, default config) and a `DESC:`
line (why it exists); each also carries a short comment that is loaded into the kernel.
"""

from __future__ import annotations

import ipaddress

from netfilter.model import (
    Accept,
    ChainRef,
    Cond,
    ConnmarkRestore,
    ConnmarkSet,
    CtZone,
    Family,
    InboundMode,
    InpodConfig,
    IpRuleSpec,
    Jump,
    LocalRouteSpec,
    Mark,
    Match,
    Redirect,
    Return,
    RouteSpec,
    Rule,
    Ruleset,
    Target,
    TProxy,
)

DNS_PORT = 53
DNS_CT_ZONE = 1


class _Builder:
    """Appends rules for one family; chains are declared as they are first used."""

    def __init__(self, family: Family, cfg: InpodConfig) -> None:
        self.family = family
        self.cfg = cfg
        self.prert = f"{cfg.prefix}_PRERT"
        self.output = f"{cfg.prefix}_OUTPUT"
        self.chains: set[ChainRef] = set()
        self.rules: list[Rule] = []

    def add(self, table: str, chain: str, match: Match, target: Target, comment: str) -> None:
        ref = ChainRef(family=self.family, table=table, name=chain)
        if not ref.builtin:
            self.chains.add(ref)
        if isinstance(target, Jump):
            self.chains.add(ChainRef(family=self.family, table=table, name=target.chain))
        self.rules.append(
            Rule(
                family=self.family,
                table=table,
                chain=chain,
                match=match,
                target=target,
                comment=f"{self.cfg.prefix.lower()}: {comment}",
            )
        )


def _probe_addr(family: Family, cfg: InpodConfig) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    addr = cfg.probe_snat_v4 if family is Family.V4 else cfg.probe_snat_v6
    return ipaddress.ip_network(addr)


def _family_rules(b: _Builder) -> None:
    cfg, family = b.cfg, b.family
    inpod = Mark(value=cfg.inpod_mark, mask=cfg.inpod_mask)
    tproxy_mark = Mark(value=cfg.tproxy_mark, mask=cfg.tproxy_mask)
    not_inpod = Cond(value=inpod, negate=True)
    not_loopback = Cond(value=family.loopback, negate=True)
    probe = _probe_addr(family, cfg)
    tproxy = cfg.inbound_mode is InboundMode.TPROXY
    inbound = not cfg.ingress_mode

    # --- hooks: built-in chains only jump into ours (easy, residue-free removal). ---
    # CLI: -t mangle -A PREROUTING -j ZT_PRERT
    # DESC: connmark tagging (and TPROXY in the tproxy variant) happen in mangle PREROUTING.
    b.add("mangle", "PREROUTING", Match(), Jump(chain=b.prert), "hook mangle PREROUTING")
    # CLI: -t mangle -A OUTPUT -j ZT_OUTPUT
    # DESC: replies of spoofed connections get their mark restored in mangle OUTPUT (re-routed).
    b.add("mangle", "OUTPUT", Match(), Jump(chain=b.output), "hook mangle OUTPUT")
    # CLI: -t nat -A OUTPUT -j ZT_OUTPUT
    # DESC: outbound capture (REDIRECT to the outbound port) happens in nat OUTPUT.
    b.add("nat", "OUTPUT", Match(), Jump(chain=b.output), "hook nat OUTPUT")
    if cfg.dns_capture:
        # CLI: -t raw -A PREROUTING -j ZT_PRERT ; -t raw -A OUTPUT -j ZT_OUTPUT
        # DESC: DNS flows are split into their own conntrack zone before conntrack sees them.
        b.add("raw", "PREROUTING", Match(), Jump(chain=b.prert), "hook raw PREROUTING")
        b.add("raw", "OUTPUT", Match(), Jump(chain=b.output), "hook raw OUTPUT")
    if not tproxy or cfg.virtual_interfaces:
        # CLI: -t nat -A PREROUTING -j ZT_PRERT
        # DESC: inbound REDIRECT to the plaintext port (and virtual interfaces) happen in nat PREROUTING.
        b.add("nat", "PREROUTING", Match(), Jump(chain=b.prert), "hook nat PREROUTING")

    # --- short-circuits first: virtual interfaces. ---
    for iface in cfg.virtual_interfaces:
        vif = Match(in_iface=Cond(value=iface), proto="tcp")
        # CLI: -t nat -A ZT_PRERT -i virt0 -p tcp -j REDIRECT --to-ports 15001
        # DESC: inbound on a virtual interface (KubeVirt, DinD) is really outbound: send it to 15001.
        b.add(
            "nat",
            b.prert,
            vif,
            Redirect(port=cfg.outbound_port),
            f"virtual interface {iface} is outbound",
        )
        # CLI: -t nat -A ZT_PRERT -i virt0 -p tcp -j RETURN
        # DESC: done with that packet; RETURN (not ACCEPT) so other people's PREROUTING rules still run.
        b.add("nat", b.prert, vif, Return(), f"virtual interface {iface} done")

    if inbound:
        # CLI: -t mangle -A ZT_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff
        # DESC: packets ztunnel sends into the pod (spoofing the client) tag their connection, so
        # the app's replies can be steered back to ztunnel by policy routing.
        b.add(
            "mangle",
            b.prert,
            Match(mark=Cond(value=inpod)),
            ConnmarkSet(mark=tproxy_mark),
            "tag connections ztunnel opens into the pod",
        )
        # CLI: -t nat -A ZT_PRERT -s 169.254.7.127 -p tcp -j ACCEPT (mangle in the tproxy variant)
        # DESC: kubelet probes, SNATed on the host to this link-local address, bypass capture.
        b.add(
            "mangle" if tproxy else "nat",
            b.prert,
            Match(src=Cond(value=probe), proto="tcp"),
            Accept(),
            "kubelet probes are not captured",
        )

    # CLI: -t nat -A ZT_OUTPUT -d 169.254.7.127 -p tcp -j ACCEPT
    # DESC: the pod's replies to those probes are not captured either.
    b.add(
        "nat",
        b.output,
        Match(dst=Cond(value=probe), proto="tcp"),
        Accept(),
        "probe replies are not captured",
    )

    if inbound and tproxy:
        # CLI: -t mangle -A ZT_PRERT ! -d 127.0.0.1/32 -p tcp -i lo -j ACCEPT
        # DESC: traffic the pod sends to itself via lo (own pod IP) is not inbound capture.
        b.add(
            "mangle",
            b.prert,
            Match(dst=not_loopback, in_iface=Cond(value="lo"), proto="tcp"),
            Accept(),
            "pod to itself over lo",
        )
        # CLI: -t mangle -A ZT_PRERT -p tcp --dport 15008 -m mark ! --mark 0x539/0xfff
        #      -j TPROXY --on-port 15008 --tproxy-mark 0x111/0xfff
        # DESC: HBONE to the pod goes to ztunnel's transparent 15008 listener.
        b.add(
            "mangle",
            b.prert,
            Match(proto="tcp", dport=Cond(value=cfg.inbound_hbone_port), mark=not_inpod),
            TProxy(port=cfg.inbound_hbone_port, mark=tproxy_mark),
            "HBONE inbound to ztunnel",
        )
        # CLI: -t mangle -A ZT_PRERT -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
        # DESC: only the first packet needs TPROXY; the socket lookup finds the rest.
        b.add(
            "mangle",
            b.prert,
            Match(proto="tcp", ctstate=frozenset({"RELATED", "ESTABLISHED"})),
            Accept(),
            "established flows already have their socket",
        )
        # CLI: -t mangle -A ZT_PRERT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff
        #      -j TPROXY --on-port 15006 --tproxy-mark 0x111/0xfff
        # DESC: other inbound TCP (plaintext) goes to ztunnel's transparent 15006 listener.
        b.add(
            "mangle",
            b.prert,
            Match(dst=not_loopback, proto="tcp", mark=not_inpod),
            TProxy(port=cfg.inbound_plaintext_port, mark=tproxy_mark),
            "plaintext inbound to ztunnel",
        )
    elif inbound:
        # CLI: -t nat -A ZT_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff
        #      -j REDIRECT --to-ports 15006
        # DESC: inbound TCP not to localhost and not from ztunnel goes to the plaintext port; 15008 is
        # ztunnel's real listener in the pod and needs no redirect.
        b.add(
            "nat",
            b.prert,
            Match(
                dst=not_loopback,
                proto="tcp",
                dport=Cond(value=cfg.inbound_hbone_port, negate=True),
                mark=not_inpod,
            ),
            Redirect(port=cfg.inbound_plaintext_port),
            "plaintext inbound to ztunnel",
        )

    # CLI: -t mangle -A ZT_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark
    #      --nfmask 0xffffffff --ctmask 0xffffffff
    # DESC: the app's replies on spoofed connections carry the connmark as packet mark, so the
    # fwmark ip rule delivers them locally to ztunnel instead of out of the pod.
    b.add(
        "mangle",
        b.output,
        Match(connmark=Cond(value=tproxy_mark)),
        ConnmarkRestore(),
        "replies on spoofed connections go back to ztunnel",
    )

    if cfg.dns_capture:
        # CLI: -t nat -A ZT_OUTPUT ! -o lo -p udp -m udp --dport 53 -m mark ! --mark 0x539/0xfff
        #      -j REDIRECT --to-ports 15053
        # DESC: UDP DNS from the app to a non-local resolver goes to ztunnel's DNS proxy.
        b.add(
            "nat",
            b.output,
            Match(
                out_iface=Cond(value="lo", negate=True),
                proto="udp",
                dport=Cond(value=DNS_PORT),
                mark=not_inpod,
            ),
            Redirect(port=cfg.dns_port),
            "UDP DNS to ztunnel",
        )
        # CLI: -t nat -A ZT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark 0x539/0xfff
        #      -j REDIRECT --to-ports 15053
        # DESC: the same for TCP DNS.
        b.add(
            "nat",
            b.output,
            Match(dst=not_loopback, proto="tcp", dport=Cond(value=DNS_PORT), mark=not_inpod),
            Redirect(port=cfg.dns_port),
            "TCP DNS to ztunnel",
        )
        # CLI: -t raw -A ZT_OUTPUT -p udp -m udp --dport 53 -m mark --mark 0x539/0xfff -j CT --zone 1
        # DESC: ztunnel's own upstream DNS queries get a separate conntrack zone, so their
        # tuples cannot collide with the app's redirected queries (istio/istio#33469).
        b.add(
            "raw",
            b.output,
            Match(proto="udp", dport=Cond(value=DNS_PORT), mark=Cond(value=inpod)),
            CtZone(zone=DNS_CT_ZONE),
            "ztunnel DNS queries in their own ct zone",
        )
        # CLI: -t raw -A ZT_PRERT -p udp -m udp --sport 53 -m mark ! --mark 0x539/0xfff -j CT --zone 1
        # DESC: and the upstream answers join that zone on the way back.
        b.add(
            "raw",
            b.prert,
            Match(proto="udp", sport=Cond(value=DNS_PORT), mark=not_inpod),
            CtZone(zone=DNS_CT_ZONE),
            "DNS answers in the ztunnel ct zone",
        )

    # CLI: -t nat -A ZT_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT
    # DESC: replies on spoofed connections (mark restored above) must not be redirected.
    b.add(
        "nat",
        b.output,
        Match(proto="tcp", mark=Cond(value=tproxy_mark)),
        Accept(),
        "replies on spoofed connections are not captured",
    )
    # CLI: -t nat -A ZT_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT
    # DESC: the app calling its own pod IP (routed via lo) is not sent through ztunnel.
    b.add(
        "nat",
        b.output,
        Match(dst=not_loopback, out_iface=Cond(value="lo")),
        Accept(),
        "pod to itself over lo",
    )
    # CLI: -t nat -A ZT_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff
    #      -j REDIRECT --to-ports 15001
    # DESC: all other outbound TCP not to localhost and not from ztunnel goes to the outbound port.
    b.add(
        "nat",
        b.output,
        Match(dst=not_loopback, proto="tcp", mark=not_inpod),
        Redirect(port=cfg.outbound_port),
        "outbound TCP to ztunnel",
    )


def inpod_ruleset(cfg: InpodConfig) -> Ruleset:
    """The capture rules for one pod network namespace, for every enabled family."""
    chains: set[ChainRef] = set()
    rules: list[Rule] = []
    for family in cfg.families:
        b = _Builder(family, cfg)
        _family_rules(b)
        chains |= b.chains
        rules.extend(b.rules)
    return Ruleset(chains=frozenset(chains), rules=tuple(rules))


def inpod_routes(cfg: InpodConfig) -> RouteSpec:
    """`ip rule fwmark <tproxy mark> lookup <table>` and `local <any> dev lo table <table>` per family."""
    ip_rules: list[IpRuleSpec] = []
    routes: list[LocalRouteSpec] = []
    for family in cfg.families:
        ip_rules.append(
            IpRuleSpec(
                family=family,
                fwmark=cfg.tproxy_mark,
                fwmask=cfg.tproxy_mask,
                priority=cfg.rule_priority,
                table=cfg.route_table,
            )
        )
        any_dst = ipaddress.ip_network("0.0.0.0/0" if family is Family.V4 else "::/0")
        routes.append(LocalRouteSpec(family=family, dst=any_dst, table=cfg.route_table))
    return RouteSpec(rules=tuple(ip_rules), routes=tuple(routes))

"""Pure renderers: a `Ruleset` to `iptables-restore` text (per family) and to `nft -f` text.

iptables: rule lines are written in the exact canonical form `iptables-save` prints, so the same
parser reads both our restore input and the live state. nft: one table per family (`table ip zt`,
`table ip6 zt`), because every model rule belongs to one family anyway; this keeps TPROXY and
address syntax family-native (no `meta nfproto` guards an `inet` table would need). Inside it, each
iptables (table, chain) becomes the nft chain `<table>_<chain>`; built-in chains become base chains
with the matching hook, type and priority.
"""

from __future__ import annotations

import shlex
from typing import TypeVar

from netfilter.model import (
    CT_STATES,
    MASK32,
    Accept,
    ChainRef,
    Cond,
    ConnmarkRestore,
    ConnmarkSet,
    CtZone,
    Family,
    IPNetwork,
    Jump,
    Mark,
    Redirect,
    Return,
    Rule,
    Ruleset,
    TProxy,
)

T = TypeVar("T")

# (table, built-in chain) -> nft base chain "type ... hook ... priority ..." (iptables-compatible).
# mangle OUTPUT must be `type route` so that a changed mark re-routes the packet, as iptables does.
NFT_BASE_CHAINS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("raw", "PREROUTING"): ("filter", "prerouting", "raw"),
    ("raw", "OUTPUT"): ("filter", "output", "raw"),
    ("mangle", "PREROUTING"): ("filter", "prerouting", "mangle"),
    ("mangle", "INPUT"): ("filter", "input", "mangle"),
    ("mangle", "FORWARD"): ("filter", "forward", "mangle"),
    ("mangle", "OUTPUT"): ("route", "output", "mangle"),
    ("mangle", "POSTROUTING"): ("filter", "postrouting", "mangle"),
    ("nat", "PREROUTING"): ("nat", "prerouting", "dstnat"),
    ("nat", "INPUT"): ("nat", "input", "100"),
    ("nat", "OUTPUT"): ("nat", "output", "-100"),
    ("nat", "POSTROUTING"): ("nat", "postrouting", "srcnat"),
}


def _neg(cond: Cond[T]) -> list[str]:
    return ["!"] if cond.negate else []


def _net(net: IPNetwork) -> str:
    return f"{net.network_address}/{net.prefixlen}"


def _mark(mark: Mark) -> str:
    # iptables-save omits a full mask.
    return f"{mark.value:#x}" if mark.mask == MASK32 else f"{mark.value:#x}/{mark.mask:#x}"


def iptables_args(rule: Rule) -> list[str]:
    """The rule's arguments after `-A <chain>`, in `iptables-save`'s canonical order."""
    m = rule.match
    args: list[str] = []
    if m.src is not None:
        args += [*_neg(m.src), "-s", _net(m.src.value)]
    if m.dst is not None:
        args += [*_neg(m.dst), "-d", _net(m.dst.value)]
    if m.in_iface is not None:
        args += [*_neg(m.in_iface), "-i", m.in_iface.value]
    if m.out_iface is not None:
        args += [*_neg(m.out_iface), "-o", m.out_iface.value]
    if m.proto is not None:
        args += ["-p", m.proto]
    if m.sport is not None or m.dport is not None:
        args += ["-m", str(m.proto)]
        if m.sport is not None:
            args += [*_neg(m.sport), "--sport", str(m.sport.value)]
        if m.dport is not None:
            args += [*_neg(m.dport), "--dport", str(m.dport.value)]
    if m.mark is not None:
        args += ["-m", "mark", *_neg(m.mark), "--mark", _mark(m.mark.value)]
    if m.connmark is not None:
        args += ["-m", "connmark", *_neg(m.connmark), "--mark", _mark(m.connmark.value)]
    if m.ctstate is not None:
        states = ",".join(s for s in CT_STATES if s in m.ctstate)
        args += ["-m", "conntrack", "--ctstate", states]
    if rule.comment:
        args += ["-m", "comment", "--comment", rule.comment]
    args += ["-j", *_iptables_target(rule)]
    return args


def _iptables_target(rule: Rule) -> list[str]:
    t = rule.target
    if isinstance(t, Accept):
        return ["ACCEPT"]
    if isinstance(t, Return):
        return ["RETURN"]
    if isinstance(t, Jump):
        return [t.chain]
    if isinstance(t, Redirect):
        return ["REDIRECT", "--to-ports", str(t.port)]
    if isinstance(t, TProxy):
        on_ip = "0.0.0.0" if rule.family is Family.V4 else "::"
        return ["TPROXY", "--on-port", str(t.port), "--on-ip", on_ip, "--tproxy-mark", str(t.mark)]
    if isinstance(t, ConnmarkSet):
        return ["CONNMARK", "--set-xmark", str(t.mark)]
    if isinstance(t, ConnmarkRestore):
        return ["CONNMARK", "--restore-mark", "--nfmask", "0xffffffff", "--ctmask", "0xffffffff"]
    assert isinstance(t, CtZone)
    return ["CT", "--zone", str(t.zone)]


def _quote(arg: str) -> str:
    # iptables-save double-quotes comments; restore accepts double quotes for any argument.
    return f'"{arg}"' if not arg or any(c in arg for c in " \t'\\;#") else arg


def iptables_rule_line(rule: Rule, op: str = "-A") -> str:
    """`-A <chain> <args>` as one restore line."""
    return " ".join([op, rule.chain, *(_quote(a) for a in iptables_args(rule))])


def iptables_command(rule: Rule, op: str = "-A") -> list[str]:
    """argv for a single `iptables`/`ip6tables` call (manual edits in tests, debugging)."""
    return [rule.family.iptables, "-t", rule.table, op, rule.chain, *iptables_args(rule)]


def to_iptables_restore(rs: Ruleset, family: Family) -> str:
    """`iptables-restore --noflush` input that (re)creates our chains and hooks for one family.

    Declaring `:CHAIN - [0:0]` under --noflush flushes that chain if it exists, so our chains are
    replaced in one go; built-in chains are never declared (that would flush other people's rules).
    Jumps from built-in chains are appended as written: callers that re-apply must leave out jumps
    that are already live (see `netfilter.plan`).
    """
    lines: list[str] = []
    part = rs.for_family(family)
    for table in part.tables(family):
        lines.append(f"*{table}")
        for ref in part.sorted_chains():
            if ref.table == table:
                lines.append(f":{ref.name} - [0:0]")
        lines.extend(iptables_rule_line(r) for r in part.rules if r.table == table)
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# --- nft ----------------------------------------------------------------------------------------


def nft_chain_name(table: str, chain: str) -> str:
    """Our nft chain for an iptables (table, chain): `nat_ZT_OUTPUT`, `mangle_PREROUTING`."""
    return f"{table}_{chain}"


def _nft_addr(net: IPNetwork) -> str:
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return _net(net)


def _nft_op(cond: Cond[T]) -> str:
    return "!= " if cond.negate else ""


def _nft_masked_set(key: str, mark: Mark) -> str:
    """`<key> set ...` implementing `(key & ~mask) ^ value` (xt CONNMARK/TPROXY semantics)."""
    if mark.mask == MASK32:
        return f"{key} set {mark.value:#010x}"
    keep = ~mark.mask & MASK32
    return f"{key} set {key} & {keep:#010x} ^ {mark.value:#010x}"


def nft_rule_text(rule: Rule) -> str:
    """One rule as an nft statement list (without the `add rule` prefix)."""
    m = rule.match
    ip = rule.family.nft
    parts: list[str] = []
    if m.in_iface is not None:
        parts.append(f'iifname {_nft_op(m.in_iface)}"{m.in_iface.value}"')
    if m.out_iface is not None:
        parts.append(f'oifname {_nft_op(m.out_iface)}"{m.out_iface.value}"')
    if m.src is not None:
        parts.append(f"{ip} saddr {_nft_op(m.src)}{_nft_addr(m.src.value)}")
    if m.dst is not None:
        parts.append(f"{ip} daddr {_nft_op(m.dst)}{_nft_addr(m.dst.value)}")
    if m.proto is not None and m.sport is None and m.dport is None:
        parts.append(f"meta l4proto {m.proto}")
    if m.sport is not None:
        parts.append(f"{m.proto} sport {_nft_op(m.sport)}{m.sport.value}")
    if m.dport is not None:
        parts.append(f"{m.proto} dport {_nft_op(m.dport)}{m.dport.value}")
    if m.mark is not None:
        mk = m.mark.value
        parts.append(f"meta mark & {mk.mask:#010x} {_nft_op(m.mark) or '== '}{mk.value:#010x}")
    if m.connmark is not None:
        mk = m.connmark.value
        parts.append(f"ct mark & {mk.mask:#010x} {_nft_op(m.connmark) or '== '}{mk.value:#010x}")
    if m.ctstate is not None:
        parts.append("ct state " + ",".join(s.lower() for s in CT_STATES if s in m.ctstate))
    t = rule.target
    if isinstance(t, Accept):
        parts.append("accept")
    elif isinstance(t, Return):
        parts.append("return")
    elif isinstance(t, Jump):
        parts.append(f"jump {nft_chain_name(rule.table, t.chain)}")
    elif isinstance(t, Redirect):
        parts.append(f"redirect to :{t.port}")
    elif isinstance(t, TProxy):
        # Set the mark first: the tproxy statement ends the rule's evaluation for the packet.
        if t.mark.mask:
            parts.append(_nft_masked_set("meta mark", t.mark))
        parts.append(f"tproxy to :{t.port}")
    elif isinstance(t, ConnmarkSet):
        parts.append(_nft_masked_set("ct mark", t.mark))
    elif isinstance(t, ConnmarkRestore):
        parts.append("meta mark set ct mark")
    else:
        assert isinstance(t, CtZone)
        parts.append(f"ct zone set {t.zone}")
    if rule.comment:
        parts.append(f'comment "{rule.comment}"')
    return " ".join(parts)


def _nft_chains(rs: Ruleset, family: Family) -> list[ChainRef]:
    """Base chains (built-ins that hold our jumps) then our chains, in canonical order."""
    refs: dict[ChainRef, None] = {}
    for rule in rs.rules:
        if rule.family is family and rule.builtin:
            refs[rule.ref] = None
    for ref in rs.sorted_chains():
        if ref.family is family:
            refs[ref] = None
    return list(refs)


def nft_table_body(rs: Ruleset, family: Family, table: str) -> str:
    """`table <family> <name> { ... }` with every chain and rule of one family."""
    lines = [f"table {family.nft} {table} {{"]
    for ref in _nft_chains(rs, family):
        lines.append(f"\tchain {nft_chain_name(ref.table, ref.name)} {{")
        if ref.builtin:
            ctype, hook, prio = NFT_BASE_CHAINS[(ref.table, ref.name)]
            lines.append(f"\t\ttype {ctype} hook {hook} priority {prio}; policy accept;")
        lines.extend(f"\t\t{nft_rule_text(r)}" for r in rs.chain_rules(ref))
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines)


def to_nft(rs: Ruleset, table: str, families: tuple[Family, ...] | None = None) -> str:
    """`nft -f` input: one transaction that replaces our table(s) wholesale.

    `table X` + `delete table X` first makes the delete valid whether or not the table exists,
    so the script is idempotent and never touches anyone else's tables.
    """
    fams = families if families is not None else rs.families()
    out: list[str] = []
    for family in fams:
        out.append(f"table {family.nft} {table}")
        out.append(f"delete table {family.nft} {table}")
        out.append(nft_table_body(rs, family, table))
    return "\n".join(out) + "\n" if out else ""


def nft_delete(table: str, families: tuple[Family, ...]) -> str:
    """`nft -f` input that removes our table(s), whether or not they exist."""
    out: list[str] = []
    for family in families:
        out += [f"table {family.nft} {table}", f"delete table {family.nft} {table}"]
    return "\n".join(out) + "\n" if out else ""


def shell_quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)

"""Pure parsers of live state back into the model: `iptables-save` text and `nft -j list ruleset` JSON.

Only *our* part of the live state is returned: chains named `<PREFIX>_*`, and jumps into them from
built-in chains (iptables), or our nft table. A line or rule in our part that the model cannot express
is kept as a `Foreign` entry (reported as drift), never dropped and never an exception: the live state
is whatever someone left there.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from netfilter.model import (
    BUILTIN_CHAINS,
    CT_STATES,
    MASK32,
    TABLES,
    Accept,
    ChainRef,
    Cond,
    ConfigError,
    ConnmarkRestore,
    ConnmarkSet,
    CtZone,
    Family,
    IPNetwork,
    Jump,
    Mark,
    Match,
    NetfilterError,
    Redirect,
    Return,
    Rule,
    Ruleset,
    Target,
    TProxy,
)
from netfilter.render import NFT_BASE_CHAINS


class ParseError(NetfilterError, ValueError):
    """A rule could not be read into the model; the message names the token and the rule."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Foreign:
    """Something in our part of the live state that is not a model rule (or is malformed)."""

    where: str
    text: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SavedLine:
    """One `-A` line of `iptables-save` in our part: its table, chain and exact text."""

    table: str
    chain: str
    line: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveRules:
    """Our part of the live state of one backend, as model values plus what did not fit."""

    ruleset: Ruleset
    foreign: tuple[Foreign, ...] = ()
    lines: tuple[SavedLine, ...] = field(default=(), compare=False)
    """iptables only: our raw lines (chain rules and hook jumps), for exact rollback/removal."""


def _is_ours(chain: str, prefix: str) -> bool:
    return chain.startswith(prefix + "_")


# --- iptables-save ------------------------------------------------------------------------------


def _parse_mark(text: str, where: str) -> Mark:
    value, _, mask = text.partition("/")
    try:
        return Mark(value=int(value, 0), mask=int(mask, 0) if mask else MASK32)
    except (ValueError, ConfigError) as exc:
        raise ParseError(f"{where}: bad mark {text!r}: {exc}") from exc


def _parse_net(text: str, family: Family, where: str) -> IPNetwork:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ParseError(f"{where}: bad address {text!r}") from exc
    if (net.version == 4) != (family is Family.V4):
        raise ParseError(f"{where}: address {text!r} is not {family.value}")
    return net


def _parse_port(text: str, where: str) -> int:
    if not text.isdigit():
        raise ParseError(f"{where}: bad port {text!r} (ranges are not in the model)")
    return int(text)


# Targets that exist but that our model never uses: a jump-looking name among these is not a jump.
_OTHER_TARGETS = frozenset(
    [
        "DROP",
        "REJECT",
        "LOG",
        "NFLOG",
        "MARK",
        "DNAT",
        "SNAT",
        "MASQUERADE",
        "NETMAP",
        "QUEUE",
        "NFQUEUE",
        "TEE",
        "TRACE",
        "CLASSIFY",
        "DSCP",
        "TOS",
        "TTL",
        "HL",
        "NOTRACK",
        "SECMARK",
        "CONNSECMARK",
        "AUDIT",
        "CHECKSUM",
        "IDLETIMER",
        "LED",
        "SET",
        "SYNPROXY",
        "TCPMSS",
        "TCPOPTSTRIP",
        "CONNMARK",
        "CT",
        "TPROXY",
        "REDIRECT",
        "ACCEPT",
        "RETURN",
    ]
)


def parse_iptables_rule(line: str, *, family: Family, table: str) -> Rule:
    """Parse one `-A CHAIN ...` line as `iptables-save` prints it into a model `Rule`."""
    try:
        tokens = shlex.split(line)
    except ValueError as exc:
        raise ParseError(f"{table}: cannot tokenize {line!r}: {exc}") from exc
    if len(tokens) < 2 or tokens[0] != "-A":
        raise ParseError(f"{table}: not an append line: {line!r}")
    chain = tokens[1]
    where = f"{family.value} {table}/{chain}"
    fields_: dict[str, object] = {}
    comment = ""
    target_name: str | None = None
    topts: dict[str, str | None] = {}
    module: str | None = None
    negate = False
    i = 2

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise ParseError(f"{where}: option {tokens[i - 1]!r} lacks a value in {line!r}")
        value = tokens[i]
        i += 1
        return value

    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "!":
            negate = True
            continue
        if target_name is not None:
            if not tok.startswith("--"):
                raise ParseError(f"{where}: unexpected {tok!r} after the target in {line!r}")
            topts[tok] = None if tok == "--restore-mark" else take()
            continue
        neg, negate = negate, False
        if tok in ("-s", "-d"):
            fields_["src" if tok == "-s" else "dst"] = Cond(
                value=_parse_net(take(), family, where), negate=neg
            )
        elif tok in ("-i", "-o"):
            fields_["in_iface" if tok == "-i" else "out_iface"] = Cond(value=take(), negate=neg)
        elif tok == "-p":
            if neg:
                raise ParseError(f"{where}: negated protocol is not in the model")
            fields_["proto"] = take()
        elif tok == "-m":
            module = take()
            if module not in ("tcp", "udp", "mark", "connmark", "conntrack", "comment"):
                raise ParseError(f"{where}: match module {module!r} is not in the model")
        elif tok in ("--sport", "--dport") and module in ("tcp", "udp"):
            fields_[tok[2:]] = Cond(value=_parse_port(take(), where), negate=neg)
        elif tok == "--mark" and module in ("mark", "connmark"):
            fields_[module] = Cond(value=_parse_mark(take(), where), negate=neg)
        elif tok == "--ctstate" and module == "conntrack" and not neg:
            fields_["ctstate"] = frozenset(take().split(","))
        elif tok == "--comment" and module == "comment":
            comment = take()
        elif tok == "-j":
            target_name = take()
        else:
            raise ParseError(f"{where}: option {tok!r} is not in the model: {line!r}")
    if target_name is None:
        raise ParseError(f"{where}: rule without a target: {line!r}")
    try:
        match = Match(**fields_)  # type: ignore[arg-type]
        target = _iptables_target(target_name, topts, family, where)
        return Rule(
            family=family, table=table, chain=chain, match=match, target=target, comment=comment
        )
    except ConfigError as exc:
        raise ParseError(f"{where}: {exc}: {line!r}") from exc


def _iptables_target(
    name: str, opts: Mapping[str, str | None], family: Family, where: str
) -> Target:
    def opt(key: str) -> str:
        value = opts.get(key)
        if value is None:
            raise ParseError(f"{where}: target {name} lacks {key}")
        return value

    known: set[str]
    target: Target
    if name in ("ACCEPT", "RETURN"):
        known = set()
        target = Accept() if name == "ACCEPT" else Return()
    elif name == "REDIRECT":
        key = "--to-ports" if "--to-ports" in opts else "--to-port"
        known = {key}
        target = Redirect(port=_parse_port(opt(key), where))
    elif name == "TPROXY":
        known = {"--on-port", "--on-ip", "--tproxy-mark"}
        on_ip = opts.get("--on-ip")
        if on_ip is not None and not ipaddress.ip_address(on_ip).is_unspecified:
            raise ParseError(f"{where}: TPROXY --on-ip {on_ip} is not in the model")
        mark = _parse_mark(opts.get("--tproxy-mark") or "0x0/0x0", where)
        target = TProxy(port=_parse_port(opt("--on-port"), where), mark=mark)
    elif name == "CONNMARK" and "--set-xmark" in opts:
        known = {"--set-xmark"}
        target = ConnmarkSet(mark=_parse_mark(opt("--set-xmark"), where))
    elif name == "CONNMARK" and "--restore-mark" in opts:
        known = {"--restore-mark", "--nfmask", "--ctmask"}
        if opts.get("--nfmask") != "0xffffffff" or opts.get("--ctmask") != "0xffffffff":
            raise ParseError(f"{where}: CONNMARK --restore-mark with partial masks")
        target = ConnmarkRestore()
    elif name == "CT":
        known = {"--zone"}
        target = CtZone(zone=_parse_port(opt("--zone"), where))
    elif name in _OTHER_TARGETS or name.startswith("-"):
        raise ParseError(f"{where}: target {name!r} is not in the model")
    else:
        known = set()
        target = Jump(chain=name)
    extra = sorted(set(opts) - known)
    if extra:
        raise ParseError(f"{where}: target {name} options {extra} are not in the model")
    return target


def parse_iptables_save(text: str, *, family: Family, prefix: str) -> LiveRules:
    """Our chains, their rules and the jumps into them, from `iptables-save` / `ip6tables-save`."""
    table: str | None = None
    chains: set[ChainRef] = set()
    rules: list[Rule] = []
    foreign: list[Foreign] = []
    lines: list[SavedLine] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:]
            continue
        if table is None or table not in BUILTIN_CHAINS:
            continue  # filter/security tables: never ours
        if line.startswith(":"):
            name = line[1:].split()[0]
            if _is_ours(name, prefix):
                chains.add(ChainRef(family=family, table=table, name=name))
            continue
        if not line.startswith("-A "):
            continue
        parts = line.split()
        chain = parts[1]
        target = parts[parts.index("-j") + 1] if "-j" in parts else ""
        builtin = chain in BUILTIN_CHAINS[table]
        if builtin and not _is_ours(target, prefix):
            continue  # other people's rules in built-in chains
        if not builtin and not _is_ours(chain, prefix):
            continue
        lines.append(SavedLine(table=table, chain=chain, line=line))
        try:
            rules.append(parse_iptables_rule(line, family=family, table=table))
        except ParseError as exc:
            foreign.append(
                Foreign(where=f"{family.value} {table}/{chain}", text=line, reason=str(exc))
            )
    # A jump into a chain that is gone (cannot happen in iptables) or a rule in an undeclared chain
    # would make the Ruleset invalid; keep those as foreign instead.
    valid: list[Rule] = []
    for rule in rules:
        jump_ok = not isinstance(rule.target, Jump) or (
            ChainRef(family=family, table=rule.table, name=rule.target.chain) in chains
        )
        if (rule.builtin or rule.ref in chains) and jump_ok:
            valid.append(rule)
        else:
            foreign.append(Foreign(where=rule.where, text=str(rule), reason="dangling chain"))
    return LiveRules(
        ruleset=Ruleset(chains=frozenset(chains), rules=tuple(valid)),
        foreign=tuple(foreign),
        lines=tuple(lines),
    )


# --- nft -j list ruleset ------------------------------------------------------------------------

_NFT_FAMILIES = {"ip": Family.V4, "ip6": Family.V6}
_PRIO_NAMES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "srcnat": 100}


def _nft_split_chain(name: str) -> tuple[str, str] | None:
    table, sep, chain = name.partition("_")
    if not sep or table not in TABLES or not chain:
        return None
    return table, chain


def _jint(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(f"{where}: expected a number, got {value!r}")
    return value


def _masked_key(expr: object) -> tuple[str, int] | None:
    """`{"&": [{"meta": {"key": "mark"}}, 4095]}` -> ("meta mark", 4095)."""
    if isinstance(expr, dict) and "&" in expr:
        left, mask = expr["&"]
        key = _key(left)
        if key is not None and isinstance(mask, int):
            return key, mask
    return None


def _key(expr: object) -> str | None:
    if isinstance(expr, dict):
        if "meta" in expr:
            return f"meta {expr['meta']['key']}"
        if "ct" in expr:
            return f"ct {expr['ct']['key']}"
        if "payload" in expr:
            return f"{expr['payload']['protocol']} {expr['payload']['field']}"
    return None


def _masked_value(expr: object, key: str, where: str) -> Mark:
    """Read back `key set (key & keep) ^/| value` (nft normalises our xor to `&`/`|`)."""
    if isinstance(expr, int) and not isinstance(expr, bool):
        return Mark(value=expr, mask=MASK32)
    if isinstance(expr, dict):
        op = next(iter(expr))
        if op in ("|", "^"):
            inner, value = expr[op]
            value = _jint(value, where)
            masked = _masked_key(inner)
            if masked is None or masked[0] != key:
                raise ParseError(f"{where}: unsupported mark expression {expr!r}")
            # (x & keep) | v, with v inside the mask == (x & ~mask) ^ v for mask = ~keep | v.
            return Mark(value=value, mask=(~masked[1] & MASK32) | value)
        masked = _masked_key(expr)
        if masked is not None and masked[0] == key:
            return Mark(value=0, mask=~masked[1] & MASK32)
    raise ParseError(f"{where}: unsupported mark expression {expr!r}")


def _nft_net(right: object, family: Family, where: str) -> IPNetwork:
    if isinstance(right, str):
        return _parse_net(right, family, where)
    if isinstance(right, dict) and "prefix" in right:
        p = right["prefix"]
        return _parse_net(f"{p['addr']}/{p['len']}", family, where)
    raise ParseError(f"{where}: unsupported address {right!r}")


def nft_rule_to_model(
    exprs: Sequence[Mapping[str, object]],
    *,
    family: Family,
    table: str,
    chain: str,
    comment: str,
) -> Rule:
    """Read one rule's JSON expression list (as `nft -j` lists it) into a model `Rule`."""
    where = f"{family.value} {table}/{chain}"
    f: dict[str, object] = {}
    target: Target | None = None
    mark_set: Mark | None = None
    tproxy_port: int | None = None
    ip = family.nft
    for expr in exprs:
        (kind, body), *rest = expr.items()
        if rest:
            raise ParseError(f"{where}: unexpected expression {expr!r}")
        if kind == "counter":
            continue  # counters do not change what a rule does
        if kind == "match":
            m = cast(dict[str, object], body)
            op, left, right = m["op"], m["left"], m["right"]
            neg = op == "!="
            if op not in ("==", "!=", "in"):
                raise ParseError(f"{where}: operator {op!r} is not in the model")
            key = _key(left)
            masked = _masked_key(left)
            if key in ("meta iifname", "meta oifname") and isinstance(right, str):
                f["in_iface" if key == "meta iifname" else "out_iface"] = Cond(
                    value=right, negate=neg
                )
            elif key in (f"{ip} saddr", f"{ip} daddr"):
                f["src" if key.endswith("saddr") else "dst"] = Cond(
                    value=_nft_net(right, family, where), negate=neg
                )
            elif key == "meta l4proto" and right in ("tcp", "udp") and not neg:
                f["proto"] = right
            elif key in ("tcp sport", "tcp dport", "udp sport", "udp dport"):
                proto, port = key.split()
                f["proto"] = proto
                f[port] = Cond(value=_jint(right, where), negate=neg)
            elif key == "ct state" and not neg:
                states = [right] if isinstance(right, str) else right
                if not isinstance(states, list):
                    raise ParseError(f"{where}: unsupported ct state {right!r}")
                f["ctstate"] = frozenset(str(s).upper() for s in states)
            elif masked is not None and masked[0] in ("meta mark", "ct mark"):
                mark = Mark(value=_jint(right, where), mask=masked[1])
                f["mark" if masked[0] == "meta mark" else "connmark"] = Cond(value=mark, negate=neg)
            elif key in ("meta mark", "ct mark"):
                # nft drops a full mask: `ct mark & 0xffffffff == 1` lists as `ct mark == 1`.
                mark = Mark(value=_jint(right, where), mask=MASK32)
                f["mark" if key == "meta mark" else "connmark"] = Cond(value=mark, negate=neg)
            else:
                raise ParseError(f"{where}: match {m!r} is not in the model")
        elif kind == "accept":
            target = Accept()
        elif kind == "return":
            target = Return()
        elif kind == "jump":
            dest = _nft_split_chain(str(cast(dict[str, object], body)["target"]))
            if dest is None or dest[0] != table:
                raise ParseError(f"{where}: jump to {body!r} leaves our table layout")
            target = Jump(chain=dest[1])
        elif kind == "redirect":
            target = Redirect(port=_jint(cast(dict[str, object], body).get("port"), where))
        elif kind == "tproxy":
            tp = cast(dict[str, object], body)
            if "addr" in tp:
                raise ParseError(f"{where}: tproxy to an address is not in the model")
            tproxy_port = _jint(tp.get("port"), where)
        elif kind == "mangle":
            mg = cast(dict[str, object], body)
            key = _key(mg["key"])
            value = mg["value"]
            if key == "meta mark" and _key(value) == "ct mark":
                target = ConnmarkRestore()
            elif key == "meta mark":
                mark_set = _masked_value(value, "meta mark", where)
            elif key == "ct mark":
                target = ConnmarkSet(mark=_masked_value(value, "ct mark", where))
            elif key == "ct zone":
                target = CtZone(zone=_jint(value, where))
            else:
                raise ParseError(f"{where}: statement {expr!r} is not in the model")
        else:
            raise ParseError(f"{where}: statement {kind!r} is not in the model")
    if tproxy_port is not None:
        target = TProxy(port=tproxy_port, mark=mark_set or Mark(value=0, mask=0))
    elif mark_set is not None:
        raise ParseError(f"{where}: a bare 'meta mark set' is not in the model")
    if target is None:
        raise ParseError(f"{where}: rule without a verdict or target")
    try:
        return Rule(
            family=family,
            table=table,
            chain=chain,
            match=Match(**f),  # type: ignore[arg-type]
            target=target,
            comment=comment,
        )
    except ConfigError as exc:
        raise ParseError(f"{where}: {exc}") from exc


def parse_nft_json(text: str, *, table: str) -> LiveRules:
    """Our `table ip <table>` / `table ip6 <table>` from `nft -j list ruleset` (or `list table`)."""
    try:
        doc = json.loads(text) if text.strip() else {"nftables": []}
        items = doc["nftables"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"nft -j output is not nftables JSON: {exc}") from exc
    chains: set[ChainRef] = set()
    pending: list[tuple[Family, str, str, dict[str, object]]] = []
    foreign: list[Foreign] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        if "chain" in item:
            c = item["chain"]
            family = _NFT_FAMILIES.get(c.get("family"))
            if family is None or c.get("table") != table:
                continue
            where = f"nft {c['family']} {table}/{c['name']}"
            split = _nft_split_chain(c["name"])
            if split is None:
                foreign.append(Foreign(where=where, text=json.dumps(c), reason="unknown chain"))
                continue
            tname, cname = split
            try:
                ref = ChainRef(family=family, table=tname, name=cname)
            except ConfigError as exc:
                foreign.append(Foreign(where=where, text=json.dumps(c), reason=str(exc)))
                continue
            if ref.builtin:
                ctype, hook, prio = NFT_BASE_CHAINS[(tname, cname)]
                want_prio = _PRIO_NAMES.get(prio)
                got = (c.get("type"), c.get("hook"), c.get("prio"), c.get("policy"))
                expect = (ctype, hook, want_prio if want_prio is not None else int(prio), "accept")
                if got != expect:
                    foreign.append(
                        Foreign(
                            where=where, text=json.dumps(c), reason=f"base chain {got} != {expect}"
                        )
                    )
            else:
                chains.add(ref)
        elif "rule" in item:
            r = item["rule"]
            family = _NFT_FAMILIES.get(r.get("family"))
            if family is None or r.get("table") != table:
                continue
            pending.append((family, r["chain"], str(r.get("comment", "")), r))
    rules: list[Rule] = []
    for family, chain_name, comment, r in pending:
        where = f"nft {family.nft} {table}/{chain_name}"
        split = _nft_split_chain(chain_name)
        if split is None:
            foreign.append(Foreign(where=where, text=json.dumps(r), reason="rule in unknown chain"))
            continue
        try:
            rule = nft_rule_to_model(
                cast(list[dict[str, object]], r.get("expr", [])),
                family=family,
                table=split[0],
                chain=split[1],
                comment=comment,
            )
        except (ParseError, ConfigError, KeyError, TypeError, ValueError) as exc:
            foreign.append(Foreign(where=where, text=json.dumps(r.get("expr")), reason=str(exc)))
            continue
        jump_ok = not isinstance(rule.target, Jump) or (
            ChainRef(family=family, table=rule.table, name=rule.target.chain) in chains
        )
        if (rule.builtin or rule.ref in chains) and jump_ok:
            rules.append(rule)
        else:
            foreign.append(
                Foreign(where=where, text=json.dumps(r.get("expr")), reason="dangling chain")
            )
    return LiveRules(
        ruleset=Ruleset(chains=frozenset(chains), rules=tuple(rules)), foreign=tuple(foreign)
    )


def nft_tables_present(text: str, *, table: str) -> tuple[Family, ...]:
    """Which families have our table, from `nft -j list tables` / `list ruleset` output."""
    try:
        items = json.loads(text)["nftables"] if text.strip() else []
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"nft -j output is not nftables JSON: {exc}") from exc
    found = {
        _NFT_FAMILIES[i["table"]["family"]]
        for i in items
        if isinstance(i, dict)
        and "table" in i
        and i["table"].get("name") == table
        and i["table"].get("family") in _NFT_FAMILIES
    }
    return tuple(f for f in Family if f in found)


__all__ = [
    "CT_STATES",
    "Foreign",
    "LiveRules",
    "ParseError",
    "SavedLine",
    "nft_rule_to_model",
    "nft_tables_present",
    "parse_iptables_rule",
    "parse_iptables_save",
    "parse_nft_json",
]


def iptables_table_usage(text: str) -> dict[str, bool]:
    """Tables listed by `iptables-save` -> whether each is empty (no rules, no user chains, and
    only ACCEPT policies), i.e. indistinguishable from not existing at all."""
    usage: dict[str, bool] = {}
    table: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:]
            usage[table] = True
        elif table is None:
            continue
        elif line.startswith(":"):
            name, policy = ([*line[1:].split(), "", ""])[:2]
            if name not in BUILTIN_CHAINS.get(table, ()) or policy != "ACCEPT":
                usage[table] = False
        elif line.startswith("-"):
            usage[table] = False
    return usage


def is_iptables_nft(text: str) -> bool:
    """Whether `iptables-save` output (or `--version`) comes from the nf_tables variant."""
    return "(nf_tables)" in text[:200]

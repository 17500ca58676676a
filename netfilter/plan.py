"""Pure planning: drift between wanted and live state, and the texts that move live to wanted.

`diff_rules`/`diff_routes` list what differs. `iptables_transition` writes one `iptables-restore
--noflush` input that turns our current chains and hook jumps (as raw `iptables-save` lines) into a
target (rendered from the model, or a snapshot taken before a failed attempt, for rollback). It
only ever names our chains and our jumps, so other people's rules are never flushed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from netfilter.model import (
    BUILTIN_CHAINS,
    TABLES,
    ChainRef,
    Drift,
    Family,
    LocalRouteSpec,
    RouteSpec,
    Rule,
    Ruleset,
)
from netfilter.parse import Foreign, LiveRules, SavedLine
from netfilter.render import iptables_rule_line


def _describe(rule: Rule) -> str:
    return f"{iptables_rule_line(rule)}"


def diff_rules(wanted: Ruleset, live: LiveRules, *, backend: str) -> list[Drift]:
    """Missing/extra chains and rules, foreign entries, and order differences within our chains."""
    drifts: list[Drift] = []
    for ref in sorted(wanted.chains - live.ruleset.chains, key=str):
        drifts.append(Drift(kind="missing_chain", where=f"{backend} {ref}", detail=ref.name))
    for ref in sorted(live.ruleset.chains - wanted.chains, key=str):
        drifts.append(Drift(kind="extra_chain", where=f"{backend} {ref}", detail=ref.name))
    refs: dict[ChainRef, None] = {}
    for rule in (*wanted.rules, *live.ruleset.rules):
        refs.setdefault(rule.ref, None)
    for ref in refs:
        want = wanted.chain_rules(ref)
        have = live.ruleset.chain_rules(ref)
        missing = Counter(want) - Counter(have)
        extra = Counter(have) - Counter(want)
        where = f"{backend} {ref}"
        for rule in want:
            if missing[rule] > 0:
                missing[rule] -= 1
                drifts.append(Drift(kind="missing_rule", where=where, detail=_describe(rule)))
        for rule in have:
            if extra[rule] > 0:
                extra[rule] -= 1
                drifts.append(Drift(kind="extra_rule", where=where, detail=_describe(rule)))
        if not ref.builtin and Counter(want) == Counter(have) and want != have:
            drifts.append(
                Drift(kind="misordered", where=where, detail="rules in a different order")
            )
    for item in live.foreign:
        drifts.append(
            Drift(kind="foreign_rule", where=f"{backend} {item.where}", detail=f"{item.reason}")
        )
    return drifts


def diff_routes(wanted: RouteSpec, live: RouteSpec, foreign: Iterable[str] = ()) -> list[Drift]:
    """Missing/extra ip rules (ours: same table) and routes in our table."""
    drifts: list[Drift] = []
    for rule in wanted.rules:
        if rule not in live.rules:
            drifts.append(Drift(kind="missing_ip_rule", where="ip rule", detail=str(rule)))
    for rule in live.rules:
        if rule not in wanted.rules:
            drifts.append(Drift(kind="extra_ip_rule", where="ip rule", detail=str(rule)))
    for route in wanted.routes:
        if route not in live.routes:
            drifts.append(Drift(kind="missing_route", where=_rt(route), detail=str(route)))
    for route in live.routes:
        if route not in wanted.routes:
            drifts.append(Drift(kind="extra_route", where=_rt(route), detail=str(route)))
    for text in foreign:
        drifts.append(Drift(kind="extra_route", where="ip route", detail=text))
    return drifts


def _rt(route: LocalRouteSpec) -> str:
    return f"ip route table {route.table}"


# --- iptables transitions ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OwnedState:
    """Our part of one family's iptables state as exact restore lines, per table."""

    chains: frozenset[tuple[str, str]]
    """(table, chain) of our chains."""
    lines: tuple[SavedLine, ...]
    """`-A ...` lines: rules of our chains and jumps from built-in chains into them."""

    @property
    def empty(self) -> bool:
        return not self.chains and not self.lines


def owned_from_ruleset(rs: Ruleset, family: Family) -> OwnedState:
    part = rs.for_family(family)
    return OwnedState(
        chains=frozenset((c.table, c.name) for c in part.chains),
        lines=tuple(
            SavedLine(table=r.table, chain=r.chain, line=iptables_rule_line(r)) for r in part.rules
        ),
    )


def owned_from_live(live: LiveRules) -> OwnedState:
    return OwnedState(
        chains=frozenset((c.table, c.name) for c in live.ruleset.chains), lines=live.lines
    )


EMPTY = OwnedState(chains=frozenset(), lines=())


@dataclass(frozen=True, slots=True, kw_only=True)
class RestoreScript:
    """A restore input plus, per input line number, what that line does (for error messages)."""

    text: str
    line_info: tuple[str, ...]

    def describe_line(self, lineno: int) -> str:
        if 1 <= lineno <= len(self.line_info):
            return self.line_info[lineno - 1]
        return f"line {lineno}"


def _is_builtin(table: str, chain: str) -> bool:
    return chain in BUILTIN_CHAINS[table]


def _with_op(line: str, op: str) -> str:
    assert line.startswith("-A ")
    return op + line[2:]


def iptables_transition(current: OwnedState, target: OwnedState) -> RestoreScript:
    """A `--noflush` restore input that turns `current` into `target`, touching only our objects.

    Our chains in the target are declared (created, or flushed if present) and refilled; jumps
    are added or deleted one by one (built-in chains are never declared, which would flush them);
    our chains not in the target are flushed and deleted after the jumps into them are gone.
    """
    out: list[str] = []
    info: list[str] = []

    def emit(line: str, what: str) -> None:
        out.append(line)
        info.append(what)

    for table in TABLES:
        t_chains = sorted(name for tb, name in target.chains if tb == table)
        c_chains = sorted(name for tb, name in current.chains if tb == table)
        t_lines = [s for s in target.lines if s.table == table]
        c_jumps = [s for s in current.lines if s.table == table and _is_builtin(table, s.chain)]
        t_jumps = [s for s in t_lines if _is_builtin(table, s.chain)]
        gone = [name for name in c_chains if name not in t_chains]
        # Jumps: keep live ones that are wanted (once each); delete the rest; add what is missing.
        keep = Counter(s.line for s in t_jumps)
        deletes: list[SavedLine] = []
        for s in c_jumps:
            if keep[s.line] > 0:
                keep[s.line] -= 1
            else:
                deletes.append(s)
        adds: list[SavedLine] = []
        for s in t_jumps:
            if keep[s.line] > 0:  # wanted more often than it is live
                keep[s.line] -= 1
                adds.append(s)
        body = [s for s in t_lines if not _is_builtin(table, s.chain)]
        if not (t_chains or gone or deletes or adds):
            continue
        emit(f"*{table}", f"table {table}")
        for name in t_chains:
            emit(f":{name} - [0:0]", f"create/flush chain {table}/{name}")
        for s in deletes:
            emit(_with_op(s.line, "-D"), f"delete hook {table}: {s.line}")
        for name in gone:
            emit(f"-F {name}", f"flush chain {table}/{name}")
        for name in gone:
            emit(f"-X {name}", f"delete chain {table}/{name}")
        for s in body:
            emit(s.line, f"rule {table}: {s.line}")
        for s in adds:
            emit(s.line, f"hook {table}: {s.line}")
        emit("COMMIT", f"commit table {table}")
    return RestoreScript(text="\n".join(out) + "\n" if out else "", line_info=tuple(info))


def foreign_lines(items: Sequence[Foreign]) -> list[str]:
    return [f"{f.where}: {f.text} ({f.reason})" for f in items]

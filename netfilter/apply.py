"""The shell: program, verify, repair and remove the in-pod capture rules inside a network namespace.

Every operation reads the live state first (iptables-save / `nft -j list ruleset` / netlink), plans
with the pure core (`rules`, `render`, `parse`, `plan`) and writes only when something differs, so
applying twice changes nothing. Writes are one `iptables-restore --noflush` per family (our chains
and jumps only) or one `nft -f` transaction (our tables only), then the policy routing. If any step
fails, everything is put back to the snapshot taken before the first write and `ApplyError` names
the step (and, where the tool says, the rule) that failed. Residue of the *other* backend (e.g. our
iptables chains when nft is configured) counts as drift and is removed too.

All functions block (subprocess + netlink); from asyncio code call them via `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from netfilter.executor import Executor, SubprocessExecutor
from netfilter.model import (
    Backend,
    Drift,
    Family,
    InpodConfig,
    NetfilterError,
    RouteSpec,
    Ruleset,
)
from netfilter.parse import (
    LiveRules,
    ParseError,
    iptables_table_usage,
    is_iptables_nft,
    parse_iptables_save,
    parse_nft_json,
)
from netfilter.plan import (
    RestoreScript,
    diff_routes,
    diff_rules,
    iptables_transition,
    owned_from_live,
    owned_from_ruleset,
)
from netfilter.render import to_nft
from netfilter.routes import LiveRoutes, Pyroute2RouteOps, RouteOps
from netfilter.rules import inpod_routes, inpod_ruleset

log = logging.getLogger(__name__)

_RESTORE_LINE = re.compile(r"(?:line:?\s*)(\d+)", re.IGNORECASE)
_NFT_LINE = re.compile(r"^[^:\n]*:(\d+):\d+(?:-\d+)?: Error", re.MULTILINE)


class ApplyError(NetfilterError):
    """A step failed; `step` names it, `detail` the rule or route, `rolled_back` whether undo worked."""

    def __init__(
        self, step: str, detail: str, *, rolled_back: bool, rollback_errors: tuple[str, ...] = ()
    ) -> None:
        self.step = step
        self.detail = detail
        self.rolled_back = rolled_back
        self.rollback_errors = rollback_errors
        state = (
            "the namespace was restored to its previous state"
            if rolled_back
            else "ROLLBACK FAILED: " + "; ".join(rollback_errors)
        )
        super().__init__(f"{step} failed: {detail} ({state})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Wanted:
    """Everything that should be live for one backend (empty for removal)."""

    backend: Backend
    ruleset: Ruleset
    routes: RouteSpec
    families: tuple[Family, ...]


@dataclass
class _Snapshot:
    iptables: dict[Family, LiveRules] = field(default_factory=dict)
    ipt_tables: dict[Family, dict[str, bool]] = field(default_factory=dict)
    """Per family: iptables tables that exist -> whether they are empty."""
    nft: LiveRules | None = None
    nft_items: list[dict[str, object]] = field(default_factory=list)
    nft_table: str = ""
    routes: LiveRoutes | None = None


def detect_backend(executor: Executor | None = None) -> Backend:
    """NFT if `nft list tables` works here, else IPTABLES if `iptables-restore` runs; else raise."""
    ex = executor or SubprocessExecutor()
    if ex.run(["nft", "list", "tables"], timeout=10).ok:
        return Backend.NFT
    if ex.run(["iptables-restore", "--version"], timeout=10).ok:
        return Backend.IPTABLES
    raise NetfilterError("no usable netfilter backend: neither `nft` nor `iptables-restore` works")


class PodNetfilter:
    """Programs one pod netns. Holds the seams (CLI executor, netlink ops) so tests can fake them."""

    def __init__(
        self,
        executor: Executor | None = None,
        route_ops: RouteOps | None = None,
        *,
        backend_detector: Callable[[Executor], Backend] = detect_backend,
        tool_exists: Callable[[str], bool] = lambda name: shutil.which(name) is not None,
    ) -> None:
        self.ex: Executor = executor or SubprocessExecutor()
        self.route_ops: RouteOps = route_ops or Pyroute2RouteOps()
        self._detect = backend_detector
        self._tool_exists = tool_exists
        self._detected: Backend | None = None
        self._ipt_nft: bool | None = None

    # --- public operations ----------------------------------------------------------------

    def backend(self, cfg: InpodConfig) -> Backend:
        if cfg.backend is not Backend.AUTO:
            return cfg.backend
        if self._detected is None:
            self._detected = self._detect(self.ex)
        return self._detected

    def wanted(self, netns: str, cfg: InpodConfig) -> Wanted:
        routes = inpod_routes(cfg)
        if Family.V6 in cfg.families and not self.route_ops.ipv6_usable(netns):
            # No IPv6 on lo (disabled in this netns): the v6 local route cannot exist.
            log.info("netns %s: IPv6 unusable on lo, skipping v6 policy routing", netns)
            routes = RouteSpec(
                rules=tuple(r for r in routes.rules if r.family is Family.V4),
                routes=tuple(r for r in routes.routes if r.family is Family.V4),
            )
        return Wanted(
            backend=self.backend(cfg),
            ruleset=inpod_ruleset(cfg),
            routes=routes,
            families=cfg.families,
        )

    def verify(self, netns: str, cfg: InpodConfig) -> list[Drift]:
        """What differs between the live netns and `cfg` (empty list = in sync)."""
        _check_netns(netns)
        wanted = self.wanted(netns, cfg)
        snap = self._read(netns, cfg)
        return self._drifts(wanted, snap, cfg)

    def program(self, netns: str, cfg: InpodConfig) -> list[Drift]:
        """Make the netns match `cfg`; returns the drifts that were fixed (empty = nothing done)."""
        _check_netns(netns)
        return self._converge(netns, cfg, self.wanted(netns, cfg))

    def unprogram(self, netns: str, cfg: InpodConfig) -> list[Drift]:
        """Remove our chains, jumps, tables, ip rules and routes (both backends); no residue."""
        _check_netns(netns)
        empty = Wanted(
            backend=self.backend(cfg), ruleset=Ruleset(), routes=RouteSpec(), families=()
        )
        return self._converge(netns, cfg, empty)

    # --- reading ------------------------------------------------------------------------------

    def _read(self, netns: str, cfg: InpodConfig) -> _Snapshot:
        snap = _Snapshot()
        primary = self.backend(cfg)
        if primary is Backend.IPTABLES or self._tool_exists("iptables-save"):
            for family in Family:
                tool = f"{family.iptables}-save"
                res = self.ex.run([tool], netns=netns)
                if not res.ok:
                    if primary is Backend.IPTABLES:
                        raise NetfilterError(f"{tool} failed in {netns}: {res.stderr.strip()}")
                    continue  # other backend's tool unusable here: nothing of ours can be there
                snap.iptables[family] = parse_iptables_save(
                    res.stdout, family=family, prefix=cfg.prefix
                )
                snap.ipt_tables[family] = iptables_table_usage(res.stdout)
        if primary is Backend.NFT or self._tool_exists("nft"):
            res = self.ex.run(["nft", "-j", "list", "ruleset"], netns=netns)
            if res.ok:
                snap.nft = parse_nft_json(res.stdout, table=cfg.nft_table)
                snap.nft_items = _nft_our_items(res.stdout, cfg.nft_table)
                snap.nft_table = cfg.nft_table
            elif primary is Backend.NFT:
                raise NetfilterError(f"nft -j list ruleset failed in {netns}: {res.stderr.strip()}")
        snap.routes = self.route_ops.read(netns, cfg.route_table)
        return snap

    def _drifts(self, wanted: Wanted, snap: _Snapshot, cfg: InpodConfig) -> list[Drift]:
        return [d for side in self._side_drifts(wanted, snap).values() for d in side]

    def _side_drifts(self, wanted: Wanted, snap: _Snapshot) -> dict[str, list[Drift]]:
        """Drifts per side: one per iptables family, "nft", "routes"."""
        sides: dict[str, list[Drift]] = {}
        for family, live in snap.iptables.items():
            want = (
                wanted.ruleset.for_family(family)
                if wanted.backend is Backend.IPTABLES
                else Ruleset()
            )
            sides[family.iptables] = diff_rules(want, live, backend=family.iptables)
        if snap.nft is not None:
            want_nft = wanted.ruleset if wanted.backend is Backend.NFT else Ruleset()
            sides["nft"] = diff_rules(want_nft, snap.nft, backend="nft")
            # An empty table of ours (or one for a family we no longer want) is residue too.
            want_fams = set(wanted.families) if wanted.backend is Backend.NFT else set()
            for fam in _table_families(snap):
                if fam not in want_fams:
                    sides["nft"].append(
                        Drift(
                            kind="extra_table",
                            where=f"nft table {fam.nft} {snap.nft_table}",
                            detail="our table where none is wanted",
                        )
                    )
        assert snap.routes is not None
        sides["routes"] = diff_routes(wanted.routes, snap.routes.spec, snap.routes.foreign)
        return sides

    # --- writing ------------------------------------------------------------------------------

    def _converge(self, netns: str, cfg: InpodConfig, wanted: Wanted) -> list[Drift]:
        snap = self._read(netns, cfg)
        sides = self._side_drifts(wanted, snap)
        drifts = [d for side in sides.values() for d in side]
        if not drifts:
            return []
        log.info(
            "netns %s: fixing %d drift(s): %s", netns, len(drifts), "; ".join(map(str, drifts))
        )
        step = "read"
        try:
            for family, live in snap.iptables.items():
                if not sides[family.iptables]:
                    continue
                want = (
                    wanted.ruleset.for_family(family)
                    if wanted.backend is Backend.IPTABLES
                    else Ruleset()
                )
                step = f"{family.iptables}-restore"
                script = iptables_transition(
                    owned_from_live(live), owned_from_ruleset(want, family)
                )
                self._restore(netns, family, script, step)
                if not want.rules and not want.chains:
                    self._drop_empty_iptables_tables(netns, snap, family, keep=set())
            if snap.nft is not None and sides["nft"]:
                step = "nft -f"
                self._nft_apply(netns, cfg, wanted, snap)
            assert snap.routes is not None
            if sides["routes"]:
                step = "policy routing"
                live_routes = snap.routes.spec
                self.route_ops.change(
                    netns,
                    add=_minus(wanted.routes, live_routes),
                    delete=_minus(live_routes, wanted.routes),
                )
            step = "verify after apply"
            after = self._drifts(wanted, self._read(netns, cfg), cfg)
            if after:
                raise NetfilterError("still differs: " + "; ".join(map(str, after)))
        except NetfilterError as exc:
            errors = self._rollback(netns, cfg, snap)
            raise ApplyError(
                step, str(exc), rolled_back=not errors, rollback_errors=tuple(errors)
            ) from exc
        return drifts

    def _restore(self, netns: str, family: Family, script: RestoreScript, step: str) -> None:
        if not script.text:
            return
        log.debug("netns %s %s input:\n%s", netns, step, script.text)
        res = self.ex.run(
            [f"{family.iptables}-restore", "-w", "5", "--noflush"], netns=netns, stdin=script.text
        )
        if res.ok:
            return
        m = _RESTORE_LINE.search(res.stderr)
        where = f"input {script.describe_line(int(m.group(1)))}; " if m else ""
        raise NetfilterError(f"{where}{family.iptables}-restore said: {res.stderr.strip()}")

    def _iptables_is_nft(self) -> bool:
        if self._ipt_nft is None:
            res = self.ex.run(["iptables-save", "--version"], timeout=10)
            self._ipt_nft = res.ok and is_iptables_nft(res.stdout)
        return self._ipt_nft

    def _drop_empty_iptables_tables(
        self, netns: str, snap: _Snapshot, family: Family, *, keep: set[str]
    ) -> None:
        """Delete iptables-nft tables that only exist because our restore created them.

        An iptables-nft table with no rules, no user chains and ACCEPT policies behaves exactly
        like no table; removing it leaves no trace of us in `nft list ruleset`. Tables named in
        `keep` (present before we started) stay. Legacy iptables tables cannot be removed.
        """
        if not self._iptables_is_nft() or not self._tool_exists("nft"):
            return
        res = self.ex.run([f"{family.iptables}-save"], netns=netns)
        if not res.ok:
            raise NetfilterError(f"{family.iptables}-save failed: {res.stderr.strip()}")
        for table, empty in iptables_table_usage(res.stdout).items():
            if empty and table not in keep:
                gone = self.ex.run(["nft", "delete", "table", family.nft, table], netns=netns)
                if not gone.ok:
                    log.warning(
                        "netns %s: could not drop empty %s table %s", netns, family.nft, table
                    )

    def _nft_apply(self, netns: str, cfg: InpodConfig, wanted: Wanted, snap: _Snapshot) -> None:
        assert snap.nft is not None
        table = cfg.nft_table
        want_families = wanted.families if wanted.backend is Backend.NFT else ()
        present = set(_table_families(snap))
        text = to_nft(wanted.ruleset, table, families=want_families)
        for family in Family:
            if family in present and family not in want_families:
                text += f"table {family.nft} {table}\ndelete table {family.nft} {table}\n"
        if not text:
            return
        log.debug("netns %s nft input:\n%s", netns, text)
        res = self.ex.run(["nft", "-f", "-"], netns=netns, stdin=text)
        if res.ok:
            return
        m = _NFT_LINE.search(res.stderr)
        where = ""
        if m:
            lines = text.splitlines()
            n = int(m.group(1))
            if 1 <= n <= len(lines):
                where = f"input line {n}: {lines[n - 1].strip()}; "
        raise NetfilterError(f"{where}nft said: {res.stderr.strip()}")

    def _rollback(self, netns: str, cfg: InpodConfig, snap: _Snapshot) -> list[str]:
        """Put every side back as it was in `snap`; returns what could not be undone."""
        errors: list[str] = []
        try:
            now = self._read(netns, cfg)
        except NetfilterError as exc:
            return [f"re-read for rollback: {exc}"]
        for family, before in snap.iptables.items():
            current = now.iptables.get(family)
            if current is None:
                continue
            script = iptables_transition(owned_from_live(current), owned_from_live(before))
            try:
                self._restore(netns, family, script, f"rollback {family.iptables}")
                existed = set(snap.ipt_tables.get(family, {}))
                self._drop_empty_iptables_tables(netns, snap, family, keep=existed)
            except NetfilterError as exc:
                errors.append(f"rollback {family.iptables}: {exc}")
        if snap.nft is not None:
            res = self.ex.run(
                ["nft", "-j", "-f", "-"], netns=netns, stdin=_nft_restore_json(snap, cfg.nft_table)
            )
            if not res.ok:
                errors.append(f"rollback nft: {res.stderr.strip()}")
        if snap.routes is not None and now.routes is not None:
            try:
                self.route_ops.change(
                    netns,
                    add=_minus(snap.routes.spec, now.routes.spec),
                    delete=_minus(now.routes.spec, snap.routes.spec),
                )
            except NetfilterError as exc:
                errors.append(f"rollback routes: {exc}")
        if errors:
            log.error("netns %s: rollback incomplete: %s", netns, errors)
        return errors


def _minus(a: RouteSpec, b: RouteSpec) -> RouteSpec:
    return RouteSpec(
        rules=tuple(r for r in a.rules if r not in b.rules),
        routes=tuple(r for r in a.routes if r not in b.routes),
    )


def _nft_our_items(text: str, table: str) -> list[dict[str, object]]:
    """Our tables, chains and rules from `nft -j list ruleset`, handles stripped (for rollback)."""
    try:
        items = json.loads(text)["nftables"] if text.strip() else []
    except (ValueError, KeyError, TypeError) as exc:
        raise ParseError(f"nft -j output is not nftables JSON: {exc}") from exc
    ours: list[dict[str, object]] = []
    for item in items:
        for kind in ("table", "chain", "rule"):
            if isinstance(item, dict) and kind in item:
                obj = dict(item[kind])
                name = obj.get("name") if kind == "table" else obj.get("table")
                if name == table and obj.get("family") in ("ip", "ip6"):
                    obj.pop("handle", None)
                    ours.append({kind: obj})
    return ours


def _table_families(snap: _Snapshot) -> tuple[Family, ...]:
    """Families in which our nft table exists (per the snapshot)."""
    fams: set[Family] = set()
    for item in snap.nft_items:
        table = item.get("table")
        if isinstance(table, dict):
            fams.add(Family.V4 if table.get("family") == "ip" else Family.V6)
    return tuple(f for f in Family if f in fams)


def _nft_restore_json(snap: _Snapshot, table: str) -> str:
    """One JSON transaction: drop our tables, then re-add exactly what the snapshot held."""
    cmds: list[dict[str, object]] = []
    for fam in ("ip", "ip6"):
        ref = {"family": fam, "name": table}
        cmds += [{"add": {"table": ref}}, {"delete": {"table": ref}}]
    # Tables, then chains, then rules: a jump needs its target chain to exist already.
    for kind in ("table", "chain", "rule"):
        cmds += [{"add": item} for item in snap.nft_items if kind in item]
    return json.dumps({"nftables": cmds})


def _check_netns(netns: str) -> None:
    if not os.path.exists(netns):
        raise NetfilterError(f"network namespace {netns!r} does not exist")


# --- module-level API ---------------------------------------------------------------------------


def program_pod(
    netns_path: str,
    cfg: InpodConfig,
    *,
    executor: Executor | None = None,
    route_ops: RouteOps | None = None,
) -> None:
    """Install the capture rules and policy routing in the netns at `netns_path` (idempotent)."""
    PodNetfilter(executor, route_ops).program(netns_path, cfg)


def verify_pod(
    netns_path: str,
    cfg: InpodConfig,
    *,
    executor: Executor | None = None,
    route_ops: RouteOps | None = None,
) -> list[Drift]:
    """Differences between what is live and what `cfg` wants; [] when in sync."""
    return PodNetfilter(executor, route_ops).verify(netns_path, cfg)


def repair_pod(
    netns_path: str,
    cfg: InpodConfig,
    *,
    executor: Executor | None = None,
    route_ops: RouteOps | None = None,
) -> list[Drift]:
    """Re-apply where live state drifted; returns the drifts that were repaired."""
    return PodNetfilter(executor, route_ops).program(netns_path, cfg)


def unprogram_pod(
    netns_path: str,
    cfg: InpodConfig,
    *,
    executor: Executor | None = None,
    route_ops: RouteOps | None = None,
) -> None:
    """Remove every trace of our rules, tables, ip rules and routes from the netns."""
    PodNetfilter(executor, route_ops).unprogram(netns_path, cfg)

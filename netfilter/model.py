"""The rule model: families, tables, matches, targets, rules, rulesets, routes, drifts and `InpodConfig`.

Everything here is a frozen value with validation that names the bad field. The model is deliberately
small: it covers exactly the matches and targets the in-pod capture rules need, so that one value can
be rendered to both `iptables-restore` text and `nft` text and parsed back from `iptables-save` and
`nft -j list ruleset` for verification. Anything outside the model that turns up in our chains is
reported as foreign (drift), never silently ignored.

The default numbers repeat `ztunnel/config.py` (netfilter is a leaf package and may not import ztunnel);
`tests/netfilter/test_model.py` checks that the two stay equal.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Final, Generic, Literal, TypeVar

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MASK32 = 0xFFFFFFFF


class NetfilterError(Exception):
    """Base of this package's errors."""


class ConfigError(NetfilterError, ValueError):
    """A configuration or model value is invalid; the message names the field and the value."""


class Family(enum.Enum):
    """Address family: one `iptables`/`ip6tables` world, one nft table family."""

    V4 = "ipv4"
    V6 = "ipv6"

    @property
    def nft(self) -> str:
        return "ip" if self is Family.V4 else "ip6"

    @property
    def iptables(self) -> str:
        return "iptables" if self is Family.V4 else "ip6tables"

    @property
    def loopback(self) -> IPNetwork:
        """The loopback host address (`127.0.0.1/32`, `::1/128`), exempt from capture."""
        if self is Family.V4:
            return ipaddress.ip_network("127.0.0.1/32")
        return ipaddress.ip_network("::1/128")


class Backend(enum.Enum):
    """Which kernel interface carries the rules; AUTO resolves to NFT where `nft` works."""

    NFT = "nft"
    IPTABLES = "iptables"
    AUTO = "auto"


class InboundMode(enum.Enum):
    """How inbound plaintext reaches 15006: nat REDIRECT (Istio today) or mangle TPROXY (Istio 1.21-1.23)."""

    REDIRECT = "redirect"
    TPROXY = "tproxy"


# Table → its built-in chains, in the kernel's hook order.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
TABLES: tuple[str, ...] = ("raw", "mangle", "nat")
CT_STATES: tuple[str, ...] = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED")
Proto = Literal["tcp", "udp"]

_CHAIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,27}$")
_IFACE_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,15}$")
_PREFIX_RE = re.compile(r"^[A-Z][A-Z0-9]{0,7}$")
_COMMENT_RE = re.compile(r"^[A-Za-z0-9 :._/,()-]{0,200}$")

T = TypeVar("T")


def _check_port(where: str, port: object) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: {port!r} is not a port number (1-65535)")


def _check_u32(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MASK32:
        raise ConfigError(f"{where}: {value!r} is not a 32-bit mark value")


@dataclass(frozen=True, slots=True, kw_only=True)
class Cond(Generic[T]):
    """One match condition, possibly negated (`! -d 127.0.0.1/32`, `ip daddr != 127.0.0.1`)."""

    value: T
    negate: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Mark:
    """A 32-bit mark under a mask; `value/mask` as iptables prints it."""

    value: int
    mask: int = MASK32

    def __post_init__(self) -> None:
        _check_u32("Mark.value", self.value)
        _check_u32("Mark.mask", self.mask)
        if self.value & ~self.mask & MASK32:
            raise ConfigError(
                f"Mark: value {self.value:#x} has bits outside its mask {self.mask:#x}"
            )

    def __str__(self) -> str:
        return f"{self.value:#x}/{self.mask:#x}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    """All conditions of one rule (a logical AND). Fields left None match anything."""

    src: Cond[IPNetwork] | None = None
    dst: Cond[IPNetwork] | None = None
    in_iface: Cond[str] | None = None
    out_iface: Cond[str] | None = None
    proto: Proto | None = None
    sport: Cond[int] | None = None
    dport: Cond[int] | None = None
    mark: Cond[Mark] | None = None
    connmark: Cond[Mark] | None = None
    ctstate: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.proto is not None and self.proto not in ("tcp", "udp"):
            raise ConfigError(f"Match.proto: {self.proto!r} is not 'tcp' or 'udp'")
        for name, port in (("sport", self.sport), ("dport", self.dport)):
            if port is not None:
                _check_port(f"Match.{name}", port.value)
                if self.proto is None:
                    raise ConfigError(f"Match.{name}: a port match needs proto tcp or udp")
        for name, iface in (("in_iface", self.in_iface), ("out_iface", self.out_iface)):
            if iface is not None and not _IFACE_RE.match(iface.value):
                raise ConfigError(f"Match.{name}: {iface.value!r} is not an interface name")
        for name, cond in (("src", self.src), ("dst", self.dst)):
            if cond is not None and cond.value.prefixlen == 0:
                raise ConfigError(f"Match.{name}: {cond.value} matches everything; leave it out")
        if (
            self.src is not None
            and self.dst is not None
            and self.src.value.version != self.dst.value.version
        ):
            raise ConfigError("Match: src and dst are of different IP versions")
        if self.ctstate is not None:
            bad = sorted(set(self.ctstate) - set(CT_STATES))
            if bad or not self.ctstate:
                raise ConfigError(f"Match.ctstate: {sorted(self.ctstate)!r} (known: {CT_STATES})")

    def addresses(self) -> Iterable[IPNetwork]:
        for cond in (self.src, self.dst):
            if cond is not None:
                yield cond.value


@dataclass(frozen=True, slots=True, kw_only=True)
class Accept:
    """Stop processing this table's hook: the packet is not captured."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Return:
    """Leave our chain and continue in the calling built-in chain."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Jump:
    """Jump into one of our chains (same table)."""

    chain: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Redirect:
    """nat REDIRECT to a local port (the original destination stays readable via SO_ORIGINAL_DST)."""

    port: int

    def __post_init__(self) -> None:
        _check_port("Redirect.port", self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class TProxy:
    """mangle TPROXY to a local IP_TRANSPARENT socket, setting the packet mark for policy routing."""

    port: int
    mark: Mark

    def __post_init__(self) -> None:
        _check_port("TProxy.port", self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnmarkSet:
    """CONNMARK --set-xmark: ctmark = (ctmark & ~mask) ^ value."""

    mark: Mark


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnmarkRestore:
    """CONNMARK --restore-mark with full masks: packet mark = connection mark."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CtZone:
    """raw CT --zone: put the flow into its own conntrack zone."""

    zone: int

    def __post_init__(self) -> None:
        # Zone 0 is the default zone: a rule "moving" a flow there does nothing, and iptables-save
        # prints it without --zone, so it could not be verified. Only real zones are accepted.
        if isinstance(self.zone, bool) or not 1 <= self.zone <= 0xFFFF:
            raise ConfigError(f"CtZone.zone: {self.zone!r} is not a zone (1-65535)")


Target = Accept | Return | Jump | Redirect | TProxy | ConnmarkSet | ConnmarkRestore | CtZone

# Which tables each target may live in (the kernel refuses the rest, later and less clearly).
_TARGET_TABLES: dict[type, frozenset[str]] = {
    Accept: frozenset(TABLES),
    Return: frozenset(TABLES),
    Jump: frozenset(TABLES),
    Redirect: frozenset({"nat"}),
    TProxy: frozenset({"mangle"}),
    ConnmarkSet: frozenset({"mangle"}),
    ConnmarkRestore: frozenset({"mangle"}),
    CtZone: frozenset({"raw"}),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainRef:
    """A chain in one family's table (built-in or ours)."""

    family: Family
    table: str
    name: str

    def __post_init__(self) -> None:
        if self.table not in BUILTIN_CHAINS:
            raise ConfigError(f"ChainRef.table: {self.table!r} is not one of {TABLES}")
        if not _CHAIN_RE.match(self.name):
            raise ConfigError(f"ChainRef.name: {self.name!r} is not a valid chain name")

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_CHAINS[self.table]

    def __str__(self) -> str:
        return f"{self.family.value} {self.table}/{self.name}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule: where it lives, what it matches, what it does, and a short why-comment.

    The comment is loaded into the kernel too (`-m comment`, nft `comment`), so a person reading
    `iptables-save` in a pod sees why each rule is there.
    """

    family: Family
    table: str
    chain: str
    match: Match = field(default_factory=Match)
    target: Target
    comment: str = ""

    def __post_init__(self) -> None:
        ChainRef(family=self.family, table=self.table, name=self.chain)  # validates names
        allowed = _TARGET_TABLES[type(self.target)]
        if self.table not in allowed:
            raise ConfigError(
                f"Rule {self.where}: target {type(self.target).__name__} is only valid in "
                f"table(s) {sorted(allowed)}"
            )
        if isinstance(self.target, TProxy) and self.chain != "PREROUTING" and self.builtin:
            raise ConfigError(f"Rule {self.where}: TPROXY only works in PREROUTING")
        if isinstance(self.target, (Redirect, TProxy)) and self.match.proto is None:
            raise ConfigError(
                f"Rule {self.where}: {type(self.target).__name__} needs proto tcp or udp"
            )
        version = 4 if self.family is Family.V4 else 6
        for net in self.match.addresses():
            if net.version != version:
                raise ConfigError(f"Rule {self.where}: address {net} is not {self.family.value}")
        if not _COMMENT_RE.match(self.comment):
            raise ConfigError(
                f"Rule {self.where}: comment {self.comment!r} must be at most 200 characters of "
                "letters, digits, spaces and :._/,()- (it is quoted differently by every tool)"
            )

    @property
    def ref(self) -> ChainRef:
        return ChainRef(family=self.family, table=self.table, name=self.chain)

    @property
    def builtin(self) -> bool:
        return self.chain in BUILTIN_CHAINS[self.table]

    @property
    def where(self) -> str:
        return f"{self.family.value} {self.table}/{self.chain}"


def _chain_sort_key(ref: ChainRef) -> tuple[int, int, int, str]:
    builtins = BUILTIN_CHAINS[ref.table]
    return (
        0 if ref.family is Family.V4 else 1,
        TABLES.index(ref.table),
        builtins.index(ref.name) if ref.name in builtins else len(builtins),
        ref.name,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Ruleset:
    """Our chains and rules, in a canonical order so that equal rule sets compare equal.

    `chains` lists only our own (non built-in) chains; built-in chains appear only as the chain of
    the jump rules that hook ours in. Rule order is preserved within each chain (that order matters);
    across chains the rules are sorted by family, table and chain.
    """

    chains: frozenset[ChainRef] = frozenset()
    rules: tuple[Rule, ...] = ()

    def __post_init__(self) -> None:
        for ref in self.chains:
            if ref.builtin:
                raise ConfigError(f"Ruleset.chains: {ref} is a built-in chain")
        for i, rule in enumerate(self.rules):
            if not rule.builtin and rule.ref not in self.chains:
                raise ConfigError(f"Ruleset.rules[{i}] ({rule.where}): chain is not declared")
            if isinstance(rule.target, Jump):
                dest = ChainRef(family=rule.family, table=rule.table, name=rule.target.chain)
                if dest not in self.chains:
                    raise ConfigError(
                        f"Ruleset.rules[{i}] ({rule.where}): jump to undeclared chain {dest}"
                    )
        self._check_hook_contexts()
        ordered = sorted(enumerate(self.rules), key=lambda ir: (_chain_sort_key(ir[1].ref), ir[0]))
        object.__setattr__(self, "rules", tuple(rule for _, rule in ordered))

    def _check_hook_contexts(self) -> None:
        """Refuse what the kernel would refuse later, less clearly: jump loops, `-o` where packets
        have no output interface yet, `-i` on locally generated packets, and TPROXY/REDIRECT
        outside their hooks, also when reached through a chain of jumps."""
        edges: dict[ChainRef, set[ChainRef]] = {}
        for rule in self.rules:
            if isinstance(rule.target, Jump):
                dest = ChainRef(family=rule.family, table=rule.table, name=rule.target.chain)
                edges.setdefault(rule.ref, set()).add(dest)
        state: dict[ChainRef, int] = {}  # 1 = on the current path, 2 = done

        def visit(ref: ChainRef, depth: int) -> None:
            if depth > 64:
                raise ConfigError(f"Ruleset: jumps nest too deep at {ref}")
            state[ref] = 1
            for nxt in edges.get(ref, ()):
                if state.get(nxt) == 1:
                    raise ConfigError(f"Ruleset: jump loop through {nxt}")
                if nxt not in state:
                    visit(nxt, depth + 1)
            state[ref] = 2

        for ref in list(edges):
            if ref not in state:
                visit(ref, 0)
        hooks: dict[ChainRef, set[str]] = {}
        for start in {r.ref for r in self.rules if r.builtin}:
            stack, seen = [start], {start}
            while stack:
                ref = stack.pop()
                hooks.setdefault(ref, set()).add(start.name)
                for nxt in edges.get(ref, ()):
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
        bad_in, bad_out = {"OUTPUT", "POSTROUTING"}, {"PREROUTING", "INPUT"}
        allowed: dict[type, set[str]] = {
            TProxy: {"PREROUTING"},
            Redirect: {"PREROUTING", "OUTPUT"},
        }
        for i, rule in enumerate(self.rules):
            reach = hooks.get(rule.ref, set())
            where = f"Ruleset.rules[{i}] ({rule.where})"
            if rule.match.in_iface is not None and reach & bad_in:
                raise ConfigError(f"{where}: -i/iifname is reached from {sorted(reach & bad_in)}")
            if rule.match.out_iface is not None and reach & bad_out:
                raise ConfigError(f"{where}: -o/oifname is reached from {sorted(reach & bad_out)}")
            ok = allowed.get(type(rule.target))
            if ok is not None and reach - ok:
                raise ConfigError(
                    f"{where}: {type(rule.target).__name__} is reached from {sorted(reach - ok)}"
                )

    def families(self) -> tuple[Family, ...]:
        present = {r.family for r in self.chains} | {r.family for r in self.rules}
        return tuple(f for f in Family if f in present)

    def for_family(self, family: Family) -> Ruleset:
        return Ruleset(
            chains=frozenset(c for c in self.chains if c.family is family),
            rules=tuple(r for r in self.rules if r.family is family),
        )

    def tables(self, family: Family) -> tuple[str, ...]:
        used = {c.table for c in self.chains if c.family is family}
        used |= {r.table for r in self.rules if r.family is family}
        return tuple(t for t in TABLES if t in used)

    def chain_rules(self, ref: ChainRef) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.ref == ref)

    def sorted_chains(self) -> list[ChainRef]:
        return sorted(self.chains, key=_chain_sort_key)


# --- policy routing ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IpRuleSpec:
    """`ip rule add fwmark <mark>/<mask> pref <priority> lookup <table>`."""

    family: Family
    fwmark: int
    fwmask: int
    priority: int
    table: int

    def __str__(self) -> str:
        return (
            f"{self.family.value} rule fwmark {self.fwmark:#x}/{self.fwmask:#x} "
            f"pref {self.priority} lookup {self.table}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalRouteSpec:
    """`ip route add local <dst> dev lo table <table>`: deliver everything to local sockets."""

    family: Family
    dst: IPNetwork
    table: int
    dev: str = "lo"

    def __str__(self) -> str:
        return f"{self.family.value} route local {self.dst} dev {self.dev} table {self.table}"


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteSpec:
    """Policy routing that delivers connmarked replies to ztunnel's transparent sockets."""

    rules: tuple[IpRuleSpec, ...] = ()
    routes: tuple[LocalRouteSpec, ...] = ()


# --- drift ------------------------------------------------------------------------------------

DriftKind = Literal[
    "missing_chain",
    "extra_chain",
    "missing_rule",
    "extra_rule",
    "foreign_rule",
    "misordered",
    "extra_table",
    "missing_route",
    "extra_route",
    "missing_ip_rule",
    "extra_ip_rule",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Drift:
    """One difference between what is live in the netns and what is wanted."""

    kind: DriftKind
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}: {self.detail}"


# --- configuration ----------------------------------------------------------------------------


def _addr(where: str, value: object, version: int) -> IPAddress:
    try:
        addr = ipaddress.ip_address(str(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not an IP address") from exc
    if addr.version != version:
        raise ConfigError(f"{where}: {value!r} is not an IPv{version} address")
    return addr


_PROBE_V4: Final = ipaddress.IPv4Address("169.254.7.127")
_PROBE_V6: Final = ipaddress.IPv6Address("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")


@dataclass(frozen=True, slots=True, kw_only=True)
class InpodConfig:
    """What the in-pod capture should look like. Defaults are Istio's (see `ztunnel/config.py`)."""

    prefix: str = "ZT"
    """Chain prefix (`ZT_PRERT`, `ZT_OUTPUT`); lower-cased it names the nft table."""
    backend: Backend = Backend.AUTO
    inbound_mode: InboundMode = InboundMode.REDIRECT
    dns_capture: bool = False
    ipv4: bool = True
    ipv6: bool = True
    ingress_mode: bool = False
    """Outbound capture only (Istio's IngressMode): no inbound, probe or connmark rules."""
    virtual_interfaces: tuple[str, ...] = ()
    """Interfaces whose inbound TCP is treated as outbound (KubeVirt, DinD)."""
    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    inbound_hbone_port: int = 15008
    dns_port: int = 15053
    inpod_mark: int = 0x539
    inpod_mask: int = 0xFFF
    tproxy_mark: int = 0x111
    tproxy_mask: int = 0xFFF
    route_table: int = 100
    rule_priority: int = 32764
    probe_snat_v4: ipaddress.IPv4Address = _PROBE_V4
    probe_snat_v6: ipaddress.IPv6Address = _PROBE_V6

    def __post_init__(self) -> None:
        prefix: object = self.prefix  # validated as a runtime value (may come from YAML)
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise ConfigError(
                f"InpodConfig.prefix: {self.prefix!r} must be 1-8 upper-case letters/digits"
            )
        if not isinstance(self.backend, Backend):
            raise ConfigError(f"InpodConfig.backend: {self.backend!r} is not a Backend")
        if not isinstance(self.inbound_mode, InboundMode):
            raise ConfigError(f"InpodConfig.inbound_mode: {self.inbound_mode!r} is not valid")
        if not (self.ipv4 or self.ipv6):
            raise ConfigError("InpodConfig: at least one of ipv4 and ipv6 must be enabled")
        for name in ("outbound_port", "inbound_plaintext_port", "inbound_hbone_port", "dns_port"):
            _check_port(f"InpodConfig.{name}", getattr(self, name))
        for name in ("inpod_mark", "inpod_mask", "tproxy_mark", "tproxy_mask"):
            _check_u32(f"InpodConfig.{name}", getattr(self, name))
        Mark(value=self.inpod_mark, mask=self.inpod_mask)
        Mark(value=self.tproxy_mark, mask=self.tproxy_mask)
        if not 1 <= self.route_table <= 0xFFFFFFFF or self.route_table in (253, 254, 255):
            raise ConfigError(f"InpodConfig.route_table: {self.route_table!r} is reserved/invalid")
        if not 1 <= self.rule_priority < 32766:
            raise ConfigError(f"InpodConfig.rule_priority: {self.rule_priority!r} not in 1-32765")
        ifaces: tuple[object, ...] = self.virtual_interfaces
        for iface in ifaces:
            if not isinstance(iface, str) or not _IFACE_RE.match(iface):
                raise ConfigError(f"InpodConfig.virtual_interfaces: {iface!r} is not a name")
        _addr("InpodConfig.probe_snat_v4", self.probe_snat_v4, 4)
        _addr("InpodConfig.probe_snat_v6", self.probe_snat_v6, 6)

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(f for f, on in ((Family.V4, self.ipv4), (Family.V6, self.ipv6)) if on)

    @property
    def nft_table(self) -> str:
        return self.prefix.lower()

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], *, source: str = "config") -> InpodConfig:
        """Build from a parsed YAML/JSON mapping; errors name `source` and the key."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in data.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} (known: {sorted(known)})")
            try:
                if key == "backend":
                    value = Backend(value)
                elif key == "inbound_mode":
                    value = InboundMode(value)
                elif key == "probe_snat_v4":
                    value = _addr(f"{source}.{key}", value, 4)
                elif key == "probe_snat_v6":
                    value = _addr(f"{source}.{key}", value, 6)
                elif key == "virtual_interfaces":
                    if not isinstance(value, (list, tuple)):
                        raise ConfigError(f"{source}.{key}: expected a list, got {value!r}")
                    value = tuple(value)
                elif isinstance(known[key].default, bool) and not isinstance(value, bool):
                    raise ConfigError(f"{source}.{key}: expected true/false, got {value!r}")
            except ValueError as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"{source}.{key}: {value!r} is not valid ({exc})") from exc
            kwargs[key] = value
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

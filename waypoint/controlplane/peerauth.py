"""PeerAuthentication (security.istio.io/v1) -> L4 DENY authorizations, as istiod's ambient index does.

ztunnel knows no PeerAuthentication; istiod expresses "mTLS required" as DENY policies on plaintext
(a connection without a peer identity, i.e. `not_principals: [presence]`). Facts from istio/istio
`pilot/pkg/serviceregistry/kube/controller/ambient/{policies,authorization}.go`:

* As soon as any PeerAuthentication exists, the static policy `<root>/istio_converted_static_strict`
  (WORKLOAD_SELECTOR, DENY, not_principals presence) is sent; workloads whose *effective* mode is
  STRICT list it in `authorization_policies`.
* The effective mode of a workload: the oldest selector-less policy of the root namespace (mesh), then
  the oldest selector-less policy of its namespace (unless UNSET), then the oldest matching workload
  policy of its namespace (STRICT / PERMISSIVE / DISABLE override; UNSET inherits).
* Workload policies with `portLevelMtls` become `<ns>/converted_peer_authentication_<name>`: per-port
  STRICT denies plaintext on that port, per-port PERMISSIVE/DISABLE under a STRICT parent exempts the
  port (merged with the parent's strictness, because any matching DENY wins in ztunnel).

Pure: plain dicts in, `ztunnel.state.model` values out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    Match,
    Rule,
    Scope,
    StringMatch,
    StringMatchKind,
)

STATIC_STRICT_POLICY_NAME: Final = "istio_converted_static_strict"
CONVERTED_PREFIX: Final = "converted_peer_authentication_"
MODES: Final = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")

_PRESENCE = StringMatch(kind=StringMatchKind.PRESENCE)


class PeerAuthError(ValueError):
    """A PeerAuthentication object that cannot be read; the message names the object and field."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuth:
    """The parts of a PeerAuthentication that matter for ambient."""

    namespace: str
    name: str
    created: str = ""  # creationTimestamp (RFC 3339 sorts as text); oldest wins conflicts
    selector: Mapping[str, str] | None = None  # None: no selector at all
    mode: str = "UNSET"
    port_modes: Mapping[int, str] = field(default_factory=dict)

    @property
    def has_labels(self) -> bool:
        return bool(self.selector)

    @property
    def age_key(self) -> tuple[str, str, str]:
        # Same creation second: fall back to the name so the choice is deterministic.
        return (self.created, self.namespace, self.name)


def _mode(value: Any, where: str) -> str:
    if value is None:
        return "UNSET"
    if not isinstance(value, Mapping):
        raise PeerAuthError(f"{where}: must be an object with a 'mode' field")
    mode = value.get("mode") or "UNSET"
    if mode not in MODES:
        raise PeerAuthError(f"{where}.mode: {mode!r} is not one of {', '.join(MODES)}")
    return str(mode)


def parse_peer_authentication(obj: Mapping[str, Any]) -> PeerAuth:
    """Read one PeerAuthentication object; raises PeerAuthError naming the bad field."""
    meta = obj.get("metadata") or {}
    ns, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    where = f"PeerAuthentication {ns}/{name}"
    spec = obj.get("spec") or {}
    if not isinstance(spec, Mapping):
        raise PeerAuthError(f"{where}: spec must be an object")
    selector: Mapping[str, str] | None = None
    raw_selector = spec.get("selector")
    if raw_selector is not None:
        labels = raw_selector.get("matchLabels") if isinstance(raw_selector, Mapping) else None
        if labels is not None and not isinstance(labels, Mapping):
            raise PeerAuthError(f"{where}: spec.selector.matchLabels must be a map")
        selector = {str(k): str(v) for k, v in (labels or {}).items()}
    port_modes: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls") or {}
    if not isinstance(raw_ports, Mapping):
        raise PeerAuthError(f"{where}: spec.portLevelMtls must be a map of port to mtls")
    for key, value in raw_ports.items():
        try:
            port = int(key)
        except (TypeError, ValueError):
            raise PeerAuthError(f"{where}: spec.portLevelMtls key {key!r} is not a port") from None
        if not 0 < port < 65536:
            raise PeerAuthError(f"{where}: spec.portLevelMtls key {port} is not a port (1-65535)")
        port_modes[port] = _mode(value, f"{where}: spec.portLevelMtls[{port}]")
    return PeerAuth(
        namespace=ns,
        name=name,
        created=str(meta.get("creationTimestamp") or ""),
        selector=selector,
        mode=_mode(spec.get("mtls"), f"{where}: spec.mtls"),
        port_modes=port_modes,
    )


def static_strict_policy(root_namespace: str) -> Authorization:
    """istiod's static STRICT policy: deny every connection without a peer identity."""
    return Authorization(
        name=STATIC_STRICT_POLICY_NAME,
        namespace=root_namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=(Rule(clauses=(Clause(matches=(Match(not_principals=(_PRESENCE,)),)),)),),
    )


def static_strict_key(root_namespace: str) -> str:
    return f"{root_namespace}/{STATIC_STRICT_POLICY_NAME}"


def converted_key(pa: PeerAuth) -> str:
    return f"{pa.namespace}/{CONVERTED_PREFIX}{pa.name}"


def _oldest(policies: Iterable[PeerAuth]) -> PeerAuth | None:
    return min(policies, key=lambda p: p.age_key, default=None)


def select_for_workload(
    policies: Iterable[PeerAuth], root_namespace: str, namespace: str, labels: Mapping[str, str]
) -> list[PeerAuth]:
    """The PeerAuthentications that apply to a workload (fetchPeerAuthentications)."""
    out = []
    for pa in policies:
        if (pa.namespace == root_namespace and pa.selector is None) or (
            pa.namespace == namespace
            and (pa.selector is None or all(labels.get(k) == v for k, v in pa.selector.items()))
        ):
            out.append(pa)
    return out


def workload_policy_keys(root_namespace: str, applicable: Sequence[PeerAuth]) -> list[str]:
    """Keys a workload lists for its PeerAuthentications (convertedSelectorPeerAuthentications)."""
    mesh = _oldest(p for p in applicable if not p.has_labels and p.namespace == root_namespace)
    ns = _oldest(p for p in applicable if not p.has_labels and p.namespace != root_namespace)
    workload = _oldest(p for p in applicable if p.has_labels and p.namespace != root_namespace)
    strict = mesh is not None and mesh.mode == "STRICT"
    if ns is not None and ns.mode != "UNSET":
        strict = ns.mode == "STRICT"
    port_key = ""
    if workload is not None:
        if workload.mode == "STRICT":
            strict = True
        elif workload.mode in ("PERMISSIVE", "DISABLE"):
            strict = False
        if workload.port_modes:
            modes = set(workload.port_modes.values())
            if workload.mode == "STRICT":
                if modes & {"PERMISSIVE", "DISABLE"}:
                    # The converted policy carries the STRICT default itself.
                    port_key, strict = converted_key(workload), False
            elif workload.mode in ("PERMISSIVE", "DISABLE"):
                if "STRICT" in modes:
                    port_key = converted_key(workload)
            elif strict:  # UNSET under a STRICT mesh/namespace policy
                if "PERMISSIVE" in modes:
                    port_key, strict = converted_key(workload), False
            else:  # UNSET under a permissive (or no) parent
                if "STRICT" in modes:
                    port_key = converted_key(workload)
    keys = set()
    if strict:
        keys.add(static_strict_key(root_namespace))
    if port_key:
        keys.add(port_key)
    return sorted(keys)


def convert_port_level(
    root_namespace: str, pa: PeerAuth, ns_pa: PeerAuth | None, root_pa: PeerAuth | None
) -> Authorization | None:
    """The converted DENY policy of a workload PeerAuthentication with portLevelMtls, or None."""
    if pa.namespace == root_namespace or pa.selector is None or not pa.port_modes:
        return None
    mode = pa.mode
    ns_mode = ns_pa.mode if ns_pa is not None else None
    root_mode = root_pa.mode if root_pa is not None else None
    no_identity = Match(not_principals=(_PRESENCE,))
    clauses: list[Clause] = []
    rules: list[Rule] = []
    if mode == "STRICT":
        clauses.append(Clause(matches=(no_identity,)))
    found_non_strict = False
    for port, port_mode in sorted(pa.port_modes.items()):
        if port_mode == "STRICT":
            parent_strict = (
                mode == "STRICT"
                or (mode == "UNSET" and ns_mode == "STRICT")
                or (ns_mode in (None, "UNSET") and root_mode == "STRICT")
            )
            if parent_strict:
                continue  # the parent's strictness already covers this port
            # Rules are OR-ed: one per STRICT port.
            rules.append(
                Rule(
                    clauses=(
                        Clause(
                            matches=(Match(not_principals=(_PRESENCE,), destination_ports=(port,)),)
                        ),
                    )
                )
            )
        elif port_mode in ("PERMISSIVE", "DISABLE"):
            if mode in ("PERMISSIVE", "DISABLE"):
                continue
            if mode == "UNSET" and (
                (ns_mode is not None and ns_mode != "STRICT")
                or (ns_mode is None and root_mode is not None and root_mode != "STRICT")
                or (ns_mode is None and root_mode is None)
            ):
                continue
            found_non_strict = True
            # Exempt this port from the deny: "deny unless the destination port is this one".
            clauses.append(Clause(matches=(Match(not_destination_ports=(port,)),)))
    if mode == "STRICT" and not found_non_strict:
        return None  # plain STRICT: the static policy does the job
    if not clauses and not rules:
        return None
    merge_strict = (
        root_mode == "STRICT" and (ns_mode is None or ns_mode in ("UNSET", "STRICT"))
    ) or ns_mode == "STRICT"
    if merge_strict and found_non_strict:
        clauses.append(Clause(matches=(no_identity,)))
    if clauses:
        rules.append(Rule(clauses=tuple(clauses)))
    return Authorization(
        name=CONVERTED_PREFIX + pa.name,
        namespace=pa.namespace,
        scope=Scope.WORKLOAD_SELECTOR,
        action=Action.DENY,
        rules=tuple(rules),
    )


def convert_all(root_namespace: str, policies: Sequence[PeerAuth]) -> dict[str, Authorization]:
    """Every authorization the PeerAuthentications produce, keyed `ns/name`."""
    out: dict[str, Authorization] = {}
    if not policies:
        return out
    static = static_strict_policy(root_namespace)
    out[static.key] = static
    root_pa = _oldest(p for p in policies if p.namespace == root_namespace and p.selector is None)
    for pa in policies:
        ns_pa = _oldest(p for p in policies if p.namespace == pa.namespace and p.selector is None)
        converted = convert_port_level(root_namespace, pa, ns_pa, root_pa)
        if converted is not None:
            out[converted.key] = converted
    return out

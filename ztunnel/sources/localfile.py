"""The local YAML configuration source: parse and validate a file into workloads, services, policies.

The format is Istio ztunnel's local config (``LOCAL_XDS_PATH``; ztunnel.md section 4.3): top-level
``workloads``, ``services``, ``policies``, camelCase keys, unknown keys rejected. This project adds a
per-workload ``netns`` (path of the pod's network namespace) and an optional top-level ``node`` (the
node this ztunnel serves). ``docs/local-config.md`` documents every field with a complete example.

Validation collects every problem before failing; each names the file, the object (kind, index and
name) and the field, e.g. ``lab.yaml: workloads[1] (default/web): workloadIps[0]: '10.0.0.300' is not
an IP address``. Nothing is half-applied: the caller gets a whole ``LocalConfig`` or an error.

``parse_local_config`` is pure; ``load_local_config`` only adds reading the file.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ztunnel.config import INBOUND_HBONE_PORT
from ztunnel.identity.spiffe import SCHEME, SpiffeId, SpiffeIdError
from ztunnel.state.model import (
    Action,
    ApplicationTunnel,
    AppTunnelProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    IpFamilies,
    IPNetwork,
    LbMode,
    LbScope,
    LoadBalancing,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    StringMatchKind,
    TunnelProtocol,
    Visibility,
    Workload,
    WorkloadType,
)

_E = TypeVar("_E", bound=enum.Enum)
_T = TypeVar("_T")
_D = TypeVar("_D")

MAX_FILE_BYTES = 16 * 1024 * 1024  # a sanity bound; real lab files are a few KiB


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigIssue:
    """One problem: where (file, object, field) and what."""

    file: str
    obj: str
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.obj}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class LocalConfigError(ValueError):
    """The file is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        lines = [str(i) for i in self.issues]
        super().__init__(
            f"{len(lines)} error(s) in local config:\n  " + "\n  ".join(lines)
            if len(lines) > 1
            else lines[0]
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalConfig:
    """A validated file. ``warnings`` are legal but suspicious things (e.g. unknown references)."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    node: str | None = None
    warnings: tuple[str, ...] = field(default=())


def load_local_config(path: str | Path) -> LocalConfig:
    """Read and parse a file; raises LocalConfigError (also for an unreadable file)."""
    name = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise LocalConfigError(
            [ConfigIssue(file=name, obj="file", field="", message=f"cannot read: {err.strerror}")]
        ) from err
    if len(data) > MAX_FILE_BYTES:
        raise LocalConfigError(
            [ConfigIssue(file=name, obj="file", field="", message=f"larger than {MAX_FILE_BYTES}")]
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LocalConfigError(
            [ConfigIssue(file=name, obj="file", field="", message=f"not UTF-8 ({err.reason})")]
        ) from err
    return parse_local_config(text, source=name)


def parse_local_config(text: str, *, source: str = "<config>") -> LocalConfig:
    """Parse YAML text (``source`` names it in errors); raises LocalConfigError listing all issues."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise LocalConfigError(
            [ConfigIssue(file=source, obj="document", field="", message=f"invalid YAML: {err}")]
        ) from err
    return _Parser(source).document(doc)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in result
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, f"unhashable key {key!r}", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Invalid(Exception):
    """Internal: abandon the current field (the issue is already recorded)."""


# The waypoint proxy shares the file and reads the L7 sections; ztunnel accepts and ignores them.
L7_SECTIONS = frozenset({"httpRoutes", "grpcRoutes", "authorizationPolicies"})
_TOP = {"workloads", "services", "policies", "node", *L7_SECTIONS}
_WORKLOAD = {
    "uid", "name", "namespace", "workloadIps", "hostname", "network", "protocol", "trustDomain",
    "serviceAccount", "node", "waypoint", "networkGateway", "canonicalName", "canonicalRevision",
    "workloadType", "workloadName", "nativeTunnel", "applicationTunnel", "services",
    "authorizationPolicies", "status", "clusterId", "locality", "capacity", "netns",
}  # fmt: skip
_SERVICE = {
    "name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint",
    "loadBalancer", "ipFamilies", "visibility", "canonical",
}  # fmt: skip
_POLICY = {"name", "namespace", "scope", "action", "dryRun", "rules"}
_MATCH_STRINGS = ("namespaces", "notNamespaces", "principals", "notPrincipals")
_MATCH_ACCOUNTS = ("serviceAccounts", "notServiceAccounts")
_MATCH_CIDRS = ("sourceIps", "notSourceIps", "destinationIps", "notDestinationIps")
_MATCH_PORTS = ("destinationPorts", "notDestinationPorts")
_MATCH = {*_MATCH_STRINGS, *_MATCH_ACCOUNTS, *_MATCH_CIDRS, *_MATCH_PORTS}


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


class _Parser:
    """Walks the document; ``self.obj`` / the field stack say where the current value is."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.obj = "document"
        self.path: list[str] = []
        self.issues: list[ConfigIssue] = []
        self.warnings: list[str] = []

    # ----- issue bookkeeping -----

    def fail(self, message: str) -> _Invalid:
        self.issues.append(
            ConfigIssue(file=self.file, obj=self.obj, field=self._field(), message=message)
        )
        return _Invalid()

    def warn(self, message: str) -> None:
        where = f"{self.file}: {self.obj}"
        if self.path:
            where += f": {self._field()}"
        self.warnings.append(f"{where}: {message}")

    def _field(self) -> str:
        out = ""
        for part in self.path:
            out += part if part.startswith("[") or not out else "." + part
        return out

    @contextmanager
    def at(self, part: str | int) -> Iterator[None]:
        self.path.append(f"[{part}]" if isinstance(part, int) else part)
        try:
            yield
        finally:
            self.path.pop()

    def guarded(self, part: str | int, parse: Callable[[], _T]) -> _T | None:
        """Run ``parse`` at ``part``; a failure is recorded and yields None, so parsing continues."""
        with self.at(part):
            try:
                return parse()
            except _Invalid:
                return None

    # ----- scalar readers (raise _Invalid after recording) -----

    def mapping(self, value: Any, allowed: set[str], what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"{what} must be a mapping, got {_kind(value)}")
        bad = sorted(str(k) for k in value if k not in allowed)
        for key in bad:
            with self.at(key):
                self.fail(f"unknown field (allowed: {', '.join(sorted(allowed))})")
        if bad:
            raise _Invalid()
        return value

    def string(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(f"must be a string, got {_kind(value)}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise self.fail(f"{value!r} contains control characters")
        return value

    def boolean(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"must be true or false, got {_kind(value)}")
        return value

    def integer(self, value: Any, low: int, high: int) -> int:
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)  # YAML map keys are often quoted
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"must be an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(f"{value} is out of range {low}-{high}")
        return value

    def port(self, value: Any) -> int:
        return self.integer(value, 1, 65535)

    def ip(self, value: Any) -> IPAddress:
        text = self.string(value)
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise self.fail(f"{text!r} is not an IP address") from None
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
            raise self.fail(f"{text!r}: zone ids are not allowed")
        return ip

    def cidr(self, value: Any) -> IPNetwork:
        text = self.string(value)
        try:
            return ipaddress.ip_network(text, strict=True)
        except ValueError as err:
            hint = ""
            try:
                hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
            except ValueError:
                pass
            raise self.fail(f"{text!r} is not a CIDR ({err}){hint}") from None

    def choice(self, value: Any, enum_type: type[_E], aliases: Mapping[str, _E] = {}) -> _E:
        text = self.string(value)
        norm = text.replace("_", "").lower()
        for alias, member in aliases.items():
            if norm == alias:
                return member
        for member in enum_type:
            if norm == member.name.replace("_", "").lower():
                return member
        names = [m.name for m in enum_type] + [a.upper() for a in aliases]
        raise self.fail(f"{text!r} is not one of {', '.join(names)}")

    def items(self, value: Any, parse: Callable[[Any], _T]) -> tuple[_T, ...]:
        """Parse every element of a list, recording failures per index."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.fail(f"must be a list, got {_kind(value)}")
        out: list[_T] = []
        failed = False
        for i, item in enumerate(value):
            parsed = self.guarded(i, functools.partial(parse, item))
            if parsed is None:
                failed = True
            else:
                out.append(parsed)
        if failed:
            raise _Invalid()
        return tuple(out)

    # ----- objects -----

    def document(self, doc: Any) -> LocalConfig:
        if doc is None:
            doc = {}
        node: str | None = None
        try:
            top = self.mapping(doc, _TOP, "the document")
        except _Invalid:
            raise LocalConfigError(self.issues) from None
        if "node" in top:
            node = self.guarded("node", lambda: self.string(top["node"]))
        services = self._objects(top.get("services"), "services", self.service)
        policies = self._objects(top.get("policies"), "policies", self.policy)
        workloads = self._objects(top.get("workloads"), "workloads", self.workload)
        self._cross_check(workloads, services, policies)
        if self.issues:
            raise LocalConfigError(self.issues)
        return LocalConfig(
            workloads=tuple(w for _, w in workloads),
            services=tuple(s for _, s in services),
            policies=tuple(p for _, p in policies),
            node=node,
            warnings=tuple(self.warnings),
        )

    def _objects(
        self, value: Any, kind: str, parse: Callable[[Any], _T | None]
    ) -> list[tuple[int, _T]]:
        self.obj = "document"
        if value is None:
            return []
        if not isinstance(value, list):
            with self.at(kind):
                self.fail(f"must be a list, got {_kind(value)}")
            return []
        out: list[tuple[int, _T]] = []
        for i, item in enumerate(value):
            label = ""
            if isinstance(item, dict):
                ns, name = item.get("namespace"), item.get("name")
                if isinstance(ns, str) and isinstance(name, str):
                    label = f" ({ns}/{name})"
            self.obj = f"{kind}[{i}]{label}"
            parsed = parse(item)
            if parsed is not None:
                out.append((i, parsed))
        return out

    def _required(self, m: dict[str, Any], key: str, parse: Callable[[Any], _T]) -> _T | None:
        if key not in m or m[key] is None:
            with self.at(key):
                self.fail("is required")
            return None
        return self.guarded(key, lambda: parse(m[key]))

    def _optional(
        self, m: dict[str, Any], key: str, parse: Callable[[Any], _T], default: _D
    ) -> _T | _D:
        if key not in m or m[key] is None:
            return default
        parsed = self.guarded(key, lambda: parse(m[key]))
        return default if parsed is None else parsed

    def workload(self, value: Any) -> Workload | None:
        try:
            m = self.mapping(value, _WORKLOAD, "a workload")
        except _Invalid:
            return None
        before = len(self.issues)
        name = self._required(m, "name", self.string)
        namespace = self._required(m, "namespace", self.string)
        kw: dict[str, Any] = {}
        for key in ("hostname", "network", "node", "canonicalName", "canonicalRevision",
                    "workloadName", "clusterId"):  # fmt: skip
            kw[_snake(key)] = self._optional(m, key, self.string, "")
        kw["addresses"] = self._optional(m, "workloadIps", lambda v: self.items(v, self.ip), ())
        kw["tunnel_protocol"] = self._optional(
            m,
            "protocol",
            lambda v: self.choice(v, TunnelProtocol, {"tcp": TunnelProtocol.NONE}),
            TunnelProtocol.NONE,
        )
        kw["trust_domain"] = self._optional(m, "trustDomain", self.string, "") or "cluster.local"
        kw["service_account"] = self._optional(m, "serviceAccount", self.string, "") or "default"
        kw["waypoint"] = self._optional(m, "waypoint", self.gateway, None)
        kw["network_gateway"] = self._optional(m, "networkGateway", self.gateway, None)
        kw["workload_type"] = self._optional(
            m, "workloadType", lambda v: self.choice(v, WorkloadType), WorkloadType.DEPLOYMENT
        )
        kw["native_tunnel"] = self._optional(m, "nativeTunnel", self.boolean, False)
        kw["application_tunnel"] = self._optional(m, "applicationTunnel", self.app_tunnel, None)
        kw["services"] = self._optional(m, "services", self.workload_services, {})
        kw["authorization_policies"] = self._optional(
            m, "authorizationPolicies", lambda v: self.items(v, self.policy_ref), ()
        )
        kw["status"] = self._optional(
            m, "status", lambda v: self.choice(v, HealthStatus), HealthStatus.HEALTHY
        )
        kw["locality"] = self._optional(m, "locality", self.locality, Locality())
        kw["capacity"] = self._optional(m, "capacity", lambda v: self.integer(v, 0, 2**32 - 1), 1)
        kw["netns"] = self._optional(m, "netns", self.netns, None)
        if name is not None and namespace is not None:
            self._check_identity(namespace, kw["service_account"], kw["trust_domain"], m)
            default_uid = f"{kw['cluster_id'] or 'Kubernetes'}//Pod/{namespace}/{name}"
            kw["uid"] = self._optional(m, "uid", self.string, "") or default_uid
        if not kw["addresses"] and not kw["hostname"] and "workloadIps" not in m:
            with self.at("workloadIps"):
                self.fail("a workload needs workloadIps (or a hostname)")
        if len(self.issues) > before or name is None or namespace is None:
            return None
        return Workload(name=name, namespace=namespace, **kw)

    def _check_identity(
        self, namespace: str, service_account: str, trust_domain: str, m: dict[str, Any]
    ) -> None:
        try:
            SpiffeId(trust_domain, namespace, service_account)
        except SpiffeIdError as err:
            text = str(err)
            key = (
                "namespace"
                if text.startswith("namespace")
                else "serviceAccount"
                if text.startswith("service account")
                else "trustDomain"
            )
            with self.at(key):
                self.fail(f"cannot form a SPIFFE identity: {text}")

    def netns(self, value: Any) -> str:
        text = self.string(value)
        if not text.startswith("/"):
            raise self.fail(f"{text!r} must be an absolute path (e.g. /var/run/netns/pod-a)")
        return text

    def policy_ref(self, value: Any) -> str:
        text = self.string(value)
        ns, sep, name = text.partition("/")
        if not sep or not ns or not name or "/" in name:
            raise self.fail(f"{text!r} must be <namespace>/<policy name>")
        return text

    def workload_services(self, value: Any) -> dict[str, dict[int, int]]:
        if not isinstance(value, dict):
            raise self.fail(f'must map "<namespace>/<hostname>" to port maps, got {_kind(value)}')
        out: dict[str, dict[int, int]] = {}
        failed = False
        for key, ports in value.items():
            parsed = self.guarded(str(key), functools.partial(self._svc_ports, key, ports))
            if parsed is None:
                failed = True
            else:
                out[parsed[0]] = parsed[1]
        if failed:
            raise _Invalid()
        return out

    def _svc_ports(self, key: Any, ports: Any) -> tuple[str, dict[int, int]]:
        text = self.string(key)
        ns, sep, host = text.partition("/")
        if not sep or not ns or not host:
            raise self.fail(f"{text!r} must be <namespace>/<hostname>")
        return text, self.port_map(ports, allow_zero_target=False)

    def port_map(self, value: Any, *, allow_zero_target: bool) -> dict[int, int]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"must map service ports to target ports, got {_kind(value)}")
        out: dict[int, int] = {}
        failed = False
        for k, v in value.items():
            with self.at(str(k)):
                try:
                    port = self.port(k)
                    out[port] = self.integer(v, 0 if allow_zero_target else 1, 65535)
                except _Invalid:
                    failed = True
        if failed:
            raise _Invalid()
        return out

    def gateway(self, value: Any) -> GatewayAddress:
        m = self.mapping(value, {"destination", "hboneMtlsPort"}, "a waypoint/gateway")
        if "destination" not in m:
            with self.at("destination"):
                raise self.fail("is required")
        dest: NetworkAddress | NamespacedHostname
        with self.at("destination"):
            raw = m["destination"]
            if isinstance(raw, dict):
                hm = self.mapping(raw, {"namespace", "hostname"}, "a destination")
                parts = [self._required(hm, k, self.string) for k in ("namespace", "hostname")]
                if parts[0] is None or parts[1] is None:
                    raise _Invalid()
                dest = NamespacedHostname(namespace=parts[0], hostname=parts[1])
            else:
                dest = self.network_address(raw)
        port = self._optional(m, "hboneMtlsPort", self.port, INBOUND_HBONE_PORT)
        return GatewayAddress(destination=dest, hbone_mtls_port=port)

    def network_address(self, value: Any) -> NetworkAddress:
        """``<network>/<ip>`` (``/10.0.0.1`` = default network); a bare IP is the default network."""
        text = self.string(value)
        network, sep, ip_text = text.rpartition("/")
        if not sep:
            ip_text = text
        return NetworkAddress(network=network, address=self.ip(ip_text))

    def app_tunnel(self, value: Any) -> ApplicationTunnel:
        m = self.mapping(value, {"protocol", "port"}, "an application tunnel")
        protocol = self._optional(
            m, "protocol", lambda v: self.choice(v, AppTunnelProtocol), AppTunnelProtocol.NONE
        )
        port = self._optional(m, "port", self.port, None)
        return ApplicationTunnel(protocol=protocol, port=port)

    def locality(self, value: Any) -> Locality:
        m = self.mapping(value, {"region", "zone", "subzone"}, "a locality")
        return Locality(**{k: self._optional(m, k, self.string, "") for k in m})

    def service(self, value: Any) -> Service | None:
        try:
            m = self.mapping(value, _SERVICE, "a service")
        except _Invalid:
            return None
        before = len(self.issues)
        name = self._required(m, "name", self.string)
        namespace = self._required(m, "namespace", self.string)
        hostname = self._required(m, "hostname", self.string)
        kw: dict[str, Any] = {
            "vips": self._optional(m, "vips", lambda v: self.items(v, self.network_address), ()),
            "ports": self._optional(
                m, "ports", lambda v: self.port_map(v, allow_zero_target=True), {}
            ),
            "subject_alt_names": self._optional(
                m, "subjectAltNames", lambda v: self.items(v, self.san), ()
            ),
            "waypoint": self._optional(m, "waypoint", self.gateway, None),
            "load_balancing": self._optional(m, "loadBalancer", self.load_balancer, None),
            "ip_families": self._optional(
                m, "ipFamilies", lambda v: self.choice(v, IpFamilies), IpFamilies.AUTOMATIC
            ),
            "visibility": self._optional(
                m, "visibility", lambda v: self.choice(v, Visibility), Visibility.PUBLIC
            ),
            "canonical": self._optional(m, "canonical", self.boolean, False),
        }
        if len(self.issues) > before or name is None or namespace is None or hostname is None:
            return None
        return Service(name=name, namespace=namespace, hostname=hostname, **kw)

    def san(self, value: Any) -> str:
        text = self.string(value)
        if text.startswith(SCHEME):
            try:
                SpiffeId.parse(text)
            except SpiffeIdError as err:
                raise self.fail(str(err)) from None
        return text

    def load_balancer(self, value: Any) -> LoadBalancing:
        m = self.mapping(value, {"routingPreferences", "mode", "healthPolicy"}, "a load balancer")
        prefs = self._optional(
            m, "routingPreferences", lambda v: self.items(v, lambda s: self.choice(s, LbScope)), ()
        )
        mode = self._optional(
            m,
            "mode",
            lambda v: self.choice(v, LbMode, {"unspecifiedmode": LbMode.UNSPECIFIED}),
            LbMode.UNSPECIFIED,
        )
        health = self._optional(
            m, "healthPolicy", lambda v: self.choice(v, HealthPolicy), HealthPolicy.ONLY_HEALTHY
        )
        return LoadBalancing(routing_preference=prefs, mode=mode, health_policy=health)

    def policy(self, value: Any) -> Authorization | None:
        try:
            m = self.mapping(value, _POLICY, "a policy")
        except _Invalid:
            return None
        before = len(self.issues)
        name = self._required(m, "name", self.string)
        namespace = self._required(m, "namespace", self.string)
        scope = self._required(m, "scope", lambda v: self.choice(v, Scope))
        action = self._required(m, "action", lambda v: self.choice(v, Action))
        dry_run = self._optional(m, "dryRun", self.boolean, False)
        rules = self._optional(m, "rules", lambda v: self.items(v, self.rule), ())
        if (
            len(self.issues) > before
            or name is None
            or namespace is None
            or scope is None
            or action is None
        ):
            return None
        return Authorization(
            name=name, namespace=namespace, scope=scope, action=action, dry_run=dry_run, rules=rules
        )

    def rule(self, value: Any) -> Rule:
        # Istio's form is a bare list of clauses; {clauses: [...]} is accepted as the readable form.
        if isinstance(value, dict):
            value = self.mapping(value, {"clauses"}, "a rule").get("clauses")
            with self.at("clauses"):
                return Rule(clauses=self.items(value, self.clause))
        if not isinstance(value, list):
            raise self.fail(f"a rule must be a list of clauses, got {_kind(value)}")
        return Rule(clauses=self.items(value, self.clause))

    def clause(self, value: Any) -> Clause:
        if isinstance(value, dict):
            value = self.mapping(value, {"matches"}, "a clause").get("matches")
            with self.at("matches"):
                return Clause(matches=self.items(value, self.match))
        if not isinstance(value, list):
            raise self.fail(f"a clause must be a list of matches, got {_kind(value)}")
        return Clause(matches=self.items(value, self.match))

    def match(self, value: Any) -> Match:
        m = self.mapping(value, _MATCH, "a match")
        kw: dict[str, Any] = {}
        for key in _MATCH_STRINGS:
            check = self.principal if "rincipal" in key else self.string_match
            kw[_snake(key)] = self._optional(m, key, functools.partial(self.items, parse=check), ())
        for key in _MATCH_ACCOUNTS:
            kw[_snake(key)] = self._optional(m, key, lambda v: self.items(v, self.account), ())
        for key in _MATCH_CIDRS:
            kw[_snake(key)] = self._optional(m, key, lambda v: self.items(v, self.cidr), ())
        for key in _MATCH_PORTS:
            kw[_snake(key)] = self._optional(m, key, lambda v: self.items(v, self.port), ())
        # A field that failed fell back to () but was recorded, so the whole policy is rejected.
        return Match(**kw)

    def string_match(self, value: Any) -> StringMatch:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.fail(
                "a string match is a mapping with one key: exact, prefix, suffix or presence"
            )
        ((key, arg),) = value.items()
        kind = self.choice(key, StringMatchKind)
        if kind is StringMatchKind.PRESENCE:
            if arg not in (None, [], {}, True, ""):
                raise self.fail(f"presence takes no value (use [] or true), got {arg!r}")
            return StringMatch(kind=kind)
        with self.at(str(key)):
            return StringMatch(kind=kind, value=self.string(arg))

    def principal(self, value: Any) -> StringMatch:
        match = self.string_match(value)
        if match.kind is not StringMatchKind.PRESENCE and match.value.startswith(SCHEME):
            raise self.fail(
                f"{match.value!r}: principals are written without {SCHEME!r} "
                "(td/ns/<ns>/sa/<sa>); with it the match could never succeed"
            )
        return match

    def account(self, value: Any) -> ServiceAccountMatch:
        m = self.mapping(value, {"namespace", "serviceAccount"}, "a service account match")
        ns = self._required(m, "namespace", self.string)
        sa = self._required(m, "serviceAccount", self.string)
        if ns is None or sa is None:
            raise _Invalid()
        return ServiceAccountMatch(namespace=ns, service_account=sa)

    # ----- cross-object checks -----

    def _cross_check(
        self,
        workloads: list[tuple[int, Workload]],
        services: list[tuple[int, Service]],
        policies: list[tuple[int, Authorization]],
    ) -> None:
        service_keys: dict[str, int] = {}
        for i, s in services:
            self.obj = f"services[{i}] ({s.namespace}/{s.name})"
            if s.key in service_keys:
                with self.at("hostname"):
                    self.fail(
                        f"service {s.key} is already defined by services[{service_keys[s.key]}]"
                    )
            service_keys.setdefault(s.key, i)
        policy_keys: dict[str, int] = {}
        for i, p in policies:
            self.obj = f"policies[{i}] ({p.key})"
            if p.key in policy_keys:
                with self.at("name"):
                    self.fail(
                        f"policy {p.key} is already defined by policies[{policy_keys[p.key]}]"
                    )
            policy_keys.setdefault(p.key, i)
        uids: dict[str, int] = {}
        addresses: dict[NetworkAddress, int] = {}
        for i, w in workloads:
            self.obj = f"workloads[{i}] ({w.namespace}/{w.name})"
            if w.uid in uids:
                with self.at("uid"):
                    self.fail(f"uid {w.uid!r} is already used by workloads[{uids[w.uid]}]")
            uids.setdefault(w.uid, i)
            for j, addr in enumerate(w.network_addresses()):
                if addr in addresses and addresses[addr] != i:
                    with self.at("workloadIps"), self.at(j):
                        self.fail(f"{addr.address} is already used by workloads[{addresses[addr]}]")
                addresses.setdefault(addr, i)
            for key in w.services:
                if key not in service_keys:
                    with self.at("services"), self.at(key):
                        self.fail(f"no service {key} is defined under services")
            for key in w.authorization_policies:
                if key not in policy_keys:
                    with self.at("authorizationPolicies"):
                        self.warn(f"policy {key} is not defined; connections to it will be denied")
        self.obj = "document"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"a string ({value!r})"
    return f"{type(value).__name__} ({value!r})"

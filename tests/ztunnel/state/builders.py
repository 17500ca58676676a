"""Small builders for store/routing/authz tests: terse workloads, services and policies."""

from __future__ import annotations

import ipaddress
from typing import Any

from ztunnel.state.model import (
    Action,
    Authorization,
    Clause,
    GatewayAddress,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Rule,
    Scope,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import WorkloadStore


def ip(text: str) -> Any:
    return ipaddress.ip_address(text)


def wl(name: str, *ips: str, ns: str = "default", hbone: bool = True, **kw: Any) -> Workload:
    return Workload(
        uid=kw.pop("uid", f"Kubernetes//Pod/{ns}/{name}"),
        name=name,
        namespace=ns,
        addresses=tuple(ip(a) for a in ips),
        tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
        service_account=kw.pop("sa", name),
        **kw,
    )


def svc(
    name: str, vip: str | None, ports: dict[int, int], ns: str = "default", **kw: Any
) -> Service:
    return Service(
        name=name,
        namespace=ns,
        hostname=f"{name}.{ns}.svc.cluster.local",
        vips=(NetworkAddress(address=ip(vip)),) if vip else (),
        ports=ports,
        **kw,
    )


def skey(name: str, ns: str = "default") -> str:
    return f"{ns}/{name}.{ns}.svc.cluster.local"


def wp_host(name: str, ns: str = "default", port: int = 15008) -> GatewayAddress:
    return GatewayAddress(
        destination=NamespacedHostname(namespace=ns, hostname=f"{name}.{ns}.svc.cluster.local"),
        hbone_mtls_port=port,
    )


def wp_addr(address: str, port: int = 15008) -> GatewayAddress:
    return GatewayAddress(destination=NetworkAddress(address=ip(address)), hbone_mtls_port=port)


def policy(
    name: str,
    *matches: Match,
    ns: str = "default",
    scope: Scope = Scope.NAMESPACE,
    action: Action = Action.ALLOW,
    **kw: Any,
) -> Authorization:
    """A policy with one rule of one clause holding ``matches`` (no matches -> no rules)."""
    rules = (Rule(clauses=(Clause(matches=matches),)),) if matches else ()
    return Authorization(name=name, namespace=ns, scope=scope, action=action, rules=rules, **kw)


def store_of(*objs: Workload | Service | Authorization) -> WorkloadStore:
    store = WorkloadStore()
    store.replace_all(
        [o for o in objs if isinstance(o, Workload)],
        [o for o in objs if isinstance(o, Service)],
        [o for o in objs if isinstance(o, Authorization)],
    )
    return store

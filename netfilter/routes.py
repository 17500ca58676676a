"""Policy routing inside a pod netns via netlink (pyroute2): read, add and delete our ip rules/routes.

The spec (what we want) is built purely by `netfilter.rules.inpod_routes`; this module only does the
netlink I/O behind the `RouteOps` seam, so the apply logic can be unit-tested with `FakeRouteOps`.
pyroute2's synchronous API runs its own event loop: call these from a worker thread
(`asyncio.to_thread`) when an asyncio loop is running in the calling thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from netfilter.model import Family, IpRuleSpec, LocalRouteSpec, NetfilterError, RouteSpec
from netfilter.netns import NetnsEnterError, in_netns_thread

_T = TypeVar("_T")

_AF = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}
_RTN_LOCAL = 2


class RouteError(NetfilterError):
    """A netlink operation failed; the message names the rule/route and the netns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveRoutes:
    """Our ip rules (those that look up our table) and the routes in our table."""

    spec: RouteSpec
    foreign: tuple[str, ...] = ()
    """Routes in our table that are not `local ... dev <if>` (reported as extra)."""


class RouteOps(Protocol):
    def read(self, netns: str, table: int) -> LiveRoutes: ...

    def change(self, netns: str, *, add: RouteSpec, delete: RouteSpec) -> None:
        """Delete then add; raises RouteError naming the first item that failed."""
        ...

    def ipv6_usable(self, netns: str) -> bool:
        """Whether lo has IPv6 (else the v6 local route cannot exist)."""
        ...


class Pyroute2RouteOps:
    """`RouteOps` over pyroute2 netlink, inside the netns at a path (`/run/netns/x`, `/proc/<pid>/ns/net`).

    Every operation runs in a short-lived thread that has entered the namespace (`netfilter.netns`),
    with a plain `IPRoute` socket there. pyroute2's `NetNS` is not used: it forks a helper process,
    and a fork in a process running gRPC threads can crash the child.
    """

    @contextmanager
    def _ns(self, netns: str) -> Iterator[Any]:
        # Runs inside in_netns_thread: this thread already is in the pod netns.
        from pyroute2 import IPRoute  # shell-only import

        # pyroute2 runs its own asyncio loop; give it a plain one, whatever the process's loop
        # policy is (uvloop cannot open netlink sockets: "invalid family 16").
        loop = asyncio.SelectorEventLoop()
        try:
            ipr = IPRoute(use_event_loop=loop)
            try:
                yield ipr
            finally:
                ipr.close()
        finally:
            loop.close()

    def _in(self, netns: str, fn: Callable[[], _T]) -> _T:
        try:
            return in_netns_thread(netns, fn)
        except NetnsEnterError as exc:
            raise RouteError(f"cannot enter netns {netns}: {exc}") from exc
        except TimeoutError as exc:
            raise RouteError(str(exc)) from exc

    def read(self, netns: str, table: int) -> LiveRoutes:
        return self._in(netns, lambda: self._read(netns, table))

    def change(self, netns: str, *, add: RouteSpec, delete: RouteSpec) -> None:
        self._in(netns, lambda: self._change(netns, add=add, delete=delete))

    def ipv6_usable(self, netns: str) -> bool:
        return self._in(netns, lambda: self._ipv6_usable(netns))

    def _read(self, netns: str, table: int) -> LiveRoutes:
        rules: list[IpRuleSpec] = []
        routes: list[LocalRouteSpec] = []
        foreign: list[str] = []
        with self._ns(netns) as ns:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ns.get_links()}
            for family, af in _AF.items():
                for msg in ns.get_rules(family=af):
                    rt = msg.get_attr("FRA_TABLE") or msg["table"]
                    if rt != table:
                        continue
                    rules.append(
                        IpRuleSpec(
                            family=family,
                            fwmark=msg.get_attr("FRA_FWMARK") or 0,
                            fwmask=msg.get_attr("FRA_FWMASK") or 0,
                            priority=msg.get_attr("FRA_PRIORITY") or 0,
                            table=rt,
                        )
                    )
                for msg in ns.get_routes(family=af, table=table):
                    if (msg.get_attr("RTA_TABLE") or msg["table"]) != table:
                        continue
                    dst = msg.get_attr("RTA_DST") or ("0.0.0.0" if family is Family.V4 else "::")
                    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}")
                    dev = names.get(msg.get_attr("RTA_OIF"), "?")
                    if msg["type"] == _RTN_LOCAL:
                        routes.append(LocalRouteSpec(family=family, dst=net, table=table, dev=dev))
                    else:
                        foreign.append(f"{family.value} route type {msg['type']} {net} dev {dev}")
        return LiveRoutes(
            spec=RouteSpec(rules=tuple(rules), routes=tuple(routes)), foreign=tuple(foreign)
        )

    def _change(self, netns: str, *, add: RouteSpec, delete: RouteSpec) -> None:
        with self._ns(netns) as ns:
            for rule in delete.rules:
                self._rule(ns, "del", rule, netns)
            for route in delete.routes:
                self._route(ns, "del", route, netns)
            for route in add.routes:
                self._route(ns, "add", route, netns)
            for rule in add.rules:
                self._rule(ns, "add", rule, netns)

    def _ipv6_usable(self, netns: str) -> bool:
        with self._ns(netns) as ns:
            lo = ns.link_lookup(ifname="lo")
            return bool(lo) and bool(ns.get_addr(family=socket.AF_INET6, index=lo[0]))

    @staticmethod
    def _rule(ns: Any, op: str, rule: IpRuleSpec, netns: str) -> None:
        try:
            ns.rule(
                op,
                family=_AF[rule.family],
                fwmark=rule.fwmark,
                fwmask=rule.fwmask,
                priority=rule.priority,
                table=rule.table,
            )
        except Exception as exc:
            raise RouteError(f"ip rule {op} failed in {netns}: {rule}: {exc}") from exc

    @staticmethod
    def _route(ns: Any, op: str, route: LocalRouteSpec, netns: str) -> None:
        try:
            idx = ns.link_lookup(ifname=route.dev)
            if not idx:
                raise RouteError(f"no device {route.dev!r}")
            kwargs: dict[str, Any] = {}
            if route.family is Family.V4:
                kwargs["scope"] = "host"  # the kernel rejects a v4 local route without it
            ns.route(
                op,
                family=_AF[route.family],
                dst=str(route.dst),
                type="local",
                oif=idx[0],
                table=route.table,
                **kwargs,
            )
        except Exception as exc:
            raise RouteError(f"ip route {op} failed in {netns}: {route}: {exc}") from exc


@dataclass
class FakeRouteOps:
    """In-memory `RouteOps` for unit tests; `fail_on` makes a matching add raise."""

    live: dict[str, RouteSpec] = field(default_factory=dict)
    v6: bool = True
    fail_on: str | None = None
    calls: list[str] = field(default_factory=list)

    def read(self, netns: str, table: int) -> LiveRoutes:
        self.calls.append(f"read {netns}")
        spec = self.live.get(netns, RouteSpec())
        return LiveRoutes(
            spec=RouteSpec(
                rules=tuple(r for r in spec.rules if r.table == table),
                routes=tuple(r for r in spec.routes if r.table == table),
            )
        )

    def change(self, netns: str, *, add: RouteSpec, delete: RouteSpec) -> None:
        self.calls.append(f"change {netns}")
        spec = self.live.get(netns, RouteSpec())
        rules = [r for r in spec.rules if r not in delete.rules]
        routes = [r for r in spec.routes if r not in delete.routes]
        for item in (*add.routes, *add.rules):
            if self.fail_on is not None and self.fail_on in str(item):
                self.live[netns] = RouteSpec(rules=tuple(rules), routes=tuple(routes))
                raise RouteError(f"injected failure adding {item}")
            if isinstance(item, IpRuleSpec):
                if item in rules:
                    raise RouteError(f"exists: {item}")
                rules.append(item)
            elif isinstance(item, LocalRouteSpec):
                if item in routes:
                    raise RouteError(f"exists: {item}")
                routes.append(item)
        self.live[netns] = RouteSpec(rules=tuple(rules), routes=tuple(routes))

    def ipv6_usable(self, netns: str) -> bool:
        return self.v6

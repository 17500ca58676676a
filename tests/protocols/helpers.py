"""Shared helpers for the protocol tests: resources, a recording handler, awaiting conditions."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ztunnel.xds import protos
from ztunnel.xds.session import NodeInfo, Versioned


def workload(name: str, ip: str, *, ns: str = "default", sa: str = "default", node: str = "n1"):
    uid = f"Kubernetes//Pod/{ns}/{name}"
    return uid, protos.Address(
        workload=protos.Workload(
            uid=uid,
            name=name,
            namespace=ns,
            addresses=[ipaddress.ip_address(ip).packed],
            service_account=sa,
            node=node,
            tunnel_protocol="HBONE",
        )
    )


def policy(name: str, ns: str = "default", port: int = 9999):
    from ztunnel.xds.gen.workloadapi.security import authorization_pb2 as az

    msg = protos.Authorization(
        name=name,
        namespace=ns,
        scope=az.WORKLOAD_SELECTOR,
        action=az.DENY,
        rules=[az.Rule(clauses=[az.Clause(matches=[az.Match(destination_ports=[port])])])],
    )
    return f"{ns}/{name}", msg


def node(pod: str = "ztunnel-abc", node_name: str = "n1", ip: str = "10.0.0.1") -> NodeInfo:
    return NodeInfo(
        instance_ip=ip,
        pod_name=pod,
        namespace="istio-system",
        node_name=node_name,
        cluster_id="Kubernetes",
    )


@dataclass
class Recorder:
    """A ResourceHandler that records calls and rejects names `reject` says no to."""

    reject: Callable[[str, Any], str | None] = lambda _name, _msg: None
    calls: list[tuple[str, dict[str, Versioned], list[str]]] = field(default_factory=list)
    state: dict[str, dict[str, object]] = field(default_factory=dict)
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    def on_resources(
        self, type_url: str, added: Mapping[str, Versioned], removed: Sequence[str]
    ) -> Mapping[str, str]:
        self.calls.append((type_url, dict(added), list(removed)))
        errors = {}
        store = self.state.setdefault(type_url, {})
        for name, (_version, msg) in added.items():
            reason = self.reject(name, msg)
            if reason:
                errors[name] = reason
            else:
                store[name] = msg
        for name in removed:
            store.pop(name, None)
        self._event.set()
        return errors

    def names(self, type_url: str) -> set[str]:
        return set(self.state.get(type_url, {}))

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 3.0) -> None:
        async def loop() -> None:
            while not predicate():
                self._event.clear()
                await self._event.wait()

        await asyncio.wait_for(loop(), timeout)


async def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll a condition that has no event of its own (e.g. server-side counters)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.005)

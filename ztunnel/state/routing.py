"""The outbound routing decision: where a captured connection from a local pod must go, and how.

``route_outbound`` follows Istio ztunnel's ``build_request`` (reference: ztunnel.md section 3.6), in order:

1. a call to the source itself (loopback or one of its own addresses) on 15001/15006/15008 is denied;
2. a service VIP whose service is bound to a waypoint goes to that waypoint over HBONE, ``:authority``
   the original VIP:port (not when the source *is* that waypoint, which would loop);
3. otherwise the upstream is resolved: a service VIP load-balances over its healthy endpoints
   (locality ranking, then weighted random by capacity) and maps the service port to the endpoint's
   target port; an address without a service is looked up as a workload; nothing found means an
   address outside the mesh, sent as plain TCP (a non-PASSTHROUGH service with no endpoint is
   ``NoHealthyUpstream`` instead);
4. a pod addressed directly whose workload has a waypoint goes to that waypoint (unless the source is
   that waypoint);
5. an HBONE workload gets HBONE to ``podIP:15008`` with ``:authority`` ``podIP:targetPort``; a workload
   with tunnel protocol NONE gets plain TCP to ``podIP:targetPort``.

Where Istio and this module differ, it is in the safe direction: an unresolvable waypoint or a
destination known to be in the mesh never turns into plaintext, and a source that is the service's own
waypoint is not sent back through it. Multi-network (double HBONE) is not supported: remote-network
endpoints are not candidates and a remote waypoint is a denial.

Pure: the store is read, randomness comes in as ``rng``. ``ztunnel.state.inbound`` holds the checks for
the receiving side.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ztunnel.config import ILLEGAL_PORTS, INBOUND_HBONE_PORT
from ztunnel.state.model import (
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    LbMode,
    LbScope,
    NamespacedHostname,
    Service,
    Workload,
)
from ztunnel.state.store import WorkloadStore


class Rng(Protocol):
    """What the decision needs from a random source; ``random.Random`` fits."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SockAddr:
    """An IP and port; ``str()`` gives the CONNECT authority form (``[v6]:port`` for IPv6)."""

    ip: IPAddress
    port: int

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Deny:
    """Refuse the connection (close it); ``reason`` is for logs and the access log."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Hbone:
    """Open an HBONE stream.

    ``connect_addr`` is the TLS peer (pod or waypoint IP, port 15008), ``authority`` the CONNECT
    ``:authority``; the peer certificate must carry one of ``expected_identities`` (SPIFFE URIs).
    ``destination_workload`` is the peer we connect to (the waypoint when ``via_waypoint``),
    ``target_workload`` the final pod when known, ``destination_service`` the service addressed.
    """

    connect_addr: SockAddr
    authority: SockAddr
    expected_identities: tuple[str, ...]
    via_waypoint: bool
    destination_workload: Workload
    target_workload: Workload | None
    destination_service: Service | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Passthrough:
    """Plain TCP to ``addr``: a destination outside the mesh (unknown, or a workload without HBONE)."""

    addr: SockAddr
    destination_workload: Workload | None = None
    destination_service: Service | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NoHealthyUpstream:
    """The address is a mesh service, but no endpoint can take this connection."""

    service: Service
    reason: str


OutboundDecision = Deny | Hbone | Passthrough | NoHealthyUpstream


def route_outbound(
    store: WorkloadStore, source: Workload, dst_ip: IPAddress, dst_port: int, rng: Rng
) -> OutboundDecision:
    """Decide how to carry a connection from local workload ``source`` to ``dst_ip:dst_port``."""
    dst_ip = _unmap(dst_ip)
    original = SockAddr(dst_ip, dst_port)
    if dst_port in ILLEGAL_PORTS and (dst_ip.is_loopback or dst_ip in source.addresses):
        return Deny(reason=f"self-call to {original}: port {dst_port} is one of ztunnel's own")

    service = store.service_by_vip(dst_ip, source.network, source.namespace)
    if service is not None:
        if service.waypoint is not None and not _is_waypoint(store, source, service.waypoint):
            return _via_waypoint(store, source, service.waypoint, original, service, None, rng)
        if service.is_passthrough:
            return Passthrough(
                addr=original,
                destination_service=service,
                reason=f"service {service.key} load balancing mode is PASSTHROUGH",
            )
        picked = _pick_endpoint(store, source, service, dst_port, rng)
        if isinstance(picked, str):
            return NoHealthyUpstream(service=service, reason=picked)
        endpoint, target_port = picked
        return _direct(endpoint, _address_for(endpoint, dst_ip), target_port, service)

    workload = store.workload_by_ip(dst_ip, source.network)
    if workload is None:
        return Passthrough(addr=original, reason=f"{dst_ip} is not a known workload or service")
    if workload.waypoint is not None and not _is_waypoint(store, source, workload.waypoint):
        return _via_waypoint(store, source, workload.waypoint, original, None, workload, rng)
    return _direct(workload, dst_ip, dst_port, None)


def _direct(
    workload: Workload, ip: IPAddress, target_port: int, service: Service | None
) -> OutboundDecision:
    if workload.is_hbone or workload.native_tunnel:
        sans = _dedupe((str(workload.identity()), *(service.subject_alt_names if service else ())))
        return Hbone(
            connect_addr=SockAddr(ip, INBOUND_HBONE_PORT),
            authority=SockAddr(ip, target_port),
            expected_identities=sans,
            via_waypoint=False,
            destination_workload=workload,
            target_workload=workload,
            destination_service=service,
        )
    # Tunnel protocol NONE: the control plane says this workload is outside the mesh.
    return Passthrough(
        addr=SockAddr(ip, target_port),
        destination_workload=workload,
        destination_service=service,
        reason=f"workload {workload.uid} does not use HBONE",
    )


def _via_waypoint(
    store: WorkloadStore,
    source: Workload,
    gateway: GatewayAddress,
    original: SockAddr,
    service: Service | None,
    target: Workload | None,
    rng: Rng,
) -> OutboundDecision:
    resolved = _resolve_waypoint(store, source, gateway, original.ip, rng)
    if isinstance(resolved, str):
        # Never fall back to plaintext or a direct path: the waypoint is where policy is enforced.
        owner = service.key if service is not None else target.uid if target is not None else "?"
        return Deny(reason=f"waypoint of {owner}: {resolved}")
    waypoint, waypoint_sans = resolved
    return Hbone(
        connect_addr=SockAddr(_address_for(waypoint, original.ip), gateway.hbone_mtls_port),
        authority=original,
        expected_identities=_dedupe((str(waypoint.identity()), *waypoint_sans)),
        via_waypoint=True,
        destination_workload=waypoint,
        target_workload=target,
        destination_service=service,
    )


def _resolve_waypoint(
    store: WorkloadStore, source: Workload, gateway: GatewayAddress, dst_ip: IPAddress, rng: Rng
) -> tuple[Workload, tuple[str, ...]] | str:
    """The waypoint workload to use and the extra SANs of its service, or why there is none."""
    dest = gateway.destination
    service: Service | None
    if isinstance(dest, NamespacedHostname):
        service = store.service_by_key(dest.key)
        if service is None:
            return f"waypoint service {dest.key} is unknown"
    else:
        if dest.network != source.network:
            return f"waypoint {dest} is on another network (multi-network is not supported)"
        workload = store.workload_by_ip(dest.address, dest.network)
        if workload is not None:
            return workload, ()
        service = store.service_by_vip(dest.address, dest.network, source.namespace)
        if service is None:
            return f"waypoint address {dest} is neither a workload nor a service"
    candidates = _healthy_local(source, service, _endpoints_with_address(store, service))
    if not candidates:
        return f"waypoint service {service.key} has no healthy endpoint"
    chosen = _weighted_choice(_rank(source, service, candidates), rng)
    return chosen, service.subject_alt_names


def _is_waypoint(store: WorkloadStore, source: Workload, gateway: GatewayAddress) -> bool:
    """Whether ``source`` is (one of the pods of) the waypoint that ``gateway`` names."""
    dest = gateway.destination
    if isinstance(dest, NamespacedHostname):
        return dest.key in source.services
    if dest.network == source.network and dest.address in source.addresses:
        return True
    service = store.service_by_vip(dest.address, dest.network, source.namespace)
    return service is not None and service.key in source.services


def _pick_endpoint(
    store: WorkloadStore,
    source: Workload,
    service: Service,
    port: int,
    rng: Rng,
) -> tuple[Workload, int] | str:
    """An endpoint and its target port for ``service:port``, or why there is none."""
    if port not in service.ports:
        return f"service {service.key} has no port {port}"
    service_target = service.ports[port]
    with_port: list[tuple[Workload, int]] = []
    for endpoint in _endpoints_with_address(store, service):
        target = endpoint.services.get(service.key, {}).get(port) or service_target
        if target == 0:
            continue  # named target port that this endpoint does not define
        with_port.append((endpoint, target))
    if not with_port:
        return f"service {service.key} has no endpoint serving port {port}"
    targets = {w.uid: t for w, t in with_port}
    candidates = _healthy_local(source, service, [w for w, _ in with_port])
    if not candidates:
        return f"service {service.key} has no healthy endpoint on network {source.network!r}"
    ranked = _rank(source, service, candidates)
    if not ranked:
        return f"service {service.key} has no endpoint in the required locality (STRICT)"
    chosen = _weighted_choice(ranked, rng)
    return chosen, targets[chosen.uid]


def _endpoints_with_address(store: WorkloadStore, service: Service) -> list[Workload]:
    # Hostname-only workloads need DNS resolution, which this data plane does not do.
    return [w for w in store.endpoints(service.key) if w.addresses]


def _healthy_local(
    source: Workload, service: Service, endpoints: Sequence[Workload]
) -> list[Workload]:
    allow_all = (
        service.load_balancing is not None
        and service.load_balancing.health_policy is HealthPolicy.ALLOW_ALL
    )
    return [
        w
        for w in endpoints
        if (allow_all or w.status is HealthStatus.HEALTHY) and w.network == source.network
    ]


def _rank(source: Workload, service: Service, candidates: list[Workload]) -> list[Workload]:
    """Apply locality preferences: FAILOVER keeps the best rank, STRICT only full matches."""
    lb = service.load_balancing
    if lb is None or lb.mode not in (LbMode.STRICT, LbMode.FAILOVER) or not lb.routing_preference:
        return candidates
    ranks = [(_locality_rank(source, w, lb.routing_preference), w) for w in candidates]
    wanted = len(lb.routing_preference) if lb.mode is LbMode.STRICT else max(r for r, _ in ranks)
    return [w for r, w in ranks if r == wanted]


def _locality_rank(source: Workload, endpoint: Workload, scopes: tuple[LbScope, ...]) -> int:
    """How many leading preferred scopes the endpoint shares with the source."""
    rank = 0
    for scope in scopes:
        if scope is LbScope.REGION:
            same = source.locality.region == endpoint.locality.region
        elif scope is LbScope.ZONE:
            same = source.locality.zone == endpoint.locality.zone
        elif scope is LbScope.SUBZONE:
            same = source.locality.subzone == endpoint.locality.subzone
        elif scope is LbScope.NODE:
            same = source.node == endpoint.node
        elif scope is LbScope.CLUSTER:
            same = source.cluster_id == endpoint.cluster_id
        else:
            same = source.network == endpoint.network
        if not same:
            break
        rank += 1
    return rank


def _weighted_choice(candidates: Sequence[Workload], rng: Rng) -> Workload:
    """Weighted random by capacity; capacity-0 endpoints only when every candidate has 0."""
    weighted = [w for w in candidates if w.capacity > 0]
    if not weighted:
        return candidates[int(rng.random() * len(candidates)) % len(candidates)]
    total = sum(w.capacity for w in weighted)
    point = rng.random() * total
    for w in weighted:
        point -= w.capacity
        if point < 0:
            return w
    return weighted[-1]  # rounding at the top end


def _address_for(workload: Workload, wanted: IPAddress) -> IPAddress:
    """The workload's address of the same family as the caller's, else its first one."""
    for address in workload.addresses:
        if address.version == wanted.version:
            return address
    return workload.addresses[0]


def _unmap(ip: IPAddress) -> IPAddress:
    # Dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d; the store indexes plain IPv4.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _dedupe(items: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))

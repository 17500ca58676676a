"""Inbound checks: which local workload and target a received connection is for, or why it is refused.

For HBONE (15008) the ``:authority`` names the target. As in Istio ztunnel (ztunnel.md section 3.2):
an authority that is not ``ip:port`` is 400; the authority IP must be the IP the connection arrived on
(else 400), except when this pod is the target's waypoint — then the authority may be a service VIP or
another pod's IP, which the waypoint routes itself — or the pod has an application tunnel; an unknown
local workload or an illegal target port (15001/15006/15008: a loop) is 503. For plaintext (15006) the
original destination must be a local workload on a legal port.

Authorization is a separate step (``ztunnel.state.authz``); the caller runs it on the accepted target.
Pure: the store and the map of this node's workloads are read only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ztunnel.config import ILLEGAL_PORTS
from ztunnel.hbone.authority import AuthorityError as AuthorityError
from ztunnel.hbone.authority import parse_authority as parse_hbone_authority
from ztunnel.state.model import GatewayAddress, IPAddress, NamespacedHostname, Service, Workload
from ztunnel.state.routing import SockAddr
from ztunnel.state.store import WorkloadStore


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundAccept:
    """Serve the connection.

    ``local_workload`` is the pod that received it (whose certificate was presented). ``target`` is
    what the authority named: for a normal pod its own ``ip:port`` (connect the app there); for a
    waypoint the VIP or pod address it must route. ``destination_service`` is set when a waypoint
    received a service VIP; ``destination_workload`` is the workload policy is evaluated for.
    ``via_waypoint_sandwich`` marks the waypoint cases.
    """

    local_workload: Workload
    target: SockAddr
    destination_workload: Workload | None
    destination_service: Service | None = None
    via_waypoint_sandwich: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundReject:
    """Refuse: ``status`` is the HBONE response code (400 or 503); plaintext callers just close."""

    status: int
    reason: str


InboundDecision = InboundAccept | InboundReject


def parse_authority(authority: str) -> SockAddr:
    """Parse an inbound ``:authority``: the HBONE core's strict grammar, and it must name an IP.

    Hostname authorities are for double HBONE through a network gateway, which this ztunnel does
    not terminate; they are refused like any other malformed target (400).
    """
    parsed = parse_hbone_authority(authority)
    if isinstance(parsed.host, str):
        raise AuthorityError(f"authority {authority!r}: {parsed.host!r} is not an IP address")
    return SockAddr(parsed.host, parsed.port)


def resolve_inbound_hbone(
    store: WorkloadStore,
    local_workloads_by_ip: Mapping[IPAddress, Workload],
    authority: str,
    connection_dst_ip: IPAddress,
) -> InboundDecision:
    """Check a CONNECT received on ``connection_dst_ip:15008`` with ``:authority`` ``authority``."""
    try:
        target = parse_authority(authority)
    except AuthorityError as err:
        return InboundReject(status=400, reason=str(err))
    local = local_workloads_by_ip.get(connection_dst_ip)
    if local is None:
        return InboundReject(
            status=503, reason=f"no local workload has address {connection_dst_ip}"
        )
    if target.port in ILLEGAL_PORTS:
        return InboundReject(
            status=503, reason=f"target port {target.port} is one of ztunnel's own (loop)"
        )
    if target.ip == connection_dst_ip:
        return InboundAccept(local_workload=local, target=target, destination_workload=local)

    # Sandwich: this pod is the waypoint of the service or pod the authority names.
    service = store.service_by_vip(target.ip, local.network)
    if service is not None and _names(store, service.waypoint, local):
        return InboundAccept(
            local_workload=local,
            target=target,
            destination_workload=local,
            destination_service=service,
            via_waypoint_sandwich=True,
        )
    workload = store.workload_by_ip(target.ip, local.network)
    if workload is not None and _names(store, workload.waypoint, local):
        return InboundAccept(
            local_workload=local,
            target=target,
            destination_workload=local,
            via_waypoint_sandwich=True,
        )
    if local.application_tunnel is not None:
        return InboundAccept(local_workload=local, target=target, destination_workload=local)
    return InboundReject(
        status=400,
        reason=f"authority {target} does not match the connection's address {connection_dst_ip}",
    )


def resolve_inbound_plaintext(
    local_workloads_by_ip: Mapping[IPAddress, Workload], dst_ip: IPAddress, dst_port: int
) -> InboundDecision:
    """Check a plaintext connection captured on 15006 with original destination ``dst_ip:dst_port``."""
    local = local_workloads_by_ip.get(dst_ip)
    if local is None:
        return InboundReject(status=503, reason=f"no local workload has address {dst_ip}")
    if dst_port in ILLEGAL_PORTS:
        return InboundReject(status=503, reason=f"port {dst_port} is one of ztunnel's own (loop)")
    return InboundAccept(
        local_workload=local, target=SockAddr(dst_ip, dst_port), destination_workload=local
    )


def _names(store: WorkloadStore, gateway: GatewayAddress | None, local: Workload) -> bool:
    """Whether ``gateway`` (a waypoint reference) designates the local workload."""
    if gateway is None:
        return False
    dest = gateway.destination
    if isinstance(dest, NamespacedHostname):
        return dest.key in local.services
    if dest.network == local.network and dest.address in local.addresses:
        return True
    service = store.service_by_vip(dest.address, dest.network)
    return service is not None and service.key in local.services

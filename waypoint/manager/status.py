"""Status of GatewayClasses and waypoint Gateways, computed from what the manager knows.

Owns `gateway_status(...)`, `gateway_class_status(...)` and `set_condition(...)`. Rules
(reference/waypoint.md §A7, §F4):
* `Accepted` is False with the reason of the first problem (ListenersNotValid, InvalidParameters,
  UnsupportedAddress) and a message listing every problem; then nothing was created.
* `Programmed` is True only once the waypoint Deployment has a ready replica and its Service has a
  ClusterIP; `status.addresses` (every ClusterIP, then the Service hostname) is published at that moment
  and never retracted afterwards (Istio: "once we are ready, never remove the address").
* `ResolvedRefs` is False (InvalidParameters) when the parametersRef cannot be used.
* each listener gets Accepted, Programmed, ResolvedRefs and Conflicted.
* `lastTransitionTime` changes only when a condition's status changes; `now` is passed in.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import MESH_LISTENER_PORT, Gateway, GatewayClass, Problem


@dataclass(frozen=True, slots=True, kw_only=True)
class Runtime:
    """What the cluster reports about a waypoint's objects."""

    ready_replicas: int = 0
    cluster_ips: tuple[str, ...] = ()
    """The Service's spec.clusterIPs (all families); empty until the Service exists."""


def set_condition(
    previous: Sequence[Mapping[str, Any]],
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> dict[str, Any]:
    """A condition dict, keeping the old lastTransitionTime when the status did not change."""
    old = next((c for c in previous if c.get("type") == type_), None)
    value = "True" if status else "False"
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    cond: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or now,
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def service_hostname(namespace: str, name: str, cluster_domain: str) -> str:
    return f"{name}.{namespace}.svc.{cluster_domain}"


def gateway_status(
    gw: Gateway,
    *,
    problems: Sequence[Problem],
    foreign: Sequence[str],
    runtime: Runtime,
    previous: Mapping[str, Any],
    now: str,
    cluster_domain: str,
) -> dict[str, Any]:
    """The full `status` of a waypoint Gateway."""
    prev_conds: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    gen = gw.generation

    def cond(type_: str, ok: bool, reason: str, message: str) -> dict[str, Any]:
        return set_condition(
            prev_conds,
            type_=type_,
            status=ok,
            reason=reason,
            message=message,
            generation=gen,
            now=now,
        )

    host = service_hostname(gw.namespace, gw.name, cluster_domain)
    ready = runtime.ready_replicas > 0 and bool(runtime.cluster_ips)
    invalid = "; ".join(p.message for p in problems)
    ref_problems = [p for p in problems if p.condition == "ResolvedRefs"]
    conditions = []
    if problems:
        conditions.append(cond("Accepted", False, problems[0].reason, invalid))
    else:
        conditions.append(cond("Accepted", True, "Accepted", "Resource accepted"))
    if problems:
        programmed = cond(
            "Programmed", False, "Invalid", f"Not programmed, nothing was created: {invalid}"
        )
    elif foreign:
        programmed = cond("Programmed", False, "Invalid", "; ".join(foreign))
    elif ready:
        programmed = cond(
            "Programmed",
            True,
            "Programmed",
            f"Resource programmed, assigned to service(s) {host}:{MESH_LISTENER_PORT}",
        )
    else:
        programmed = cond(
            "Programmed",
            False,
            "Pending",
            f"Waiting for a ready waypoint replica ({runtime.ready_replicas} ready) and a Service address",
        )
    conditions.append(programmed)
    if ref_problems:
        conditions.append(
            cond(
                "ResolvedRefs",
                False,
                "InvalidParameters",
                "; ".join(p.message for p in ref_problems),
            )
        )
    else:
        conditions.append(cond("ResolvedRefs", True, "ResolvedRefs", "All references resolved"))

    status: dict[str, Any] = {}
    if ready and not problems and not foreign:
        status["addresses"] = [{"type": "IPAddress", "value": ip} for ip in runtime.cluster_ips] + [
            {"type": "Hostname", "value": host}
        ]
    elif previous.get("addresses"):
        status["addresses"] = list(previous["addresses"])
    status["conditions"] = conditions

    prev_listeners = {
        str(entry.get("name")): entry.get("conditions") or []
        for entry in previous.get("listeners") or []
    }
    listeners = []
    for listener in gw.listeners:
        lp = prev_listeners.get(listener.name, [])
        own = next((p for p in problems if p.listener == listener.name), None)

        def lcond(
            type_: str, ok: bool, reason: str, message: str, lp: Sequence[Mapping[str, Any]] = lp
        ) -> dict[str, Any]:
            return set_condition(
                lp, type_=type_, status=ok, reason=reason, message=message, generation=gen, now=now
            )

        lconds = [
            lcond("Accepted", False, own.listener_reason or "Invalid", own.message)
            if own
            else lcond("Accepted", True, "Accepted", "Listener accepted"),
            lcond("Conflicted", False, "NoConflicts", "No conflicts"),
            lcond(
                "Programmed",
                programmed["status"] == "True",
                programmed["reason"],
                programmed["message"],
            ),
            lcond("ResolvedRefs", True, "ResolvedRefs", "All references resolved"),
        ]
        # HBONE carries no Gateway API route kinds (Istio reports [] too).
        listeners.append(
            {"name": listener.name, "supportedKinds": [], "attachedRoutes": 0, "conditions": lconds}
        )
    status["listeners"] = listeners
    return status


def gateway_class_status(gc: GatewayClass, previous: Mapping[str, Any], now: str) -> dict[str, Any]:
    prev: Sequence[Mapping[str, Any]] = previous.get("conditions") or []
    return {
        "conditions": [
            set_condition(
                prev,
                type_="Accepted",
                status=True,
                reason="Accepted",
                message="Handled by the ambient waypoint manager",
                generation=gc.generation,
                now=now,
            )
        ]
    }


def without_times(status: Any) -> Any:
    """A status with lastTransitionTime removed, to compare whether a write is needed."""
    if isinstance(status, Mapping):
        return {k: without_times(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [without_times(v) for v in status]
    return status

"""Which pods this node's ztunnel must serve, and what to do to get there (pure).

Owns the decisions of the local-mode node agent, the counterpart of ztunnel's in-pod state manager
(ztunnel.md section 7.1) with the config file in place of the CNI's ZDS messages:

* ``local_pods``: a workload is enrolled when it is on this node, speaks HBONE and names its network
  namespace (``netns``). Pods outside the mesh (protocol TCP) are never captured.
* ``plan``: from what runs now (per uid: netns path, netns id = (dev, inode), identity, up or pending)
  and what is wanted, the pods to start, to stop (drain, then remove their rules) and to restart. A
  changed netns (the sandbox was recreated: new inode) or a changed identity restarts the pod, as
  ztunnel does; a pod whose start failed stays *pending* and is retried.

No I/O: netns ids are looked up by the shell and passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ztunnel.identity.spiffe import SpiffeId
from ztunnel.state.model import TunnelProtocol, Workload

NetnsId = tuple[int, int]
"""(st_dev, st_ino) of a network namespace file: what identifies a sandbox (ztunnel #1244)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """What the agent has for one pod right now."""

    uid: str
    netns: str
    netns_id: NetnsId | None
    identity: SpiffeId
    up: bool
    """False = the last start failed; the pod is pending and will be retried."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Steps to converge; ``stop`` runs before ``start`` (a restart appears in both)."""

    start: tuple[Workload, ...] = ()
    stop: tuple[str, ...] = ()
    retry: tuple[Workload, ...] = ()
    keep: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.start or self.stop or self.retry)


def enrolled(workload: Workload, node: str) -> bool:
    """Is this workload a pod of ``node`` that the node agent must capture and serve?"""
    return (
        workload.node == node
        and workload.tunnel_protocol is TunnelProtocol.HBONE
        and bool(workload.netns)
        and not workload.native_tunnel  # waypoints speak HBONE themselves: no capture
    )


def local_pods(workloads: Iterable[Workload], node: str) -> dict[str, Workload]:
    """The enrolled pods of ``node`` by uid."""
    return {w.uid: w for w in workloads if enrolled(w, node)}


def plan(
    running: Mapping[str, Running],
    wanted: Mapping[str, Workload],
    netns_ids: Mapping[str, NetnsId | None],
) -> Plan:
    """Decide the steps from ``running`` to ``wanted``.

    ``netns_ids`` maps each wanted pod's netns path to its current id (None = the file is missing:
    the pod is started anyway and fails, which makes it pending, so it is retried when it appears).
    """
    start: list[Workload] = []
    stop: list[str] = []
    retry: list[Workload] = []
    keep: list[str] = []
    for uid in sorted(running):
        if uid not in wanted:
            stop.append(uid)
    for uid in sorted(wanted):
        w = wanted[uid]
        assert w.netns is not None  # local_pods only yields workloads with a netns
        have = running.get(uid)
        if have is None:
            start.append(w)
            continue
        new_id = netns_ids.get(w.netns)
        recreated = (
            have.netns != w.netns
            or (have.netns_id is not None and new_id is not None and have.netns_id != new_id)
            or have.identity != w.identity()
        )
        if recreated:
            stop.append(uid)
            start.append(w)
        elif not have.up:
            retry.append(w)
        else:
            keep.append(uid)
    return Plan(start=tuple(start), stop=tuple(stop), retry=tuple(retry), keep=tuple(keep))

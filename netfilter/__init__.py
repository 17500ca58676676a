"""Capture rules for pod network namespaces: a rule model, pure renderers (iptables-restore, nft), atomic apply.

A leaf library: imports neither ztunnel nor waypoint.

Pure core: `model` (values, `InpodConfig`), `rules` (the in-pod rule set and policy routing),
`render` (iptables-restore / nft text), `parse` (iptables-save / nft JSON back into the model),
`plan` (drift and transitions). Shell: `executor` (CLI seam), `routes` (netlink), `apply`.
"""

from __future__ import annotations

from netfilter.apply import (
    ApplyError,
    PodNetfilter,
    detect_backend,
    program_pod,
    repair_pod,
    unprogram_pod,
    verify_pod,
)
from netfilter.model import Backend, ConfigError, Drift, InboundMode, InpodConfig, NetfilterError
from netfilter.rules import inpod_routes, inpod_ruleset

__all__ = [
    "ApplyError",
    "Backend",
    "ConfigError",
    "Drift",
    "InboundMode",
    "InpodConfig",
    "NetfilterError",
    "PodNetfilter",
    "detect_backend",
    "inpod_routes",
    "inpod_ruleset",
    "program_pod",
    "repair_pod",
    "unprogram_pod",
    "verify_pod",
]

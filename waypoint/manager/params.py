"""Waypoint parameters: the typed knobs of a waypoint and their parsing from a parametersRef ConfigMap.

Owns `Params` (replica bounds, autoscaling and PDB switches, HPA metrics and scale-down behaviour,
resources, drain time, image) and `parse_params(configmap)`. Two kinds of ConfigMap keys are accepted:

* typed keys (`minReplicas: "3"`, `autoscaling: "false"`, `requestsPerSecondTarget: "200"`, ...), each
  checked with an error that names the ConfigMap and the key;
* Istio's overlay keys (`deployment`, `service`, `serviceAccount`, `horizontalPodAutoscaler`,
  `podDisruptionBudget`), YAML patches applied to the rendered object (reference/waypoint.md §A5).

Pure: no I/O. YAML parsing uses PyYAML's safe loader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

import yaml

OVERLAY_KEYS: Final = (
    "deployment",
    "service",
    "serviceAccount",
    "horizontalPodAutoscaler",
    "podDisruptionBudget",
)

DEFAULT_RESOURCES: Final[Mapping[str, Mapping[str, str]]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "1Gi"},
}


class ParamsError(ValueError):
    """A parametersRef ConfigMap with a bad key or value; the message names ConfigMap and key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """How one waypoint is sized and made available. Defaults: 2-10 replicas on CPU, PDB minAvailable 1."""

    min_replicas: int = 2
    max_replicas: int = 10
    autoscaling: bool = True
    """False: no HPA (an existing one is deleted) and the Deployment gets `replicas: min_replicas`."""
    cpu_target_utilization: int | None = 80
    """Average CPU utilisation target in percent; None drops the CPU metric (RPS only)."""
    requests_per_second_target: int | None = None
    """Average requests per second per pod; adds a Pods metric (needs a custom-metrics adapter)."""
    requests_per_second_metric: str = "istio_requests_per_second"
    """Pods metric name the adapter derives from the waypoint's own istio_requests_total."""
    scale_down_stabilization_seconds: int = 300
    scale_down_pods: int = 1
    """At most this many pods removed per `scale_down_period_seconds`: no sawtooth of HBONE resets."""
    scale_down_period_seconds: int = 60
    pod_disruption_budget: bool = True
    min_available: int = 1
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    termination_grace_period_seconds: int = 60
    """Long enough to drain HBONE streams: >= 30 s, and at least drain time + the preStop delay."""
    image: str | None = None
    """Proxy image override; None uses the manager's default."""
    overlays: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Istio-style per-kind patches, keyed by one of OVERLAY_KEYS."""


def _int(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(where: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ParamsError(f"{where}: must be an integer, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ParamsError(f"{where}: must be {bound}, got {value}")
        return value

    return parse


def _bool(where: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "enabled", "on", "yes"):
        return True
    if value in ("false", "disabled", "off", "no"):
        return False
    raise ParamsError(f"{where}: must be true or false, got {raw!r}")


def _optional_int(lo: int, hi: int | None = None) -> Callable[[str, str], int | None]:
    inner = _int(lo, hi)

    def parse(where: str, raw: str) -> int | None:
        if raw.strip().lower() in ("", "none", "off"):
            return None
        return inner(where, raw)

    return parse


def _metric_name(where: str, raw: str) -> str:
    name = raw.strip()
    if not name or not all(c.isalnum() or c in "_:" for c in name):
        raise ParamsError(f"{where}: must be a Prometheus metric name, got {raw!r}")
    return name


def _image(where: str, raw: str) -> str:
    image = raw.strip()
    if not image or any(c.isspace() for c in image):
        raise ParamsError(f"{where}: must be an image reference without spaces, got {raw!r}")
    return image


def _resources(where: str, raw: str) -> Mapping[str, Mapping[str, str]]:
    data = _yaml_mapping(where, raw)
    out: dict[str, dict[str, str]] = {}
    for section, values in data.items():
        if section not in ("requests", "limits"):
            raise ParamsError(f"{where}: unknown section {section!r} (requests, limits)")
        if not isinstance(values, Mapping):
            raise ParamsError(f"{where}: {section} must be a mapping of resource to quantity")
        out[section] = {str(k): str(v) for k, v in values.items()}
    return out


def _yaml_mapping(where: str, raw: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: must be a YAML mapping, got {type(data).__name__}")
    return data


# ConfigMap key -> (Params field, parser)
_TYPED: Final[Mapping[str, tuple[str, Callable[[str, str], Any]]]] = {
    "minReplicas": ("min_replicas", _int(1)),
    "maxReplicas": ("max_replicas", _int(1)),
    "autoscaling": ("autoscaling", _bool),
    "cpuTargetUtilization": ("cpu_target_utilization", _optional_int(1, 100)),
    "requestsPerSecondTarget": ("requests_per_second_target", _optional_int(1)),
    "requestsPerSecondMetric": ("requests_per_second_metric", _metric_name),
    "scaleDownStabilizationSeconds": ("scale_down_stabilization_seconds", _int(0, 3600)),
    "scaleDownPods": ("scale_down_pods", _int(1)),
    "scaleDownPeriodSeconds": ("scale_down_period_seconds", _int(1, 1800)),
    "disruptionBudget": ("pod_disruption_budget", _bool),
    "minAvailable": ("min_available", _int(0)),
    "resources": ("resources", _resources),
    "terminationGracePeriodSeconds": ("termination_grace_period_seconds", _int(30, 3600)),
    "image": ("image", _image),
}

ALLOWED_KEYS: Final = tuple(_TYPED) + OVERLAY_KEYS


def parse_params(configmap: Mapping[str, Any]) -> Params:
    """Params from a ConfigMap dict; raises ParamsError naming the ConfigMap and key on bad input."""
    meta = configmap.get("metadata") or {}
    cm = f"ConfigMap {meta.get('namespace', '')}/{meta.get('name', '')}"
    data = configmap.get("data") or {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"{cm}: data must be a mapping")
    values: dict[str, Any] = {}
    overlays: dict[str, Mapping[str, Any]] = {}
    for key in sorted(data):
        raw = data[key]
        where = f'{cm} key "{key}"'
        if not isinstance(raw, str):
            raise ParamsError(f"{where}: value must be a string")
        if key in OVERLAY_KEYS:
            overlays[key] = _yaml_mapping(where, raw)
            continue
        if key not in _TYPED:
            raise ParamsError(f"{where}: unknown key; allowed keys are {', '.join(ALLOWED_KEYS)}")
        attr, parse = _TYPED[key]
        values[attr] = parse(where, raw)
    params = replace(Params(), overlays=overlays, **values)
    if params.min_replicas > params.max_replicas:
        raise ParamsError(
            f"{cm}: minReplicas ({params.min_replicas}) is greater than maxReplicas ({params.max_replicas})"
        )
    if (
        params.autoscaling
        and params.cpu_target_utilization is None
        and params.requests_per_second_target is None
    ):
        raise ParamsError(
            f"{cm}: autoscaling needs a metric: set cpuTargetUtilization or requestsPerSecondTarget"
        )
    for key, enabled, switch in (
        ("horizontalPodAutoscaler", params.autoscaling, "autoscaling"),
        ("podDisruptionBudget", params.pod_disruption_budget, "disruptionBudget"),
    ):
        if key in overlays and not enabled:
            raise ParamsError(
                f'{cm} key "{key}": an overlay for an object that {switch}=false disables'
            )
    if (
        params.pod_disruption_budget
        and params.min_available >= max(params.min_replicas, 1)
        and params.min_available > 1
    ):
        # A PDB that never allows an eviction blocks node drains forever.
        raise ParamsError(
            f"{cm}: minAvailable ({params.min_available}) must be less than minReplicas "
            f"({params.min_replicas}) or node drains block"
        )
    return params

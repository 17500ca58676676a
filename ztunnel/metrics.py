"""ztunnel's Prometheus metrics: Istio's TCP metric names and standard labels, on its own registry.

Owns the metric definitions, the pure mapping from a connection's endpoints to Istio's standard label
set (``traffic_labels``; unknown values are ``"unknown"``, as Istio), and the HTTP handlers for
``/metrics`` and ``/stats/prometheus`` (served on 15020 by the app).

Byte counters follow Istio's meaning for both reporters: ``istio_tcp_received_bytes_total`` counts
bytes of the request direction (client to server), ``istio_tcp_sent_bytes_total`` the response
direction (server to client).

In-pod mode adds the node agent's ``workload_manager_*`` gauges and counters (Istio's names), read
from the agent's counters at scrape time (``watch_workload_manager``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields, replace

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ztunnel.identity.spiffe import SpiffeId
from ztunnel.state.model import Service, Workload

UNKNOWN = "unknown"
BUILD_TAG = "0.1.0"


class Reporter(enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class ResponseFlags(enum.Enum):
    """Istio's TCP ``response_flags`` values ztunnel reports."""

    NONE = "-"
    DENY = "DENY"  # authorization policy
    CONNECT = "CONNECT"  # upstream connect failed
    TLS_FAILURE = "TLS_FAILURE"
    H2_HANDSHAKE_FAILURE = "H2_HANDSHAKE_FAILURE"
    NETWORK_POLICY = "NETWORK_POLICY"
    IDENTITY_ERROR = "IDENTITY_ERROR"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficLabels:
    """Istio's standard TCP labels (``CommonTrafficLabels``), in exposition order."""

    reporter: str
    source_workload: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_cluster: str = UNKNOWN
    destination_service: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_cluster: str = UNKNOWN
    request_protocol: str = "tcp"
    response_flags: str = ResponseFlags.NONE.value
    connection_security_policy: str = UNKNOWN

    # Both run per connection on the proxy path: no dataclasses.asdict (a deep copy, ~16% CPU).
    def with_flags(self, flags: ResponseFlags) -> TrafficLabels:
        if self.response_flags == flags.value:
            return self
        return replace(self, response_flags=flags.value)

    def values(self) -> dict[str, str]:
        """The labels by name, in exposition order."""
        return {name: getattr(self, name) for name in LABEL_NAMES}

    def ordered(self) -> tuple[str, ...]:
        """The label values in ``LABEL_NAMES`` order (for ``Counter.labels(*values)``)."""
        return tuple(getattr(self, name) for name in LABEL_NAMES)


LABEL_NAMES = tuple(f.name for f in fields(TrafficLabels))


def _or_unknown(value: str | None) -> str:
    return value if value else UNKNOWN


def _workload_name(w: Workload) -> str:
    return w.workload_name or w.name


def traffic_labels(
    *,
    reporter: Reporter,
    source: Workload | None,
    source_identity: SpiffeId | None,
    destination: Workload | None,
    destination_identity: SpiffeId | None,
    service: Service | None,
    mtls: bool,
    flags: ResponseFlags = ResponseFlags.NONE,
) -> TrafficLabels:
    """The label set for one connection (pure). ``source_principal`` only from a real mTLS peer."""
    src: dict[str, str] = {}
    if source is not None:
        app = source.canonical_name or _workload_name(source)
        src = {
            "source_workload": _or_unknown(_workload_name(source)),
            "source_canonical_service": _or_unknown(app),
            "source_canonical_revision": source.canonical_revision or "latest",
            "source_workload_namespace": _or_unknown(source.namespace),
            "source_app": _or_unknown(app),
            "source_version": source.canonical_revision or "latest",
            "source_cluster": _or_unknown(source.cluster_id),
        }
    dst: dict[str, str] = {}
    if destination is not None:
        app = destination.canonical_name or _workload_name(destination)
        dst = {
            "destination_workload": _or_unknown(_workload_name(destination)),
            "destination_canonical_service": _or_unknown(app),
            "destination_canonical_revision": destination.canonical_revision or "latest",
            "destination_workload_namespace": _or_unknown(destination.namespace),
            "destination_app": _or_unknown(app),
            "destination_version": destination.canonical_revision or "latest",
            "destination_cluster": _or_unknown(destination.cluster_id),
        }
    svc: dict[str, str] = {}
    if service is not None:
        svc = {
            "destination_service": service.hostname,
            "destination_service_namespace": service.namespace,
            "destination_service_name": service.name,
        }
    return TrafficLabels(
        reporter=reporter.value,
        source_principal=source_identity.uri if source_identity is not None else UNKNOWN,
        destination_principal=(
            destination_identity.uri if destination_identity is not None else UNKNOWN
        ),
        response_flags=flags.value,
        connection_security_policy="mutual_tls" if mtls else UNKNOWN,
        **src,
        **dst,
        **svc,
    )


class Metrics:
    """All of ztunnel's metrics, on a registry of its own (tests create as many as they like)."""

    def __init__(self, *, component: str = "ztunnel", tag: str = BUILD_TAG) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened",
            "Connections opened",
            LABEL_NAMES,
            registry=r,
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "Connections closed", LABEL_NAMES, registry=r
        )
        self.failed = Counter(
            "istio_tcp_connections_failed",
            "Connections that failed before data flowed (denied, upstream errors)",
            LABEL_NAMES,
            registry=r,
        )
        self.sent_bytes = Counter(
            "istio_tcp_sent_bytes",
            "Bytes of the response direction (server to client)",
            LABEL_NAMES,
            registry=r,
        )
        self.received_bytes = Counter(
            "istio_tcp_received_bytes",
            "Bytes of the request direction (client to server)",
            LABEL_NAMES,
            registry=r,
        )
        self.unknown_policy_denials = Counter(
            "istio_unknown_policy_denials",
            "Connections denied because a workload references a policy that is not known",
            ("policy",),
            registry=r,
        )
        self.config_reload_failures = Counter(
            "istio_config_reload_failures",
            "Rejected configuration reloads (the previous configuration stayed in force)",
            ("source",),
            registry=r,
        )
        self.late_denials = Counter(
            "istio_authorization_late_rejections",
            "Live connections closed because a policy change now denies them",
            ("reporter",),
            registry=r,
        )
        self.build = Gauge("istio_build", "Build information", ("component", "tag"), registry=r)
        self.build.labels(component=component, tag=tag).set(1)
        # Children per label set, made on first use: ``Counter.labels`` validates and locks on
        # every call, and label sets repeat (one per pair of workloads and flags).
        self._children: dict[Counter, dict[TrafficLabels, Counter]] = {
            m: {}
            for m in (
                self.opened,
                self.closed,
                self.failed,
                self.sent_bytes,
                self.received_bytes,
            )
        }

    def _child(self, metric: Counter, labels: TrafficLabels) -> Counter:
        cache = self._children[metric]
        child = cache.get(labels)
        if child is None:
            child = cache[labels] = metric.labels(*labels.ordered())
        return child

    # -- connection life cycle ---------------------------------------------------------------

    def connection_opened(self, labels: TrafficLabels) -> None:
        self._child(self.opened, labels).inc()

    def connection_closed(
        self, labels: TrafficLabels, *, request_bytes: int, response_bytes: int
    ) -> None:
        self._child(self.closed, labels).inc()
        if request_bytes:
            self._child(self.received_bytes, labels).inc(request_bytes)
        if response_bytes:
            self._child(self.sent_bytes, labels).inc(response_bytes)

    def connection_failed(self, labels: TrafficLabels) -> None:
        self._child(self.failed, labels).inc()

    def unknown_policy_denied(self, policies: tuple[str, ...]) -> None:
        for policy in policies:
            self.unknown_policy_denials.labels(policy=policy).inc()

    def config_reload_failed(self, source: str) -> None:
        self.config_reload_failures.labels(source=source).inc()

    def watch_workload_manager(self, counters: Callable[[], Mapping[str, object]]) -> None:
        """Export the node agent's counters (its ``snapshot()["counters"]``) on every scrape."""
        self.registry.register(_WorkloadManagerCollector(counters))

    def watch_hbone_listeners(self, counters: Callable[[], Mapping[str, int]]) -> None:
        """Export the HBONE listeners' own counters (caps, guard trips) on every scrape."""
        self.registry.register(_HboneListenerCollector(counters))

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 if absent); ``name`` is the sample name, e.g. ``..._total``."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def routes(self) -> list[web.RouteDef]:
        async def handle(_request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return [web.get("/metrics", handle), web.get("/stats/prometheus", handle)]


class _WorkloadManagerCollector:
    """ztunnel's ``workload_manager_*`` metrics from the node agent's counters."""

    GAUGES = {
        "active_proxy_count": "Pods whose in-pod proxies are up",
        "pending_proxy_count": "Pods whose start failed and is being retried",
    }
    COUNTERS = {
        "proxies_started": "In-pod proxies started",
        "proxies_stopped": "In-pod proxies stopped",
        "rules_repaired": "Pods whose capture rules a periodic recheck found drifted and rewrote",
        "netns_changed": "Pods restarted because their netns path was recreated (new dev/inode)",
        "rechecks": "Periodic rechecks of running pods completed",
    }

    def __init__(self, counters: Callable[[], Mapping[str, object]]) -> None:
        self._counters = counters

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._counters())

    def _families(self, values: Mapping[str, object]) -> Iterator[Metric]:
        def number(key: str) -> float:
            v = values.get(key, 0)
            return float(v) if isinstance(v, int | float) else 0.0

        for key, doc in self.GAUGES.items():
            yield GaugeMetricFamily(f"workload_manager_{key}", doc, value=number(key))
        for key, doc in self.COUNTERS.items():
            yield CounterMetricFamily(f"workload_manager_{key}", doc, value=number(f"{key}_total"))


class _HboneListenerCollector:
    """``ztunnel_hbone_*``: what the HBONE listeners accepted, refused and cut off.

    Not Istio metrics (Istio's ztunnel has no connection caps or H2 guard); named for this project.
    """

    def __init__(self, counters: Callable[[], Mapping[str, int]]) -> None:
        self._counters = counters

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._counters())

    @staticmethod
    def _families(values: Mapping[str, int]) -> Iterator[Metric]:
        def number(key: str) -> float:
            return float(values.get(key, 0))

        yield CounterMetricFamily(
            "ztunnel_hbone_connections_accepted",
            "TCP connections accepted on HBONE listeners",
            value=number("connections_accepted"),
        )
        yield CounterMetricFamily(
            "ztunnel_hbone_handshake_failures",
            "HBONE connections that failed TLS or the peer identity check",
            value=number("handshake_failures"),
        )
        rejected = CounterMetricFamily(
            "ztunnel_hbone_connections_rejected",
            "HBONE connections closed at once by a connection cap",
            labels=("cap",),
        )
        rejected.add_metric(("global",), number("connections_rejected_global"))
        rejected.add_metric(("identity",), number("connections_rejected_identity"))
        yield rejected
        yield GaugeMetricFamily(
            "ztunnel_hbone_connections_open",
            "HBONE connections open now",
            value=number("connections_open"),
        )
        yield CounterMetricFamily(
            "ztunnel_hbone_guard_trips",
            "HBONE connections ended by an HTTP/2 guard limit (floods, resets, header abuse)",
            value=number("guard_trips"),
        )

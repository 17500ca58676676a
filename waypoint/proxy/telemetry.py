"""Request telemetry of the waypoint: Istio's HTTP metrics, one access-log line per request, tracing.

Owns the metric definitions (``istio_requests_total``, ``istio_request_duration_milliseconds``,
``istio_request_bytes``, ``istio_response_bytes``) on a registry of its own with Istio's standard
labels (``reporter="waypoint"``; source/destination workload, namespace, principal, app, version;
``destination_service*``; ``request_protocol`` http|grpc; ``response_code``;
``grpc_response_status``; ``response_flags``; ``connection_security_policy``), the access-log
record and its ``key=value`` rendering, and W3C ``traceparent`` handling (`child_traceparent` is
pure: ids come in through a callable).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ztunnel.identity.spiffe import SpiffeId
from ztunnel.metrics import Reporter, traffic_labels
from ztunnel.state.model import Service, Workload

ACCESS_LOGGER = logging.getLogger("access")
REPORTER = "waypoint"
UNKNOWN = "unknown"

LABEL_NAMES = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
# Istio's default histogram buckets (milliseconds; bytes).
DURATION_BUCKETS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1e6, 1e7, 1e8, 1e9)

# Envoy response flags used here.
FLAG_NONE = "-"
FLAG_RBAC = "RBAC"
FLAG_NO_ROUTE = "NR"
FLAG_NO_HEALTHY = "UH"
FLAG_UPSTREAM_CONNECT = "UF"
FLAG_UPSTREAM_TIMEOUT = "UT"
FLAG_UPSTREAM_RESET = "UR"
FLAG_DOWNSTREAM_RESET = "DR"
FLAG_RETRY_LIMIT = "URX"
FLAG_BAD_REQUEST = "DPE"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """What is known about one finished request."""

    source_workload: Workload | None
    source_identity: SpiffeId | None
    source_addr: str
    destination_workload: Workload | None
    destination_identity: SpiffeId | None
    destination_addr: str | None
    service: Service | None
    hbone_authority: str
    method: str
    path: str
    authority: str
    protocol: str
    """``HTTP/1.1`` or ``HTTP/2``."""
    grpc: bool
    status: int
    grpc_status: str | None
    flags: str
    request_bytes: int
    response_bytes: int
    duration: float
    """Seconds."""
    route: str | None = None
    policy: str | None = None
    traceparent: str | None = None
    request_id: str | None = None
    user_agent: str | None = None
    attempts: int = 1
    error: str | None = None


def request_labels(record: RequestRecord) -> dict[str, str]:
    """Istio's standard HTTP labels for a request (pure)."""
    base = traffic_labels(
        reporter=Reporter.DESTINATION,
        source=record.source_workload,
        source_identity=record.source_identity,
        destination=record.destination_workload,
        destination_identity=record.destination_identity,
        service=record.service,
        mtls=record.source_identity is not None,
    ).values()
    base["reporter"] = REPORTER
    base["request_protocol"] = "grpc" if record.grpc else "http"
    base["response_code"] = str(record.status)
    base["grpc_response_status"] = record.grpc_status or ""
    base["response_flags"] = record.flags
    return {name: base.get(name, UNKNOWN) for name in LABEL_NAMES}


def format_access(record: RequestRecord) -> str:
    """One ``key=value`` line (values with spaces or quotes are quoted)."""
    fields: list[tuple[str, object]] = [
        ("src.addr", record.source_addr),
        (
            "src.workload",
            record.source_workload.name if record.source_workload else None,
        ),
        (
            "src.namespace",
            record.source_workload.namespace if record.source_workload else None,
        ),
        ("src.identity", record.source_identity.uri if record.source_identity else None),
        ("dst.hbone_addr", record.hbone_authority),
        ("dst.service", record.service.hostname if record.service else None),
        ("dst.addr", record.destination_addr),
        (
            "dst.workload",
            record.destination_workload.name if record.destination_workload else None,
        ),
        (
            "dst.identity",
            record.destination_identity.uri if record.destination_identity else None,
        ),
        ("method", record.method),
        ("path", record.path),
        ("authority", record.authority),
        ("protocol", record.protocol),
        ("response_code", record.status),
        ("grpc_status", record.grpc_status),
        ("response_flags", record.flags),
        ("route", record.route),
        ("policy", record.policy),
        ("attempts", record.attempts),
        ("bytes_recv", record.request_bytes),
        ("bytes_sent", record.response_bytes),
        ("duration", f"{record.duration * 1000:.0f}ms"),
        ("traceparent", record.traceparent),
        ("x_request_id", record.request_id),
        ("user_agent", record.user_agent),
        ("error", record.error),
    ]
    parts = []
    for key, value in fields:
        if value is None or value == "":
            continue
        text = str(value)
        if any(c in text for c in ' "=') or not text:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return "request complete " + " ".join(parts)


MAX_CACHED_LABEL_SETS = 4096


@dataclass(frozen=True, slots=True)
class _Children:
    """The four metric children of one label set."""

    requests: Any
    duration: Any
    request_bytes: Any
    response_bytes: Any


_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def child_traceparent(incoming: str | None, new_id: Callable[[int], str]) -> str:
    """The ``traceparent`` to send upstream: same trace and flags, our own span id.

    A missing or invalid header (bad format, version ff, all-zero ids) starts a new sampled trace.
    `new_id(n)` returns n random bytes as lower-case hex.
    """
    if incoming is not None:
        m = _TRACEPARENT.match(incoming.strip().lower())
        if m is not None:
            version, trace_id, parent, flags = m.groups()
            if version != "ff" and trace_id != "0" * 32 and parent != "0" * 16:
                return f"00-{trace_id}-{new_id(8)}-{flags}"
    return f"00-{new_id(16)}-{new_id(8)}-01"


class Telemetry:
    """The waypoint's metrics registry and access log."""

    def __init__(self, *, access_log: Callable[[str], None] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("istio_requests", "Requests", LABEL_NAMES, registry=r)
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration",
            LABEL_NAMES,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request sizes", LABEL_NAMES, buckets=BYTES_BUCKETS, registry=r
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response sizes",
            LABEL_NAMES,
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.tcp_connections = Counter(
            "istio_tcp_connections_opened",
            "Non-HTTP connections passed through at L4",
            ("reporter", "destination_service"),
            registry=r,
        )
        self.config_errors = Gauge(
            "waypoint_config_rejected_objects",
            "Configuration objects rejected in the configuration in force",
            ("source",),
            registry=r,
        )
        self.build = Gauge("istio_build", "Build information", ("component", "tag"), registry=r)
        self.build.labels(component="waypoint", tag="0.1.0").set(1)
        self._access = access_log
        # Metric children per label-input key: building 25 labels and four ``labels(**...)`` calls
        # (each hashing the label tuple under a lock) was a large share of a request's CPU.
        self._children: dict[tuple[object, ...], _Children] = {}

    def _children_for(self, record: RequestRecord) -> _Children:
        # The key holds the (frozen) objects themselves, so equal keys give identical labels.
        key: tuple[object, ...] = (
            record.source_workload,
            record.source_identity,
            record.destination_workload,
            record.destination_identity,
            record.service,
            record.grpc,
            record.status,
            record.grpc_status,
            record.flags,
        )
        try:
            children = self._children.get(key)
        except TypeError:  # an unhashable field (never with the model's frozen classes)
            children = None
            key = ()
        if children is None:
            labels = request_labels(record)
            children = _Children(
                self.requests.labels(**labels),
                self.duration.labels(**labels),
                self.request_bytes.labels(**labels),
                self.response_bytes.labels(**labels),
            )
            if key:
                if len(self._children) >= MAX_CACHED_LABEL_SETS:
                    self._children.clear()  # bounded: workload churn leaves stale keys behind
                self._children[key] = children
        return children

    def record(self, record: RequestRecord) -> None:
        children = self._children_for(record)
        children.requests.inc()
        children.duration.observe(record.duration * 1000.0)
        children.request_bytes.observe(record.request_bytes)
        children.response_bytes.observe(record.response_bytes)
        if self._access is not None:
            self._access(format_access(record))
        elif ACCESS_LOGGER.isEnabledFor(logging.INFO):
            # Formatting only when the line will be written (the logger is off in the bench).
            ACCESS_LOGGER.info("%s", format_access(record))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v

    def total(self, name: str, **match: str) -> float:
        """Sum of a sample over every label set that has the given label values."""
        total = 0.0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in match.items()):
                    total += sample.value
        return total

    def routes(self) -> list[web.RouteDef]:
        async def handle(_request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

        return [web.get("/metrics", handle), web.get("/stats/prometheus", handle)]

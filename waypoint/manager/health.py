"""The manager's monitoring endpoint: `/healthz`, `/readyz` and `/metrics` on one HTTP port (15014).

Owns `HealthServer` (aiohttp) and `ManagerCollector` (a prometheus-client collector). Nothing is
instrumented by hand: the collector reads the live counters the components already keep
(`WaypointManager.reconciles`, `XdsServer.clients`, `IstioCaService.issued`, ...) through a
`snapshot()` callable at scrape time, so a second replica in the same Python process (tests) gets
its own registry and numbers. `parse_listen_address` is the pure flag parser.

* `/healthz` (liveness): 200 while the event loop answers and `live()` holds.
* `/readyz` (readiness): 200 once `ready()` holds (the watch caches listed and the first xDS
  snapshot is published); 503 with the reason before. Non-leader replicas are ready too: they
  serve xDS and certificates.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_MONITORING_PORT = 15014  # istiod's monitoring port


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSnapshot:
    """The numbers /metrics reports, read from the running components at scrape time."""

    leader: bool = False
    reconciles: int = 0
    reconcile_errors: int = 0
    xds_clients: int = 0
    xds_acks: int = 0
    xds_nacks: int = 0
    certificates_signed: int = 0
    certificates_refused: int = 0
    informer_relists: dict[str, int] = field(default_factory=dict)


class ManagerCollector(Collector):
    """Exposes a `MetricsSnapshot` as Prometheus metrics (names prefixed `waypoint_manager_`)."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        yield GaugeMetricFamily(
            "waypoint_manager_leader",
            "1 while this replica holds the Lease and runs the waypoint controller",
            value=1 if s.leader else 0,
        )
        yield CounterMetricFamily(
            "waypoint_manager_reconciles",
            "Waypoint controller reconciles that succeeded",
            s.reconciles,
        )
        yield CounterMetricFamily(
            "waypoint_manager_reconcile_errors",
            "Waypoint controller reconciles that failed (retried with backoff)",
            s.reconcile_errors,
        )
        yield GaugeMetricFamily(
            "waypoint_manager_xds_clients", "Connected delta-xDS clients", value=s.xds_clients
        )
        yield CounterMetricFamily("waypoint_manager_xds_acks", "xDS responses ACKed", s.xds_acks)
        yield CounterMetricFamily(
            "waypoint_manager_xds_nacks", "xDS responses NACKed by a client", s.xds_nacks
        )
        yield CounterMetricFamily(
            "waypoint_manager_certificates_signed",
            "Workload certificates issued by the CA",
            s.certificates_signed,
        )
        yield CounterMetricFamily(
            "waypoint_manager_certificates_refused",
            "CA requests refused (authentication, authorization or a bad CSR)",
            s.certificates_refused,
        )
        relists = CounterMetricFamily(
            "waypoint_manager_informer_relists",
            "Full lists of a watched kind (1 at start, +1 per 410 Gone or broken watch)",
            labels=["resource"],
        )
        for resource, count in sorted(s.informer_relists.items()):
            relists.add_metric([resource], count)
        yield relists


def parse_listen_address(value: str, *, flag: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); a clear error names the flag otherwise."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{flag}: {value!r} is not HOST:PORT (port 0-65535)")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{flag}: {value!r}: {host!r} is not an IP address") from None
    return host, int(port_text)


class HealthServer:
    """aiohttp server for /healthz, /readyz and /metrics."""

    def __init__(
        self,
        *,
        ready: Callable[[], str | None],
        snapshot: Callable[[], MetricsSnapshot],
        live: Callable[[], str | None] = lambda: None,
    ) -> None:
        """`ready()`/`live()` return None when fine, else the reason the probe fails."""
        self._ready = ready
        self._live = live
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ManagerCollector(snapshot))
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    @staticmethod
    def _probe(problem: str | None) -> web.Response:
        if problem is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"{problem}\n")

    async def _healthz(self, _request: web.Request) -> web.Response:
        return self._probe(self._live())

    async def _readyz(self, _request: web.Request) -> web.Response:
        return self._probe(self._ready())

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, address: str) -> int:
        """Listen on `address` (HOST:PORT, port 0 picks one); returns the bound port."""
        host, port = parse_listen_address(address, flag="--monitoring-address")
        if self._runner is not None:
            raise RuntimeError("health server already started")
        runner = web.AppRunner(self._app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise OSError(f"--monitoring-address {address}: cannot listen: {err}") from err
        self._runner = runner
        bound = runner.addresses[0]
        self.port = int(bound[1])
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

"""The waypoint's data path: HBONE tunnel in, HTTP parsed, authorized, routed, HBONE out.

Owns `WaypointProxy`: the ``on_connect`` callback of the HBONE server (resolve the CONNECT target
to the Service VIP or pod the client addressed, then accept), protocol detection on the first bytes
of each tunnel (HTTP/2 prior knowledge, HTTP/1.1, else TCP pass-through under L4 policy), and the
per-request pipeline: normalise (400 on ambiguity) -> authorize (403, gRPC PERMISSION_DENIED) ->
route with the pure core -> pick an endpoint of the chosen backend per request (not per
connection) -> send upstream with timeouts, retries and mirrors -> apply response filters ->
record telemetry. Decisions are the core's (`normalize`, `authz`, `routing`); this module does I/O.

The HBONE server hands each accepted tunnel's `HboneStream` straight to the proxy
(``AcceptStream``): the HTTP layers read and write the stream itself, with no socketpair copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from waypoint.proxy import filters as fx
from waypoint.proxy.authz import AuthzContext, WaypointScope, evaluate
from waypoint.proxy.config import L7Config
from waypoint.proxy.exchange import (
    BytesBody,
    Headers,
    InboundRequest,
    ReplayBody,
    ResponseSink,
    UpstreamResponse,
    end_to_end,
)
from waypoint.proxy.http1 import H1Client, HttpProtocolError, serve_http1
from waypoint.proxy.http2 import PREFACE, H2Conn, H2StreamError, serve_http2
from waypoint.proxy.l4authz import evaluate_tcp
from waypoint.proxy.normalize import (
    DEFAULT_OPTIONS,
    NormalizationOptions,
    RequestRejectedError,
    normalize_request,
)
from waypoint.proxy.request import Destination, RawRequest, Request
from waypoint.proxy.routes import BackendRef, RetryPolicy, RouteTable
from waypoint.proxy.routing import (
    GRPC_PERMISSION_DENIED,
    GRPC_STATUS_FOR_HTTP,
    DirectResponse,
    Forward,
    RandomSource,
    Redirect,
    decide,
)
from waypoint.proxy.streams import ByteStream, HboneByteStream, PrefixedStream, splice
from waypoint.proxy.telemetry import (
    FLAG_BAD_REQUEST,
    FLAG_DOWNSTREAM_RESET,
    FLAG_NO_HEALTHY,
    FLAG_NO_ROUTE,
    FLAG_NONE,
    FLAG_RBAC,
    FLAG_UPSTREAM_CONNECT,
    FLAG_UPSTREAM_RESET,
    FLAG_UPSTREAM_TIMEOUT,
    RequestRecord,
    Telemetry,
    child_traceparent,
)
from waypoint.proxy.upstream import Endpoint, UpstreamPool, pick_endpoint
from ztunnel.hbone.errors import HboneError
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.proxy.h2io import HboneStream
from ztunnel.proxy.hbone_server import AcceptStream, Reject, TunnelRequest
from ztunnel.state.model import HealthStatus, Service, Workload
from ztunnel.state.store import WorkloadStore

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
WORKLOAD_KIND = "Workload"
# Errors that mean "this upstream attempt failed" (connect, TLS, tunnel, framing, reset).
UPSTREAM_ERRORS = (OSError, HboneError, H2StreamError, HttpProtocolError, ConnectionError)
_HTTP1_LINE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32} [^ \r\n]+ HTTP/1\.[01]\r?\n")
_TOKEN_START = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}( [^ \r\n]*( [^\r\n]*)?)?$")
MAX_SNIFF = 8192


def detect_protocol(prefix: bytes) -> str | None:
    """``"h2"``, ``"http/1.1"``, ``"tcp"``, or None when more bytes are needed (pure)."""
    if not prefix:
        return None
    if prefix.startswith(PREFACE):
        return "h2"
    if PREFACE.startswith(prefix):
        return None
    if _HTTP1_LINE.match(prefix):
        return "http/1.1"
    if b"\n" not in prefix and len(prefix) < MAX_SNIFF and _TOKEN_START.match(prefix):
        return None
    return "tcp"


def forwarded_for(value: str | None) -> IPAddress | None:
    """The first ``for=`` address of a ``Forwarded`` header (RFC 7239), if it is an IP."""
    if not value:
        return None
    for element in value.split(","):
        for pair in element.split(";"):
            key, _, raw = pair.strip().partition("=")
            if key.lower() != "for":
                continue
            text = raw.strip().strip('"')
            if text.startswith("["):
                text = text[1 : text.find("]")] if "]" in text else text[1:]
            elif text.count(":") == 1:
                text = text.split(":", 1)[0]
            with contextlib.suppress(ValueError):
                return ipaddress.ip_address(text)
            return None
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxySettings:
    scope: WaypointScope
    cluster_domain: str = "cluster.local"
    detect_timeout: float = 1.0
    """How long to wait for a client's first bytes before treating a stream as TCP."""
    retry_buffer: int = 1024 * 1024
    """Request bytes kept for retries and mirrors (Envoy's per-request buffer limit)."""
    default_retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=2, codes=(), backoff=0.025)
    )
    """Used when the route sets none: connect failures and resets before a response only."""
    default_backoff: float = 0.025
    normalization: NormalizationOptions = DEFAULT_OPTIONS
    idle_timeout: float = 300.0
    mirror_timeout: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TunnelInfo:
    """What the HBONE CONNECT told us about one inbound stream."""

    hbone_authority: str
    destination: Destination
    service: Service | None
    target_workload: Workload | None
    """Set when the client addressed a pod, not a Service VIP."""
    peer_identity: SpiffeId | None
    source_ip: IPAddress | None
    source_addr: str
    destination_ip: IPAddress | None


class Unroutable(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class _Outcome:
    """Mutable facts collected while one request is handled (for telemetry)."""

    status: int = 0
    flags: str = FLAG_NONE
    grpc_status: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    endpoint: Endpoint | None = None
    service: Service | None = None
    route: str | None = None
    policy: str | None = None
    attempts: int = 0
    error: str | None = None
    traceparent: str | None = None


class _CountingBody:
    """Counts request bytes as they are read."""

    def __init__(self, inner: InboundRequest, outcome: _Outcome) -> None:
        self._inner = inner.body
        self._outcome = outcome

    async def read(self) -> bytes:
        data = await self._inner.read()
        self._outcome.request_bytes += len(data)
        return data

    @property
    def trailers(self) -> Headers:
        return self._inner.trailers


def _random_hex(nbytes: int) -> str:
    return secrets.token_hex(nbytes)


class WaypointProxy:
    """Serves HBONE tunnels addressed to bound Services; see the module docstring."""

    def __init__(
        self,
        *,
        store: WorkloadStore,
        upstream: UpstreamPool,
        telemetry: Telemetry,
        settings: ProxySettings,
        config: L7Config | None = None,
        rng: RandomSource | None = None,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.telemetry = telemetry
        self.settings = settings
        self.config = config or L7Config(routes=RouteTable.build(), policies=())
        self.rng: RandomSource = rng or random.Random()
        self._draining = False
        self._tunnels: set[asyncio.Task[None]] = set()
        self._h2_conns: set[H2Conn] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._index_version = -1
        self._by_name: dict[tuple[str, str], Service] = {}
        self._endpoint_cache: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        self.requests_handled = 0

    # ------------------------------------------------------------------ configuration
    def set_config(self, config: L7Config) -> None:
        """Swap in a new route/policy set (atomically: one reference)."""
        self.config = config

    @property
    def draining(self) -> bool:
        return self._draining

    def start_drain(self) -> None:
        """New responses close their HTTP/1.1 connection; idle HTTP/2 connections are closed."""
        self._draining = True
        for conn in list(self._h2_conns):
            if not conn.streams:
                conn.close()

    async def wait_idle(self, timeout: float) -> None:
        pending = [t for t in self._tunnels if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def close(self) -> None:
        for task in list(self._tunnels) + list(self._background):
            task.cancel()
        tasks = list(self._tunnels) + list(self._background)
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    # ------------------------------------------------------------------ store lookups
    def _reindex(self) -> None:
        if self._index_version == self.store.version:
            return
        self._index_version = self.store.version
        self._by_name = {(s.namespace, s.name): s for s in self.store.services()}
        self._endpoint_cache = {}
        live = {w.uid for w in self.store.workloads()}
        for uid in self.upstream.known_endpoints() - live:
            self.upstream.forget_endpoint(uid)

    def service_named(self, namespace: str, name: str) -> Service | None:
        self._reindex()
        return self._by_name.get((namespace, name))

    def _backend_valid(self, ref: BackendRef) -> bool:
        return self.service_named(ref.namespace, ref.name) is not None

    def _endpoint_for(self, workload: Workload, port: int) -> Endpoint | None:
        if not workload.addresses:
            return None
        return Endpoint(
            workload=workload,
            uid=workload.uid,
            ip=workload.addresses[0],
            port=port,
            identity=workload.identity() if workload.is_hbone else None,
        )

    def endpoints(self, service: Service, port: int) -> tuple[Endpoint, ...]:
        """Healthy endpoints of `service` for its `port`, with each pod's target port."""
        self._reindex()
        key = (service.key, port)
        cached = self._endpoint_cache.get(key)
        if cached is not None:
            return cached
        out: list[Endpoint] = []
        for w in self.store.endpoints(service.key):
            if w.status is not HealthStatus.HEALTHY:
                continue
            target = service.ports.get(port, port) or port
            per_endpoint = w.services.get(service.key)
            if per_endpoint and port in per_endpoint and per_endpoint[port]:
                target = per_endpoint[port]
            ep = self._endpoint_for(w, target)
            if ep is not None:
                out.append(ep)
        result = tuple(out)
        self._endpoint_cache[key] = result
        return result

    def resolve(self, request: TunnelRequest) -> TunnelInfo:
        """The Service (or pod) a CONNECT addresses; Unroutable when there is none."""
        authority = request.authority
        if authority.is_hostname:
            raise Unroutable(400, f"hostname authority {authority} is not supported here")
        ip = authority.host
        assert not isinstance(ip, str)
        port = authority.port
        peer = request.peer_address
        peer_ip: IPAddress | None = None
        peer_text = "unknown"
        if isinstance(peer, tuple) and peer:
            with contextlib.suppress(ValueError):
                peer_ip = ipaddress.ip_address(peer[0])
            peer_text = f"{peer[0]}:{peer[1]}" if len(peer) > 1 else str(peer[0])
        source_ip = forwarded_for(request.header("forwarded")) or peer_ip
        service = self.store.service_by_vip(ip)
        target: Workload | None = None
        if service is not None:
            if port not in service.ports:
                raise Unroutable(503, f"service {service.hostname} has no port {port}")
            destination = Destination(
                namespace=service.namespace,
                name=service.name,
                hostname=service.hostname,
                port=port,
            )
        else:
            target = self.store.workload_by_ip(ip)
            if target is None:
                raise Unroutable(503, f"no service or workload at {authority}")
            destination = self._pod_destination(target, port)
            service = self.service_named(destination.namespace, destination.name)
        return TunnelInfo(
            hbone_authority=str(authority),
            destination=destination,
            service=service,
            target_workload=target,
            peer_identity=request.peer_identity,
            source_ip=source_ip,
            source_addr=peer_text if source_ip is None else str(source_ip),
            destination_ip=ip,
        )

    def _pod_destination(self, workload: Workload, port: int) -> Destination:
        # A pod addressed directly: routes of the Service it backs on that target port apply.
        for key, ports in workload.services.items():
            service = self.store.service_by_key(key)
            if service is None:
                continue
            for svc_port, target in {**service.ports, **ports}.items():
                if (target or svc_port) == port:
                    return Destination(
                        namespace=service.namespace,
                        name=service.name,
                        hostname=service.hostname,
                        port=svc_port,
                    )
        return Destination(
            namespace=workload.namespace,
            name=workload.name,
            hostname=str(workload.addresses[0]) if workload.addresses else workload.name,
            port=port,
            kind=WORKLOAD_KIND,
        )

    # ------------------------------------------------------------------ tunnels
    async def on_connect(self, request: TunnelRequest) -> AcceptStream | Reject:
        """HboneServer callback: accept tunnels to known Services/pods, serve them in a task."""
        if self._draining:
            return Reject(status=503, reason="waypoint is draining")
        try:
            info = self.resolve(request)
        except Unroutable as err:
            log.info("HBONE CONNECT %s rejected: %s", request.authority, err.reason)
            return Reject(status=err.status, reason=err.reason)

        async def serve(stream: HboneStream) -> None:
            # Runs in the HBONE server's tunnel task: tracked so close()/wait_idle() see it.
            task = asyncio.current_task()
            if task is not None:
                self._tunnels.add(task)
            try:
                await self.serve_tunnel(HboneByteStream(stream), info)
            finally:
                if task is not None:
                    self._tunnels.discard(task)

        # The stream itself, not a socketpair: no extra copy and no syscalls per chunk.
        return AcceptStream(handler=serve)

    async def serve_tunnel(self, stream: ByteStream, info: TunnelInfo) -> None:
        """Detect the protocol of one tunnel and serve it until it ends."""
        try:
            prefix = b""
            kind: str | None = None
            try:
                async with asyncio.timeout(self.settings.detect_timeout):
                    while kind is None:
                        chunk = await stream.read()
                        if not chunk:
                            break
                        prefix += chunk
                        kind = detect_protocol(prefix)
            except TimeoutError:
                kind = "tcp"
            if kind is None and not prefix:
                return
            kind = kind or "tcp"

            async def handler(req: InboundRequest, sink: ResponseSink) -> None:
                await self.handle(req, sink, info)

            if kind == "h2":
                await serve_http2(
                    stream,
                    handler,
                    preface=prefix,
                    draining=lambda: self._draining,
                    register=self._register_h2,
                )
            elif kind == "http/1.1":
                await serve_http1(
                    PrefixedStream(prefix, stream),
                    handler,
                    draining=lambda: self._draining,
                    idle_timeout=self.settings.idle_timeout,
                )
            else:
                await self.serve_tcp(PrefixedStream(prefix, stream), info)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception:
            log.exception("tunnel %s failed", info.hbone_authority)
            stream.abort()
        finally:
            stream.close()

    def _register_h2(self, conn: H2Conn) -> None:
        self._h2_conns.add(conn)
        conn.closed.add_done_callback(lambda _: self._h2_conns.discard(conn))

    async def serve_tcp(self, stream: ByteStream, info: TunnelInfo) -> None:
        """Non-HTTP: L4 policy, then bytes to one endpoint of the addressed Service (or pod)."""
        started = time.monotonic()
        dest = info.destination
        decision = evaluate_tcp(
            self.config.policies,
            destination=dest,
            scope=self.settings.scope,
            source_principal=info.peer_identity.uri if info.peer_identity else None,
            source_ip=info.source_ip,
            destination_ip=info.destination_ip,
        )
        self.telemetry.tcp_connections.labels(
            reporter="waypoint", destination_service=dest.hostname
        ).inc()
        if not decision.allowed:
            log.info("TCP stream to %s denied: %s", info.hbone_authority, decision.reason)
            stream.abort()
            return
        endpoints = self._destination_endpoints(info, dest.port)
        ep = pick_endpoint(endpoints, self.upstream.active, self.rng)
        if ep is None:
            log.info("TCP stream to %s: no healthy endpoint", info.hbone_authority)
            stream.abort()
            return
        self.upstream.begin(ep)
        try:
            upstream = await self.upstream.dial(ep)
            sent, received = await splice(stream, upstream)
            log.getChild("tcp").debug(
                "TCP %s -> %s: %d bytes up, %d down in %.0fms",
                info.hbone_authority,
                ep.authority,
                sent,
                received,
                (time.monotonic() - started) * 1000,
            )
        except UPSTREAM_ERRORS as err:
            log.info("TCP stream to %s via %s failed: %s", info.hbone_authority, ep.authority, err)
            stream.abort()
        finally:
            self.upstream.end(ep)

    def _destination_endpoints(self, info: TunnelInfo, port: int) -> tuple[Endpoint, ...]:
        if info.target_workload is not None:
            target_port = int(info.hbone_authority.rsplit(":", 1)[1])
            ep = self._endpoint_for(info.target_workload, target_port)
            return (ep,) if ep is not None else ()
        if info.service is None:
            return ()
        return self.endpoints(info.service, port)

    # ------------------------------------------------------------------ requests
    async def handle(self, req: InboundRequest, sink: ResponseSink, info: TunnelInfo) -> None:
        """One HTTP request, start to finish (never raises for request-level problems)."""
        started = time.monotonic()
        outcome = _Outcome(service=info.service)
        grpc = any(
            k == "content-type" and v.lower().startswith("application/grpc") for k, v in req.headers
        )
        body = _CountingBody(req, outcome)
        req.body = body
        request: Request | None = None
        try:
            request = normalize_request(
                RawRequest(
                    method=req.method,
                    target=req.target,
                    scheme=req.scheme,
                    authority=req.authority,
                    headers=req.headers,
                ),
                info.destination,
                self.settings.normalization,
            )
            await self._handle_normalized(req, request, sink, info, grpc, outcome)
        except RequestRejectedError as err:
            outcome.flags = FLAG_BAD_REQUEST
            await self._local(sink, err.status, f"bad request: {err.reason}", grpc, outcome)
        except (OSError, H2StreamError, HttpProtocolError) as err:
            # The downstream went away (or broke framing) while we answered.
            outcome.flags = FLAG_DOWNSTREAM_RESET if outcome.flags == FLAG_NONE else outcome.flags
            outcome.error = str(err) or type(err).__name__
            sink.abort()
        except asyncio.CancelledError:
            outcome.flags = FLAG_DOWNSTREAM_RESET
            sink.abort()
            raise
        finally:
            self.requests_handled += 1
            self._record(req, request, info, grpc, outcome, started)

    def _record(
        self,
        req: InboundRequest,
        request: Request | None,
        info: TunnelInfo,
        grpc: bool,
        outcome: _Outcome,
        started: float,
    ) -> None:
        ep = outcome.endpoint
        headers = dict(req.headers)
        self.telemetry.record(
            RequestRecord(
                source_workload=(
                    self.store.workload_by_ip(info.source_ip) if info.source_ip else None
                ),
                source_identity=info.peer_identity,
                source_addr=info.source_addr,
                destination_workload=ep.workload if ep else None,
                destination_identity=ep.identity if ep else None,
                destination_addr=ep.authority if ep else None,
                service=outcome.service,
                hbone_authority=info.hbone_authority,
                method=request.method if request else req.method,
                path=request.target if request else req.target,
                authority=request.authority if request else (req.authority or ""),
                protocol=req.protocol,
                grpc=grpc,
                status=outcome.status,
                grpc_status=outcome.grpc_status,
                flags=outcome.flags,
                request_bytes=outcome.request_bytes,
                response_bytes=outcome.response_bytes,
                duration=time.monotonic() - started,
                route=outcome.route,
                policy=outcome.policy,
                traceparent=outcome.traceparent,
                request_id=headers.get("x-request-id"),
                user_agent=headers.get("user-agent"),
                attempts=outcome.attempts,
                error=outcome.error,
            )
        )

    async def _handle_normalized(
        self,
        req: InboundRequest,
        request: Request,
        sink: ResponseSink,
        info: TunnelInfo,
        grpc: bool,
        outcome: _Outcome,
    ) -> None:
        config = self.config
        ctx = AuthzContext(
            request=request,
            source_principal=info.peer_identity.uri if info.peer_identity else None,
            source_ip=info.source_ip,
            destination_ip=info.destination_ip,
        )
        verdict = evaluate(config.policies, ctx, self.settings.scope)
        outcome.policy = verdict.policy
        if not verdict.allowed:
            outcome.flags = FLAG_RBAC
            log.debug("request %s %s denied: %s", request.method, request.path, verdict.reason)
            await self._local(sink, 403, "RBAC: access denied", grpc, outcome)
            return
        if request.destination.kind == WORKLOAD_KIND:
            # A pod without a Service: no routes can attach; straight to that pod.
            await self._forward(req, request, None, sink, info, grpc, outcome)
            return
        decision = decide(request, config.routes, self.rng, backend_valid=self._backend_valid)
        if decision.rule is not None:
            outcome.route = f"{decision.rule.kind}/{decision.rule.route}#{decision.rule.rule_index}"
        if isinstance(decision, DirectResponse):
            if decision.status == 404:
                outcome.flags = FLAG_NO_ROUTE
            await self._local(sink, decision.status, decision.reason, grpc, outcome)
            return
        if isinstance(decision, Redirect):
            headers = fx.apply_header_modifiers(
                (("location", decision.location),), decision.response_modifiers
            )
            outcome.status = decision.status
            await sink.start(decision.status, list(headers), end_stream=True)
            return
        await self._forward(req, decision.request, decision, sink, info, grpc, outcome)

    async def _local(
        self, sink: ResponseSink, status: int, text: str, grpc: bool, outcome: _Outcome
    ) -> None:
        """A response the waypoint makes itself (gRPC: trailers-only with a grpc-status)."""
        if sink.started:
            sink.abort()
            return
        if grpc:
            code = GRPC_PERMISSION_DENIED if status == 403 else GRPC_STATUS_FOR_HTTP.get(status, 2)
            outcome.status = 200
            outcome.grpc_status = str(code)
            await sink.start(
                200,
                [
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(code)),
                    ("grpc-message", text.replace("\r", " ").replace("\n", " ")),
                ],
                end_stream=True,
            )
            return
        data = (text + "\n").encode()
        outcome.status = status
        outcome.response_bytes += len(data)
        await sink.start(
            status,
            [("content-type", "text/plain"), ("content-length", str(len(data)))],
        )
        await sink.data(data)
        await sink.end()

    # ------------------------------------------------------------------ forwarding
    def _backend_endpoints(
        self, request: Request, backend: BackendRef | None, info: TunnelInfo, outcome: _Outcome
    ) -> tuple[Endpoint, ...]:
        if backend is None:
            return self._destination_endpoints(info, request.destination.port)
        service = self.service_named(backend.namespace, backend.name)
        outcome.service = service
        if service is None:
            return ()
        port = backend.port if backend.port is not None else request.destination.port
        if (
            info.target_workload is not None
            and service.key in info.target_workload.services
            and (backend.namespace, backend.name)
            == (request.destination.namespace, request.destination.name)
        ):
            # Addressed a pod and routed to its own Service: keep the pod the client chose.
            return self._destination_endpoints(info, port)
        return self.endpoints(service, port)

    def _upstream_headers(self, request: Request, h2: bool, outcome: _Outcome) -> Headers:
        headers = end_to_end(list(request.headers), keep_te_trailers=h2)
        incoming = next((v for k, v in headers if k == "traceparent"), None)
        outcome.traceparent = child_traceparent(incoming, _random_hex)
        headers = [(k, v) for k, v in headers if k != "traceparent"]
        headers.append(("traceparent", outcome.traceparent))
        if not any(k == "x-request-id" for k, _ in headers):
            headers.append(("x-request-id", _uuid4()))
        return headers

    async def _forward(
        self,
        req: InboundRequest,
        request: Request,
        decision: Forward | None,
        sink: ResponseSink,
        info: TunnelInfo,
        grpc: bool,
        outcome: _Outcome,
    ) -> None:
        endpoints = self._backend_endpoints(
            request, decision.backend if decision else None, info, outcome
        )
        if not endpoints:
            outcome.flags = FLAG_NO_HEALTHY
            await self._local(sink, 503, "no healthy upstream", grpc, outcome)
            return
        h2 = req.protocol == "HTTP/2"
        headers = self._upstream_headers(request, h2, outcome)
        body = ReplayBody(req.body, self.settings.retry_buffer) if req.has_body else None
        retry = (decision.retry if decision else None) or self.settings.default_retry
        attempts = 1 + (retry.attempts if retry.attempts is not None else 2)
        backoff = retry.backoff if retry.backoff is not None else self.settings.default_backoff
        timeouts = decision.timeouts if decision else None
        total_timeout = timeouts.request if timeouts and timeouts.request else None
        per_try = timeouts.backend_request if timeouts and timeouts.backend_request else None
        try:
            async with asyncio.timeout(total_timeout):
                await self._attempts(
                    request,
                    headers,
                    body,
                    endpoints,
                    h2,
                    attempts,
                    retry.codes,
                    backoff,
                    per_try,
                    decision,
                    sink,
                    grpc,
                    outcome,
                )
        except TimeoutError:
            outcome.flags = FLAG_UPSTREAM_TIMEOUT
            await self._local(sink, 504, "upstream request timeout", grpc, outcome)
        if decision is not None and decision.mirrors:
            self._mirror(request, headers, body, decision.mirrors, h2)

    async def _attempts(
        self,
        request: Request,
        headers: Headers,
        body: ReplayBody | None,
        endpoints: tuple[Endpoint, ...],
        h2: bool,
        attempts: int,
        codes: tuple[int, ...],
        backoff: float,
        per_try: float | None,
        decision: Forward | None,
        sink: ResponseSink,
        grpc: bool,
        outcome: _Outcome,
    ) -> None:
        tried: set[str] = set()
        for attempt in range(attempts):
            last = attempt == attempts - 1
            ep = pick_endpoint(endpoints, self.upstream.active, self.rng, frozenset(tried))
            assert ep is not None
            tried.add(ep.uid)
            outcome.endpoint = ep
            outcome.attempts = attempt + 1
            self.upstream.begin(ep)
            try:
                try:
                    async with asyncio.timeout(per_try):
                        response = await self._exchange(ep, request, headers, body, h2)
                except TimeoutError:
                    if per_try is None or last or (body is not None and not body.replayable):
                        raise
                    outcome.error = f"per-try timeout on {ep.authority}"
                    await asyncio.sleep(backoff)
                    continue
                except UPSTREAM_ERRORS as err:
                    outcome.error = f"{ep.authority}: {err}"
                    if last or (body is not None and not body.replayable):
                        outcome.flags = FLAG_UPSTREAM_CONNECT
                        await self._local(
                            sink, 503, "upstream connect error or reset", grpc, outcome
                        )
                        return
                    await asyncio.sleep(backoff)
                    continue
                retriable_grpc = grpc and _grpc_status(response.headers) == "14"
                if (
                    (response.status in codes or retriable_grpc)
                    and not last
                    and (body is None or body.replayable)
                ):
                    response.release(False)
                    outcome.error = f"{ep.authority} answered {response.status}; retried"
                    await asyncio.sleep(backoff)
                    continue
                await self._relay(response, decision, sink, outcome)
                return
            finally:
                self.upstream.end(ep)

    async def _exchange(
        self,
        ep: Endpoint,
        request: Request,
        headers: Headers,
        body: ReplayBody | None,
        h2: bool,
    ) -> UpstreamResponse:
        chunks: AsyncIterator[bytes] | None = body.iterate() if body is not None else None
        if h2:
            return await self._exchange_h2(ep, request, headers, body, chunks)
        h1_headers = [("host", request.authority), *headers]
        for fresh in (False, True):
            client, reused = await self.upstream.h1(ep) if not fresh else (None, False)
            if client is None:
                client = H1Client(await self.upstream.dial(ep))
            try:
                response = await client.request(request.method, request.target, h1_headers, chunks)
            except UPSTREAM_ERRORS:
                client.close()
                # A kept-alive connection the pod closed meanwhile: once more on a new one.
                if reused and not fresh and (body is None or body.consumed == 0):
                    chunks = body.iterate() if body is not None else None
                    continue
                raise
            inner_release = response.release

            def release(complete: bool, c: Any = client, r: Any = inner_release) -> None:
                r(complete)
                self.upstream.release_h1(ep, c)

            response.release = release
            return response
        raise ConnectionError("unreachable")

    async def _exchange_h2(
        self,
        ep: Endpoint,
        request: Request,
        headers: Headers,
        body: ReplayBody | None,
        chunks: AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        conn = await self.upstream.h2(ep)
        pseudo = [
            (":method", request.method),
            (":scheme", request.scheme),
            (":authority", request.authority),
            (":path", request.target),
        ]
        stream = conn.open(pseudo + headers, end_stream=chunks is None)
        sender: asyncio.Task[None] | None = None
        if chunks is not None:
            assert body is not None

            async def send() -> None:
                assert chunks is not None
                async for chunk in chunks:
                    await stream.send_data(chunk)
                await stream.end(body.trailers or None)

            sender = asyncio.ensure_future(send())
        try:
            while True:
                response_headers = await stream.headers
                break
        except BaseException:
            if sender is not None:
                sender.cancel()
            stream.reset()
            raise
        status = int(next((v for k, v in response_headers if k == ":status"), "502"))

        def release(complete: bool) -> None:
            if sender is not None and not sender.done():
                sender.cancel()
            if not complete or not (stream.local_ended and stream.remote_ended):
                stream.reset()

        return UpstreamResponse(
            status=status,
            headers=[(k, v) for k, v in response_headers if not k.startswith(":")],
            body=stream,
            release=release,
        )

    async def _relay(
        self,
        response: UpstreamResponse,
        decision: Forward | None,
        sink: ResponseSink,
        outcome: _Outcome,
    ) -> None:
        complete = False
        try:
            headers = end_to_end(response.headers)
            if decision is not None and decision.response_modifiers:
                headers = list(
                    fx.apply_header_modifiers(tuple(headers), decision.response_modifiers)
                )
            outcome.status = response.status
            outcome.grpc_status = _grpc_status(headers)
            await sink.start(response.status, headers)
            while True:
                try:
                    chunk = await response.body.read()
                except UPSTREAM_ERRORS as err:
                    outcome.flags = FLAG_UPSTREAM_RESET
                    outcome.error = f"upstream reset mid-response: {err}"
                    sink.abort()
                    return
                if not chunk:
                    break
                outcome.response_bytes += len(chunk)
                await sink.data(chunk)
            trailers = end_to_end(response.body.trailers)
            if trailers:
                outcome.grpc_status = _grpc_status(trailers) or outcome.grpc_status
            complete = True
            await sink.end(trailers or None)
        finally:
            response.release(complete)

    def _mirror(
        self,
        request: Request,
        headers: Headers,
        body: ReplayBody | None,
        mirrors: tuple[BackendRef, ...],
        h2: bool,
    ) -> None:
        data = b"" if body is None else body.recorded
        if data is None:
            log.debug("mirror skipped: request body larger than the retry buffer")
            return
        host = request.host + "-shadow"
        shadow = Request(
            method=request.method,
            scheme=request.scheme,
            host=host,
            port=request.port,
            path=request.path,
            query=request.query,
            headers=request.headers,
            destination=request.destination,
        )
        for ref in mirrors:
            service = self.service_named(ref.namespace, ref.name)
            if service is None:
                continue
            port = ref.port if ref.port is not None else request.destination.port
            ep = pick_endpoint(self.endpoints(service, port), self.upstream.active, self.rng)
            if ep is None:
                continue
            task = asyncio.ensure_future(self._send_mirror(ep, shadow, headers, data, h2))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _send_mirror(
        self, ep: Endpoint, request: Request, headers: Headers, data: bytes, h2: bool
    ) -> None:
        replay = ReplayBody(BytesBody(data)) if data else None
        try:
            async with asyncio.timeout(self.settings.mirror_timeout):
                response = await self._exchange(ep, request, headers, replay, h2)
                complete = False
                try:
                    while await response.body.read():
                        pass
                    complete = True
                finally:
                    response.release(complete)
        except (TimeoutError, *UPSTREAM_ERRORS) as err:
            log.debug("mirror to %s failed: %s", ep.authority, err)


def _grpc_status(headers: Headers) -> str | None:
    return next((v for k, v in headers if k == "grpc-status"), None)


def _uuid4() -> str:
    return str(uuid.uuid4())

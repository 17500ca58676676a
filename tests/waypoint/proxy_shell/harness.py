"""An in-process mesh on loopback for waypoint shell tests.

Pieces, all real (TLS 1.3 mTLS with SPIFFE certificates from a LocalCa, HTTP/2 CONNECT):
* two destination "pods": each an HboneServer standing in for the pod's ztunnel, whose on_connect
  dials the local app server named by the CONNECT port (an aiohttp HTTP/1.1 app and a grpcio app);
* the waypoint: HboneServer(on_connect=WaypointProxy.on_connect) with its own identity;
* a client: HbonePool with a client identity, plus a TCP->HBONE forwarder so unmodified clients
  (aiohttp, grpcio) can talk to a Service VIP through the waypoint.
Pod IPs (10.10.0.x) are not real: the pools' connector maps them to the stand-ins' loopback ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from waypoint.proxy.authz import WaypointScope
from waypoint.proxy.config import L7Config, parse_local_config
from waypoint.proxy.server import ProxySettings, WaypointProxy
from waypoint.proxy.telemetry import Telemetry
from waypoint.proxy.upstream import UpstreamPool
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.copy import splice_streams_hbone
from ztunnel.proxy.hbone_server import Accept, HboneServer, Reject, TunnelRequest
from ztunnel.proxy.pool import HbonePool, PoolKey
from ztunnel.state.model import (
    NetworkAddress,
    Service,
    TunnelProtocol,
    Workload,
)
from ztunnel.state.store import WorkloadStore

TD = "cluster.local"
NS = "default"
WAYPOINT_ID = SpiffeId(TD, NS, "waypoint")
CLIENT_ID = SpiffeId(TD, "client-ns", "client")
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
ECHO_VIP = "10.96.0.10"
GRPC_VIP = "10.96.0.20"
POD_IPS = {"pod-1": "10.10.0.1", "pod-2": "10.10.0.2"}
VERSIONS = {"pod-1": "v1", "pod-2": "v2"}
WAYPOINT_IP = "10.10.0.100"


def svc_host(name: str) -> str:
    return f"{name}.{NS}.svc.cluster.local"


@dataclass
class Pod:
    name: str
    ip: str
    hbone: HboneServer
    http_port: int
    grpc_port: int
    runner: web.AppRunner
    grpc_server: Any = None
    requests: list[dict[str, Any]] = field(default_factory=list)


def make_app(pod: dict[str, Any]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        p: Pod = pod["pod"]
        body = await request.read()
        p.requests.append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
        shared = pod["shared"]
        if shared["fail"] > 0:
            shared["fail"] -= 1
            return web.Response(status=503, text="try again")
        payload = {
            "pod": p.name,
            "path": request.path_qs,
            "host": request.host,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": len(body),
        }
        return web.json_response(payload, headers={"x-pod": p.name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_pod(
    name: str, ca: LocalCa, shared: dict[str, int], grpc_factory: Any = None
) -> Pod:
    box: dict[str, Any] = {"shared": shared}
    runner = web.AppRunner(make_app(box), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    grpc_server = None
    grpc_port = 0
    if grpc_factory is not None:
        grpc_server, grpc_port = await grpc_factory(name)
    identity = SpiffeId(TD, NS, f"echo-{VERSIONS[name]}")
    cert = ca.issue(identity)

    async def on_connect(request: TunnelRequest) -> Accept | Reject:
        # The stand-in for the destination ztunnel: the waypoint must address this pod's IP.
        if str(request.authority.host) != POD_IPS[name]:
            return Reject(status=400, reason="authority IP is not this pod's")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", request.authority.port)
        except OSError:
            return Reject(status=503, reason="upstream refused")
        return Accept(reader=reader, writer=writer)

    hbone = HboneServer(
        ssl_context=lambda: server_context(cert), trust_domain=TD, on_connect=on_connect
    )
    await hbone.start(host="127.0.0.1", port=0)
    pod = Pod(
        name=name,
        ip=POD_IPS[name],
        hbone=hbone,
        http_port=http_port,
        grpc_port=grpc_port,
        runner=runner,
        grpc_server=grpc_server,
    )
    box["pod"] = pod
    return pod


def mesh_objects(pods: dict[str, Pod]) -> tuple[list[Workload], list[Service]]:
    services = [
        Service(
            name="echo",
            namespace=NS,
            hostname=svc_host("echo"),
            vips=(NetworkAddress(address=ipaddress.ip_address(ECHO_VIP)),),
            ports={80: 0},
        ),
        Service(name="echo-v1", namespace=NS, hostname=svc_host("echo-v1"), ports={80: 0}),
        Service(name="echo-v2", namespace=NS, hostname=svc_host("echo-v2"), ports={80: 0}),
        Service(
            name="grpc",
            namespace=NS,
            hostname=svc_host("grpc"),
            vips=(NetworkAddress(address=ipaddress.ip_address(GRPC_VIP)),),
            ports={50051: 0},
        ),
    ]
    workloads = []
    for name, pod in pods.items():
        version = VERSIONS[name]
        workloads.append(
            Workload(
                uid=f"{TD}//Pod/{NS}/{name}",
                name=name,
                namespace=NS,
                addresses=(ipaddress.ip_address(pod.ip),),
                tunnel_protocol=TunnelProtocol.HBONE,
                service_account=f"echo-{version}",
                canonical_name="echo",
                canonical_revision=version,
                workload_name=f"echo-{version}",
                services={
                    f"{NS}/{svc_host('echo')}": {80: pod.http_port},
                    f"{NS}/{svc_host('echo-' + version)}": {80: pod.http_port},
                    f"{NS}/{svc_host('grpc')}": {50051: pod.grpc_port or 1},
                },
            )
        )
    workloads.append(
        Workload(
            uid=f"{TD}//Pod/client-ns/client",
            name="client",
            namespace="client-ns",
            addresses=(ipaddress.ip_address("127.0.0.1"),),
            tunnel_protocol=TunnelProtocol.HBONE,
            service_account="client",
            workload_name="client",
        )
    )
    return workloads, services


@dataclass
class Mesh:
    ca: LocalCa
    pods: dict[str, Pod]
    store: WorkloadStore
    proxy: WaypointProxy
    waypoint: HboneServer
    telemetry: Telemetry
    client_pool: HbonePool
    access_lines: list[str]
    shared: dict[str, int]
    """``fail``: answer this many HTTP requests (on any pod) with 503 first."""
    forwarders: list[asyncio.Server] = field(default_factory=list)

    def set_routes(self, text: str) -> L7Config:
        config = parse_local_config(text, source="test.yaml")
        assert not config.errors, [str(e) for e in config.errors]
        self.proxy.set_config(config)
        return config

    def client_key(self) -> PoolKey:
        return PoolKey(
            src_identity=CLIENT_ID,
            dst_identities=frozenset({WAYPOINT_ID}),
            src_ip=None,
            dst_ip=LOOPBACK,
            dst_port=self.waypoint.address[1],
        )

    async def forwarder(self, vip: str, port: int) -> int:
        """A loopback TCP port whose connections are tunnelled to vip:port via the waypoint."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                stream = await self.client_pool.connect(self.client_key(), f"{vip}:{port}")
            except Exception:
                writer.close()
                return
            await splice_streams_hbone(reader, writer, stream)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.forwarders.append(server)
        return int(server.sockets[0].getsockname()[1])

    def requests_total(self, **labels: str) -> float:
        return self.telemetry.total("istio_requests_total", **labels)

    async def close(self) -> None:
        for server in self.forwarders:
            server.close()
        await self.client_pool.close()
        await self.waypoint.close()
        await self.proxy.close()
        await self.proxy.upstream.close()
        for pod in self.pods.values():
            await pod.hbone.close()
            await pod.runner.cleanup()
            if pod.grpc_server is not None:
                await pod.grpc_server.stop(None)


async def start_mesh(grpc_factory: Any = None, *, seed: int = 7) -> Mesh:
    ca = LocalCa.generate(TD)
    shared = {"fail": 0}
    pods = {name: await start_pod(name, ca, shared, grpc_factory) for name in POD_IPS}
    workloads, services = mesh_objects(pods)
    store = WorkloadStore()
    store.replace_all(workloads, services, [])
    hbone_ports = {ipaddress.ip_address(p.ip): p.hbone.address[1] for p in pods.values()}

    async def connector(key: PoolKey) -> socket.socket:
        # Pod IPs are fictional: reach each pod's HBONE stand-in on loopback instead.
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        port = hbone_ports.get(key.dst_ip, key.dst_port)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock

    waypoint_cert = ca.issue(WAYPOINT_ID)
    upstream = UpstreamPool(
        HbonePool(client_context=lambda _ident: client_context(waypoint_cert), connector=connector),
        WAYPOINT_ID,
    )
    lines: list[str] = []
    telemetry = Telemetry(access_log=lines.append)
    proxy = WaypointProxy(
        store=store,
        upstream=upstream,
        telemetry=telemetry,
        settings=ProxySettings(scope=WaypointScope(namespace=NS, name="waypoint")),
        rng=random.Random(seed),
    )
    waypoint = HboneServer(
        ssl_context=lambda: server_context(waypoint_cert),
        trust_domain=TD,
        on_connect=proxy.on_connect,
    )
    await waypoint.start(host="127.0.0.1", port=0)
    client_cert = ca.issue(CLIENT_ID)
    client_pool = HbonePool(client_context=lambda _ident: client_context(client_cert))
    return Mesh(
        ca=ca,
        pods=pods,
        store=store,
        proxy=proxy,
        waypoint=waypoint,
        telemetry=telemetry,
        client_pool=client_pool,
        access_lines=lines,
        shared=shared,
    )


def decode(body: bytes) -> dict[str, Any]:
    return json.loads(body)


@contextlib.asynccontextmanager
async def mesh_ctx(grpc_factory: Any = None) -> Any:
    mesh = await start_mesh(grpc_factory)
    try:
        yield mesh
    finally:
        await mesh.close()

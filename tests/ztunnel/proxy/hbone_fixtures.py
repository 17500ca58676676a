"""Shared loopback fixtures for HBONE shell tests: CA, identities, upstreams, server, pool."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from ztunnel.hbone.authority import Authority
from ztunnel.identity.ca import LocalCa
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.identity.tls import client_context, server_context
from ztunnel.proxy.hbone_server import Accept, HboneServer, Reject, TunnelRequest, TunnelStats
from ztunnel.proxy.pool import HbonePool, PoolKey

TD = "cluster.local"
SERVER_ID = SpiffeId(TD, "ns-b", "sa-server")
CLIENT_ID = SpiffeId(TD, "ns-a", "sa-client")
CLIENT2_ID = SpiffeId(TD, "ns-a", "sa-other")
LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


async def hash_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads everything, answers with the SHA-256 of it followed by the same bytes reversed-chunked."""
    digest = hashlib.sha256()
    received = bytearray()
    while data := await reader.read(65536):
        digest.update(data)
        received += data
    writer.write(digest.digest())
    writer.write(bytes(received[::-1]))
    await writer.drain()
    writer.close()


async def echo_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()


@dataclass
class Lab:
    ca: LocalCa
    server: HboneServer
    pool: HbonePool
    upstream: asyncio.Server
    upstream_port: int
    dials: int = 0
    calls: int = 0
    stats: list[TunnelStats] = field(default_factory=list)
    requests: list[TunnelRequest] = field(default_factory=list)
    server_cert: dict[str, Any] = field(default_factory=dict)
    decide_delay: float = 0.0

    @property
    def key(self) -> PoolKey:
        return self.key_for(CLIENT_ID)

    def key_for(self, src: SpiffeId, expected=(SERVER_ID,)) -> PoolKey:
        return PoolKey(
            src_identity=src,
            dst_identities=frozenset(expected),
            src_ip=LOOPBACK,
            dst_ip=LOOPBACK,
            dst_port=self.server.address[1],
        )

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.upstream_port}"

    async def close(self) -> None:
        await self.pool.close()
        await self.server.close()
        self.upstream.close()
        await self.upstream.wait_closed()


async def make_lab(handler=hash_upstream, **server_kwargs) -> Lab:
    ca = LocalCa.generate(TD)
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    upstream_port = upstream.sockets[0].getsockname()[1]
    certs = {CLIENT_ID: ca.issue(CLIENT_ID), CLIENT2_ID: ca.issue(CLIENT2_ID)}
    lab_ref: list[Lab] = []

    async def on_connect(request: TunnelRequest) -> Accept | Reject:
        lab = lab_ref[0]
        lab.calls += 1
        lab.requests.append(request)
        if lab.decide_delay:
            await asyncio.sleep(lab.decide_delay)
        if request.authority.port != upstream_port:
            return Reject(status=503, reason="no such upstream")
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        lab.dials += 1
        try:
            await loop.sock_connect(sock, ("127.0.0.1", upstream_port))
        except OSError:
            sock.close()
            return Reject(status=503, reason="upstream refused")
        return Accept(sock=sock)

    server_cert_box = {"cert": ca.issue(SERVER_ID)}
    server = HboneServer(
        ssl_context=lambda: server_context(server_cert_box["cert"]),
        trust_domain=TD,
        on_connect=on_connect,
        on_tunnel_closed=lambda s: lab_ref[0].stats.append(s),
        **server_kwargs,
    )
    await server.start(host="127.0.0.1", port=0)
    pool = HbonePool(client_context=lambda ident: client_context(certs[ident]))
    lab = Lab(ca=ca, server=server, pool=pool, upstream=upstream, upstream_port=upstream_port)
    lab.server_cert = server_cert_box
    lab.certs = certs  # type: ignore[attr-defined]
    lab_ref.append(lab)
    return lab


async def roundtrip(stream, payload: bytes) -> bytes:
    """Send payload with END_STREAM; return everything the upstream answered."""
    stream.write(payload)
    stream.write_eof()
    chunks = []
    while data := await stream.read():
        chunks.append(data)
    return b"".join(chunks)


def authority_of(lab: Lab) -> Authority:
    from ztunnel.hbone.authority import parse_authority

    return parse_authority(lab.authority)

"""Upstream connections from the waypoint to destination pods: HBONE (or plain TCP) plus HTTP.

Owns `Endpoint` (a pod chosen for one request: address, target port, expected identity),
per-request endpoint choice (`pick_endpoint`, least-request of two random choices, skipping
endpoints that just failed), and `UpstreamPool`: idle HTTP/1.1 connections kept alive per endpoint
and one multiplexed HTTP/2 connection per endpoint, each riding an HBONE tunnel from the shared
`HbonePool` to ``podIP:15008`` with ``:authority podIP:targetPort`` and the pod's SPIFFE identity
expected, or plain TCP for a workload that is not in the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from waypoint.proxy.http1 import H1Client
from waypoint.proxy.http2 import H2Conn
from waypoint.proxy.routing import RandomSource
from waypoint.proxy.streams import AsyncioByteStream, ByteStream, HboneByteStream
from ztunnel.config import INBOUND_HBONE_PORT
from ztunnel.identity.spiffe import SpiffeId
from ztunnel.proxy.pool import HbonePool, PoolKey
from ztunnel.state.model import Workload

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_IDLE_PER_ENDPOINT = 32


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    workload: Workload = field(compare=False)
    uid: str
    ip: IPAddress
    port: int
    """Target port on the pod."""
    identity: SpiffeId | None
    """Expected peer identity (None: plain TCP, the pod is not in the mesh)."""

    @property
    def authority(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def pick_endpoint(
    endpoints: Sequence[Endpoint],
    active: Callable[[Endpoint], int],
    rng: RandomSource,
    avoid: frozenset[str] = frozenset(),
) -> Endpoint | None:
    """Least-request of two random choices (Envoy's default), preferring endpoints not in `avoid`."""
    candidates = [e for e in endpoints if e.uid not in avoid] or list(endpoints)
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    first = candidates[int(rng.random() * len(candidates)) % len(candidates)]
    second = candidates[int(rng.random() * len(candidates)) % len(candidates)]
    return second if active(second) < active(first) else first


Dialer = Callable[[Endpoint], Awaitable[ByteStream]]


class UpstreamPool:
    """HTTP connections to endpoints, over HBONE from `source` (the waypoint's identity)."""

    def __init__(
        self,
        hbone: HbonePool,
        source: SpiffeId,
        *,
        hbone_port: int = INBOUND_HBONE_PORT,
        connect_timeout: float = 10.0,
    ) -> None:
        self.hbone = hbone
        self.source = source
        self.hbone_port = hbone_port
        self.connect_timeout = connect_timeout
        self._idle: dict[str, list[H1Client]] = {}
        self._h2: dict[str, H2Conn] = {}
        self._h2_dialing: dict[str, asyncio.Future[H2Conn]] = {}
        self._active: dict[str, int] = {}
        self._closed = False

    def active(self, endpoint: Endpoint) -> int:
        return self._active.get(endpoint.uid, 0)

    def begin(self, endpoint: Endpoint) -> None:
        self._active[endpoint.uid] = self._active.get(endpoint.uid, 0) + 1

    def end(self, endpoint: Endpoint) -> None:
        n = self._active.get(endpoint.uid, 0) - 1
        if n > 0:
            self._active[endpoint.uid] = n
        else:
            self._active.pop(endpoint.uid, None)

    async def dial(self, endpoint: Endpoint) -> ByteStream:
        """A fresh byte stream to the endpoint's target port (HBONE tunnel or TCP)."""
        if self._closed:
            raise ConnectionError("upstream pool is closed")
        if endpoint.identity is None:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(str(endpoint.ip), endpoint.port), self.connect_timeout
            )
            return AsyncioByteStream(reader, writer)
        key = PoolKey(
            src_identity=self.source,
            dst_identities=frozenset({endpoint.identity}),
            src_ip=None,
            dst_ip=endpoint.ip,
            dst_port=self.hbone_port,
        )
        stream = await asyncio.wait_for(
            self.hbone.connect(key, endpoint.authority), self.connect_timeout
        )
        return HboneByteStream(stream)

    async def h1(self, endpoint: Endpoint) -> tuple[H1Client, bool]:
        """(client, reused): an idle kept-alive connection to the endpoint, or a new one."""
        idle = self._idle.get(endpoint.uid)
        while idle:
            client = idle.pop()
            if client.reusable:
                return client, True
            client.close()
        return H1Client(await self.dial(endpoint)), False

    def release_h1(self, endpoint: Endpoint, client: H1Client) -> None:
        if self._closed or not client.reusable:
            client.close()
            return
        idle = self._idle.setdefault(endpoint.uid, [])
        if len(idle) >= MAX_IDLE_PER_ENDPOINT:
            client.close()
            return
        idle.append(client)

    async def h2(self, endpoint: Endpoint) -> H2Conn:
        """The shared HTTP/2 connection to the endpoint (dialled once, concurrently awaited)."""
        conn = self._h2.get(endpoint.uid)
        if conn is not None and conn.usable:
            return conn
        pending = self._h2_dialing.get(endpoint.uid)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[H2Conn] = loop.create_future()
        self._h2_dialing[endpoint.uid] = fut
        try:
            stream = await self.dial(endpoint)
            conn = H2Conn(stream, client=True)
            await conn.start()
        except BaseException as err:
            fut.set_exception(err if isinstance(err, Exception) else ConnectionError("cancelled"))
            fut.exception()
            raise
        finally:
            self._h2_dialing.pop(endpoint.uid, None)
        old = self._h2.get(endpoint.uid)
        if old is not None and not old.streams:
            old.close()
        self._h2[endpoint.uid] = conn
        conn.closed.add_done_callback(lambda _: self._drop_h2(endpoint.uid, conn))
        fut.set_result(conn)
        return conn

    def _drop_h2(self, uid: str, conn: H2Conn) -> None:
        if self._h2.get(uid) is conn:
            del self._h2[uid]

    def forget_endpoint(self, uid: str) -> None:
        """Close pooled connections of an endpoint that left the store."""
        for client in self._idle.pop(uid, []):
            client.close()
        conn = self._h2.pop(uid, None)
        if conn is not None and not conn.streams:
            conn.close()

    def known_endpoints(self) -> set[str]:
        return set(self._idle) | set(self._h2)

    async def close(self) -> None:
        self._closed = True
        for clients in self._idle.values():
            for client in clients:
                client.close()
        self._idle.clear()
        for conn in list(self._h2.values()):
            conn.close()
        self._h2.clear()
        with contextlib.suppress(Exception):
            await self.hbone.close()

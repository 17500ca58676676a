"""A generic delta-xDS server (Envoy's DeltaAggregatedResources) on grpc.aio.

It serves any number of clients from one in-memory snapshot per type URL: `set_resources()` and
`remove()` change the snapshot and every connected stream gets only what changed for it (per-client
deltas from `waypoint.controlplane.delta`). Clients that reconnect with `initial_resource_versions`
are sent only resources whose content changed since. ACKs are counted; NACKs are recorded (see
`nacks`, `on_nack`) and not retried. `resource_filter(client, type_url, name)` decides per client
what it may see (e.g. only workloads relevant to a node); call `refresh()` when its answers change.

Usage:
    server = XdsServer()
    server.set_resources(ADDRESS_TYPE_URL, {"Kubernetes//Pod/ns/a": Address(workload=...)})
    port = await server.start("127.0.0.1:0")
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import Message

from waypoint.controlplane.delta import Snapshot, Subscription
from waypoint.controlplane.grpcserve import GrpcService
from ztunnel.xds import protos

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientInfo:
    """Who is on the other end of a stream: node from its first request, peer, call metadata."""

    node: protos.Node
    peer: str
    metadata: Mapping[str, str]

    @property
    def node_id(self) -> str:
        return str(self.node.id)


@dataclass(frozen=True, slots=True, kw_only=True)
class NackRecord:
    node_id: str
    peer: str
    type_url: str
    nonce: str
    message: str


ResourceFilter = Callable[[ClientInfo, str, str], bool]


class InvalidRequest(Exception):
    """A client request that breaks the protocol; the stream is aborted with INVALID_ARGUMENT."""


@dataclass(slots=True, eq=False)  # identity-hashed: kept in a set
class _Connection:
    peer: str
    metadata: dict[str, str]
    info: ClientInfo | None = None
    subs: dict[str, Subscription] = field(default_factory=dict)
    must_answer: set[str] = field(default_factory=set)
    pending: dict[str, str] = field(default_factory=dict)  # nonce -> type URL
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class XdsServer(GrpcService):
    """Delta ADS over a versioned snapshot; add to a grpc.aio server or start() its own."""

    _service_name = "xDS server"

    def __init__(
        self,
        *,
        resource_filter: ResourceFilter | None = None,
        on_nack: Callable[[NackRecord], None] | None = None,
        max_nack_records: int = 1000,
    ) -> None:
        self._snapshot = Snapshot()
        self._filter = resource_filter
        self._on_nack = on_nack
        self._connections: set[_Connection] = set()
        self._nonces = itertools.count(1)
        self.nacks: deque[NackRecord] = deque(maxlen=max_nack_records)
        self.acks = 0

    # --- snapshot -------------------------------------------------------------------------------

    def set_resources(
        self, type_url: str, resources: Mapping[str, Message], *, replace: bool = False
    ) -> None:
        """Add or update resources (replace=True: make these the whole set of the type)."""
        if self._snapshot.set(type_url, resources, replace=replace):
            self._wake_all()

    def remove(self, type_url: str, names: Iterable[str]) -> None:
        if self._snapshot.remove(type_url, names):
            self._wake_all()

    def versions(self, type_url: str) -> dict[str, str]:
        return {n: e.version for n, e in self._snapshot.entries(type_url).items()}

    def refresh(self) -> None:
        """Re-evaluate every client against the filter (its inputs changed)."""
        for conn in self._connections:
            for sub in conn.subs.values():
                sub.synced_generation = -1
            conn.wake.set()

    @property
    def clients(self) -> list[ClientInfo]:
        return [c.info for c in self._connections if c.info is not None]

    def _wake_all(self) -> None:
        for conn in self._connections:
            conn.wake.set()

    # --- gRPC -----------------------------------------------------------------------------------

    def rpc_handler(self) -> grpc.GenericRpcHandler:
        handler = grpc.stream_stream_rpc_method_handler(
            self._serve,
            request_deserializer=protos.DeltaDiscoveryRequest.FromString,
            response_serializer=protos.DeltaDiscoveryResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(
            protos.ADS_SERVICE, {"DeltaAggregatedResources": handler}
        )

    async def _serve(
        self,
        requests: AsyncIterator[protos.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        conn = _Connection(
            peer=str(context.peer()),
            metadata={k: str(v) for k, v in (context.invocation_metadata() or ())},
        )
        self._connections.add(conn)
        reader = asyncio.create_task(self._read(requests, conn))
        try:
            while True:
                await conn.wake.wait()
                conn.wake.clear()
                if reader.done() and reader.exception() is not None:
                    break
                for response in self._responses(conn):
                    await context.write(response)
                if reader.done():
                    break
            error = reader.exception()
            if isinstance(error, InvalidRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            elif error is not None:
                raise error
        finally:
            reader.cancel()
            self._connections.discard(conn)

    async def _read(
        self, requests: AsyncIterator[protos.DeltaDiscoveryRequest], conn: _Connection
    ) -> None:
        try:
            async for request in requests:
                self._on_request(conn, request)
                conn.wake.set()
        finally:
            conn.wake.set()

    def _on_request(self, conn: _Connection, request: protos.DeltaDiscoveryRequest) -> None:
        if conn.info is None:
            conn.info = ClientInfo(node=request.node, peer=conn.peer, metadata=conn.metadata)
        type_url = request.type_url
        if not type_url:
            raise InvalidRequest("DeltaDiscoveryRequest without type_url")
        if request.response_nonce:
            conn.pending.pop(request.response_nonce, None)
            if request.HasField("error_detail"):
                record = NackRecord(
                    node_id=conn.info.node_id,
                    peer=conn.peer,
                    type_url=type_url,
                    nonce=request.response_nonce,
                    message=request.error_detail.message,
                )
                log.warning(
                    "xds: NACK from %s for %s: %s", record.node_id, type_url, record.message
                )
                self.nacks.append(record)
                if self._on_nack is not None:
                    self._on_nack(record)
            else:
                self.acks += 1
        sub = conn.subs.get(type_url)
        if sub is None:
            sub = conn.subs[type_url] = Subscription(type_url)
            conn.must_answer.add(type_url)
        sub.apply_request(request)

    def _responses(self, conn: _Connection) -> list[protos.DeltaDiscoveryResponse]:
        out = []
        info = conn.info
        for type_url, sub in conn.subs.items():
            generation = self._snapshot.generation(type_url)
            if generation == sub.synced_generation and type_url not in conn.must_answer:
                continue
            entries = self._snapshot.entries(type_url)
            if self._filter is None or info is None:
                send, removed = sub.delta(entries, lambda _name: True)
            else:
                send, removed = sub.delta(entries, functools.partial(self._filter, info, type_url))
            if send or removed or type_url in conn.must_answer:
                nonce = str(next(self._nonces))
                out.append(
                    protos.DeltaDiscoveryResponse(
                        type_url=type_url,
                        nonce=nonce,
                        system_version_info=str(generation),
                        resources=[e.to_proto() for e in send],
                        removed_resources=removed,
                    )
                )
                conn.pending[nonce] = type_url
                conn.must_answer.discard(type_url)
            sub.commit(send, removed, generation)
        return out

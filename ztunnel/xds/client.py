"""The grpc.aio shell of ztunnel's delta-xDS client (Istio's AdsClient).

One long-lived `DeltaAggregatedResources` stream to the control plane, reconnected forever with
capped exponential backoff; all protocol decisions live in `ztunnel.xds.session.DeltaSession`.
Per connection it reads the bearer token file again (projected tokens rotate) and sends
`authorization: Bearer <token>` and `clusterid` metadata like ztunnel; the channel is plaintext or
TLS (`grpc.ssl_channel_credentials`). Known resources survive disconnects and are offered back as
`initial_resource_versions`, so a resumed stream only carries changes.

Usage:
    client = XdsClient(XdsClientConfig(address="istiod:15012", node=NodeInfo.from_env(os.environ),
                                       credentials=tls_credentials(root_pem)), handler)
    task = asyncio.create_task(client.run())
    await client.wait_ready(timeout=30)
    ...
    await client.close()
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ztunnel.xds import protos
from ztunnel.xds.channel import (
    XdsError,
    auth_metadata,
    channel_options,
    open_channel,
    tls_credentials,
)
from ztunnel.xds.session import (
    Backoff,
    DeltaSession,
    NodeInfo,
    ResourceHandler,
    Versioned,
    is_benign_close,
)

log = logging.getLogger(__name__)

__all__ = ["NodeInfo", "XdsClient", "XdsClientConfig", "XdsError", "tls_credentials"]


@dataclass(frozen=True, slots=True, kw_only=True)
class XdsClientConfig:
    """Where and how to reach the control plane."""

    address: str  # host:port, e.g. "istiod.istio-system.svc:15012"
    node: NodeInfo
    type_urls: tuple[str, ...] = protos.ZTUNNEL_TYPE_URLS
    # None: plaintext (tests, lab); else e.g. tls_credentials(root_pem).
    credentials: grpc.ChannelCredentials | None = None
    # TLS name to verify instead of the address host (ztunnel's ALT_XDS_HOSTNAME).
    server_name: str | None = None
    # Projected service-account token (audience istio-ca); None sends no authorization.
    token_path: Path | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
    connect_timeout: float = 5.0
    backoff_initial: float = 0.01
    backoff_max: float = 15.0
    keepalive_seconds: float = 30.0
    keepalive_timeout_seconds: float = 10.0
    # Extra gRPC channel arguments, e.g. ("grpc.use_local_subchannel_pool", 1).
    channel_args: tuple[tuple[str, Any], ...] = ()


class XdsClient:
    """Keeps a delta-xDS session with one server alive and feeds `handler` with its pushes."""

    def __init__(self, config: XdsClientConfig, handler: ResourceHandler) -> None:
        self._config = config
        self.session = DeltaSession(config.node.to_proto(), config.type_urls, handler)
        self._backoff = Backoff(initial=config.backoff_initial, maximum=config.backoff_max)
        self._closing = asyncio.Event()
        self._ready = asyncio.Event()
        self._call: Any = None
        self.connections = 0  # streams that got at least one response
        self.connected = False
        self.last_error: str | None = None

    @property
    def ready(self) -> bool:
        return self.session.ready

    def resources(self, type_url: str) -> dict[str, Versioned]:
        """Last known good resources of a type (kept while disconnected)."""
        return self.session.resources(type_url)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every type got and ACKed a first response."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def run(self) -> None:
        """Stream, reconnecting with backoff, until close(). Never raises for server trouble."""
        while not self._closing.is_set():
            try:
                benign = await self._stream_once()
            except XdsError as err:
                benign = False
                self.last_error = str(err)
                log.warning("xds: %s", err)
            except Exception as err:  # a surprise from grpc must not end the session for good
                benign = False
                self.last_error = f"xDS stream to {self._config.address} failed: {err!r}"
                log.exception("xds: unexpected error on stream to %s", self._config.address)
            finally:
                self.connected = False
                self._call = None
            if self._closing.is_set():
                break
            if benign:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Stop reconnecting and end the current stream."""
        self._closing.set()
        call = self._call
        if call is not None:
            call.cancel()

    async def _stream_once(self) -> bool:
        """One stream from connect to end; returns whether it ended benignly."""
        cfg = self._config
        metadata = auth_metadata(cfg.token_path, cfg.node.cluster_id, cfg.extra_headers)
        options = channel_options(
            server_name=cfg.server_name,
            connect_timeout=cfg.connect_timeout,
            keepalive=cfg.keepalive_seconds,
            keepalive_timeout=cfg.keepalive_timeout_seconds,
        ) + list(cfg.channel_args)
        async with open_channel(cfg.address, cfg.credentials, options) as channel:
            rpc = channel.stream_stream(
                protos.DELTA_ADS_METHOD,
                request_serializer=protos.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=protos.DeltaDiscoveryResponse.FromString,
            )
            call = rpc(metadata=metadata)
            self._call = call
            got_response = False
            try:
                for request in self.session.initial_requests():
                    await call.write(request)
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        break
                    if not got_response:
                        got_response = True
                        self.connected = True
                        self.connections += 1
                    reply = self.session.on_response(response)
                    if reply.HasField("error_detail"):
                        log.warning(
                            "xds: NACK %s: %s", response.type_url, reply.error_detail.message
                        )
                    await call.write(reply)
                    if self.session.ready:
                        self._ready.set()
                code = await call.code()
            except grpc.aio.AioRpcError as err:
                if self._closing.is_set():
                    return True
                code_name = err.code().name
                details = err.details() or ""
                if is_benign_close(code_name, details):
                    log.info("xds: stream to %s closed: %s %s", cfg.address, code_name, details)
                    return True
                raise XdsError(
                    f"xDS stream to {cfg.address} failed: {code_name}: {details}"
                ) from None
            except asyncio.InvalidStateError:
                # Writing after the server already ended the stream with OK.
                return True
            except asyncio.CancelledError:
                if self._closing.is_set():
                    return True
                raise
        log.info("xds: stream to %s ended: %s", cfg.address, code)
        return True

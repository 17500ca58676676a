"""Sans-IO state machine of ztunnel's delta-xDS client (one logical session across reconnects).

It owns what the client knows (name -> version per type URL, the last good message of each), builds
the requests of a new stream (wildcard subscription, node, `initial_resource_versions`), turns each
DeltaDiscoveryResponse into one handler call plus the ACK or NACK to send, and decides reconnect
delays. No sockets or asyncio here; `ztunnel.xds.client` is the I/O shell.

Semantics follow Istio's ztunnel (xds/client.rs): a resource that fails to decode or that the handler
rejects is NACKed with the reasons joined by "; " while the good ones of the same push are applied and
remembered; a rejected resource keeps its last good version (so a reconnect asks for it again); state
is never dropped while disconnected; readiness is reached once every type got and ACKed a response.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from google.protobuf.message import DecodeError

from ztunnel.xds import protos

DEFAULT_INSTANCE_IP: Final = "1.1.1.1"  # what ztunnel puts into the node id without INSTANCE_IP
# google.rpc.Code INVALID_ARGUMENT: the pushed config could not be applied.
NACK_CODE: Final = 3

Versioned = tuple[str, protos.Message]


class ResourceHandler(Protocol):
    """Receives decoded resources of one push; returns {name: reason} for those it rejects.

    Called once per DeltaDiscoveryResponse. `added` maps name -> (version, message) for new and
    changed resources; `removed` lists names the server deleted (only names the client had). A
    rejected name is NACKed and not remembered; everything else counts as applied.
    """

    def on_resources(
        self, type_url: str, added: Mapping[str, Versioned], removed: Sequence[str]
    ) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """Who this ztunnel is, as it tells the control plane (Istio's Node id and metadata)."""

    instance_ip: str = DEFAULT_INSTANCE_IP
    pod_name: str = ""
    namespace: str = ""
    node_name: str = ""
    cluster_id: str = ""
    # proxyMetadata with ISTIO_META_ stripped (e.g. DNS_CAPTURE) and ISTIO_METAJSON_ values.
    metadata: Mapping[str, object] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        ns = self.namespace
        return f"ztunnel~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"

    def to_proto(self) -> protos.Node:
        # Any: Struct.update takes JSON-like values, which mypy cannot express.
        fields: dict[str, Any] = {
            "NAME": self.pod_name,
            "NAMESPACE": self.namespace,
            "INSTANCE_IPS": self.instance_ip,
            "NODE_NAME": self.node_name,
        }
        if self.cluster_id:
            fields["CLUSTER_ID"] = self.cluster_id
        fields.update(self.metadata)
        node = protos.Node(id=self.node_id)
        try:
            node.metadata.update(fields)
        except (TypeError, ValueError) as err:
            raise ValueError(f"node metadata is not JSON-like: {err}") from None
        return node

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> NodeInfo:
        """Read INSTANCE_IP, POD_NAME, POD_NAMESPACE, NODE_NAME, ISTIO_META_* and ISTIO_METAJSON_*."""
        metadata: dict[str, object] = {}
        for key, value in sorted(env.items()):
            if key.startswith("ISTIO_METAJSON_"):
                try:
                    metadata[key.removeprefix("ISTIO_METAJSON_")] = json.loads(value)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"environment variable {key} is not valid JSON: {err}"
                    ) from None
            elif key.startswith("ISTIO_META_"):
                metadata[key.removeprefix("ISTIO_META_")] = value
        cluster_id = str(metadata.pop("CLUSTER_ID", env.get("CLUSTER_ID", "")))
        return cls(
            instance_ip=env.get("INSTANCE_IP") or DEFAULT_INSTANCE_IP,
            pod_name=env.get("POD_NAME", ""),
            namespace=env.get("POD_NAMESPACE", ""),
            node_name=env.get("NODE_NAME", ""),
            cluster_id=cluster_id,
            metadata=metadata,
        )


@dataclass(slots=True)
class Backoff:
    """Capped exponential reconnect delay: 10 ms, doubling, at most 15 s (ztunnel's values)."""

    initial: float = 0.01
    maximum: float = 15.0
    factor: float = 2.0
    _next: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.factor < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and factor >= 1, got "
                f"initial={self.initial} maximum={self.maximum} factor={self.factor}"
            )
        self._next = self.initial

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.initial


_BENIGN_CODES: Final = frozenset({"CANCELLED", "UNKNOWN", "DEADLINE_EXCEEDED"})
_BENIGN_DETAILS: Final = ("transport is closing", "received prior goaway")


def is_benign_close(code: str | None, details: str = "") -> bool:
    """Whether a stream end is routine (server rotation, idle close) rather than a failure.

    `code` is the gRPC status code name, or None for a clean end of stream. After a benign close the
    client reconnects at the initial delay instead of backing off further.
    """
    if code is None or code == "OK" or code in _BENIGN_CODES:
        return True
    lowered = details.lower()
    return any(marker in lowered for marker in _BENIGN_DETAILS)


class DeltaSession:
    """One client's delta-xDS state for a fixed set of type URLs, across any number of streams."""

    def __init__(
        self,
        node: protos.Node,
        type_urls: Sequence[str],
        handler: ResourceHandler,
        message_types: Mapping[str, type[protos.Message]] = protos.MESSAGE_TYPES,
    ) -> None:
        unknown = [t for t in type_urls if t not in message_types]
        if unknown:
            raise ValueError(f"no message type registered for type URL(s) {unknown}")
        if not type_urls:
            raise ValueError("a delta-xDS session needs at least one type URL")
        self._node = node
        self._type_urls = tuple(type_urls)
        self._handler = handler
        self._message_types = dict(message_types)
        self._state: dict[str, dict[str, Versioned]] = {t: {} for t in self._type_urls}
        self._acked_once: set[str] = set()
        self.last_nack: dict[str, str] = {}
        self.responses = 0
        self.nacks = 0

    @property
    def type_urls(self) -> tuple[str, ...]:
        return self._type_urls

    @property
    def ready(self) -> bool:
        """Every type got and ACKed a first response (never revoked afterwards)."""
        return self._acked_once.issuperset(self._type_urls)

    def resources(self, type_url: str) -> dict[str, Versioned]:
        """The last good (version, message) of every known resource of a type."""
        return dict(self._state[type_url])

    def known_versions(self, type_url: str) -> dict[str, str]:
        return {name: version for name, (version, _) in self._state[type_url].items()}

    def initial_requests(self) -> list[protos.DeltaDiscoveryRequest]:
        """The first request of each type on a new stream: wildcard, node, what we already have."""
        return [
            protos.DeltaDiscoveryRequest(
                node=self._node,
                type_url=type_url,
                initial_resource_versions=self.known_versions(type_url),
            )
            for type_url in self._type_urls
        ]

    def on_response(self, response: protos.DeltaDiscoveryResponse) -> protos.DeltaDiscoveryRequest:
        """Apply one push through the handler; return its ACK, or NACK with the reasons."""
        self.responses += 1
        type_url = response.type_url
        errors: dict[str, str] = {}
        if type_url not in self._state:
            errors["*"] = f"type URL {type_url!r} was not subscribed"
        else:
            added, errors = self._decode(type_url, response.resources)
            state = self._state[type_url]
            removed = [n for n in dict.fromkeys(response.removed_resources) if n in state]
            try:
                rejected = dict(self._handler.on_resources(type_url, added, removed))
            except Exception as err:  # a handler bug must NACK, not kill the session
                rejected = dict.fromkeys(added, f"handler failed: {err!r}") or {
                    "*": f"handler failed: {err!r}"
                }
                removed = []
            for name, reason in rejected.items():
                errors.setdefault(name, reason or "rejected")
            for name, versioned in added.items():
                if name not in rejected:
                    state[name] = versioned
            for name in removed:
                state.pop(name, None)
        if errors:
            self.nacks += 1
            message = "; ".join(f"{name}: {reason}" for name, reason in errors.items())
            self.last_nack[type_url] = message
            return protos.DeltaDiscoveryRequest(
                type_url=type_url,
                response_nonce=response.nonce,
                error_detail=protos.Status(code=NACK_CODE, message=message),
            )
        self._acked_once.add(type_url)
        return protos.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)

    def _decode(
        self, type_url: str, resources: Sequence[protos.Resource]
    ) -> tuple[dict[str, Versioned], dict[str, str]]:
        cls = self._message_types[type_url]
        added: dict[str, Versioned] = {}
        errors: dict[str, str] = {}
        for index, resource in enumerate(resources):
            name = resource.name or f"<resource #{index} without name>"
            if not resource.name:
                errors[name] = "resource has no name"
            elif name in added or name in errors:
                errors[name] = "resource appears twice in one response"
                added.pop(name, None)
            elif resource.resource.type_url != type_url:
                errors[name] = (
                    f"resource type {resource.resource.type_url!r} does not match response "
                    f"type {type_url!r}"
                )
            else:
                message = cls()
                try:
                    message.ParseFromString(resource.resource.value)
                except DecodeError as err:
                    errors[name] = f"cannot decode {cls.DESCRIPTOR.full_name}: {err}"
                else:
                    added[name] = (resource.version, message)
        return added, errors

"""Sans-IO core of the delta-xDS server: versioned snapshot and per-client subscription state.

A `Snapshot` holds, per type URL, every resource packed once as an Any with a content-hash version
(so a restarted server that is fed the same resources produces the same versions, and a client
resuming with `initial_resource_versions` gets only what really changed). A `Subscription` is one
client stream's view of one type URL: wildcard or explicit names, and what the client has
(name -> version); `delta()` says what to send and what to remove. Envoy's delta rules:
the first request with no names is a wildcard subscription, "*" subscribes/unsubscribes the
wildcard, explicitly subscribed names are always (re)sent, and a subscribed name that does not
exist is reported in removed_resources. No I/O here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import any_pb2
from google.protobuf.message import Message

from ztunnel.xds import protos

WILDCARD: Final = "*"
# Placeholder "version" for a name the client asked for but has not been answered about yet.
_PENDING: Final = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One resource as stored: name, content version and the packed message."""

    name: str
    version: str
    packed: any_pb2.Any

    def to_proto(self) -> protos.Resource:
        return protos.Resource(name=self.name, version=self.version, resource=self.packed)


def pack(type_url: str, name: str, message: Message) -> Entry:
    """Pack a message for `type_url`; the version is a hash of its deterministic encoding."""
    expected = protos.type_url_of(message)
    if expected != type_url:
        raise TypeError(
            f"resource {name!r}: message {message.DESCRIPTOR.full_name} does not match "
            f"type URL {type_url!r}"
        )
    value = message.SerializeToString(deterministic=True)
    version = hashlib.sha256(value).hexdigest()[:16]
    return Entry(name, version, any_pb2.Any(type_url=type_url, value=value))


class Snapshot:
    """All resources the server offers, per type URL, with a generation counter per type."""

    def __init__(self) -> None:
        self._types: dict[str, dict[str, Entry]] = {}
        self._generation: dict[str, int] = {}

    def type_urls(self) -> list[str]:
        return list(self._types)

    def entries(self, type_url: str) -> Mapping[str, Entry]:
        return self._types.get(type_url, {})

    def generation(self, type_url: str) -> int:
        return self._generation.get(type_url, 0)

    def set(self, type_url: str, resources: Mapping[str, Message], *, replace: bool) -> bool:
        """Upsert (or with replace=True, replace the whole type); returns whether anything changed.

        All resources are packed before any is stored, so a bad one changes nothing.
        """
        if not type_url.startswith(protos.TYPE_URL_PREFIX):
            raise ValueError(f"type URL {type_url!r} must start with {protos.TYPE_URL_PREFIX!r}")
        packed = {}
        for name, message in resources.items():
            if not name:
                raise ValueError(f"{type_url}: resource with an empty name")
            packed[name] = pack(type_url, name, message)
        current = self._types.setdefault(type_url, {})
        changed = False
        if replace:
            for name in [n for n in current if n not in packed]:
                del current[name]
                changed = True
        for name, entry in packed.items():
            old = current.get(name)
            if old is None or old.version != entry.version:
                current[name] = entry
                changed = True
        if changed:
            self._generation[type_url] = self.generation(type_url) + 1
        return changed

    def remove(self, type_url: str, names: Iterable[str]) -> bool:
        current = self._types.get(type_url, {})
        changed = False
        for name in names:
            if current.pop(name, None) is not None:
                changed = True
        if changed:
            self._generation[type_url] = self.generation(type_url) + 1
        return changed


Visible = Callable[[str], bool]


@dataclass(slots=True)
class Subscription:
    """One client stream's subscription to one type URL and what the client holds."""

    type_url: str
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    # name -> version the client has (or _PENDING: asked for, not answered yet).
    sent: dict[str, str] = field(default_factory=dict)
    started: bool = False
    # Snapshot generation last synced; -1 forces a full comparison.
    synced_generation: int = -1

    def apply_request(self, request: protos.DeltaDiscoveryRequest) -> None:
        """Take subscription changes (and, on the first request, initial_resource_versions)."""
        subscribe = list(request.resource_names_subscribe)
        if not (subscribe or request.resource_names_unsubscribe or not self.started):
            return  # a plain ACK/NACK: nothing to re-evaluate
        if not self.started:
            self.started = True
            self.sent.update(request.initial_resource_versions)
            # Legacy wildcard: a first request naming nothing means "everything".
            if not subscribe and not request.resource_names_unsubscribe:
                self.wildcard = True
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
            else:
                self.names.add(name)
                # Explicit subscriptions are always answered, even if the client has the version.
                self.sent[name] = _PENDING
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
            else:
                self.names.discard(name)
                self.sent.pop(name, None)
        self.synced_generation = -1

    def delta(
        self, entries: Mapping[str, Entry], visible: Visible
    ) -> tuple[list[Entry], list[str]]:
        """What to send (new or changed) and which names to remove, given the snapshot."""
        # A wildcard covers explicitly named resources too.
        wanted: Iterable[str] = entries.keys() if self.wildcard else self.names
        send: list[Entry] = []
        present: set[str] = set()
        for name in wanted:
            entry = entries.get(name)
            if entry is None or not visible(name):
                continue
            present.add(name)
            if self.sent.get(name) != entry.version:
                send.append(entry)
        removed = [name for name in self.sent if name not in present]
        return send, removed

    def commit(self, sent: Iterable[Entry], removed: Iterable[str], generation: int) -> None:
        for entry in sent:
            self.sent[entry.name] = entry.version
        for name in removed:
            self.sent.pop(name, None)
        self.synced_generation = generation

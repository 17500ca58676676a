"""HbonePair: a sans-IO client and server joined in memory (h11 ConnectionPair / aioquic style)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ztunnel.hbone.connection import HboneClientConnection, HboneServerConnection
from ztunnel.hbone.events import DataReceived, Event


@dataclass
class HbonePair:
    client: HboneClientConnection
    server: HboneServerConnection
    now: float = 0.0
    client_events: list[Event] = field(default_factory=list)
    server_events: list[Event] = field(default_factory=list)
    auto_ack: bool = True

    @classmethod
    def create(cls, **kwargs) -> HbonePair:
        pair = cls(
            client=HboneClientConnection(now=0.0, **kwargs.pop("client_kwargs", {})),
            server=HboneServerConnection(now=0.0, **kwargs.pop("server_kwargs", {})),
            **kwargs,
        )
        pair.roundtrip()
        pair.client_events.clear()
        pair.server_events.clear()
        return pair

    def _deliver(self, events: list[Event], conn, sink: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, DataReceived):
                ev = DataReceived(
                    stream_id=ev.stream_id,
                    data=memoryview(bytes(ev.data)),
                    flow_controlled_length=ev.flow_controlled_length,
                )
                if self.auto_ack:
                    conn.acknowledge_data(ev.stream_id, ev.flow_controlled_length)
            sink.append(ev)

    def transfer_once(self, chunk: int | None = None) -> int:
        """Move pending bytes both ways once (optionally in chunks); returns bytes moved."""
        moved = 0
        for src, dst, sink in (
            (self.client, self.server, self.server_events),
            (self.server, self.client, self.client_events),
        ):
            data = src.data_to_send()
            moved += len(data)
            if not data:
                continue
            step = chunk or len(data)
            for i in range(0, len(data), step):
                self._deliver(dst.receive_data(data[i : i + step], self.now), dst, sink)
        return moved

    def roundtrip(self, chunk: int | None = None, limit: int = 100) -> None:
        for _ in range(limit):
            if not self.transfer_once(chunk):
                return
        raise AssertionError("pair did not settle")

    def take(self) -> tuple[list[Event], list[Event]]:
        c, s = self.client_events, self.server_events
        self.client_events, self.server_events = [], []
        return c, s

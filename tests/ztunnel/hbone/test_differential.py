"""Differential property tests: the DATA fast path is invisible to applications.

Random sequences of tunnel opens, accepts, writes (with and without END_STREAM), half-closes and resets
on either side, with the byte stream cut into random chunks, are run twice: once through the system
under test (HBONE core on one or both ends) and once through plain python-hyper/h2 on both ends (the
reference: h2 parses and builds every DATA frame itself). Both must report the same application
events (request, 200, data, END_STREAM, peer reset with its code) in the same order. Windows are large
enough that flow control never holds data back here, so window-update timing (which differs: h2 and
the core batch acknowledgements differently) cannot change what is on the wire; a second property
test covers small windows, where the invariant is "everything written is delivered, nothing stalls".
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
from h2.settings import SettingCodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.hbone.connection import HboneClientConnection, HboneConnection, HboneServerConnection
from ztunnel.hbone.errors import ErrorCodes
from ztunnel.hbone.events import (
    ConnectionTerminated,
    DataReceived,
    GoAwayReceived,
    StreamEnded,
    StreamReset,
    TunnelEstablished,
    TunnelRejected,
    TunnelRequested,
    TunnelRequestInvalid,
)
from ztunnel.hbone.settings import H2Settings, MiB

AUTHORITY = "10.0.0.1:80"
STREAM_WINDOW = 4 * MiB
CONN_WINDOW = 16 * MiB
AppEvent = tuple[object, ...]


# ------------------------------------------------------------------ endpoints
class HboneEnd:
    """The HBONE core, acknowledging every byte as soon as it is delivered."""

    def __init__(self, conn: HboneConnection) -> None:
        self.conn = conn

    def open(self) -> int:
        assert isinstance(self.conn, HboneClientConnection)
        return self.conn.open_tunnel(AUTHORITY)

    def accept(self, sid: int) -> None:
        assert isinstance(self.conn, HboneServerConnection)
        self.conn.accept(sid)

    def write(self, sid: int, data: bytes, end: bool) -> None:
        assert self.conn.send_data(sid, data, end_stream=end) == len(data)

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)

    def reset(self, sid: int, code: int) -> None:
        self.conn.reset(sid, code)

    def output(self) -> bytes:
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> list[AppEvent]:
        out: list[AppEvent] = []
        for ev in self.conn.receive_data(data, 0.0):
            if isinstance(ev, DataReceived):
                out.append(("data", ev.stream_id, bytes(ev.data)))
                self.conn.acknowledge_data(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, TunnelRequested):
                out.append(("request", ev.stream_id, str(ev.authority)))
            elif isinstance(ev, TunnelRequestInvalid):
                out.append(("invalid", ev.stream_id))
            elif isinstance(ev, TunnelEstablished):
                out.append(("established", ev.stream_id))
            elif isinstance(ev, TunnelRejected):
                out.append(("rejected", ev.stream_id, ev.status))
            elif isinstance(ev, StreamEnded):
                out.append(("end", ev.stream_id))
            elif isinstance(ev, StreamReset):
                kind = "reset" if ev.remote else "local-reset"
                out.append((kind, ev.stream_id, ev.error_code))
            elif isinstance(ev, ConnectionTerminated):
                out.append(("terminated", ev.error_code))
            elif isinstance(ev, GoAwayReceived):
                out.append(("goaway", ev.last_stream_id))
        return out


class H2End:
    """Plain h2 doing everything itself, configured with HBONE's windows."""

    def __init__(self, *, client_side: bool) -> None:
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        )
        conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW},
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CONN_WINDOW - 65_535)
        self.conn = conn

    def open(self) -> int:
        sid = int(self.conn.get_next_available_stream_id())
        self.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", AUTHORITY.encode())])
        return sid

    def accept(self, sid: int) -> None:
        self.conn.send_headers(sid, [(b":status", b"200")])

    def write(self, sid: int, data: bytes, end: bool) -> None:
        assert self.conn.local_flow_control_window(sid) >= len(data)
        step = int(self.conn.max_outbound_frame_size)
        for i in range(0, len(data), step):
            last = i + step >= len(data)
            self.conn.send_data(sid, data[i : i + step], end_stream=end and last)
        if end and not data:
            self.conn.end_stream(sid)

    def end(self, sid: int) -> None:
        self.conn.end_stream(sid)

    def reset(self, sid: int, code: int) -> None:
        self.conn.reset_stream(sid, code)

    def output(self) -> bytes:
        return bytes(self.conn.data_to_send())

    def receive(self, data: bytes) -> list[AppEvent]:
        out: list[AppEvent] = []
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as err:
            return [("terminated", int(err.error_code or ErrorCodes.PROTOCOL_ERROR))]
        for ev in events:
            if isinstance(ev, h2.events.DataReceived):
                out.append(("data", ev.stream_id, bytes(ev.data or b"")))
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.RequestReceived):
                authority = dict(ev.headers or ())[b":authority"].decode()
                out.append(("request", ev.stream_id, authority))
            elif isinstance(ev, h2.events.ResponseReceived):
                status = int(dict(ev.headers or ())[b":status"])
                out.append(
                    ("established", ev.stream_id)
                    if status == 200
                    else ("rejected", ev.stream_id, status)
                )
            elif isinstance(ev, h2.events.StreamEnded):
                out.append(("end", ev.stream_id))
            elif isinstance(ev, h2.events.StreamReset):
                kind = "reset" if ev.remote_reset else "local-reset"
                out.append((kind, ev.stream_id, int(ev.error_code or 0)))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                out.append(("terminated", int(ev.error_code or 0)))
        return out


def merge_data(events: list[AppEvent]) -> list[AppEvent]:
    """Adjacent data events of one stream become one: chunking is not application-visible."""
    merged: list[AppEvent] = []
    for ev in events:
        if ev[0] == "data" and merged and merged[-1][0] == "data" and merged[-1][1] == ev[1]:
            merged[-1] = ("data", ev[1], merged[-1][2] + ev[2])  # type: ignore[operator]
        elif ev[0] != "data" or ev[2]:
            merged.append(ev)
    return merged


@dataclass
class System:
    client: HboneEnd | H2End
    server: HboneEnd | H2End
    chunked: bool
    log: dict[str, list[AppEvent]] = field(default_factory=lambda: {"client": [], "server": []})

    def transfer(self, to_server: bool, rng: random.Random | None) -> list[AppEvent]:
        src, dst = (self.client, self.server) if to_server else (self.server, self.client)
        data = src.output()
        if not data:
            return []
        cuts = [0, len(data)]
        if self.chunked and rng is not None and len(data) > 1:
            cuts += rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 24)))
        cuts.sort()
        events: list[AppEvent] = []
        for a, b in itertools.pairwise(cuts):
            if b > a:
                events += dst.receive(data[a:b])
        events = merge_data(events)
        self.log["server" if to_server else "client"] += events
        return events

    def settle(self) -> None:
        for _ in range(50):
            moved = self.transfer(True, None) + self.transfer(False, None)
            if not moved and not self.client_pending() and not self.server_pending():
                return
        raise AssertionError("did not settle")

    def client_pending(self) -> bool:
        return False

    def server_pending(self) -> bool:
        return False


PAIRINGS: dict[str, Callable[[], tuple[HboneEnd | H2End, HboneEnd | H2End]]] = {
    "hbone-hbone": lambda: (
        HboneEnd(HboneClientConnection(now=0.0)),
        HboneEnd(HboneServerConnection(now=0.0)),
    ),
    "hbone-client-h2-server": lambda: (
        HboneEnd(HboneClientConnection(now=0.0)),
        H2End(client_side=False),
    ),
    "h2-client-hbone-server": lambda: (
        H2End(client_side=True),
        HboneEnd(HboneServerConnection(now=0.0)),
    ),
}


# ------------------------------------------------------------------ model of valid operations
@dataclass
class StreamModel:
    requested: bool = False
    established: bool = False
    accepted: bool = False  # the server sent 200
    answered: bool = False  # the server sent 200 or reset the stream
    closed_for: set[str] = field(default_factory=set)  # sides that may not send (ended / reset)
    dead_for: set[str] = field(default_factory=set)  # sides that saw or sent a reset
    fin_sent: set[str] = field(default_factory=set)
    fin_seen: set[str] = field(default_factory=set)

    def gone_for(self, side: str) -> bool:
        """Reset, or ended both ways as far as ``side`` knows: nothing more to do on it."""
        return side in self.dead_for or (side in self.fin_sent and side in self.fin_seen)


def update_model(streams: dict[int, StreamModel], side: str, events: list[AppEvent]) -> None:
    for ev in events:
        s = streams.get(ev[1]) if len(ev) > 1 and isinstance(ev[1], int) else None
        if s is None:
            continue
        if ev[0] == "request":
            s.requested = True
        elif ev[0] == "established":
            s.established = True
        elif ev[0] == "end":
            s.fin_seen.add(side)
        elif ev[0] in ("reset", "local-reset", "rejected"):
            s.dead_for |= {side}
            s.closed_for |= {side}


OPS = st.sampled_from(
    ["open", "accept", "write", "write", "write", "end", "reset", "c2s", "s2c", "c2s", "s2c"]
)
RESET_CODES = st.sampled_from([ErrorCodes.CANCEL, ErrorCodes.NO_ERROR, ErrorCodes.INTERNAL_ERROR])


@pytest.mark.parametrize("pairing", list(PAIRINGS), ids=list(PAIRINGS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_path_matches_plain_h2(pairing, data):
    make = PAIRINGS[pairing]
    sut = System(*make(), chunked=True)
    ref = System(H2End(client_side=True), H2End(client_side=False), chunked=False)
    for system in (sut, ref):
        system.settle()
        system.log = {"client": [], "server": []}
    streams: dict[int, StreamModel] = {}
    for step in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(OPS, label=f"op{step}")
        sides = ["client", "server"]
        if op == "open":
            if len(streams) >= 5:
                continue
            sid = sut.client.open()
            assert ref.client.open() == sid
            streams[sid] = StreamModel()
        elif op == "accept":
            pending = [
                i
                for i, s in streams.items()
                if s.requested and not s.answered and not s.gone_for("server")
            ]
            if not pending:
                continue
            sid = data.draw(st.sampled_from(pending), label="accept")
            streams[sid].answered = streams[sid].accepted = True
            sut.server.accept(sid)
            ref.server.accept(sid)
        elif op in ("write", "end", "reset"):
            side = data.draw(st.sampled_from(sides), label="side")
            if op == "reset":
                ok = [
                    i
                    for i, s in streams.items()
                    if not s.gone_for(side) and (side == "client" or s.requested)
                ]
            else:
                ok = [
                    i
                    for i, s in streams.items()
                    if side not in s.closed_for
                    and (s.established if side == "client" else s.accepted)
                ]
            if not ok:
                continue
            sid = data.draw(st.sampled_from(ok), label="stream")
            s = streams[sid]
            end = getattr(sut, side)
            ref_end = getattr(ref, side)
            if op == "write":
                n = data.draw(st.sampled_from([0, 1, 100, 16_383, 16_385, 40_000]), label="size")
                fin = data.draw(st.booleans(), label="fin")
                payload = random.Random(step * 7919 + n).randbytes(n)
                end.write(sid, payload, fin)
                ref_end.write(sid, payload, fin)
                if fin:
                    s.closed_for.add(side)
                    s.fin_sent.add(side)
            elif op == "end":
                end.end(sid)
                ref_end.end(sid)
                s.closed_for.add(side)
                s.fin_sent.add(side)
            else:
                code = data.draw(RESET_CODES, label="code")
                end.reset(sid, code)
                ref_end.reset(sid, code)
                s.dead_for.add(side)
                s.closed_for.add(side)
                if side == "server":
                    s.answered = True
        else:
            to_server = op == "c2s"
            rng = random.Random(data.draw(st.integers(0, 2**32), label="chunking"))
            got = sut.transfer(to_server, rng)
            want = ref.transfer(to_server, None)
            assert got == want, f"{op} at step {step}"
            update_model(streams, "server" if to_server else "client", want)
    for system in (sut, ref):
        system.settle()
    assert merge_data(sut.log["server"]) == merge_data(ref.log["server"])
    assert merge_data(sut.log["client"]) == merge_data(ref.log["client"])
    for side in ("client", "server"):
        assert not [e for e in ref.log[side] if e[0] in ("local-reset", "terminated", "invalid")]


# ------------------------------------------------------------------ small windows: no stall, no loss
SMALL = H2Settings(stream_window=65_535, connection_window=65_535, max_frame_size=16_384)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 300_000), min_size=1, max_size=4),
    chunking=st.integers(0, 2**32),
    ack_delay=st.integers(0, 3),
)
def test_small_windows_deliver_everything_without_stall(sizes, chunking, ack_delay):
    """Several streams share one small connection window; acknowledgements lag by up to
    ``ack_delay`` transfers; the byte stream is cut randomly. Every write completes."""
    client = HboneClientConnection(now=0.0, settings=SMALL)
    server = HboneServerConnection(now=0.0, settings=SMALL)
    rng = random.Random(chunking)
    received: dict[int, bytearray] = {}
    ended: set[int] = set()
    unacked: list[list[tuple[int, int]]] = []

    def deliver(src, dst) -> list:
        data = src.data_to_send()
        events: list = []
        pos = 0
        while pos < len(data):
            step = rng.choice([1, 9, 10, 700, 16_393, 70_000])
            events += dst.receive_data(data[pos : pos + step], 0.0)
            pos += step
        return events

    sids = [client.open_tunnel(AUTHORITY) for _ in sizes]
    for ev in deliver(client, server):
        if isinstance(ev, TunnelRequested):
            server.accept(ev.stream_id)
    deliver(server, client)
    payloads = {sid: random.Random(sid).randbytes(n) for sid, n in zip(sids, sizes, strict=True)}
    offsets = dict.fromkeys(sids, 0)
    fin_sent: set[int] = set()
    for _ in range(5_000):
        for sid in sids:
            if sid not in fin_sent:
                rest = payloads[sid][offsets[sid] :]
                offsets[sid] += client.send_data(sid, rest, end_stream=True)
                if offsets[sid] == len(payloads[sid]):
                    fin_sent.add(sid)
        batch: list[tuple[int, int]] = []
        events = deliver(client, server)
        for ev in events:
            if isinstance(ev, DataReceived):
                received.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                batch.append((ev.stream_id, ev.flow_controlled_length))
            elif isinstance(ev, StreamEnded):
                ended.add(ev.stream_id)
            else:
                assert not isinstance(ev, (StreamReset, ConnectionTerminated)), ev
        unacked.append(batch)
        # The slow reader: bytes are acknowledged ``ack_delay`` rounds after they arrived, or
        # all at once when nothing else can move.
        stuck = not events and not any(unacked[:-1])
        while unacked and (len(unacked) > ack_delay or stuck):
            for sid, n in unacked.pop(0):
                server.acknowledge_data(sid, n)
        replies = deliver(server, client)
        for ev in replies:
            assert not isinstance(ev, (StreamReset, ConnectionTerminated)), ev
        if len(ended) == len(sids):
            break
        if stuck and not replies:  # nothing arrived, nothing to acknowledge, no WINDOW_UPDATE
            blocked = {s: client.send_window(s) for s in sids if s not in fin_sent}
            raise AssertionError(f"flow-control deadlock: blocked streams/windows {blocked}")
    assert ended == set(sids), "transfer did not finish"
    for sid in sids:
        assert bytes(received.get(sid, b"")) == payloads[sid]

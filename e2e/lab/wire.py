"""What a packet capture on the link between nodes proves (pure analysis of captured TCP segments).

Owns the verdict the demo and the tests print: every TCP flow goes to or from port 15008, each
direction of each flow is a well-formed sequence of TLS records from its first byte, every TLS
ClientHello offers ALPN ``h2`` (and nothing else) and carries no SNI (HBONE), and a given secret
(the payload the test sent) occurs in no segment and in no reassembled stream.

Input is plain values (``Segment``); ``segments_from_pcap`` is the only function that reads a file
(with scapy). TLS parsing follows RFC 8446 section 5.1 (records) and 4.1.2 (ClientHello).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
MAX_RECORD = 2**14 + 256
EXT_SNI = 0
EXT_ALPN = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    payload: bytes
    syn: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowReport:
    client: str
    server: str
    bytes_up: int
    bytes_down: int
    tls_records: int
    tls_ok: bool
    problem: str
    alpn: tuple[str, ...]
    sni: str | None
    midstream: bool = False
    """The capture began after the connection was opened (a pooled HBONE connection): no handshake
    to see; its bytes are checked from the first TLS record boundary found."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WireReport:
    segments: int
    flows: tuple[FlowReport, ...]
    non_hbone_flows: tuple[str, ...]
    secret_seen: bool
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        alpns = sorted({",".join(f.alpn) for f in self.flows if f.alpn})
        return (
            f"{self.segments} TCP segments in {len(self.flows)} flow(s); "
            f"all to port 15008: {not self.non_hbone_flows}; "
            f"all TLS from the first byte: {all(f.tls_ok for f in self.flows)}; "
            f"ALPN offered: {alpns or ['-']}; "
            f"payload seen in clear: {self.secret_seen}"
        )


def parse_client_hello(body: bytes) -> tuple[tuple[str, ...], str | None]:
    """(ALPN protocols, SNI host) of a ClientHello handshake body (after type and length)."""
    pos = 2 + 32  # legacy_version, random
    sid_len = body[pos]
    pos += 1 + sid_len
    (cs_len,) = struct.unpack_from("!H", body, pos)
    pos += 2 + cs_len
    comp_len = body[pos]
    pos += 1 + comp_len
    if pos + 2 > len(body):
        return (), None
    (ext_total,) = struct.unpack_from("!H", body, pos)
    pos += 2
    end = min(len(body), pos + ext_total)
    alpn: list[str] = []
    sni: str | None = None
    while pos + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", body, pos)
        data = body[pos + 4 : pos + 4 + ext_len]
        pos += 4 + ext_len
        if ext_type == EXT_ALPN and len(data) >= 2:
            i = 2
            while i < len(data):
                n = data[i]
                alpn.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
                i += 1 + n
        elif ext_type == EXT_SNI and len(data) >= 5:
            (name_len,) = struct.unpack_from("!H", data, 3)
            sni = data[5 : 5 + name_len].decode("ascii", "replace")
    return tuple(alpn), sni


def tls_records(stream: bytes) -> tuple[int, str, list[bytes]]:
    """Walk TLS records: (count, problem or "", handshake payloads). A truncated last record is fine
    (the capture may stop mid-record)."""
    pos, count = 0, 0
    handshakes: list[bytes] = []
    while pos + 5 <= len(stream):
        ctype, major, minor, length = stream[pos], stream[pos + 1], stream[pos + 2], 0
        (length,) = struct.unpack_from("!H", stream, pos + 3)
        if ctype not in TLS_CONTENT_TYPES or major != 3 or minor > 4 or length > MAX_RECORD:
            return (
                count,
                f"byte {pos}: not a TLS record header ({stream[pos : pos + 5].hex()})",
                handshakes,
            )
        if ctype == 22:
            handshakes.append(stream[pos + 5 : pos + 5 + length])
        pos += 5 + length
        count += 1
    return count, "", handshakes


def _align(stream: bytes, *, want: int = 3) -> int:
    """Offset of the first position where ``want`` TLS record headers chain (or the stream ends)."""
    for start in range(min(len(stream), MAX_RECORD + 5)):
        pos, n = start, 0
        while pos + 5 <= len(stream) and n < want:
            ctype, major, minor = stream[pos], stream[pos + 1], stream[pos + 2]
            (length,) = struct.unpack_from("!H", stream, pos + 3)
            if ctype not in TLS_CONTENT_TYPES or major != 3 or minor > 4 or length > MAX_RECORD:
                break
            pos += 5 + length
            n += 1
        else:
            return start
        if n == want:
            return start
    return 0


def _reassemble(segs: Sequence[Segment]) -> bytes:
    """Payload of one direction in sequence order (retransmissions dropped)."""
    data = sorted((s for s in segs if s.payload), key=lambda s: s.seq)
    if not data:
        return b""
    out = bytearray()
    base = data[0].seq
    for s in data:
        off = (s.seq - base) & 0xFFFFFFFF
        if off + len(s.payload) <= len(out):
            continue
        if off > len(out):
            break  # a hole (packet missed by the capture): stop, what we have is still checked
        out += s.payload[len(out) - off :]
    return bytes(out)


def analyze(segments: Iterable[Segment], *, secret: bytes, hbone_port: int = 15008) -> WireReport:
    segs = list(segments)
    flows: dict[tuple[str, int, str, int], list[Segment]] = {}
    for s in segs:
        flows.setdefault((s.src, s.sport, s.dst, s.dport), []).append(s)
    problems: list[str] = []
    secret_seen = any(secret and secret in s.payload for s in segs)
    reports: list[FlowReport] = []
    non_hbone: list[str] = []
    seen: set[tuple[str, int, str, int]] = set()
    for key in flows:
        a, ap, b, bp = key
        if key in seen:
            continue
        back = (b, bp, a, ap)
        seen |= {key, back}
        if bp == hbone_port:
            client, server = key, back
        elif ap == hbone_port:
            client, server = back, key
        else:
            non_hbone.append(f"{a}:{ap} <-> {b}:{bp}")
            continue
        up = _reassemble(flows.get(client, []))
        down = _reassemble(flows.get(server, []))
        if secret and (secret in up or secret in down):
            secret_seen = True
        midstream = not any(s.syn for s in flows.get(client, []))
        if midstream:
            up, down = up[_align(up) :], down[_align(down) :]
        n_up, prob_up, hs = tls_records(up)
        n_down, prob_down, _ = tls_records(down)
        alpn: tuple[str, ...] = ()
        sni: str | None = None
        for h in hs:
            if h[:1] == b"\x01":  # ClientHello
                try:
                    alpn, sni = parse_client_hello(h[4:])
                except (IndexError, struct.error):
                    prob_up = prob_up or "ClientHello could not be parsed"
                break
        problem = "; ".join(
            p
            for p in (
                prob_up and f"client->server {prob_up}",
                prob_down and f"server->client {prob_down}",
            )
            if p
        )
        report = FlowReport(
            client=f"{client[0]}:{client[1]}",
            server=f"{client[2]}:{client[3]}",
            bytes_up=len(up),
            bytes_down=len(down),
            tls_records=n_up + n_down,
            tls_ok=not problem,
            problem=problem,
            alpn=alpn,
            sni=sni,
            midstream=midstream,
        )
        reports.append(report)
        if problem:
            problems.append(f"flow {report.client} -> {report.server}: {problem}")
        if up and not midstream and alpn != ("h2",):
            problems.append(
                f"flow {report.client} -> {report.server}: ALPN offered {list(alpn)}, want ['h2']"
            )
        if sni:
            problems.append(
                f"flow {report.client} -> {report.server}: SNI {sni!r} sent (HBONE sends none)"
            )
    if non_hbone:
        problems.append("TCP flows not to port 15008: " + ", ".join(non_hbone))
    if secret_seen:
        problems.append("the payload was seen in clear on the wire")
    if not reports:
        problems.append("no HBONE flow was captured")
    return WireReport(
        segments=len(segs),
        flows=tuple(reports),
        non_hbone_flows=tuple(non_hbone),
        secret_seen=secret_seen,
        problems=tuple(problems),
    )


def segments_from_pcap(path: str) -> list[Segment]:
    """TCP segments of a pcap file (IPv4 and IPv6)."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    out: list[Segment] = []
    for pkt in rdpcap(path):
        if TCP not in pkt:
            continue
        ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
        if ip is None:
            continue
        tcp = pkt[TCP]
        # Length from the IP header: Ethernet padding of short frames is not payload.
        total = int(ip.len) - int(ip.ihl) * 4 if IP in pkt else int(ip.plen)
        size = max(0, total - int(tcp.dataofs) * 4)
        out.append(
            Segment(
                src=str(ip.src),
                dst=str(ip.dst),
                sport=int(tcp.sport),
                dport=int(tcp.dport),
                seq=int(tcp.seq) + (1 if "S" in str(tcp.flags) else 0),
                payload=bytes(tcp.payload)[:size],
                syn="S" in str(tcp.flags),
            )
        )
    return out

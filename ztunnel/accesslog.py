"""Access logs: one line per connection when it closes, with Istio ztunnel's field names.

Owns the record (``AccessEntry``), its two renderings (ztunnel-style ``key=value`` text, or one JSON
object per line) and the writer. Fields: ``src.addr``, ``src.workload``, ``src.namespace``,
``src.identity`` (mTLS peers only), ``dst.addr`` (the next hop, e.g. ``podIP:15008``),
``dst.hbone_addr`` (the CONNECT target), ``dst.service``, ``dst.workload``, ``dst.namespace``,
``dst.identity``, ``direction`` (inbound|outbound), ``bytes_sent`` (client to server), ``bytes_recv``
(server to client), ``duration`` (``"<n>ms"``) and ``error``. A connection that ended with an error
is logged at ERROR ("connection complete" with ``error=``), others at INFO.

``format_entry`` is pure; ``AccessLog`` writes through the ``access`` logger or a given sink.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

ACCESS_LOGGER = logging.getLogger("access")


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessEntry:
    """What is known about one finished connection; ``None`` fields are left out."""

    direction: str  # "inbound" | "outbound"
    src_addr: str
    dst_addr: str
    src_workload: str | None = None
    src_namespace: str | None = None
    src_identity: str | None = None
    dst_hbone_addr: str | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    duration_ms: int = 0
    error: str | None = None

    def fields(self) -> dict[str, str | int]:
        """The fields in ztunnel's order and names, absent ones dropped."""
        ordered: list[tuple[str, str | int | None]] = [
            ("src.addr", self.src_addr),
            ("src.workload", self.src_workload),
            ("src.namespace", self.src_namespace),
            ("src.identity", self.src_identity),
            ("dst.addr", self.dst_addr),
            ("dst.hbone_addr", self.dst_hbone_addr),
            ("dst.service", self.dst_service),
            ("dst.workload", self.dst_workload),
            ("dst.namespace", self.dst_namespace),
            ("dst.identity", self.dst_identity),
            ("direction", self.direction),
            ("bytes_sent", self.bytes_sent),
            ("bytes_recv", self.bytes_recv),
            ("duration", f"{self.duration_ms}ms"),
            ("error", self.error),
        ]
        return {k: v for k, v in ordered if v is not None}


def format_entry(entry: AccessEntry, fmt: LogFormat) -> str:
    """One line: ``connection complete k=v ...`` (strings quoted) or a JSON object."""
    fields = entry.fields()
    if fmt is LogFormat.JSON:
        return json.dumps(
            {"level": "error" if entry.error else "info", "scope": "access"}
            | {"message": "connection complete"}
            | fields,
            separators=(",", ":"),
        )
    parts = ["connection complete"]
    for key, value in fields.items():
        parts.append(f"{key}={value}" if isinstance(value, int) else f"{key}={json.dumps(value)}")
    return " ".join(parts)


def parse_text_line(line: str) -> dict[str, str]:
    """Inverse of the text format (tests and tools): ``{"src.addr": "...", "bytes_sent": "12"}``."""
    prefix = "connection complete"
    rest = line[line.index(prefix) + len(prefix) :].strip()
    out: dict[str, str] = {}
    decoder = json.JSONDecoder()
    i = 0
    while i < len(rest):
        eq = rest.index("=", i)
        key = rest[i:eq]
        if rest[eq + 1 : eq + 2] == '"':
            value, end = decoder.raw_decode(rest, eq + 1)
            out[key] = str(value)
        else:
            end = rest.find(" ", eq + 1)
            end = len(rest) if end < 0 else end
            out[key] = rest[eq + 1 : end]
        i = end + 1
    return out


class AccessLog:
    """Writes entries; ``sink`` (if given) receives every line as well as the ``access`` logger."""

    def __init__(
        self, fmt: LogFormat = LogFormat.TEXT, *, sink: Callable[[str], None] | None = None
    ) -> None:
        self.format = fmt
        self.sink = sink

    def write(self, entry: AccessEntry) -> None:
        level = logging.ERROR if entry.error else logging.INFO
        if self.sink is None and not ACCESS_LOGGER.isEnabledFor(level):
            return  # nobody would read it: skip the formatting (a dozen json.dumps per line)
        line = format_entry(entry, self.format)
        ACCESS_LOGGER.log(level, "%s", line)
        if self.sink is not None:
            self.sink(line)

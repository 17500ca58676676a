"""The access log formats a line only when someone reads it (a handler at that level, or a sink)."""

from __future__ import annotations

import logging

import pytest

from ztunnel import accesslog
from ztunnel.accesslog import ACCESS_LOGGER, AccessEntry, AccessLog, LogFormat

ENTRY = AccessEntry(direction="outbound", src_addr="10.0.0.1:1234", dst_addr="10.0.0.2:80")


@pytest.fixture
def formatted(monkeypatch):
    calls: list[AccessEntry] = []
    real = accesslog.format_entry

    def spy(entry, fmt):
        calls.append(entry)
        return real(entry, fmt)

    monkeypatch.setattr(accesslog, "format_entry", spy)
    old = ACCESS_LOGGER.level
    yield calls
    ACCESS_LOGGER.setLevel(old)


@pytest.mark.parametrize(
    ("level", "error", "sink", "expected"),
    [
        (logging.WARNING, None, False, 0),
        (logging.WARNING, "connect failed", False, 1),
        (logging.INFO, None, False, 1),
        (logging.WARNING, None, True, 1),
    ],
    ids=["info-entry-not-enabled", "error-entry-enabled", "info-enabled", "sink-always"],
)
def test_formats_only_when_read(formatted, level, error, sink, expected):
    ACCESS_LOGGER.setLevel(level)
    lines: list[str] = []
    log = AccessLog(LogFormat.TEXT, sink=lines.append if sink else None)
    log.write(_entry(error))
    assert len(formatted) == expected
    assert len(lines) == (1 if sink else 0)


def _entry(error: str | None) -> AccessEntry:
    return AccessEntry(
        direction=ENTRY.direction, src_addr=ENTRY.src_addr, dst_addr=ENTRY.dst_addr, error=error
    )

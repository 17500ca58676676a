"""The admin endpoint (127.0.0.1:15000 only): ``/config_dump``, ``/logging``, ``/quitquitquit``.

Owns the HTTP handlers; the data comes from callbacks the app passes in:

* ``GET /config_dump``: JSON with ``workloads``, ``services``, ``policies``, ``certificates`` (state,
  serial, validity per identity), ``connections`` (live, from the tracker) and ``config`` (source,
  reload counters) -- whatever ``dump()`` returns, serialized;
* ``GET /logging`` shows the current levels; ``POST /logging?level=<spec>`` sets them, where a spec is
  ``info`` (root) or ``access=debug,ztunnel=warning`` (comma-joined ``logger=level``); ``?reset`` goes
  back to the start-up levels;
* ``POST /quitquitquit`` starts a graceful drain.

``serialize`` turns the state model (frozen dataclasses, enums, IPs, mappings) into JSON values.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web

LEVELS = ("critical", "error", "warning", "info", "debug")


def serialize(value: Any) -> Any:
    """JSON-ready form of model values (dataclasses by field, enums by value, IPs as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: serialize(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): serialize(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [serialize(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


class LoggingSpecError(ValueError):
    """A ``/logging?level=`` value that is not ``level`` or ``logger=level,...``."""


def parse_level_spec(spec: str) -> dict[str, int]:
    """``"info"`` -> ``{"": INFO}``; ``"access=debug,info"`` -> ``{"access": DEBUG, "": INFO}``."""
    out: dict[str, int] = {}
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, _, level = part.rpartition("=")
        level = level.strip().lower()
        if level == "warn":
            level = "warning"
        if level == "trace":
            level = "debug"
        if level not in LEVELS:
            raise LoggingSpecError(
                f"logging level {level!r} in {spec!r} is not one of {', '.join(LEVELS)}"
            )
        out[name.strip()] = getattr(logging, level.upper())
    if not out:
        raise LoggingSpecError(f"logging spec {spec!r} names no level")
    return out


def current_levels(extra: tuple[str, ...] = ("access", "ztunnel")) -> dict[str, str]:
    names = {"", *extra, *(n for n in logging.root.manager.loggerDict if n.startswith("ztunnel"))}
    out: dict[str, str] = {}
    for name in sorted(names):
        logger = logging.getLogger(name or None)
        if name and logger.level == logging.NOTSET:
            continue
        out[name or "root"] = logging.getLevelName(logger.getEffectiveLevel()).lower()
    return out


class Admin:
    """Routes for the admin server; ``dump`` builds the config_dump, ``quit`` starts the drain."""

    def __init__(self, *, dump: Callable[[], dict[str, Any]], quit: Callable[[str], None]) -> None:
        self.dump = dump
        self.quit = quit
        self._initial = {"": logging.getLogger().level}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self._index),
            web.get("/config_dump", self._config_dump),
            web.get("/logging", self._show_logging),
            web.post("/logging", self._set_logging),
            web.post("/quitquitquit", self._quit),
        ]

    async def _index(self, _request: web.Request) -> web.Response:
        return web.Response(
            text="ztunnel admin\n  /config_dump\n  /logging (POST ?level=)\n  /quitquitquit (POST)\n"
        )

    async def _config_dump(self, _request: web.Request) -> web.Response:
        body = json.dumps(serialize(self.dump()), indent=2, sort_keys=False)
        return web.Response(text=body, content_type="application/json")

    async def _show_logging(self, _request: web.Request) -> web.Response:
        return web.json_response({"levels": current_levels()})

    async def _set_logging(self, request: web.Request) -> web.Response:
        if "reset" in request.query:
            for name in list(logging.root.manager.loggerDict):
                logging.getLogger(name).setLevel(logging.NOTSET)
            logging.getLogger().setLevel(self._initial[""])
            return web.json_response({"levels": current_levels()})
        spec = request.query.get("level")
        if spec is None:
            return web.json_response({"levels": current_levels()})
        try:
            levels = parse_level_spec(spec)
        except LoggingSpecError as err:
            return web.Response(status=400, text=f"{err}\n")
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level)
        return web.json_response({"levels": current_levels()})

    async def _quit(self, _request: web.Request) -> web.Response:
        self.quit("/quitquitquit")
        return web.Response(text="OK\n")

"""Helpers for parsing Kubernetes-shaped object dicts: typed field access with error paths.

Owns `ConfigError` (what is wrong, in which object, at which field) and `Reader`, a cursor over one
mapping that records errors instead of raising, so one pass reports every problem of an object.
Unknown fields are reported too: the API server prunes them, so one here is a typo or a feature this
waypoint does not implement, and silently ignoring it would change what the user asked for.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigError:
    """One problem in one configuration object."""

    kind: str
    """Object kind, e.g. ``HTTPRoute``."""
    namespace: str
    name: str
    field: str
    """Dotted path of the offending field, e.g. ``spec.rules[0].matches[1].path.value``."""
    message: str

    def __str__(self) -> str:
        where = (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else f"{self.kind} {self.name}"
        )
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class InvalidObjectError(ValueError):
    """Raised when an object has at least one error; carries all of them."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors


@dataclass(slots=True)
class Collector:
    """Accumulates errors for one object."""

    kind: str
    namespace: str
    name: str
    errors: list[ConfigError] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.errors.append(
            ConfigError(
                kind=self.kind,
                namespace=self.namespace,
                name=self.name,
                field=path,
                message=message,
            )
        )

    def raise_if_any(self) -> None:
        if self.errors:
            raise InvalidObjectError(list(self.errors))


class Reader:
    """Typed access to the fields of one mapping; problems go to the collector, never raise."""

    def __init__(self, data: Mapping[str, Any], path: str, errors: Collector) -> None:
        self.data = data
        self.path = path
        self.errors = errors
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> None:
        self.errors.add(self.at(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self.data.get(key)

    def text(self, key: str, *, required: bool = False, max_len: int = 1024) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.error(key, "required field is missing")
            return None
        if not isinstance(value, str):
            self.error(key, f"must be a string, got {type(value).__name__}")
            return None
        if len(value) > max_len:
            self.error(key, f"longer than {max_len} characters")
            return None
        return value

    def enum(self, key: str, allowed: tuple[str, ...], *, default: str | None = None) -> str | None:
        value = self.text(key)
        if value is None:
            return default
        if value not in allowed:
            self.error(key, f"unsupported value {value!r} (supported: {', '.join(allowed)})")
            return None
        return value

    def integer(
        self, key: str, *, low: int, high: int, required: bool = False, default: int | None = None
    ) -> int | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.error(key, "required field is missing")
            return default
        # bool is an int subclass; YAML `true` is never a number here.
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"must be an integer, got {type(value).__name__}")
            return None
        if not low <= value <= high:
            self.error(key, f"{value} is out of range [{low}, {high}]")
            return None
        return value

    def sub(self, key: str, *, required: bool = False) -> Reader | None:
        value = self.raw(key)
        if value is None:
            if required:
                self.error(key, "required field is missing")
            return None
        if not isinstance(value, Mapping):
            self.error(key, f"must be an object, got {type(value).__name__}")
            return None
        return Reader(value, self.at(key), self.errors)

    def array(self, key: str, *, max_items: int = 1024) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"must be a list, got {type(value).__name__}")
            return []
        if len(value) > max_items:
            self.error(key, f"has {len(value)} items, at most {max_items} are allowed")
            return []
        return value

    def objects(self, key: str, *, max_items: int = 1024) -> Iterator[Reader]:
        for i, item in enumerate(self.array(key, max_items=max_items)):
            path = f"{self.at(key)}[{i}]"
            if not isinstance(item, Mapping):
                self.errors.add(path, f"must be an object, got {type(item).__name__}")
                continue
            yield Reader(item, path, self.errors)

    def strings(self, key: str, *, max_items: int = 1024, max_len: int = 1024) -> list[str]:
        out: list[str] = []
        for i, item in enumerate(self.array(key, max_items=max_items)):
            if not isinstance(item, str) or len(item) > max_len:
                self.errors.add(
                    f"{self.at(key)}[{i}]", f"must be a string of at most {max_len} characters"
                )
                continue
            out.append(item)
        return out

    def finish(self, ignore: tuple[str, ...] = ()) -> None:
        """Report keys that no accessor consumed (typos or unsupported features)."""
        for key in self.data:
            if key not in self._seen and key not in ignore:
                self.error(str(key), "unknown or unsupported field")


def object_identity(obj: Any, kind: str) -> tuple[str, str, Collector]:
    """Namespace and name of a Kubernetes object dict, with a collector named after it."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    namespace = "default"
    name = "<unnamed>"
    if isinstance(meta, Mapping):
        if isinstance(meta.get("namespace"), str) and meta["namespace"]:
            namespace = meta["namespace"]
        if isinstance(meta.get("name"), str) and meta["name"]:
            name = meta["name"]
    errors = Collector(kind, namespace, name)
    if not isinstance(obj, Mapping):
        errors.add("", f"must be an object, got {type(obj).__name__}")
    elif not isinstance(meta, Mapping) or not meta.get("name"):
        errors.add("metadata.name", "required field is missing")
    return namespace, name, errors


def parse_timestamp(value: Any, path: str, errors: Collector) -> datetime | None:
    """RFC 3339 `creationTimestamp` (as the API server writes it)."""
    if value is None:
        return None
    if isinstance(value, datetime):  # YAML loaders turn timestamps into datetimes
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        errors.add(path, "must be an RFC 3339 timestamp string")
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except ValueError:
        errors.add(path, f"{value!r} is not an RFC 3339 timestamp")
        return None


# Gateway API Duration (GEP-2257): 1-4 groups of up to 5 digits with h, m, s or ms.
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    """Seconds of a Gateway API duration string; raises ValueError on a bad one."""
    if not _DURATION.match(text):
        raise ValueError(f"{text!r} is not a Gateway API duration (e.g. 10s, 1m30s, 500ms)")
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))

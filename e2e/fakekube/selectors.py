"""Label and field selectors as the Kubernetes API server parses and matches them.

Owns the selector grammars (`app=x,tier!=db,env in (a,b),!legacy,team` for labels; `metadata.name=x,
status.phase!=Running` for fields) and their matching. Pure: `SelectorError` carries the text the real
server puts into its 400 BadRequest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class SelectorError(ValueError):
    """A selector that the real server would reject with 400 BadRequest."""


_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_KEY_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Requirement:
    key: str
    op: str
    """One of "=", "!=", "in", "notin", "exists", "!"."""
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present  # "!"


def _check_key(key: str, selector: str) -> None:
    prefix, _, name = key.rpartition("/")
    if not name or len(name) > 63 or not _LABEL_KEY_NAME.match(name) or len(prefix) > 253:
        raise SelectorError(
            f"unable to parse requirement: invalid label key {key!r} in selector {selector!r}: name part "
            "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
            "alphanumeric character"
        )


def _check_value(value: str, selector: str) -> None:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise SelectorError(
            f"unable to parse requirement: invalid label value {value!r} in selector {selector!r}: "
            "must be 63 characters or less and consist of alphanumeric characters, '-', '_' or '.'"
        )


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unable to parse requirement: unbalanced ')' in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SelectorError(f"unable to parse requirement: unbalanced '(' in {text!r}")
    parts.append("".join(current))
    return parts


_SET_RE = re.compile(r"^\s*(\S+?)\s+(in|notin)\s*\((.*)\)\s*$")


def parse_label_selector(text: str | None) -> tuple[Requirement, ...]:
    """Parse a labelSelector query value; "" or None selects everything."""
    if text is None or not text.strip():
        return ()
    out: list[Requirement] = []
    for raw in _split_top_level(text):
        part = raw.strip()
        if not part:
            raise SelectorError(f"unable to parse requirement: empty requirement in {text!r}")
        m = _SET_RE.match(part)
        if m:
            key, op, inner = m.group(1), m.group(2), m.group(3)
            values = tuple(v.strip() for v in inner.split(","))
            values = tuple(v for v in values if v)
            if not values:
                raise SelectorError(
                    f"unable to parse requirement: {op} needs at least one value in {part!r}"
                )
            _check_key(key, text)
            for v in values:
                _check_value(v, text)
            out.append(Requirement(key=key, op=op, values=values))
            continue
        for token, op in (("!=", "!="), ("==", "="), ("=", "=")):
            if token in part:
                key, _, value = part.partition(token)
                key, value = key.strip(), value.strip()
                _check_key(key, text)
                _check_value(value, text)
                out.append(Requirement(key=key, op=op, values=(value,)))
                break
        else:
            if part.startswith("!"):
                key = part[1:].strip()
                _check_key(key, text)
                out.append(Requirement(key=key, op="!"))
            else:
                if any(ch in part for ch in " ()<>"):
                    raise SelectorError(
                        f"unable to parse requirement: found {part!r}, expected a label key"
                    )
                _check_key(part, text)
                out.append(Requirement(key=part, op="exists"))
    return tuple(out)


def labels_match(requirements: tuple[Requirement, ...], labels: Mapping[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in requirements)


@dataclass(frozen=True, slots=True, kw_only=True)
class FieldRequirement:
    field: str
    op: str
    """"=" or "!="."""
    value: str


def parse_field_selector(
    text: str | None, supported: tuple[str, ...]
) -> tuple[FieldRequirement, ...]:
    """Parse a fieldSelector; a field outside `supported` is rejected like the real server does."""
    if text is None or not text.strip():
        return ()
    out: list[FieldRequirement] = []
    for raw in text.split(","):
        part = raw.strip()
        token = next((t for t in ("!=", "==", "=") if t in part), None)
        if token is None:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        name, _, value = part.partition(token)
        name, value = name.strip(), value.strip()
        op = "!=" if token == "!=" else "="
        if name not in supported:
            raise SelectorError(f"field label not supported: {name}")
        out.append(FieldRequirement(field=name, op=op, value=value))
    return tuple(out)


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of a dotted field; missing fields read as "" (as on the real server)."""
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    if isinstance(node, bool):
        return "true" if node else "false"
    if node is None:
        return ""
    if isinstance(node, Mapping):
        # Event source is selected as "component" in the real server.
        return str(node.get("component", ""))
    return str(node)


def fields_match(requirements: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    for req in requirements:
        value = field_value(obj, req.field)
        if (value == req.value) != (req.op == "="):
            return False
    return True

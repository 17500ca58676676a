"""Field ownership (managedFields) and server-side apply, at the level of leaf fields and keyed list items.

Owns the good-enough ownership model the fake API server uses for `application/apply-patch+yaml` and
for the `managedFields` bookkeeping of ordinary writes:

* A *path* is a tuple of FieldsV1 elements: ``f:<field>`` for a map field, ``k:{"name":"app"}`` for an
  item of a list that has a merge key (containers, env, ports, conditions, ...). Other lists and all
  scalars are leaves (atomic), like the real server treats lists without a merge key.
* Apply: the manager's applied configuration becomes exactly its Apply set. A field owned by another
  manager with a different value is a conflict (409) unless ``force``, which moves ownership. Equal
  values become shared. Fields the manager applied before but no longer does are removed from the
  object unless someone else owns them.
* Update (PUT, PATCH, POST): the writer takes the fields whose value it changed; others lose them.

Pure functions over JSON values; time is passed in.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from e2e.fakekube.patch import merge_key_for

Path = tuple[str, ...]

# Server-owned or identity fields that nobody "manages".
_UNTRACKED_METADATA = frozenset(
    {
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "managedFields",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
    }
)
_UNTRACKED_TOP = frozenset({"apiVersion", "kind"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Conflict:
    manager: str
    path: Path

    @property
    def field(self) -> str:
        return path_to_field(self.path)


class ApplyConflict(Exception):
    """Fields owned by other managers would change; the shell answers 409 with one cause per field."""

    def __init__(self, conflicts: list[Conflict]) -> None:
        self.conflicts = conflicts
        listed = "\n".join(f'conflict with "{c.manager}": {c.field}' for c in conflicts)
        noun = "conflict" if len(conflicts) == 1 else "conflicts"
        super().__init__(f"Apply failed with {len(conflicts)} {noun}: {listed}")


def path_to_field(path: Path) -> str:
    """Human form used in conflict messages: .spec.containers[name="app"].image."""
    out = ""
    for element in path:
        if element.startswith("f:"):
            out += "." + element[2:]
        elif element.startswith("k:"):
            key = json.loads(element[2:])
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in key.items()) + "]"
    return out


def _item_element(merge_key: str, item: Mapping[str, Any]) -> str:
    return "k:" + json.dumps({merge_key: item[merge_key]}, separators=(",", ":"), sort_keys=True)


def _keyed(field_name: str, value: list[Any]) -> str | None:
    merge_key = merge_key_for(field_name, value)
    if merge_key is None:
        return None
    if all(isinstance(i, Mapping) and merge_key in i for i in value):
        return merge_key
    return None


def leaf_paths(obj: Mapping[str, Any], *, scope: str = "main") -> set[Path]:
    """Tracked leaf paths of an object. scope: "main" (no status), "status" (status only), "all"."""
    out: set[Path] = set()
    for key, value in obj.items():
        if key in _UNTRACKED_TOP:
            continue
        if scope == "main" and key == "status":
            continue
        if scope == "status" and key != "status":
            continue
        if key == "metadata" and isinstance(value, Mapping):
            trimmed = {k: v for k, v in value.items() if k not in _UNTRACKED_METADATA}
            _walk(("f:metadata",), trimmed, out)
        else:
            _walk_value((f"f:{key}",), key, value, out)
    return out


def _walk(prefix: Path, obj: Mapping[str, Any], out: set[Path]) -> None:
    for key, value in obj.items():
        _walk_value((*prefix, f"f:{key}"), key, value, out)


def _walk_value(path: Path, field_name: str, value: Any, out: set[Path]) -> None:
    if isinstance(value, Mapping) and value:
        _walk(path, value, out)
        return
    if isinstance(value, list) and value:
        merge_key = _keyed(field_name, value)
        if merge_key is not None:
            for item in value:
                _walk((*path, _item_element(merge_key, item)), item, out)
            return
    out.add(path)


def _step(node: Any, element: str) -> tuple[bool, Any]:
    if element.startswith("f:"):
        if isinstance(node, Mapping) and element[2:] in node:
            return True, node[element[2:]]
        return False, None
    if element.startswith("k:") and isinstance(node, list):
        key = json.loads(element[2:])
        for item in node:
            if isinstance(item, Mapping) and all(item.get(k) == v for k, v in key.items()):
                return True, item
    return False, None


def get_at(obj: Any, path: Path) -> tuple[bool, Any]:
    node = obj
    for element in path:
        found, node = _step(node, element)
        if not found:
            return False, None
    return True, node


def remove_at(obj: Any, path: Path) -> None:
    """Remove a leaf and prune maps / keyed items that this removal left empty."""
    if not path:
        return
    found, parent = get_at(obj, path[:-1])
    if not found:
        return
    last = path[-1]
    in_keyed_item = len(path) > 1 and path[-2].startswith("k:") and isinstance(parent, dict)
    item_key: dict[str, Any] = json.loads(path[-2][2:]) if in_keyed_item else {}
    if last.startswith("f:") and isinstance(parent, dict):
        # An item's key fields go only with the whole item (they are how the item is found).
        if last[2:] not in item_key:
            parent.pop(last[2:], None)
    elif last.startswith("k:") and isinstance(parent, list):
        key = json.loads(last[2:])
        parent[:] = [
            i
            for i in parent
            if not (isinstance(i, Mapping) and all(i.get(k) == v for k, v in key.items()))
        ]
    else:
        return
    if in_keyed_item and set(parent) <= set(item_key):
        remove_at(obj, path[:-1])  # a keyed item left holding only its key fields is gone too
    elif len(path) > 1 and parent in ({}, []):
        remove_at(obj, path[:-1])


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in sorted(paths):
        node = root
        for element in path:
            node = node.setdefault(element, {})
            if element.startswith("k:"):
                node.setdefault(".", {})
    return root


def from_fields_v1(fields: Mapping[str, Any] | None, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    if not fields:
        return out
    for element, child in fields.items():
        if element == ".":
            continue
        path = (*prefix, element)
        children = {k: v for k, v in (child or {}).items() if k != "."}
        if children:
            out |= from_fields_v1(children, path)
        elif not element.startswith("k:"):
            out.add(path)
    return out


def ssa_merge(live: Any, applied: Any, field_name: str = "") -> Any:
    """Merge an applied configuration into the live object: maps by key, keyed lists by item."""
    if isinstance(live, Mapping) and isinstance(applied, Mapping):
        result = dict(live)
        for key, value in applied.items():
            result[key] = (
                ssa_merge(live.get(key), value, key) if key in live else copy.deepcopy(value)
            )
        return result
    if isinstance(live, list) and isinstance(applied, list) and applied:
        merge_key = _keyed(field_name, applied)
        if merge_key is not None and _keyed(field_name, live) == merge_key:
            result_list = list(live)
            for item in applied:
                position = next(
                    (
                        i
                        for i, cur in enumerate(result_list)
                        if cur.get(merge_key) == item[merge_key]
                    ),
                    None,
                )
                if position is None:
                    result_list.append(copy.deepcopy(item))
                else:
                    result_list[position] = ssa_merge(result_list[position], item)
            return result_list
    return copy.deepcopy(applied)


# --- managedFields bookkeeping ---------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    manager: str
    operation: str
    subresource: str
    api_version: str
    time: str
    paths: set[Path]

    def render(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_fields_v1(self.paths),
        }
        if self.subresource:
            out["subresource"] = self.subresource
        return out


def _entries(obj: Mapping[str, Any]) -> list[_Entry]:
    out: list[_Entry] = []
    for raw in obj.get("metadata", {}).get("managedFields") or []:
        if not isinstance(raw, Mapping):
            continue
        out.append(
            _Entry(
                manager=str(raw.get("manager", "")),
                operation=str(raw.get("operation", "Update")),
                subresource=str(raw.get("subresource", "")),
                api_version=str(raw.get("apiVersion", "")),
                time=str(raw.get("time", "")),
                paths=from_fields_v1(raw.get("fieldsV1")),
            )
        )
    return out


def _store(obj: dict[str, Any], entries: list[_Entry]) -> None:
    kept = [e.render() for e in entries if e.paths]
    obj.setdefault("metadata", {})["managedFields"] = kept


def _owned_by_others(entries: list[_Entry], mine: _Entry, path: Path) -> bool:
    for entry in entries:
        if entry is mine:
            continue
        for owned in entry.paths:
            if owned[: len(path)] == path or path[: len(owned)] == owned:
                return True
    return False


def _find(entries: list[_Entry], manager: str, operation: str, subresource: str) -> _Entry | None:
    for entry in entries:
        if (entry.manager, entry.operation, entry.subresource) == (manager, operation, subresource):
            return entry
    return None


def _scope(subresource: str, has_status: bool) -> str:
    if subresource == "status":
        return "status"
    return "main" if has_status else "all"


def apply(
    live: dict[str, Any] | None,
    applied: Mapping[str, Any],
    *,
    manager: str,
    force: bool,
    now: str,
    subresource: str = "",
    has_status: bool = True,
) -> dict[str, Any]:
    """Server-side apply of `applied` onto `live` (None: create). Raises ApplyConflict."""
    scope = _scope(subresource, has_status)
    base: dict[str, Any] = copy.deepcopy(live) if live is not None else {}
    entries = _entries(base)
    # What the manager may set: status only through /status, and nothing but status there.
    config = {
        k: copy.deepcopy(v)
        for k, v in applied.items()
        if (scope == "status" and k in ("status", "apiVersion", "kind"))
        or (scope == "main" and k != "status")
        or scope == "all"
    }
    if "metadata" in applied:
        config["metadata"] = {
            k: copy.deepcopy(v)
            for k, v in applied["metadata"].items()
            if k not in _UNTRACKED_METADATA
        }
    new_set = leaf_paths(config, scope=scope)

    conflicts: list[Conflict] = []
    for entry in entries:
        if entry.manager == manager:
            continue
        for path in sorted(entry.paths & new_set):
            if get_at(base, path) != get_at(config, path):
                conflicts.append(Conflict(manager=entry.manager, path=path))
    if conflicts and not force:
        raise ApplyConflict(conflicts)
    for conflict in conflicts:
        for entry in entries:
            if entry.manager == conflict.manager:
                entry.paths.discard(conflict.path)

    mine = _find(entries, manager, "Apply", subresource)
    if mine is None:
        mine = _Entry(manager, "Apply", subresource, str(applied.get("apiVersion", "")), now, set())
        entries.append(mine)
    for path in sorted(mine.paths - new_set, key=len, reverse=True):
        if not _owned_by_others(entries, mine, path):
            remove_at(base, path)
    mine.paths = new_set
    mine.time = now
    mine.api_version = str(applied.get("apiVersion", mine.api_version))

    merged: dict[str, Any] = ssa_merge(base, config)
    _store(merged, entries)
    return merged


def track_update(
    old: Mapping[str, Any] | None,
    new: dict[str, Any],
    *,
    manager: str,
    now: str,
    subresource: str = "",
    has_status: bool = True,
) -> None:
    """Record in `new`'s managedFields that `manager` wrote what changed between old and new."""
    scope = _scope(subresource, has_status)
    old_obj: Mapping[str, Any] = old or {}
    entries = _entries(old_obj) if old is not None else []
    new_paths = leaf_paths(new, scope=scope)
    old_paths = leaf_paths(old_obj, scope=scope)
    changed = {p for p in new_paths if get_at(old_obj, p) != get_at(new, p)}
    removed = old_paths - new_paths
    if not changed and not removed:
        _store(new, entries)
        return
    for entry in entries:
        entry.paths -= removed
        if entry.manager != manager:
            entry.paths -= changed
    mine = _find(entries, manager, "Update", subresource)
    if mine is None:
        mine = _Entry(manager, "Update", subresource, str(new.get("apiVersion", "")), now, set())
        entries.append(mine)
    mine.paths |= changed
    mine.time = now
    _store(new, entries)

"""Plan the writes that make the cluster match a render: apply, delete, or leave alone and report.

Owns `plan(gateway_namespace, gateway_name, desired, observed)` and its result types. Rules:
* a desired object that does not exist is created (server-side apply);
* an existing object that carries our managed label is applied when it differs (pinned to the
  resourceVersion we saw, so a concurrent writer makes the apply fail instead of being overwritten);
* an existing object WITHOUT our managed label is never touched: it is reported as `Foreign`
  (Istio's `canManage`: "don't take over resources we didn't create");
* a managed object of this Gateway that is no longer rendered (autoscaling or PDB switched off, or the
  Gateway deleted) is deleted, with a uid precondition. This is the prune step Istio lacks (#52923).

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .model import GATEWAY_NAME_LABEL, MANAGED_LABEL, MANAGED_VALUE, ObjectKey


@dataclass(frozen=True, slots=True, kw_only=True)
class Apply:
    key: ObjectKey
    obj: Mapping[str, Any]
    resource_version: str | None
    """The version we saw (a precondition), or None when the object does not exist yet."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete:
    key: ObjectKey
    uid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Foreign:
    key: ObjectKey
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    applies: tuple[Apply, ...] = ()
    deletes: tuple[Delete, ...] = ()
    foreign: tuple[Foreign, ...] = ()
    unchanged: tuple[ObjectKey, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.applies or self.deletes)


def key_of(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return ObjectKey(
        kind=str(obj.get("kind", "")),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
    )


def is_managed(obj: Mapping[str, Any]) -> bool:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(MANAGED_LABEL) == MANAGED_VALUE


def contains(observed: Any, desired: Any) -> bool:
    """Whether every field of `desired` is present with the same value in `observed`.

    Server defaults (extra fields in `observed`) are ignored, so an unchanged render plans no write.
    """
    if isinstance(desired, Mapping):
        return isinstance(observed, Mapping) and all(
            k in observed and contains(observed[k], v) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(observed, list)
            and len(observed) == len(desired)
            and all(contains(o, d) for o, d in zip(observed, desired, strict=True))
        )
    return bool(observed == desired)


def plan(
    namespace: str,
    gateway_name: str,
    desired: Sequence[Mapping[str, Any]],
    observed: Iterable[Mapping[str, Any]],
) -> Plan:
    """Writes that turn `observed` (objects of the owned kinds in the Gateway's namespace that share a
    desired name or carry this Gateway's labels) into `desired` (the render; empty = Gateway gone)."""
    seen: dict[ObjectKey, Mapping[str, Any]] = {}
    for obj in observed:
        key = key_of(obj)
        if key.namespace == namespace:
            seen[key] = obj
    applies: list[Apply] = []
    foreign: list[Foreign] = []
    unchanged: list[ObjectKey] = []
    wanted: set[ObjectKey] = set()
    for obj in desired:
        key = key_of(obj)
        wanted.add(key)
        current = seen.get(key)
        if current is None:
            applies.append(Apply(key=key, obj=obj, resource_version=None))
        elif not is_managed(current):
            foreign.append(
                Foreign(
                    key=key,
                    reason=f"{key} exists without label {MANAGED_LABEL}={MANAGED_VALUE}; left alone",
                )
            )
        elif contains(current, obj):
            unchanged.append(key)
        else:
            rv = (current.get("metadata") or {}).get("resourceVersion")
            applies.append(Apply(key=key, obj=obj, resource_version=str(rv) if rv else None))
    deletes = [
        Delete(key=key, uid=str((obj.get("metadata") or {}).get("uid", "")))
        for key, obj in sorted(seen.items(), key=lambda kv: (kv[0].kind, kv[0].name))
        if key not in wanted
        and is_managed(obj)
        and ((obj.get("metadata") or {}).get("labels") or {}).get(GATEWAY_NAME_LABEL)
        == gateway_name
    ]
    return Plan(
        applies=tuple(applies),
        deletes=tuple(deletes),
        foreign=tuple(foreign),
        unchanged=tuple(unchanged),
    )

"""The thin seam between the waypoint manager and a Kubernetes API: `KubeApi` and its error types.

Owns the `KubeApi` protocol (get, list, watch, server-side apply, delete with a uid precondition),
`WatchEvent`, and the errors the controller reacts to (`NotFound`, `Conflict`, `Gone`). The controller
and tests only see this; `waypoint.manager.client` implements it on kubernetes_asyncio.

Pure: typing only, no client import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .kinds import ResourceType


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0 for transport errors)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: a resourceVersion/uid precondition failed or a field-manager conflict."""


class Gone(KubeError):
    """410: the resourceVersion a watch resumed from was compacted away; relist."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    type: Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    obj: Mapping[str, Any]

    @property
    def resource_version(self) -> str:
        return str((self.obj.get("metadata") or {}).get("resourceVersion", ""))


class KubeApi(Protocol):
    async def get(
        self, rt: ResourceType, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        ...

    async def list(
        self, rt: ResourceType, *, label_selector: str | None = None, namespace: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """All objects (of every namespace, or of `namespace` only) and the list's resourceVersion."""
        ...

    def watch(
        self,
        rt: ResourceType,
        *,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        namespace: str | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Events after `resource_version` (bookmarks included) until the server ends the stream;
        of every namespace, or of `namespace` only (what a namespace-scoped RoleBinding allows).

        Raises Gone when that version is too old.
        """
        ...

    async def apply(
        self,
        rt: ResourceType,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        """Server-side apply (PATCH application/apply-patch+yaml) of `obj`."""
        ...

    async def delete(
        self, rt: ResourceType, namespace: str | None, name: str, *, uid: str | None = None
    ) -> bool:
        """Delete (background propagation); False when already gone. A uid mismatch raises Conflict."""
        ...

    async def close(self) -> None: ...

"""`KubeApi` on the official client's asyncio port (kubernetes_asyncio): the only module that talks HTTP.

Owns `AsyncKubeClient` and `connect(kubeconfig)` (a kubeconfig file, else in-cluster configuration).
It uses the generic `ApiClient.call_api` with REST paths from `kinds.ResourceType`, so every kind —
core, apps, autoscaling/v2, policy/v1 and the Gateway API CRDs — goes through one code path:
server-side apply is `PATCH` with `application/apply-patch+yaml` (a JSON body is valid YAML),
watches are `?watch=1&resourceVersion=..&allowWatchBookmarks=true` read line by line, and a 410
(HTTP status, or an ERROR event carrying a 410 Status) becomes `Gone`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from .kinds import ResourceType
from .kube import Conflict, Gone, KubeError, NotFound, WatchEvent

_AUTH = ["BearerToken"]
_OBJECT = {200: "object", 201: "object", 202: "object"}


def _error(exc: ApiException, what: str) -> KubeError:
    message = f"{what}: {exc.reason}"
    try:
        body = json.loads(exc.body) if exc.body else {}
        message = f"{what}: {body.get('message', exc.reason)}"
    except (ValueError, TypeError):
        pass
    status = int(exc.status or 0)
    if status == 404:
        return NotFound(status, message)
    if status == 409:
        return Conflict(status, message)
    if status == 410:
        return Gone(status, message)
    return KubeError(status, message)


class AsyncKubeClient:
    """A `KubeApi` over one kubernetes_asyncio ApiClient (owns and closes it)."""

    def __init__(self, api_client: k8s.ApiClient, *, request_timeout: float = 30.0) -> None:
        self._api = api_client
        self._timeout = request_timeout

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        try:
            result = await self._api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Accept": "application/json", "Content-Type": content_type},
                body=body,
                response_types_map=_OBJECT,
                auth_settings=_AUTH,
                _return_http_data_only=True,
                _request_timeout=self._timeout,
            )
        except ApiException as exc:
            raise _error(exc, what) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, f"{what}: {exc!r}") from None
        return result if isinstance(result, dict) else {}

    async def get(
        self, rt: ResourceType, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            obj = await self._call(
                "GET", rt.path(namespace, name), f"get {rt.kind} {namespace}/{name}"
            )
        except NotFound:
            return None
        obj.setdefault("apiVersion", rt.api_version)
        obj.setdefault("kind", rt.kind)
        return obj

    async def list(
        self, rt: ResourceType, *, label_selector: str | None = None, namespace: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        query = [("labelSelector", label_selector)] if label_selector else []
        what = f"list {rt.plural}" + (f" in {namespace}" if namespace else "")
        result = await self._call("GET", rt.path(namespace), what, query=query)
        items = []
        for item in result.get("items") or []:
            # List items carry no apiVersion/kind; the rest of the manager expects them.
            item.setdefault("apiVersion", rt.api_version)
            item.setdefault("kind", rt.kind)
            items.append(item)
        return items, str((result.get("metadata") or {}).get("resourceVersion", ""))

    async def watch(
        self,
        rt: ResourceType,
        *,
        resource_version: str,
        label_selector: str | None = None,
        timeout_seconds: int = 300,
        namespace: str | None = None,
    ) -> AsyncIterator[WatchEvent]:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        what = f"watch {rt.plural}" + (f" in {namespace}" if namespace else "")
        try:
            resp = await self._api.call_api(
                rt.path(namespace),
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=_AUTH,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._timeout, sock_read=timeout_seconds + 30
                ),
            )
        except ApiException as exc:
            raise _error(exc, what) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, f"{what}: {exc!r}") from None
        try:
            if resp.status != 200:
                text = await resp.text()
                failure = ApiException(status=resp.status, reason=resp.reason)
                failure.body = text
                raise _error(failure, what)
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    code = int(obj.get("code", 0) or 0)
                    message = f"{what}: {obj.get('message', 'watch error')}"
                    raise Gone(410, message) if code == 410 else KubeError(code, message)
                if etype not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                    raise KubeError(0, f"{what}: unknown event type {etype!r}")
                obj.setdefault("apiVersion", rt.api_version)
                obj.setdefault("kind", rt.kind)
                yield WatchEvent(type=etype, obj=obj)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise KubeError(0, f"{what}: {exc!r}") from None
        finally:
            resp.release()

    async def apply(
        self,
        rt: ResourceType,
        obj: Mapping[str, Any],
        *,
        field_manager: str,
        force: bool,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace"), str(meta.get("name", ""))
        query = [("fieldManager", field_manager)]
        if force:
            query.append(("force", "true"))
        return await self._call(
            "PATCH",
            rt.path(namespace, name, subresource),
            f"apply {rt.kind} {namespace}/{name}" + (f"/{subresource}" if subresource else ""),
            query=query,
            body=dict(obj),
            content_type="application/apply-patch+yaml",
        )

    async def delete(
        self, rt: ResourceType, namespace: str | None, name: str, *, uid: str | None = None
    ) -> bool:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
        }
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call(
                "DELETE",
                rt.path(namespace, name),
                f"delete {rt.kind} {namespace}/{name}",
                body=body,
            )
        except NotFound:
            return False
        return True

    async def close(self) -> None:
        await self._api.close()


async def connect(kubeconfig: str | None = None, *, context: str | None = None) -> AsyncKubeClient:
    """A client from a kubeconfig file, or from the in-cluster service account when none is given."""
    configuration = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return AsyncKubeClient(k8s.ApiClient(configuration))

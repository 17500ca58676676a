"""List + watch of one Kubernetes collection over kubernetes_asyncio (a minimal reflector).

Owns keeping a consumer current with one collection, as client-go's reflector does: list (the
consumer replaces its cache), then watch from the list's ``resourceVersion`` with bookmarks,
resuming from the last seen version when the server ends the stream; a ``410 Gone`` (HTTP status
or ERROR event) relists; other failures back off (doubling, capped) and relist. Selectors go to the
server (``fieldSelector=spec.nodeName=<node>``: the node sees only its own pods, as the kubelet
does).

It talks through the client's generic ``ApiClient.call_api`` and reads the watch stream line by
line, so objects stay plain dicts (the pure membership code reads them as the server sent them).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger(__name__)

_AUTH = ["BearerToken"]

OnReplace = Callable[[Sequence[Mapping[str, Any]]], None]
OnEvent = Callable[[str, Mapping[str, Any]], None]


class WatchError(Exception):
    """A list or watch failed; ``status`` is the HTTP status (0: transport), the message says which."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def api_client(kubeconfig: str | None, context: str | None = None) -> k8s.ApiClient:
    """A kubernetes_asyncio client from a kubeconfig file, else the in-cluster service account."""
    configuration = k8s.Configuration()
    if kubeconfig:
        await k8s_config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return k8s.ApiClient(configuration)


class Reflector:
    """Keeps ``on_replace``/``on_event`` fed with one collection until ``stop()``."""

    def __init__(
        self,
        api: k8s.ApiClient,
        path: str,
        *,
        on_replace: OnReplace,
        on_event: OnEvent,
        field_selector: str | None = None,
        label_selector: str | None = None,
        watch_timeout: int = 300,
        request_timeout: float = 30.0,
        retry_initial: float = 0.2,
        retry_max: float = 30.0,
    ) -> None:
        self._api = api
        self.path = path
        self._on_replace = on_replace
        self._on_event = on_event
        self._selectors: list[tuple[str, str]] = []
        if field_selector:
            self._selectors.append(("fieldSelector", field_selector))
        if label_selector:
            self._selectors.append(("labelSelector", label_selector))
        self._watch_timeout = watch_timeout
        self._request_timeout = request_timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self.synced = asyncio.Event()
        self.relists = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"reflector:{self.path}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        rv: str | None = None
        delay = self._retry_initial
        while True:
            try:
                if rv is None:
                    rv = await self._list()
                rv = await self._watch(rv)
                delay = self._retry_initial
            except WatchError as err:
                self.last_error = str(err)
                if err.status == 410:
                    log.info("%s; relisting", err)
                    rv = None
                    continue
                log.warning("%s; retrying in %.1f s", err, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max)
                rv = None

    async def _list(self) -> str:
        what = f"list {self.path}"
        try:
            result = await self._api.call_api(
                self.path,
                "GET",
                query_params=list(self._selectors),
                header_params={"Accept": "application/json"},
                response_types_map={200: "object"},
                auth_settings=_AUTH,
                _return_http_data_only=True,
                _request_timeout=self._request_timeout,
            )
        except ApiException as err:
            raise WatchError(int(err.status or 0), f"{what}: {err.status} {err.reason}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise WatchError(0, f"{what}: {err!r}") from None
        if not isinstance(result, Mapping):
            raise WatchError(0, f"{what}: answer is not an object")
        items = [i for i in result.get("items") or [] if isinstance(i, Mapping)]
        self.relists += 1
        self._on_replace(items)
        self.synced.set()
        return str((result.get("metadata") or {}).get("resourceVersion") or "")

    async def _watch(self, rv: str) -> str:
        """Stream events after ``rv``; returns the last version seen when the server ends it."""
        what = f"watch {self.path}"
        query = [
            *self._selectors,
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", rv),
            ("timeoutSeconds", str(self._watch_timeout)),
        ]
        try:
            resp = await self._api.call_api(
                self.path,
                "GET",
                query_params=query,
                header_params={"Accept": "application/json"},
                auth_settings=_AUTH,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    total=None,
                    sock_connect=self._request_timeout,
                    sock_read=self._watch_timeout + 30,
                ),
            )
        except ApiException as err:
            raise WatchError(int(err.status or 0), f"{what}: {err.status} {err.reason}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise WatchError(0, f"{what}: {err!r}") from None
        try:
            if resp.status != 200:
                raise WatchError(resp.status, f"{what}: HTTP {resp.status} {resp.reason}")
            async for raw in resp.content:
                line = raw.strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise WatchError(0, f"{what}: a line of the stream is not JSON") from None
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    code = int(obj.get("code", 0) or 0)
                    raise WatchError(code, f"{what}: {obj.get('message', 'watch error')}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                if etype in ("ADDED", "MODIFIED", "DELETED"):
                    self._on_event(etype, obj)
                elif etype != "BOOKMARK":
                    raise WatchError(0, f"{what}: unknown event type {etype!r}")
                rv = version or rv
        except (aiohttp.ClientError, TimeoutError) as err:
            raise WatchError(0, f"{what}: {err!r}") from None
        finally:
            resp.release()
        return rv

"""Fixtures: a fresh fake API server per test and the same scenario driven through both official clients.

`kube` is parametrised over "sync" (the `kubernetes` client, its blocking calls run in worker threads so
the in-loop server keeps serving) and "asyncio" (`kubernetes_asyncio`). Scenarios await `kube.core`,
`kube.apps`, `kube.custom`, ... the same way for both.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kubernetes
import kubernetes_asyncio
import pytest

from e2e.fakekube import FakeApiServer


class _Threaded:
    """Makes every method of a sync API object awaitable by running it in a worker thread."""

    def __init__(self, api: Any) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn = getattr(self._api, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))

        return call


class _Awaitable:
    def __init__(self, api: Any) -> None:
        self._api = api

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


class Kube:
    """One client flavour bound to one server."""

    def __init__(self, flavour: str, server: FakeApiServer, api_client: Any) -> None:
        self.flavour = flavour
        self.server = server
        self.api_client = api_client
        lib = kubernetes if flavour == "sync" else kubernetes_asyncio
        wrap = _Threaded if flavour == "sync" else _Awaitable
        self.lib = lib
        self.ApiException = lib.client.ApiException
        self.core = wrap(lib.client.CoreV1Api(api_client))
        self.apps = wrap(lib.client.AppsV1Api(api_client))
        self.custom = wrap(lib.client.CustomObjectsApi(api_client))
        self.coordination = wrap(lib.client.CoordinationV1Api(api_client))
        self.auth = wrap(lib.client.AuthenticationV1Api(api_client))
        self.ext = wrap(lib.client.ApiextensionsV1Api(api_client))
        self.apis = wrap(lib.client.ApisApi(api_client))
        self.version = wrap(lib.client.VersionApi(api_client))
        self._raw = {
            "core": lib.client.CoreV1Api(api_client),
            "apps": lib.client.AppsV1Api(api_client),
            "custom": lib.client.CustomObjectsApi(api_client),
        }

    async def watch(
        self,
        api: str,
        method: str,
        *args: Any,
        max_events: int = 100,
        stop_when: Callable[[dict[str, Any]], bool] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Collect watch events (dicts with type/object/raw_object) until max_events, stop_when or the
        server's timeoutSeconds ends the stream. Raises the client's ApiException like the client does."""
        fn = getattr(self._raw[api], method)
        events: list[dict[str, Any]] = []

        def done(event: dict[str, Any]) -> bool:
            events.append(event)
            return len(events) >= max_events or (stop_when is not None and stop_when(event))

        if self.flavour == "sync":

            def run() -> None:
                w = kubernetes.watch.Watch()
                for event in w.stream(fn, *args, **kwargs):
                    if done(event):
                        w.stop()
                        break

            await asyncio.wait_for(asyncio.to_thread(run), timeout=20)
            return events
        w = kubernetes_asyncio.watch.Watch()
        async with w.stream(fn, *args, **kwargs) as stream:

            async def consume() -> None:
                async for event in stream:
                    if done(event):
                        break

            await asyncio.wait_for(consume(), timeout=20)
        return events


@pytest.fixture
async def server() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer(bookmark_interval=0.1) as srv:
        yield srv


@pytest.fixture(params=["sync", "asyncio"])
async def kube(
    request: pytest.FixtureRequest, server: FakeApiServer, tmp_path: Path
) -> AsyncIterator[Kube]:
    path = server.write_kubeconfig(tmp_path / "kubeconfig")
    if request.param == "sync":
        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(path), client_configuration=cfg)
        sync_client = kubernetes.client.ApiClient(cfg)
        try:
            yield Kube("sync", server, sync_client)
        finally:
            await asyncio.to_thread(sync_client.close)
    else:
        acfg = kubernetes_asyncio.client.Configuration()
        await kubernetes_asyncio.config.load_kube_config(
            config_file=str(path), client_configuration=acfg
        )
        async with kubernetes_asyncio.client.ApiClient(acfg) as async_client:
            yield Kube("asyncio", server, async_client)

"""The fake Kubernetes API server's HTTP shell: aiohttp on loopback, speaking the real REST API.

Owns URL routing (/api, /apis/<group>/<version>, namespaced and cluster paths, /status, the legacy
/watch/ prefix), discovery and /version documents, query-parameter parsing, Status error bodies, the
watch stream (chunked JSON lines; initial ADDED events, resume, bookmarks, timeoutSeconds, ERROR 410 on
compacted history), kubeconfig writing, and `FakeApiServer`: the object tests start (in their event
loop, or in a background thread for sync tests and the lab). Semantics live in `store.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from e2e.fakekube import errors
from e2e.fakekube.errors import ApiError
from e2e.fakekube.registry import ResourceKind, UnknownKind
from e2e.fakekube.store import (
    DEFAULT_SERVICE_CLUSTER_IP_RANGE,
    PATCH_APPLY,
    Store,
    TokenReviewer,
    WatchEvent,
    parse_bool,
    parse_delete_options,
)

VERSION_INFO = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-fakekube",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_STOP = object()


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
    )


def _error(exc: ApiError) -> web.Response:
    return _json(exc.status(), exc.code)


def _manager(request: web.Request) -> str:
    """fieldManager, else the User-Agent's product (what the real server records)."""
    explicit = request.query.get("fieldManager")
    if explicit:
        return explicit
    agent = request.headers.get("User-Agent", "unknown")
    return agent.split("/", 1)[0] or "unknown"


class _Route:
    __slots__ = ("kind", "name", "namespace", "subresource", "watch")

    def __init__(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str | None,
        subresource: str,
        watch: bool,
    ) -> None:
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.subresource = subresource
        self.watch = watch


class FakeApiServer:
    """An in-process Kubernetes API server for tests and the lab (loopback HTTP, no auth)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        history_limit: int = 10_000,
        bookmark_interval: float = 1.0,
        default_watch_timeout: float = 1800.0,
        token_reviewer: TokenReviewer | None = None,
        store: Store | None = None,
        service_cluster_ip_range: str = DEFAULT_SERVICE_CLUSTER_IP_RANGE,
    ) -> None:
        """`service_cluster_ip_range` is where Services get their clusterIP (ignored with `store`)."""
        self.store = store or Store(
            history_limit=history_limit,
            token_reviewer=token_reviewer,
            service_cluster_ip_range=service_cluster_ip_range,
        )
        self._host = host
        self._port = port
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._watches: set[asyncio.Queue[object]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("FakeApiServer is already started")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._loop = asyncio.get_running_loop()
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self._host, self._port)
        await self._site.start()
        server = self._site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        self._port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for queue in list(self._watches):
            queue.put_nowait(_STOP)
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner = None
        self._site = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("FakeApiServer is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def write_kubeconfig(
        self, path: str | Path, *, context: str = "fakekube", namespace: str = "default"
    ) -> Path:
        """A kubeconfig that the official clients load with load_kube_config(config_file=path)."""
        target = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url}}],
            "users": [{"name": context, "user": {"token": "fakekube-admin-token"}}],
            "contexts": [
                {
                    "name": context,
                    "context": {"cluster": context, "user": context, "namespace": namespace},
                }
            ],
            "current-context": context,
            "preferences": {},
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(yaml.safe_dump(config, sort_keys=False))
        return target

    @classmethod
    @contextlib.contextmanager
    def running_in_thread(cls, **kwargs: Any) -> Iterator[FakeApiServer]:
        """Run a server on its own event loop in a daemon thread; for sync tests and the lab."""
        server = cls(**kwargs)
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.start())
            except BaseException as exc:  # reported to the caller below
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=run, name="fakekube", daemon=True)
        thread.start()
        if not started.wait(timeout=30):
            raise RuntimeError("fake API server did not start within 30 s")
        if failure:
            raise failure[0]
        try:
            yield server
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()

    # --- direct store access (thread-safe) --------------------------------------------------------

    def get_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        return self.store.get_object(api_version, kind, name, namespace)

    def put_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.store.put_object(obj)

    def delete_object(
        self, api_version: str, kind: str, name: str, namespace: str | None = None
    ) -> None:
        self.store.delete_object(api_version, kind, name, namespace)

    def register_kind(self, kind: ResourceKind) -> None:
        self.store.register_kind(kind)

    def compact_history(self) -> int:
        return self.store.compact_history()

    def set_token_reviewer(self, reviewer: TokenReviewer) -> None:
        self.store.token_reviewer = reviewer

    # --- routing ---------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle(request)
        except ApiError as exc:
            return _error(exc)
        except UnknownKind as exc:
            return _error(ApiError(404, "NotFound", str(exc), details={}))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        method = request.method
        if parts == ["version"] or parts == ["version", ""]:
            return _json(VERSION_INFO)
        if parts[:1] == ["openapi"]:
            if parts[1:2] == ["v2"]:
                return _json(
                    {
                        "swagger": "2.0",
                        "info": {"title": "Kubernetes", "version": VERSION_INFO["gitVersion"]},
                        "paths": {},
                        "definitions": {},
                    }
                )
            return _json({"paths": {}})
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        registry = self.store.registry
        if parts == ["api"]:
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                    ],
                }
            )
        if parts == ["apis"]:
            return _json(registry.group_list())
        if parts[:1] == ["api"] and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 2:
            if len(parts) == 2:
                if parts[1] not in registry.groups():
                    raise ApiError(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                        details={},
                    )
                return _json(registry.group_document(parts[1]))
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        if not registry.has_version(group, version):
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        if not rest:
            if method != "GET":
                raise errors.method_not_allowed()
            return _json(registry.resource_list(group, version))
        route = self._route(group, version, rest)
        return await self._serve(request, route)

    def _route(self, group: str, version: str, rest: list[str]) -> _Route:
        watch = False
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        kind = self.store.registry.lookup(group, version, rest[0])
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else ""
        if subresource and (subresource != "status" or not kind.has_status):
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        if kind.namespaced is False and namespace is not None:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        if kind.namespaced and namespace is None and name is not None:
            raise ApiError(
                404, "NotFound", "the server could not find the requested resource", details={}
            )
        return _Route(kind, namespace, name, subresource, watch)

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            try:
                return yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise errors.bad_request(f"error decoding request body: {exc}") from None

    async def _serve(self, request: web.Request, route: _Route) -> web.StreamResponse:
        store, kind, q = self.store, route.kind, request.query
        method = request.method
        verb_allowed = {
            "GET": "get" if route.name else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if route.name else "deletecollection",
        }.get(method)
        if verb_allowed is None or (
            verb_allowed not in kind.verbs and not (verb_allowed == "get" and route.subresource)
        ):
            raise errors.method_not_allowed()
        dry_run = bool(q.get("dryRun"))
        if method == "GET":
            if route.watch or parse_bool(q.get("watch")):
                return await self._watch(request, route)
            if route.name is None:
                limit = q.get("limit")
                return _json(
                    store.list_objects(
                        kind,
                        route.namespace,
                        label_selector=q.get("labelSelector"),
                        field_selector=q.get("fieldSelector"),
                        limit=int(limit) if limit and limit.isdigit() else None,
                        continue_token=q.get("continue"),
                    )
                )
            return _json(store.get(kind, route.namespace or "", route.name))
        if method == "POST":
            if route.name is not None:
                raise errors.method_not_allowed()
            created = store.create(
                kind,
                route.namespace,
                await self._body(request),
                manager=_manager(request),
                dry_run=dry_run,
            )
            return _json(created, 200 if kind.virtual else 201)
        if route.name is None:
            if method == "DELETE":
                policy, _, dry = parse_delete_options(await request.read(), q)
                return _json(
                    store.delete_collection(
                        kind,
                        route.namespace,
                        label_selector=q.get("labelSelector"),
                        field_selector=q.get("fieldSelector"),
                        propagation=policy,
                        dry_run=dry,
                    )
                )
            raise errors.method_not_allowed()
        if method == "PUT":
            body = await self._body(request)
            return _json(
                store.update(
                    kind,
                    route.namespace,
                    route.name,
                    body,
                    manager=_manager(request),
                    subresource=route.subresource,
                    dry_run=dry_run,
                )
            )
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            manager = q.get("fieldManager") if content_type == PATCH_APPLY else _manager(request)
            existed = (
                store.get_object(kind.api_version, kind.kind, route.name, route.namespace)
                is not None
            )
            patched = store.patch(
                kind,
                route.namespace,
                route.name,
                content_type,
                await request.read(),
                manager=manager,
                force=parse_bool(q.get("force")),
                subresource=route.subresource,
                dry_run=dry_run,
            )
            return _json(patched, 200 if existed else 201)
        # DELETE one object
        policy, preconditions, dry = parse_delete_options(await request.read(), q)
        result = store.delete(
            kind,
            route.namespace,
            route.name,
            propagation=policy,
            preconditions=preconditions,
            dry_run=dry,
        )
        pending = result.get("kind") == kind.kind and result.get("metadata", {}).get(
            "deletionTimestamp"
        )
        return _json(
            result,
            202
            if pending
            and store.get_object(kind.api_version, kind.kind, route.name, route.namespace)
            else 200,
        )

    # --- watch --------------------------------------------------------------------------

    async def _watch(self, request: web.Request, route: _Route) -> web.StreamResponse:
        store, kind, q = self.store, route.kind, request.query
        field_selector = q.get("fieldSelector")
        if route.name is not None:  # legacy /watch/namespaces/ns/pods/name
            by_name = f"metadata.name={route.name}"
            field_selector = f"{field_selector},{by_name}" if field_selector else by_name
        labels_req, fields_req = store.parse_selectors(kind, q.get("labelSelector"), field_selector)
        timeout_raw = q.get("timeoutSeconds")
        try:
            timeout = float(timeout_raw) if timeout_raw else self.default_watch_timeout
        except ValueError:
            raise errors.bad_request(
                f"timeoutSeconds must be a number, not {timeout_raw!r}"
            ) from None
        rv_raw = q.get("resourceVersion")
        since: int | None
        if rv_raw in (None, "", "0"):
            since = None
        else:
            try:
                since = int(rv_raw)
            except ValueError:
                raise errors.bad_request(
                    f"resourceVersion {rv_raw!r} is not a valid resource version"
                ) from None
        send_initial = q.get("sendInitialEvents")
        if send_initial is not None and since is not None and parse_bool(send_initial):
            since = None  # initial state requested explicitly
        if send_initial is not None and not parse_bool(send_initial) and since is None:
            since = store.resource_version
        bookmarks = parse_bool(q.get("allowWatchBookmarks"))
        store_key = (kind.group, kind.plural)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def on_event(event: WatchEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        try:
            subscription, backlog, last_rv = store.subscribe(on_event, since)
        except ApiError as exc:
            # The real server answers 200 and streams one ERROR event (410 Expired) before closing.
            await response.prepare(request)
            await response.write(self._line("ERROR", exc.status()))
            await response.write_eof()
            return response
        self._watches.add(queue)

        def wanted(event: WatchEvent) -> tuple[str, dict[str, Any]] | None:
            if event.store_key != store_key:
                return None
            obj = event.obj
            if route.namespace is not None and obj["metadata"].get("namespace") != route.namespace:
                return None
            now_matches = store.matches(obj, labels_req, fields_req)
            if event.type != "MODIFIED" or event.old is None:
                return (event.type, obj) if now_matches else None
            was_matching = store.matches(event.old, labels_req, fields_req)
            if now_matches and was_matching:
                return "MODIFIED", obj
            if now_matches:
                return "ADDED", obj
            if was_matching:
                return "DELETED", obj
            return None

        try:
            await response.prepare(request)
            for event in backlog:
                chosen = wanted(event)
                if chosen is not None:
                    await response.write(self._line(chosen[0], store._versioned(kind, chosen[1])))
            if (
                since is None
                and bookmarks
                and send_initial is not None
                and parse_bool(send_initial)
            ):
                await response.write(self._bookmark(kind, last_rv, initial_end=True))
            deadline = loop.time() + timeout
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                now = loop.time()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=wait)
                except TimeoutError:
                    if bookmarks and loop.time() >= next_bookmark:
                        await response.write(self._bookmark(kind, last_rv))
                        next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if item is _STOP:
                    break
                assert isinstance(item, WatchEvent)
                if item.rv <= last_rv:
                    continue  # already delivered from the backlog
                last_rv = item.rv
                chosen = wanted(item)
                if chosen is not None:
                    await response.write(self._line(chosen[0], store._versioned(kind, chosen[1])))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            store.unsubscribe(subscription)
            self._watches.discard(queue)
        return response

    @staticmethod
    def _line(event_type: str, obj: Mapping[str, Any]) -> bytes:
        return (
            json.dumps({"type": event_type, "object": obj}, separators=(",", ":")).encode() + b"\n"
        )

    def _bookmark(self, kind: ResourceKind, rv: int, *, initial_end: bool = False) -> bytes:
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if initial_end:
            metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
        return self._line(
            "BOOKMARK", {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": metadata}
        )

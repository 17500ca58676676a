"""The fake API server's storage and API semantics, without HTTP.

Owns the objects, the ONE global resourceVersion counter, the bounded watch-event history (with
compaction), metadata bookkeeping (uid, generation, creationTimestamp, managedFields), the verbs
(list/get/create/update/patch/apply/delete/deletecollection) with their validation and optimistic
concurrency, the status subresource rules, finalizers, and the garbage collector (ownerReference
cascade with background/foreground/orphan, namespace termination). Also registers CRD-defined kinds.

No asyncio or sockets: the HTTP shell (`server.py`) calls in from its event loop and tests may call in
from other threads, so every public method takes one re-entrant lock. Watchers subscribe with a
callback that is invoked under that lock, in commit order, and must not block.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime as dt
import ipaddress
import json
import random
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from e2e.fakekube import errors, fields
from e2e.fakekube.errors import ApiError
from e2e.fakekube.patch import PatchError, json_patch, merge_patch, strategic_merge_patch
from e2e.fakekube.registry import Registry, ResourceKind, UnknownKind, kinds_from_crd
from e2e.fakekube.selectors import (
    FieldRequirement,
    Requirement,
    SelectorError,
    fields_match,
    labels_match,
    parse_field_selector,
    parse_label_selector,
)

ObjKey = tuple[str, str]  # (namespace or "", name)
StoreKey = tuple[str, str]  # (group, plural): one bucket for all versions of a resource

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kinds whose names must be DNS-1123 labels (63 chars, no dots) on the real server.
_LABEL_NAMED = {("", "namespaces"), ("", "services")}
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
DEFAULT_SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/12"  # kubeadm's default --service-cluster-ip-range
_FIRST_SERVICE_IP_OFFSET = 10  # first address handed out: 10.96.0.10 in the default range

PATCH_MERGE = "application/merge-patch+json"
PATCH_JSON = "application/json-patch+json"
PATCH_STRATEGIC = "application/strategic-merge-patch+json"
PATCH_APPLY = "application/apply-patch+yaml"
PATCH_TYPES = (PATCH_MERGE, PATCH_JSON, PATCH_STRATEGIC, PATCH_APPLY)


@dataclass(frozen=True, slots=True, kw_only=True)
class WatchEvent:
    rv: int
    type: str
    """ADDED, MODIFIED or DELETED."""
    store_key: StoreKey
    obj: dict[str, Any]
    old: dict[str, Any] | None = None
    """The previous state (MODIFIED), so label-selected watches can turn changes into ADDED/DELETED."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenReviewResult:
    """What a token-review hook answers for one token."""

    authenticated: bool
    username: str = ""
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    error: str = ""


TokenReviewer = Callable[[str, tuple[str, ...]], TokenReviewResult]
"""(token, requested audiences) -> result."""


def pod_token_user(
    *,
    namespace: str,
    service_account: str,
    pod_name: str,
    pod_uid: str,
    node_name: str = "",
    node_uid: str = "",
    audiences: tuple[str, ...] = (),
) -> TokenReviewResult:
    """The answer the real server gives for a pod-bound service-account token."""
    extra: dict[str, tuple[str, ...]] = {
        "authentication.kubernetes.io/pod-name": (pod_name,),
        "authentication.kubernetes.io/pod-uid": (pod_uid,),
    }
    if node_name:
        extra["authentication.kubernetes.io/node-name"] = (node_name,)
    if node_uid:
        extra["authentication.kubernetes.io/node-uid"] = (node_uid,)
    return TokenReviewResult(
        authenticated=True,
        username=f"system:serviceaccount:{namespace}:{service_account}",
        uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"sa/{namespace}/{service_account}")),
        groups=(
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        ),
        extra=extra,
        audiences=audiences,
    )


def _reject_all(token: str, audiences: tuple[str, ...]) -> TokenReviewResult:
    return TokenReviewResult(authenticated=False, error="[invalid bearer token]")


def rfc3339(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that bumps generation: all but metadata, status, apiVersion, kind."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _without_times(obj: Mapping[str, Any]) -> Any:
    clone = copy.deepcopy(dict(obj))
    meta = clone.get("metadata", {})
    meta.pop("resourceVersion", None)
    for entry in meta.get("managedFields") or []:
        if isinstance(entry, dict):
            entry.pop("time", None)
    return clone


def _query_bool(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


class Store:
    """Objects, resourceVersions, history and the API verbs. Thread-safe (one RLock)."""

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        history_limit: int = 10_000,
        token_reviewer: TokenReviewer | None = None,
        rng: random.Random | None = None,
        service_cluster_ip_range: str | ipaddress.IPv4Network | ipaddress.IPv6Network = (
            DEFAULT_SERVICE_CLUSTER_IP_RANGE
        ),
    ) -> None:
        if history_limit < 1:
            raise ValueError(f"history_limit must be at least 1, got {history_limit}")
        try:
            service_range = ipaddress.ip_network(service_cluster_ip_range)
        except ValueError as exc:
            raise ValueError(
                f"service_cluster_ip_range {service_cluster_ip_range!r}: {exc}"
            ) from None
        if service_range.num_addresses <= _FIRST_SERVICE_IP_OFFSET + 1:
            raise ValueError(
                f"service_cluster_ip_range {service_range}: too small, need more than "
                f"{_FIRST_SERVICE_IP_OFFSET + 1} addresses"
            )
        self.service_cluster_ip_range = service_range
        """Where Services without a clusterIP get one (kube-apiserver's --service-cluster-ip-range)."""
        self.registry = registry or Registry.with_builtins()
        self.lock = threading.RLock()
        self.token_reviewer: TokenReviewer = token_reviewer or _reject_all
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._rng = rng or random.Random()
        self._objects: dict[StoreKey, dict[ObjKey, dict[str, Any]]] = {}
        self._rv = 0
        self._history: deque[WatchEvent] = deque()
        self._history_limit = history_limit
        self._compacted_rv = 0
        self._subscribers: dict[int, Callable[[WatchEvent], None]] = {}
        self._next_subscriber = 0
        self._gc_pending = False
        self._next_cluster_ip = _FIRST_SERVICE_IP_OFFSET
        for ns in BUILTIN_NAMESPACES:
            self.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # --- small helpers ---------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self.lock:
            return self._rv

    @property
    def compacted_rv(self) -> int:
        with self.lock:
            return self._compacted_rv

    def now(self) -> str:
        return rfc3339(self._clock())

    def _bucket(self, kind: ResourceKind) -> dict[ObjKey, dict[str, Any]]:
        return self._objects.setdefault((kind.group, kind.plural), {})

    @staticmethod
    def _versioned(kind: ResourceKind, obj: Mapping[str, Any]) -> dict[str, Any]:
        """A copy as served at kind's version (stored objects are shared by all versions: no conversion)."""
        out = copy.deepcopy(dict(obj))
        out["apiVersion"] = kind.api_version
        out["kind"] = kind.kind
        return out

    def _kind_of(self, obj: Mapping[str, Any]) -> ResourceKind:
        api_version = obj.get("apiVersion")
        kind_name = obj.get("kind")
        if not isinstance(api_version, str) or not isinstance(kind_name, str):
            raise errors.bad_request("Object 'Kind' or 'apiVersion' is missing")
        try:
            return self.registry.by_kind(api_version, kind_name)
        except UnknownKind as exc:
            raise errors.bad_request(str(exc)) from None

    # --- commit, history, subscribers ----------------------------------------------------------

    def _commit(
        self, kind: ResourceKind, event_type: str, obj: dict[str, Any], old: dict[str, Any] | None
    ) -> dict[str, Any]:
        self._rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._rv)
        key: ObjKey = (meta.get("namespace", ""), meta["name"])
        bucket = self._bucket(kind)
        if event_type == "DELETED":
            bucket.pop(key, None)
        else:
            bucket[key] = obj
        event = WatchEvent(
            rv=self._rv,
            type=event_type,
            store_key=(kind.group, kind.plural),
            obj=copy.deepcopy(obj),
            old=copy.deepcopy(old) if old is not None else None,
        )
        self._history.append(event)
        while len(self._history) > self._history_limit:
            self._compacted_rv = self._history.popleft().rv
        for callback in list(self._subscribers.values()):
            callback(event)
        if event_type == "DELETED" or meta.get("ownerReferences") or meta.get("deletionTimestamp"):
            self._gc_pending = True
        return obj

    def compact_history(self) -> int:
        """Forget every past event (like etcd compaction); returns the compacted resourceVersion."""
        with self.lock:
            self._history.clear()
            self._compacted_rv = self._rv
            return self._rv

    def subscribe(
        self, callback: Callable[[WatchEvent], None], since: int | None
    ) -> tuple[int, list[WatchEvent], int]:
        """Register a watcher. since=None: backlog is the current objects as ADDED; else the events after
        `since` (410 Expired when compacted). Returns (subscription id, backlog, resourceVersion the
        backlog is complete up to), atomically: the callback sees every later commit."""
        with self.lock:
            if since is None:
                backlog = [
                    WatchEvent(
                        rv=int(obj["metadata"]["resourceVersion"]),
                        type="ADDED",
                        store_key=sk,
                        obj=copy.deepcopy(obj),
                    )
                    for sk, bucket in self._objects.items()
                    for _, obj in sorted(bucket.items())
                ]
            else:
                if since < self._compacted_rv:
                    raise errors.expired(
                        f"too old resource version: {since} ({self._compacted_rv + 1})"
                    )
                backlog = [e for e in self._history if e.rv > since]
            self._next_subscriber += 1
            self._subscribers[self._next_subscriber] = callback
            return self._next_subscriber, backlog, self._rv

    def unsubscribe(self, subscription: int) -> None:
        with self.lock:
            self._subscribers.pop(subscription, None)

    # --- kinds ---------------------------------------------------------------------------

    def register_kind(self, kind: ResourceKind) -> None:
        with self.lock:
            self.registry.add(kind)

    # --- reads ---------------------------------------------------------------------------

    def get(self, kind: ResourceKind, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self._bucket(kind).get((namespace if kind.namespaced else "", name))
            if obj is None:
                raise errors.not_found(kind.plural, name, kind.group)
            return self._versioned(kind, obj)

    def list_objects(
        self,
        kind: ResourceKind,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
    ) -> dict[str, Any]:
        labels_req, fields_req = self.parse_selectors(kind, label_selector, field_selector)
        with self.lock:
            start_after: ObjKey | None = None
            if continue_token:
                token_rv, start_after = self._decode_continue(continue_token)
                if token_rv < self._compacted_rv:
                    raise errors.expired(
                        "The provided continue parameter is too old to display a consistent list result. "
                        "You can start a new list without the continue parameter."
                    )
            items = [
                self._versioned(kind, obj)
                for key, obj in sorted(self._bucket(kind).items())
                if (namespace is None or key[0] == namespace)
                and (start_after is None or key > start_after)
                and self.matches(obj, labels_req, fields_req)
            ]
            metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
            if limit is not None and limit > 0 and len(items) > limit:
                items = items[:limit]
                last = _meta(items[-1])
                metadata["continue"] = self._encode_continue(
                    self._rv, (last.get("namespace", ""), last["name"])
                )
            return {
                "kind": kind.list_kind,
                "apiVersion": kind.api_version,
                "metadata": metadata,
                "items": items,
            }

    @staticmethod
    def _encode_continue(rv: int, after: ObjKey) -> str:
        raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(after)}).encode()
        return base64.urlsafe_b64encode(raw).decode()

    @staticmethod
    def _decode_continue(token: str) -> tuple[int, ObjKey]:
        try:
            data = json.loads(base64.urlsafe_b64decode(token.encode()))
            return int(data["rv"]), (str(data["start"][0]), str(data["start"][1]))
        except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
            raise errors.bad_request(f"continue key is not valid: {token!r}") from None

    @staticmethod
    def parse_selectors(
        kind: ResourceKind, label_selector: str | None, field_selector: str | None
    ) -> tuple[tuple[Requirement, ...], tuple[FieldRequirement, ...]]:
        try:
            return (
                parse_label_selector(label_selector),
                parse_field_selector(field_selector, kind.selectable_fields),
            )
        except SelectorError as exc:
            raise errors.bad_request(str(exc)) from None

    @staticmethod
    def matches(
        obj: Mapping[str, Any],
        labels_req: tuple[Requirement, ...],
        fields_req: tuple[FieldRequirement, ...],
    ) -> bool:
        return labels_match(labels_req, _meta(obj).get("labels")) and fields_match(fields_req, obj)

    # --- validation --------------------------------------------------------------------

    def _check_type(self, kind: ResourceKind, body: Mapping[str, Any]) -> None:
        api_version, kind_name = body.get("apiVersion"), body.get("kind")
        if api_version is not None and api_version != kind.api_version:
            # Other served versions of the same group/kind are fine (no conversion needed here).
            group = api_version.rpartition("/")[0] if "/" in api_version else ""
            if group != kind.group or not self.registry.find_by_group_kind(group, kind.kind):
                raise errors.bad_request(
                    f"the API version in the data ({api_version}) does not match the expected API version ({kind.api_version})"
                )
        if kind_name is not None and kind_name != kind.kind:
            raise errors.bad_request(
                f"the kind in the data ({kind_name}) does not match the expected kind ({kind.kind})"
            )

    def _check_name(self, kind: ResourceKind, name: str) -> None:
        label_named = (kind.group, kind.plural) in _LABEL_NAMED
        pattern, limit = (DNS1123_LABEL, 63) if label_named else (DNS1123_SUBDOMAIN, 253)
        if len(name) > limit or not pattern.match(name):
            what = "RFC 1123 label" if label_named else "lowercase RFC 1123 subdomain"
            raise errors.invalid(
                kind.kind,
                name,
                [
                    (
                        "FieldValueInvalid",
                        "metadata.name",
                        f'Invalid value: "{name}": a {what} must consist of lower case alphanumeric characters, '
                        f"'-' or '.', start and end with an alphanumeric character, and be at most {limit} characters",
                    )
                ],
                kind.group,
            )

    def _check_namespace(
        self, kind: ResourceKind, namespace: str, name: str, *, creating: bool
    ) -> None:
        if not kind.namespaced:
            return
        ns = self._objects.get(("", "namespaces"), {}).get(("", namespace))
        if ns is None:
            raise errors.not_found("namespaces", namespace)
        if creating and _meta(ns).get("deletionTimestamp"):
            raise errors.forbidden(
                kind.plural,
                name,
                f'{kind.resource_label} "{name}" is forbidden: unable to create new content in namespace '
                f"{namespace} because it is being terminated",
                kind.group,
            )

    def _check_labels(self, kind: ResourceKind, obj: Mapping[str, Any], name: str) -> None:
        labels = _meta(obj).get("labels")
        if labels is None:
            return
        if not isinstance(labels, Mapping):
            raise errors.invalid(
                kind.kind,
                name,
                [("FieldValueInvalid", "metadata.labels", "must be a map of strings")],
                kind.group,
            )
        for key, value in labels.items():
            try:
                parse_label_selector(f"{key}={value}" if value else f"{key}")
            except SelectorError:
                raise errors.invalid(
                    kind.kind,
                    name,
                    [
                        (
                            "FieldValueInvalid",
                            f"metadata.labels[{key}]",
                            f'Invalid value: "{value}": not a valid label',
                        )
                    ],
                    kind.group,
                ) from None

    # --- create ----------------------------------------------------------------------------

    def create(
        self,
        kind: ResourceKind,
        namespace: str | None,
        body: Mapping[str, Any],
        *,
        manager: str,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise errors.bad_request("the body of the request must be a JSON object")
        if kind.virtual:
            return self._review(kind, body)
        with self.lock:
            obj = self._prepare_create(kind, namespace, body)
            fields.track_update(
                None, obj, manager=manager, now=self.now(), has_status=kind.has_status
            )
            if dry_run:
                return self._versioned(kind, obj)
            return self._versioned(kind, self._insert(kind, obj))

    def _prepare_create(
        self, kind: ResourceKind, namespace: str | None, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        self._check_type(kind, body)
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise errors.bad_request("metadata must be an object")
        if kind.namespaced:
            body_ns = meta.get("namespace")
            if namespace is None:
                raise errors.method_not_allowed()
            if body_ns and body_ns != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        name = meta.get("name")
        if not name:
            prefix = meta.get("generateName")
            if not prefix:
                raise errors.invalid(
                    kind.kind,
                    "",
                    [("FieldValueRequired", "metadata.name", "name or generateName is required")],
                    kind.group,
                )
            for _ in range(100):
                name = prefix + "".join(self._rng.choice(_GENERATE_ALPHABET) for _ in range(5))
                if (meta.get("namespace", ""), name) not in self._bucket(kind):
                    break
            meta["name"] = name
        if not isinstance(name, str):
            raise errors.bad_request("metadata.name must be a string")
        self._check_name(kind, name)
        self._check_labels(kind, obj, name)
        self._check_namespace(kind, meta.get("namespace", ""), name, creating=True)
        if (meta.get("namespace", ""), name) in self._bucket(kind):
            raise errors.already_exists(kind.plural, name, kind.group)
        for server_owned in (
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "managedFields",
        ):
            meta.pop(server_owned, None)
        meta["uid"] = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        meta["creationTimestamp"] = self.now()
        meta["generation"] = 1
        if kind.has_status:
            obj.pop("status", None)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        self._defaults(kind, obj)
        return obj

    def _allocate_cluster_ip(self, name: str) -> str:
        """The next free address of the service range (in order; addresses in use are skipped)."""
        net = self.service_cluster_ip_range
        in_use = {
            str(ip)
            for svc in self._objects.get(("", "services"), {}).values()
            for ip in (svc.get("spec") or {}).get("clusterIPs") or []
        }
        # The last address of an IPv4 range is its broadcast address: never handed out.
        end = net.num_addresses - (1 if net.version == 4 else 0)
        while self._next_cluster_ip < end:
            candidate = str(net[self._next_cluster_ip])
            self._next_cluster_ip += 1
            if candidate not in in_use:
                return candidate
        raise errors.invalid(
            "Service",
            name,
            [("FieldValueInvalid", "spec.clusterIP", f"service IP range {net} is full")],
        )

    def _defaults(self, kind: ResourceKind, obj: dict[str, Any]) -> None:
        """What the real server's create strategies fill in, for the kinds where clients look."""
        key = (kind.group, kind.plural)
        if key == ("", "namespaces"):
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
        elif key == ("", "pods"):
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif key == ("", "services"):
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                spec["clusterIP"] = self._allocate_cluster_ip(_meta(obj).get("name", ""))
            if spec.get("clusterIP"):
                spec.setdefault(
                    "clusterIPs", [spec["clusterIP"]] if spec["clusterIP"] != "None" else ["None"]
                )
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
                    port.setdefault("targetPort", port.get("port"))
            obj["status"] = {"loadBalancer": {}}
        elif key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            try:
                new_kinds = kinds_from_crd(obj)
            except ValueError as exc:
                raise errors.invalid(
                    kind.kind,
                    _meta(obj).get("name", ""),
                    [("FieldValueInvalid", "spec", str(exc))],
                    kind.group,
                ) from None
            names = obj["spec"]["names"]
            obj["status"] = {
                "acceptedNames": copy.deepcopy(names),
                "storedVersions": [
                    v["name"] for v in obj["spec"]["versions"] if v.get("storage", True)
                ][:1],
                "conditions": [
                    {
                        "type": t,
                        "status": "True",
                        "reason": r,
                        "message": m,
                        "lastTransitionTime": self.now(),
                    }
                    for t, r, m in (
                        ("NamesAccepted", "NoConflicts", "no conflicts found"),
                        (
                            "Established",
                            "InitialNamesAccepted",
                            "the initial names have been accepted",
                        ),
                    )
                ],
            }
            for new_kind in new_kinds:
                self.registry.add(new_kind)

    def _insert(self, kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
        stored = self._commit(kind, "ADDED", obj, None)
        if (kind.group, kind.plural) == ("", "namespaces"):
            sa_kind = self.registry.lookup("", "v1", "serviceaccounts")
            name = stored["metadata"]["name"]
            if (name, "default") not in self._bucket(sa_kind):
                sa = self._prepare_create(sa_kind, name, {"metadata": {"name": "default"}})
                fields.track_update(
                    None, sa, manager="kube-controller-manager", now=self.now(), has_status=False
                )
                self._commit(sa_kind, "ADDED", sa, None)
        self._collect_garbage()
        return stored

    # --- update (PUT) -----------------------------------------------------------------------

    def update(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        body: Mapping[str, Any],
        *,
        manager: str,
        subresource: str = "",
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise errors.bad_request("the body of the request must be a JSON object")
        with self.lock:
            old = self._existing(kind, namespace, name)
            self._check_type(kind, body)
            body_meta = _meta(body)
            if body_meta.get("name") not in (None, name):
                raise errors.bad_request(
                    f"the name of the object ({body_meta.get('name')}) does not match the name on the URL ({name})"
                )
            if kind.namespaced and body_meta.get("namespace") not in (None, "", namespace):
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            rv = body_meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(kind.plural, name, kind.group)
            return self._write(
                kind, old, body, manager=manager, subresource=subresource, dry_run=dry_run
            )

    def _existing(self, kind: ResourceKind, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self._bucket(kind).get(((namespace or "") if kind.namespaced else "", name))
        if obj is None:
            raise errors.not_found(kind.plural, name, kind.group)
        return obj

    def _write(
        self,
        kind: ResourceKind,
        old: dict[str, Any],
        body: Mapping[str, Any],
        *,
        manager: str,
        subresource: str,
        dry_run: bool,
        apply_managed: bool = False,
    ) -> dict[str, Any]:
        """Shared tail of update/patch/apply: scope to main or status, metadata rules, generation, commit."""
        if subresource == "status":
            new = copy.deepcopy(old)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
            if apply_managed:
                new.setdefault("metadata", {})["managedFields"] = copy.deepcopy(
                    _meta(body).get("managedFields", [])
                )
        else:
            new = copy.deepcopy(dict(body))
            if kind.has_status:
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            meta = new.setdefault("metadata", {})
            old_meta = old["metadata"]
            for immutable in (
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ):
                if immutable in old_meta:
                    meta[immutable] = old_meta[immutable]
                else:
                    meta.pop(immutable, None)
            if not apply_managed:
                meta["managedFields"] = copy.deepcopy(old_meta.get("managedFields", []))
            self._check_labels(kind, new, old_meta["name"])
            if old_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
                if added:
                    raise errors.invalid(
                        kind.kind,
                        old_meta["name"],
                        [
                            (
                                "FieldValueForbidden",
                                "metadata.finalizers",
                                f"no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)!r}",
                            )
                        ],
                        kind.group,
                    )
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if not apply_managed:
            fields.track_update(
                old,
                new,
                manager=manager,
                now=self.now(),
                subresource=subresource,
                has_status=kind.has_status,
            )
        if _spec_part(new) != _spec_part(old):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _without_times(new) == _without_times(old):
            return self._versioned(
                kind, old
            )  # no-op writes neither bump resourceVersion nor notify
        if dry_run:
            return self._versioned(kind, new)
        if (kind.group, kind.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            try:
                for new_kind in kinds_from_crd(new):
                    self.registry.add(new_kind)
            except ValueError as exc:
                raise errors.invalid(
                    kind.kind,
                    old["metadata"]["name"],
                    [("FieldValueInvalid", "spec", str(exc))],
                    kind.group,
                ) from None
        if (
            new["metadata"].get("deletionTimestamp")
            and not new["metadata"].get("finalizers")
            and not self._namespace_pending(kind, new)
        ):
            # The last finalizer is gone: the update is the deletion (one DELETED event, like the real store).
            out = self._versioned(kind, self._remove(kind, new))
            self._collect_garbage()
            return out
        stored = self._commit(kind, "MODIFIED", new, old)
        self._collect_garbage()
        return self._versioned(kind, stored)

    # --- patch --------------------------------------------------------------------------------

    def patch(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        patch_type: str,
        raw_body: bytes,
        *,
        manager: str | None,
        force: bool = False,
        subresource: str = "",
        dry_run: bool = False,
    ) -> dict[str, Any]:
        if patch_type not in PATCH_TYPES:
            raise errors.unsupported_media_type(patch_type)
        if patch_type == PATCH_STRATEGIC and kind.custom:
            # Custom resources have no schema-declared merge keys; the real server refuses.
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: "
                f"{PATCH_JSON}, {PATCH_MERGE}, {PATCH_APPLY}",
            )
        if force and patch_type != PATCH_APPLY:
            raise errors.bad_request("force may not be set for non-apply patch requests")
        try:
            body = (
                yaml.safe_load(raw_body)
                if patch_type == PATCH_APPLY
                else json.loads(raw_body or b"null")
            )
        except (ValueError, yaml.YAMLError) as exc:
            raise errors.bad_request(f"error decoding patch: {exc}") from None
        if patch_type == PATCH_APPLY:
            if not manager:
                raise errors.bad_request(
                    "PATCH /apply requires the fieldManager query parameter to be set"
                )
            return self._apply(
                kind,
                namespace,
                name,
                body,
                manager=manager,
                force=force,
                subresource=subresource,
                dry_run=dry_run,
            )
        with self.lock:
            old = self._existing(kind, namespace, name)
            current = self._versioned(kind, old)
            try:
                if patch_type == PATCH_MERGE:
                    if not isinstance(body, Mapping):
                        raise PatchError("a merge patch must be a JSON object")
                    patched = merge_patch(current, body)
                elif patch_type == PATCH_STRATEGIC:
                    if not isinstance(body, Mapping):
                        raise PatchError("a strategic merge patch must be a JSON object")
                    patched = strategic_merge_patch(current, body)
                else:
                    patched = json_patch(current, body)
            except PatchError as exc:
                raise errors.ApiError(
                    422, "Invalid", f'{kind.resource_label} "{name}" is invalid: {exc}'
                ) from None
            if not isinstance(patched, dict):
                raise errors.bad_request("the patch produced something other than an object")
            rv = _meta(patched).get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(kind.plural, name, kind.group)
            patched_meta = _meta(patched)
            if patched_meta.get("name") != name:
                raise errors.bad_request("metadata.name cannot be changed by a patch")
            return self._write(
                kind,
                old,
                patched,
                manager=manager or "unknown",
                subresource=subresource,
                dry_run=dry_run,
            )

    def _apply(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        manager: str,
        force: bool,
        subresource: str,
        dry_run: bool,
    ) -> dict[str, Any]:
        if not isinstance(body, Mapping):
            raise errors.bad_request("an apply patch must be an object")
        if not body.get("apiVersion") or not body.get("kind"):
            raise errors.bad_request("apiVersion and kind must be set in an apply configuration")
        self._check_type(kind, body)
        body_meta = _meta(body)
        if body_meta.get("name") not in (None, name):
            raise errors.bad_request(
                f"the name of the object ({body_meta.get('name')}) does not match the name on the URL ({name})"
            )
        with self.lock:
            old = self._bucket(kind).get(((namespace or "") if kind.namespaced else "", name))
            rv = body_meta.get("resourceVersion")
            if old is not None and rv and rv != old["metadata"]["resourceVersion"]:
                raise errors.conflict(kind.plural, name, kind.group)
            try:
                merged = fields.apply(
                    copy.deepcopy(old) if old is not None else None,
                    body,
                    manager=manager,
                    force=force,
                    now=self.now(),
                    subresource=subresource,
                    has_status=kind.has_status,
                )
            except fields.ApplyConflict as exc:
                raise ApiError(
                    409,
                    "Conflict",
                    str(exc),
                    details={
                        "causes": [
                            {
                                "reason": "FieldManagerConflict",
                                "message": f'conflict with "{c.manager}"',
                                "field": c.field,
                            }
                            for c in exc.conflicts
                        ]
                    },
                ) from None
            if old is None:
                if subresource:
                    raise errors.not_found(kind.plural, name, kind.group)
                merged.setdefault("metadata", {})["name"] = name
                managed = merged["metadata"].pop("managedFields", [])
                obj = self._prepare_create(kind, namespace, merged)
                obj["metadata"]["managedFields"] = managed
                if dry_run:
                    return self._versioned(kind, obj)
                return self._versioned(kind, self._insert(kind, obj))
            return self._write(
                kind,
                old,
                merged,
                manager=manager,
                subresource=subresource,
                dry_run=dry_run,
                apply_managed=True,
            )

    # --- delete -------------------------------------------------------------------------------

    def delete(
        self,
        kind: ResourceKind,
        namespace: str | None,
        name: str,
        *,
        propagation: str | None = None,
        preconditions: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """Returns the object (still present with deletionTimestamp, or as deleted) or a Success Status."""
        if propagation not in (None, "Background", "Foreground", "Orphan"):
            raise errors.bad_request(
                f"propagationPolicy {propagation!r} is not one of Background, Foreground, Orphan"
            )
        with self.lock:
            old = self._existing(kind, namespace, name)
            meta = old["metadata"]
            preconditions = preconditions or {}
            if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
                raise errors.conflict(
                    kind.plural,
                    name,
                    kind.group,
                    f"Precondition failed: UID in precondition: {preconditions['uid']}, UID in object meta: {meta['uid']}",
                )
            if (
                preconditions.get("resourceVersion")
                and preconditions["resourceVersion"] != meta["resourceVersion"]
            ):
                raise errors.conflict(
                    kind.plural,
                    name,
                    kind.group,
                    f"Precondition failed: ResourceVersion in precondition: {preconditions['resourceVersion']}, "
                    f"ResourceVersion in object meta: {meta['resourceVersion']}",
                )
            if dry_run:
                return self._versioned(kind, old)
            new = copy.deepcopy(old)
            new_meta = new["metadata"]
            finalizers = list(new_meta.get("finalizers") or [])
            if propagation == "Foreground" and "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
            if propagation == "Orphan" and "orphan" not in finalizers:
                finalizers.append("orphan")
            is_namespace = (kind.group, kind.plural) == ("", "namespaces")
            if finalizers or is_namespace:
                if meta.get("deletionTimestamp") and finalizers == list(
                    meta.get("finalizers") or []
                ):
                    return self._versioned(kind, old)
                if finalizers:
                    new_meta["finalizers"] = finalizers
                new_meta.setdefault("deletionTimestamp", self.now())
                new_meta.setdefault("deletionGracePeriodSeconds", 0)
                if is_namespace:
                    new.setdefault("status", {})["phase"] = "Terminating"
                stored = self._commit(kind, "MODIFIED", new, old)
                out = self._versioned(kind, stored)
                self._collect_garbage()
                return out
            out = self._versioned(kind, self._remove(kind, new))
            self._collect_garbage()
            if kind.return_deleted_object:
                return out
            return {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Success",
                "details": {
                    "name": name,
                    "group": kind.group,
                    "kind": kind.plural,
                    "uid": meta["uid"],
                },
            }

    def _remove(self, kind: ResourceKind, obj: dict[str, Any]) -> dict[str, Any]:
        deleted = self._commit(kind, "DELETED", copy.deepcopy(obj), None)
        if (kind.group, kind.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            spec = obj.get("spec", {})
            for gone in self.registry.remove(
                spec.get("group", ""), spec.get("names", {}).get("plural", "")
            ):
                for _, cr in list(self._bucket(gone).items()):
                    self._commit(gone, "DELETED", copy.deepcopy(cr), None)
        return deleted

    def delete_collection(
        self,
        kind: ResourceKind,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        propagation: str | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        with self.lock:
            listed = self.list_objects(
                kind, namespace, label_selector=label_selector, field_selector=field_selector
            )
            deleted = []
            for item in listed["items"]:
                meta = item["metadata"]
                try:
                    result = self.delete(
                        kind,
                        meta.get("namespace"),
                        meta["name"],
                        propagation=propagation,
                        dry_run=dry_run,
                    )
                except ApiError:
                    continue  # raced with the garbage collector
                deleted.append(result if result.get("kind") == kind.kind else item)
            return {
                "kind": kind.list_kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(self._rv)},
                "items": deleted,
            }

    # --- garbage collector --------------------------------------------------------------------

    def _namespace_pending(self, kind: ResourceKind, obj: Mapping[str, Any]) -> bool:
        """A terminating namespace stays until it is empty."""
        if (kind.group, kind.plural) != ("", "namespaces"):
            return False
        name = obj["metadata"]["name"]
        return any(
            key[0] == name
            for (g, p), bucket in self._objects.items()
            if (g, p) != ("", "namespaces")
            for key in bucket
        )

    def _all(self) -> list[tuple[ResourceKind, dict[str, Any]]]:
        out: list[tuple[ResourceKind, dict[str, Any]]] = []
        for (group, plural), bucket in self._objects.items():
            candidates = [
                k for k in self.registry.kinds() if k.group == group and k.plural == plural
            ]
            if not candidates:
                continue
            for obj in list(bucket.values()):
                out.append((candidates[0], obj))
        return out

    def _collect_garbage(self) -> None:
        """Run the controllers that deletion relies on until nothing changes (bounded)."""
        if not self._gc_pending:
            return
        for _ in range(1000):
            self._gc_pending = False
            if not self._gc_round():
                return
        raise RuntimeError("garbage collection did not settle after 1000 rounds")

    def _gc_round(self) -> bool:
        everything = self._all()
        uids = {obj["metadata"]["uid"]: (kind, obj) for kind, obj in everything}
        dependents: dict[str, list[tuple[ResourceKind, dict[str, Any], dict[str, Any]]]] = {}
        for kind, obj in everything:
            for ref in obj["metadata"].get("ownerReferences") or []:
                dependents.setdefault(ref.get("uid", ""), []).append((kind, obj, ref))
        for kind, obj in everything:
            meta = obj["metadata"]
            ns_name = meta.get("namespace", "")
            finalizers = list(meta.get("finalizers") or [])
            deleting = bool(meta.get("deletionTimestamp"))
            if deleting and "orphan" in finalizers:
                for dep_kind, dep, _ in dependents.get(meta["uid"], []):
                    updated = copy.deepcopy(dep)
                    updated["metadata"]["ownerReferences"] = [
                        r for r in dep["metadata"]["ownerReferences"] if r.get("uid") != meta["uid"]
                    ]
                    if not updated["metadata"]["ownerReferences"]:
                        del updated["metadata"]["ownerReferences"]
                    self._commit(dep_kind, "MODIFIED", updated, dep)
                self._drop_finalizer(kind, obj, "orphan")
                return True
            if deleting and "foregroundDeletion" in finalizers:
                deps = dependents.get(meta["uid"], [])
                for dep_kind, dep, _ in deps:
                    if not dep["metadata"].get("deletionTimestamp"):
                        self.delete(
                            dep_kind,
                            dep["metadata"].get("namespace"),
                            dep["metadata"]["name"],
                            propagation="Foreground",
                        )
                        return True
                if not any(ref.get("blockOwnerDeletion") for _, _, ref in deps):
                    self._drop_finalizer(kind, obj, "foregroundDeletion")
                    return True
            if (kind.group, kind.plural) == ("", "namespaces") and deleting:
                name = meta["name"]
                contents = [
                    (k, o)
                    for k, o in everything
                    if k.namespaced and o["metadata"].get("namespace") == name
                ]
                for dep_kind, dep in contents:
                    if not dep["metadata"].get("deletionTimestamp"):
                        self.delete(dep_kind, name, dep["metadata"]["name"])
                        return True
                if not contents and not finalizers:
                    self._remove(kind, obj)
                    return True
            refs = meta.get("ownerReferences") or []
            if refs and not deleting:
                owners = [uids.get(ref.get("uid", "")) for ref in refs]
                live_owners = [
                    o
                    for o in owners
                    if o is not None and o[1]["metadata"].get("namespace", "") in ("", ns_name)
                ]
                if not live_owners:
                    self.delete(kind, ns_name or None, meta["name"], propagation="Background")
                    return True
        return False

    def _drop_finalizer(self, kind: ResourceKind, obj: dict[str, Any], finalizer: str) -> None:
        new = copy.deepcopy(obj)
        remaining = [f for f in new["metadata"].get("finalizers") or [] if f != finalizer]
        if remaining:
            new["metadata"]["finalizers"] = remaining
        else:
            new["metadata"].pop("finalizers", None)
        if not remaining and not self._namespace_pending(kind, new):
            self._remove(kind, new)
        else:
            self._commit(kind, "MODIFIED", new, obj)

    # --- token review ---------------------------------------------------------------------

    def _review(self, kind: ResourceKind, body: Mapping[str, Any]) -> dict[str, Any]:
        spec = body.get("spec") or {}
        token = spec.get("token")
        if not isinstance(token, str) or not token:
            raise errors.invalid(
                kind.kind, "", [("FieldValueRequired", "spec.token", "Required value")], kind.group
            )
        audiences = tuple(spec.get("audiences") or ())
        result = self.token_reviewer(token, audiences)
        status: dict[str, Any] = {"authenticated": result.authenticated}
        if result.authenticated:
            status["user"] = {
                "username": result.username,
                "uid": result.uid,
                "groups": list(result.groups),
                "extra": {k: list(v) for k, v in result.extra.items()},
            }
            status["audiences"] = list(result.audiences or audiences)
        if result.error:
            status["error"] = result.error
        return {
            "kind": "TokenReview",
            "apiVersion": kind.api_version,
            "metadata": {"creationTimestamp": None},
            "spec": dict(spec),
            "status": status,
        }

    # --- direct access for tests, kubelets and controller managers -----------------------------------

    def get_object(
        self, api_version: str, kind_name: str, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        with self.lock:
            kind = self.registry.by_kind(api_version, kind_name)
            obj = self._bucket(kind).get(((namespace or "") if kind.namespaced else "", name))
            return self._versioned(kind, obj) if obj is not None else None

    def put_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object as a trusted component would: status included, no resourceVersion
        check, no managedFields change; uid/creationTimestamp kept; resourceVersion bumped, watchers told."""
        with self.lock:
            kind = self._kind_of(obj)
            meta = _meta(obj)
            name = meta.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError(f"put_object: {kind.kind} needs metadata.name")
            namespace = meta.get("namespace") or ("default" if kind.namespaced else "")
            old = self._bucket(kind).get((namespace if kind.namespaced else "", name))
            if old is None:
                new = copy.deepcopy(dict(obj))
                new_meta = new.setdefault("metadata", {})
                if kind.namespaced:
                    new_meta["namespace"] = namespace
                    self._check_namespace(kind, namespace, name, creating=True)
                new_meta.setdefault(
                    "uid", str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
                )
                new_meta.setdefault("creationTimestamp", self.now())
                new_meta.setdefault("generation", 1)
                new["apiVersion"], new["kind"] = kind.api_version, kind.kind
                if (kind.group, kind.plural) == ("", "namespaces"):
                    new.setdefault("spec", {"finalizers": ["kubernetes"]})
                    new.setdefault("status", {"phase": "Active"})
                    return self._versioned(kind, self._insert(kind, new))
                stored = self._commit(kind, "ADDED", new, None)
                self._collect_garbage()
                return self._versioned(kind, stored)
            new = copy.deepcopy(dict(obj))
            new_meta = new.setdefault("metadata", {})
            for kept in ("uid", "creationTimestamp", "namespace", "generation", "managedFields"):
                if kept in old["metadata"] and kept not in new_meta:
                    new_meta[kept] = old["metadata"][kept]
            if _spec_part(new) != _spec_part(old) and new_meta.get("generation") == old[
                "metadata"
            ].get("generation"):
                new_meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
            new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            stored = self._commit(kind, "MODIFIED", new, old)
            self._collect_garbage()
            return self._versioned(kind, stored)

    def delete_object(
        self, api_version: str, kind_name: str, name: str, namespace: str | None = None
    ) -> None:
        """Remove an object at once (finalizers ignored), as if etcd lost it."""
        with self.lock:
            kind = self.registry.by_kind(api_version, kind_name)
            obj = self._bucket(kind).get(
                ((namespace or "default") if kind.namespaced else "", name)
            )
            if obj is not None:
                self._remove(kind, copy.deepcopy(obj))
                self._collect_garbage()


def parse_bool(value: str | None) -> bool:
    return _query_bool(value)


def parse_delete_options(
    body: bytes, query: Mapping[str, str]
) -> tuple[str | None, dict[str, Any], bool]:
    """(propagationPolicy, preconditions, dryRun) from a DELETE's body and query, query winning."""
    options: dict[str, Any] = {}
    if body and body.strip():
        try:
            loaded = json.loads(body)
        except ValueError as exc:
            raise errors.bad_request(f"error decoding DeleteOptions: {exc}") from None
        if isinstance(loaded, dict):
            options = loaded
    policy = query.get("propagationPolicy") or options.get("propagationPolicy")
    orphan = query.get("orphanDependents")
    if orphan is None and options.get("orphanDependents") is not None:
        orphan = "true" if options["orphanDependents"] else "false"
    if policy is None and orphan is not None:
        policy = "Orphan" if _query_bool(orphan) else "Background"
    dry_run = bool(query.get("dryRun")) or bool(options.get("dryRun"))
    return policy, dict(options.get("preconditions") or {}), dry_run

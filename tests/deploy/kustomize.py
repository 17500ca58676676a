"""A tiny, strict subset of kustomize, enough to render deploy/** in tests (kustomize is not installed).

Owns `build(directory)`: read `kustomization.yaml`, load its `resources` (YAML files, or directories
holding another kustomization, recursively), then apply `namespace` (to namespaced objects only) and
`commonLabels` (to every object's labels and, as kustomize does, to workload selectors and pod
templates and to Service selectors). Anything else in a kustomization is an error rather than being
silently ignored, so a manifest that needs real kustomize features fails here first. Like kustomize,
two objects with the same group/kind/namespace/name are an error.

Not implemented (on purpose): remote resources, patches, generators, images, name prefixes, and
kustomize's rewriting of RoleBinding subjects' namespaces - our manifests spell those out.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = frozenset({"apiVersion", "kind", "resources", "namespace", "commonLabels"})
# Kinds without a namespace (the ones our manifests can contain, and the usual others).
CLUSTER_SCOPED_KINDS = frozenset(
    {
        "Namespace",
        "Node",
        "PersistentVolume",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "PriorityClass",
        "StorageClass",
        "IngressClass",
        "RuntimeClass",
        "GatewayClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "APIService",
    }
)
# kind -> paths of label maps that commonLabels also extends (kustomize's default fieldSpecs).
_WORKLOAD_LABELS = (("spec", "selector", "matchLabels"), ("spec", "template", "metadata", "labels"))
_SELECTOR_PATHS: dict[str, tuple[tuple[str, ...], ...]] = dict.fromkeys(
    ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet"), _WORKLOAD_LABELS
)
_SELECTOR_PATHS["Service"] = (("spec", "selector"),)
_SELECTOR_PATHS["Job"] = (("spec", "template", "metadata", "labels"),)

Object = dict[str, Any]


class KustomizeError(Exception):
    """A kustomization or resource this subset cannot render; the message names the file and why."""


def build(directory: Path) -> list[Object]:
    """Render the kustomization in `directory` into a list of objects (deep copies, file order)."""
    return _build(directory.resolve(), stack=())


def object_id(obj: Object) -> tuple[str, str, str, str]:
    """kustomize's resource id: (API group, kind, namespace, name)."""
    group = obj["apiVersion"].rpartition("/")[0]
    return (group, obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise KustomizeError(f"{directory}: no kustomization.yaml")


def _build(directory: Path, stack: tuple[Path, ...]) -> list[Object]:
    if directory in stack:
        chain = " -> ".join(str(p) for p in (*stack, directory))
        raise KustomizeError(f"kustomization cycle: {chain}")
    path = _kustomization_file(directory)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise KustomizeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(spec, dict):
        raise KustomizeError(f"{path}: must be a mapping, got {type(spec).__name__}")
    unknown = sorted(set(spec) - SUPPORTED_FIELDS)
    if unknown:
        raise KustomizeError(f"{path}: unsupported field(s) {', '.join(unknown)}")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{path}: kind must be Kustomization, got {spec['kind']!r}")

    resources = spec.get("resources") or []
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise KustomizeError(f"{path}: resources must be a list of relative paths")
    objects: list[Object] = []
    for entry in resources:
        if "://" in entry or entry.startswith(("github.com/", "git@")):
            raise KustomizeError(f"{path}: remote resource {entry!r} is not supported")
        target = (directory / entry).resolve()
        if target.is_dir():
            objects.extend(_build(target, (*stack, directory)))
        elif target.is_file():
            objects.extend(_load_file(target))
        else:
            raise KustomizeError(f"{path}: resource {entry!r} does not exist ({target})")

    namespace = spec.get("namespace")
    if namespace is not None:
        if not isinstance(namespace, str) or not namespace:
            raise KustomizeError(f"{path}: namespace must be a non-empty string")
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = namespace

    labels = spec.get("commonLabels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise KustomizeError(f"{path}: commonLabels must map strings to strings")
    if labels:
        for obj in objects:
            _add_labels(obj, ("metadata", "labels"), labels)
            for label_path in _SELECTOR_PATHS.get(obj["kind"], ()):
                _add_labels(obj, label_path, labels)

    seen: dict[tuple[str, str, str, str], None] = {}
    for obj in objects:
        key = object_id(obj)
        if key in seen:
            raise KustomizeError(f"{path}: duplicate object {'/'.join(p for p in key if p)}")
        seen[key] = None
    return objects


def _load_file(path: Path) -> list[Object]:
    try:
        docs = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as err:
        raise KustomizeError(f"{path}: not valid YAML: {err}") from None
    objects: list[Object] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue  # empty document between separators
        where = f"{path} document {index}"
        if not isinstance(doc, dict):
            raise KustomizeError(f"{where}: must be a mapping, got {type(doc).__name__}")
        for key in ("apiVersion", "kind"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise KustomizeError(f"{where}: missing {key}")
        meta = doc.get("metadata")
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise KustomizeError(f"{where}: {doc['kind']} has no metadata.name")
        if doc["kind"] == "Kustomization":
            raise KustomizeError(f"{where}: list the directory, not the kustomization file")
        objects.append(copy.deepcopy(doc))
    return objects


def _add_labels(obj: Object, path: tuple[str, ...], labels: dict[str, str]) -> None:
    node: Any = obj
    for key in path:
        if not isinstance(node, dict):
            return
        if key not in node or node[key] is None:
            # Only create label maps where kustomize would: metadata.labels always, selectors
            # and templates only when the object has them already.
            if path != ("metadata", "labels"):
                return
            node[key] = {}
        node = node[key]
    if isinstance(node, dict):
        node.update(labels)

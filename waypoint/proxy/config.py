"""The waypoint's L7 configuration from the local config document (lab and tests).

The document is YAML with top-level keys ``httpRoutes``, ``grpcRoutes`` and
``authorizationPolicies``, each a list of Kubernetes-shaped objects; other keys (the ztunnel's
workloads, services, ...) are left to their owners. Every object is validated on its own: bad ones
are rejected and reported (`L7Config.errors`), the rest are used. The caller reads the file; this
module only parses text. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from waypoint.proxy.authz import AuthorizationPolicy, parse_authorization_policies
from waypoint.proxy.parsing import ConfigError, InvalidObjectError
from waypoint.proxy.routes import (
    DEFAULT_PARSE_OPTIONS,
    GRPCRoute,
    HTTPRoute,
    ParseOptions,
    RouteTable,
    parse_grpc_route,
    parse_http_route,
)

HTTP_ROUTES_KEY = "httpRoutes"
GRPC_ROUTES_KEY = "grpcRoutes"
POLICIES_KEY = "authorizationPolicies"


class ConfigDocumentError(ValueError):
    """The document as a whole is unusable (not YAML, not a mapping)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class L7Config:
    routes: RouteTable
    policies: tuple[AuthorizationPolicy, ...]
    """Accepted policies plus fail-closed stand-ins for rejected ones (see `authz`)."""
    errors: tuple[ConfigError, ...] = ()
    """Rejected objects, one entry per problem."""
    warnings: tuple[ConfigError, ...] = ()
    """Accepted objects with parts that answer 500 at request time (e.g. invalid backends)."""


def _duplicate(kind: str, namespace: str, name: str) -> ConfigError:
    return ConfigError(
        kind=kind,
        namespace=namespace,
        name=name,
        field="metadata.name",
        message="duplicate object; the first one is used",
    )


def build_routes(
    http_objects: Iterable[Any],
    grpc_objects: Iterable[Any] = (),
    options: ParseOptions = DEFAULT_PARSE_OPTIONS,
) -> tuple[RouteTable, list[ConfigError], list[ConfigError]]:
    """(table of accepted routes, errors of rejected ones, warnings of accepted ones)."""
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    http: dict[str, HTTPRoute] = {}
    grpc: dict[str, GRPCRoute] = {}
    for obj in http_objects:
        try:
            route, warns = parse_http_route(obj, options)
        except InvalidObjectError as exc:
            errors.extend(exc.errors)
            continue
        if route.key in http:
            errors.append(_duplicate("HTTPRoute", route.namespace, route.name))
            continue
        http[route.key] = route
        warnings.extend(warns)
    for obj in grpc_objects:
        try:
            groute, warns = parse_grpc_route(obj, options)
        except InvalidObjectError as exc:
            errors.extend(exc.errors)
            continue
        if groute.key in grpc:
            errors.append(_duplicate("GRPCRoute", groute.namespace, groute.name))
            continue
        grpc[groute.key] = groute
        warnings.extend(warns)
    return RouteTable.build(http.values(), grpc.values()), errors, warnings


def _objects(doc: Mapping[str, Any], key: str, source: str, errors: list[ConfigError]) -> list[Any]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append(
            ConfigError(
                kind="ConfigFile",
                namespace="",
                name=source,
                field=key,
                message=f"must be a list of objects, got {type(value).__name__}",
            )
        )
        return []
    return value


def parse_local_config(
    document: str | Mapping[str, Any],
    *,
    source: str = "<config>",
    options: ParseOptions = DEFAULT_PARSE_OPTIONS,
) -> L7Config:
    """Validated routes and policies of a local config document (YAML text or parsed mapping).

    Raises ConfigDocumentError naming `source` when the document itself is unusable.
    """
    if isinstance(document, str):
        try:
            loaded = yaml.safe_load(document)
        except yaml.YAMLError as exc:
            raise ConfigDocumentError(f"{source}: not valid YAML: {exc}") from exc
    else:
        loaded = document
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, Mapping):
        raise ConfigDocumentError(
            f"{source}: the top level must be a mapping, got {type(loaded).__name__}"
        )
    errors: list[ConfigError] = []
    http_objects = _objects(loaded, HTTP_ROUTES_KEY, source, errors)
    grpc_objects = _objects(loaded, GRPC_ROUTES_KEY, source, errors)
    policy_objects = _objects(loaded, POLICIES_KEY, source, errors)
    table, route_errors, warnings = build_routes(http_objects, grpc_objects, options)
    policies, policy_errors = parse_authorization_policies(policy_objects)
    return L7Config(
        routes=table,
        policies=tuple(policies),
        errors=tuple(errors + route_errors + policy_errors),
        warnings=tuple(warnings),
    )

"""API errors of the fake API server, rendered as real `Status` objects.

Owns `ApiError` (HTTP code + Kubernetes reason + message + details) and the constructors for the
reasons the real server uses (NotFound, AlreadyExists, Conflict, Invalid, Expired/Gone, BadRequest,
MethodNotAllowed, Forbidden, UnsupportedMediaType). Messages copy the real server's wording so that
clients and people reading logs see what they would see against a real cluster.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error answer; `status()` is the Status object body."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        *,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(resource: str, name: str, group: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": resource}
    if group:
        details["group"] = group
    return details


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    label = f"{resource}.{group}" if group else resource
    return ApiError(
        404, "NotFound", f'{label} "{name}" not found', details=_details(resource, name, group)
    )


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    label = f"{resource}.{group}" if group else resource
    return ApiError(
        409,
        "AlreadyExists",
        f'{label} "{name}" already exists',
        details=_details(resource, name, group),
    )


def conflict(resource: str, name: str, group: str = "", why: str = "") -> ApiError:
    label = f"{resource}.{group}" if group else resource
    why = (
        why
        or "the object has been modified; please apply your changes to the latest version and try again"
    )
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {label} "{name}": {why}',
        details=_details(resource, name, group),
    )


def invalid(kind: str, name: str, causes: list[tuple[str, str, str]], group: str = "") -> ApiError:
    """causes: (reason, field, message), e.g. ("FieldValueInvalid", "metadata.name", "...")."""
    rendered = [{"reason": r, "message": m, "field": f} for r, f, m in causes]
    summary = ", ".join(f"{f}: {m}" for _, f, m in causes)
    details = _details(kind, name, group)
    details["causes"] = rendered
    label = f"{kind}.{group}" if group else kind
    return ApiError(422, "Invalid", f'{label} "{name}" is invalid: {summary}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def gone(message: str) -> ApiError:
    return ApiError(410, "Gone", message)


def method_not_allowed(
    message: str = "the server does not allow this method on the requested resource",
) -> ApiError:
    return ApiError(405, "MethodNotAllowed", message, details={})


def forbidden(resource: str, name: str, message: str, group: str = "") -> ApiError:
    return ApiError(403, "Forbidden", message, details=_details(resource, name, group))


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format: {content_type}",
    )

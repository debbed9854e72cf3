"""The one mapping of `SecretsError` to an answer: the status and JSON body each error carries,
`no-store` always, the 401 challenge; also the 404 of an unrouted path and the 503 that
replaces an answer whose audit record no sink confirmed.

The trace notes why a request was refused: no_grant (403) or audit_unavailable (503); the
authentication reason of a 401 is noted where it is decided (access.authenticate).
"""

from __future__ import annotations

import logging

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from schemas.api import ConflictError, ErrorBody, InvalidSecretError, ViolationBody, encoder
from schemas.errors import (
    AuditUnavailable,
    Forbidden,
    InvalidPath,
    InvalidSecret,
    SecretsError,
    Unauthenticated,
    VersionConflict,
)
from schemas.paths import validate_path
from service.http.responses import NO_STORE, JsonResponse
from service.http.trace import trace_of

__all__ = ["audit_refusal", "error_response", "route_not_found"]

log = logging.getLogger("secrets.http")


async def error_response(request: Request, exc: Exception) -> Response:
    """The exception handler of every SecretsError."""
    assert isinstance(exc, SecretsError)
    headers = dict(NO_STORE)
    body: msgspec.Struct
    if isinstance(exc, VersionConflict):
        body = ConflictError(exc.code, exc.detail, exc.current_version)
    elif isinstance(exc, InvalidSecret):
        body = InvalidSecretError(
            exc.code, exc.detail, [ViolationBody(v.field, v.rule) for v in exc.violations]
        )
    else:
        body = ErrorBody(exc.code, exc.detail)
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = exc.www_authenticate
    elif exc.status == 429:
        headers["Retry-After"] = "1"  # too many watch streams: one may close any moment
    elif isinstance(exc, Forbidden | AuditUnavailable):
        reason = "no_grant" if isinstance(exc, Forbidden) else "audit_unavailable"
        trace_of(request).reason = reason
    if exc.status >= 500:
        log.error("request failed", extra={"error": exc.code, "error_type": type(exc).__name__})
    return JsonResponse(encoder.encode(body), status_code=exc.status, headers=headers)


async def route_not_found(request: Request, exc: Exception) -> Response:
    """404 for a path no route takes; 400 for one under /secrets/ that is no valid path."""
    if request.url.path.startswith("/secrets/"):
        # `{rest:path}` matches anything but a newline: such a path is invalid, not unrouted.
        try:
            validate_path(request.url.path.removeprefix("/secrets/"))
        except InvalidPath as invalid:
            return await error_response(request, invalid)
    return JsonResponse(encoder.encode(ErrorBody("not_found", "no such route")), status_code=404)


def audit_refusal(request_id: str) -> list[Message]:
    """The 503 sent in place of an answer whose audit record no sink accepted."""
    body = encoder.encode(ErrorBody("backend_unavailable", AuditUnavailable().detail))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        (b"x-request-id", request_id.encode()),
    ]
    return [
        {"type": "http.response.start", "status": 503, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]

"""The one typed record of a request: `RequestTrace`, what the routes learnt and where it stands
(`TraceState`), plus the request ids (`RequestIds`) and the caller's own X-Request-ID.

A trace is made by the middleware (routed requests) or the fast path (cached reads), filled in
by the routes, and read once at the end by the recorder: audit record, metrics and log line.
"""

from __future__ import annotations

import enum
import itertools
import re
import secrets
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType
from starlette.requests import Request
from starlette.types import Scope

from service.auth import Principal

__all__ = ["RequestIds", "RequestTrace", "TraceState", "caller_request_id", "trace_of"]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class TraceState(enum.Enum):
    """Where a request stands, which decides whether it leaves an audit record."""

    RECEIVED = "received"  # nobody decided anything yet (an unrouted path, /healthz): no record
    AUTHENTICATED = "authenticated"  # a verified principal: every answer is audited
    UNAUTHENTICATED = "unauthenticated"  # refused at authentication (401): audited as such


# Looked up once: on 3.11 an Enum member costs ~70 ns each time it is named.
_RECEIVED = TraceState.RECEIVED
_AUTHENTICATED = TraceState.AUTHENTICATED
_UNAUTHENTICATED = TraceState.UNAUTHENTICATED


class RequestTrace(msgspec.Struct, kw_only=True, gc=False):
    """One request's context: exactly the fields of its log line, in the line's order.

    A field never set is UNSET and absent from the line (None is shown: `client_id` of a token
    without one). The context is filled in as the routes learn it; `method` to `duration_ms`
    only once the answer is known (service.http.recorder), so that a line logged within the
    request shows the context alone. The line is this Struct encoded (`log_request`), which is
    why nothing else lives here: the state is computed from the fields its two transitions set.
    """

    request_id: str  # generated, unique: never the caller's choice
    client_request_id: str | UnsetType = UNSET  # the caller's X-Request-ID, if well-formed
    actor: str | UnsetType = UNSET  # the principal's subject; set by `authenticated` only
    client_id: str | None | UnsetType = UNSET
    path: str | UnsetType = UNSET  # the secret's path or listed prefix ("" for the top)
    op: str | UnsetType = UNSET  # one of schemas.audit.OPS, once a route chose it
    versions: list[int] | UnsetType = UNSET  # lifecycle calls: every version acted on
    from_version: int | UnsetType = UNSET  # rollback: the version copied
    version: int | None | UnsetType = UNSET  # the version read or written (None: several)
    list_calls: int | UnsetType = UNSET  # listing: Vault LIST calls made
    list_truncated: bool | UnsetType = UNSET  # listing: the walk ran out of its budget
    reason: str | UnsetType = UNSET  # why it was refused: auth reason, no_grant, audit_unavailable
    change_id: str | UnsetType = UNSET  # the change request acted on (or a bypass's own id)
    bypass: bool | UnsetType = UNSET  # a break-glass change (its reason: in the audit record)
    method: str | UnsetType = UNSET
    status: int | UnsetType = UNSET
    outcome: str | UnsetType = UNSET
    duration_ms: float | UnsetType = UNSET

    def authenticated(self, principal: Principal) -> None:
        """RECEIVED -> AUTHENTICATED."""
        self.actor = principal.subject
        self.client_id = principal.client_id

    def unauthenticated(self, reason: str) -> None:
        """RECEIVED -> UNAUTHENTICATED."""
        self.reason = reason

    @property
    def state(self) -> TraceState:
        # Only `authenticated` sets an actor, and a reason is noted without one only by
        # `unauthenticated`: every later refusal (403, 503) comes after authentication.
        if self.actor is not UNSET:
            return _AUTHENTICATED
        if self.reason is not UNSET:
            return _UNAUTHENTICATED
        return _RECEIVED

    def log_fields(self) -> dict[str, Any]:
        """The fields of the log line, in order, those never set left out."""
        fields: dict[str, Any] = msgspec.to_builtins(self)
        return fields


class RequestIds:
    """Generated ids: a random prefix per app and a counter, 32 hex digits like a UUID's,
    unique across instances and restarts, at an eighth of uuid4()'s cost.

    Every request gets one, whatever it sent: it is the `request_id` of its audit record and
    log line, and its `X-Request-ID` header. A caller's own well-formed X-Request-ID is kept
    beside it as `client_request_id`, so no caller can make its records pass for another's.
    """

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


def caller_request_id(scope: Scope) -> str | UnsetType:
    """The caller's X-Request-ID if it is well-formed; UNSET otherwise."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return UNSET


def trace_of(request: Request) -> RequestTrace:
    """The trace of a routed request (`TraceMiddleware` put it in the scope, as starlette's
    AuthenticationMiddleware puts `scope["user"]`)."""
    trace: RequestTrace = request.scope["trace"]
    return trace

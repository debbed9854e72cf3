"""`CachedReads`, the outermost ASGI layer: a `GET /secrets/{path}` whose token, grant and secret
are all in the caches is answered here; anything else goes on to the wrapped app, the routes.

The answer is the routes' byte for byte (service.http.responses.secret_headers), and it leaves
the same audit record, metrics and log line (the one Recorder), without Starlette's routing,
Request and Response objects or TraceMiddleware's send wrapper: measured, served, 76 µs of CPU
against 127 µs for the same read routed.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Receive, Scope, Send

from schemas.errors import Unauthenticated
from schemas.secret import Secret
from service.audit import AuditLog
from service.auth import OIDCVerifier, Policy, Principal, bearer_token
from service.auth.policy import READ
from service.core import SecretsManager
from service.http.recorder import Recorder
from service.http.responses import secret_headers
from service.http.trace import RequestIds, RequestTrace, caller_request_id

__all__ = ["CachedReads", "cached_read"]

_PREFIX = "/secrets/"


class CachedReads:
    """Answers the cached reads, in the shape of starlette's TrustedHostMiddleware."""

    def __init__(self, app: ASGIApp, *, ids: RequestIds, recorder: Recorder) -> None:
        self.app = app
        self.ids = ids
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            started = time.perf_counter()
            hit = cached_read(scope)
            if hit is not None:
                principal, path, secret, body = hit
                trace = RequestTrace(
                    request_id=self.ids.next(),
                    client_request_id=caller_request_id(scope),
                    actor=principal.subject,
                    client_id=principal.client_id,
                    path=path,
                    op="read",
                    version=secret.version,
                )
                headers = secret_headers(secret.version, body)
                headers.append((b"x-request-id", trace.request_id.encode()))
                try:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                finally:
                    self.recorder.finish(trace, scope, 200, started, scope["state"]["audit"])
                return
        await self.app(scope, receive, send)


def cached_read(scope: Scope) -> tuple[Principal, str, Secret, bytes] | None:
    """Who asks, for which path, and the secret with its document, when the caches alone can
    answer this `GET /secrets/{path}` as the routes would; None to take the routes."""
    path: str = scope["path"]
    state = scope.get("state")
    if not path.startswith(_PREFIX) or not state:
        return None
    path = path[9:]  # after _PREFIX
    audit: AuditLog = state["audit"]
    if audit.must_confirm("read"):  # SECRETS_AUDIT_FAIL_CLOSED=all: the answer is held
        return None
    authorization = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            break
    try:
        token = bearer_token(authorization)
    except Unauthenticated:
        return None  # the routes refuse it, log why and count it
    verifier: OIDCVerifier = state["verifier"]
    principal = verifier.cached(token)
    if principal is None:
        return None
    policy: Policy = state["policy"]
    # Never allowed on an invalid path, a custom method (`:verb`) included.
    if not policy.allows(principal.roles, principal.scopes, READ, path):
        return None
    manager: SecretsManager = state["manager"]
    found = manager.cached_document(path)
    if found is None:
        return None
    secret, body = found
    return principal, path, secret, body

"""`TraceMiddleware`, pure ASGI: each routed request gets its trace and X-Request-ID, and leaves
its audit record, metrics and log line (recorder) once answered.

Where the audit log is fail-closed for the request's op, the answer is held until a sink has
accepted its record, and replaced by a 503 if none did.
"""

from __future__ import annotations

import time

from msgspec import UNSET
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.audit import AuditLog
from service.http.errors import audit_refusal
from service.http.recorder import Recorder
from service.http.trace import RequestIds, RequestTrace, caller_request_id
from service.obs.logs import log_context

__all__ = ["TraceMiddleware"]


class TraceMiddleware:
    """Every /secrets request that reached a decision (authenticated or refused) gets one audit
    record; every /secrets request gets one log line; a chosen op is counted in the metrics."""

    def __init__(self, app: ASGIApp, *, ids: RequestIds, recorder: Recorder) -> None:
        self.app = app
        self.ids = ids
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        trace = RequestTrace(request_id=self.ids.next(), client_request_id=caller_request_id(scope))
        started = time.perf_counter()
        scope["trace"] = trace  # for the routes: service.http.trace.trace_of
        token = log_context.set(trace)  # for any line logged while it is served
        request_id = trace.request_id.encode()
        status = 500  # unless an answer starts: the exception reaches ServerErrorMiddleware
        secrets_route = scope["path"].startswith("/secrets")
        audit: AuditLog | None = scope.get("state", {}).get("audit") if secrets_route else None
        held: list[Message] | None = None
        recorded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, held, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
                op = trace.op
                # A watch stream is recorded when it ends (start_op refused it already if no
                # sink works): holding it until then would hold it for hours.
                if (
                    audit is not None
                    and op is not UNSET
                    and op != "watch"
                    and audit.must_confirm(op)
                ):
                    held = [message]
                    return
            elif held is not None:
                held.append(message)
                if message.get("more_body", False):
                    return
                messages, held = held, None
                recorded = True
                assert audit is not None
                if not await self.recorder.confirm(audit, trace, scope, status):
                    status = 503
                    messages = audit_refusal(trace.request_id)
                for held_message in messages:
                    await send(held_message)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            try:
                if secrets_route:
                    audit_left = None if recorded else audit
                    self.recorder.finish(trace, scope, status, started, audit_left)
                else:
                    self.recorder.observe(trace, status, started)
            finally:
                log_context.reset(token)

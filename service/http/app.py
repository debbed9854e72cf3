"""The HTTP adapter: app factory, lifespan resources, routes and the one error handler.

Each request flows route -> auth -> policy -> manager; the manager owns cache, Vault, events.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from prometheus_client import generate_latest, start_http_server
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from events.bus import EventBus
from schemas.api import (
    ConflictError,
    ErrorBody,
    InvalidSecretError,
    ViolationBody,
    WriteResponse,
    encoder,
    write_request_decoder,
)
from schemas.audit import OPS, AuditRecord, outcome_for
from schemas.errors import (
    AuditUnavailable,
    ConfigError,
    Forbidden,
    InvalidPath,
    InvalidRequest,
    InvalidSecret,
    SecretsError,
    TooLarge,
    Unauthenticated,
    VersionConflict,
)
from schemas.paths import split_custom_method, validate_path, validate_prefix
from schemas.secret import redact_url
from service.audit.log import AuditLog, LineSink
from service.auth import OIDCVerifier, Principal, bearer_token
from service.auth.policy import METRICS, READ, WRITE, Policy
from service.core.manager import SecretsManager
from service.core.validation import Validator
from service.http.lifecycle import SecretMethods, decode_body
from service.http.openapi import openapi_document
from service.obs.logs import log_request, request_context
from service.obs.metrics import Metrics
from service.settings import Settings
from service.timestamps import utc_now
from service.vault import HvacBackend, VaultBackend

__all__ = ["create_app"]

log = logging.getLogger("secrets.http")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_VERSION_PARAM = re.compile(r"[1-9][0-9]{0,15}")
_NO_STORE = {"Cache-Control": "no-store"}
_WRITE_BODY = '{"data": {...}, "version": N}'
_HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Json(Response):
    media_type = "application/json"


def create_app(
    settings: Settings,
    *,
    backend: VaultBackend | None = None,
    verifier: OIDCVerifier | None = None,
    policy: Policy | None = None,
    bus: EventBus | None = None,
) -> Starlette:
    """Build the app. Anything not injected is opened in the lifespan from `settings`."""
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        try:
            async with _open_resources(app) as state:
                yield state
        except ConfigError as exc:
            # The CLI turns this into exit code 2 with one line naming the setting.
            app.state.startup_error = exc
            raise

    @contextlib.asynccontextmanager
    async def _open_resources(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as stack:
            pol = policy or Policy.load(settings.policy_file)
            vault = backend
            if vault is None:
                hvac_backend = HvacBackend(
                    settings.vault_addr,
                    token=settings.vault_token,
                    role_id=settings.vault_role_id,
                    secret_id=settings.vault_secret_id,
                    mount=settings.vault_mount,
                    timeout=settings.vault_timeout,
                    concurrency=settings.vault_concurrency,
                    observer=metrics.observe_vault,
                )
                stack.push_async_callback(hvac_backend.aclose)
                await hvac_backend.login()
                vault = hvac_backend
            auth = verifier
            if auth is None:
                auth = OIDCVerifier(
                    settings.oidc_issuer,
                    settings.oidc_audience,
                    roles_claim=pol.roles_claim,
                    algorithms=settings.oidc_algorithms,
                    leeway=settings.oidc_leeway,
                    max_lifetime=settings.oidc_max_token_lifetime,
                    jwks_refresh=settings.oidc_jwks_refresh,
                )
                stack.push_async_callback(auth.aclose)
                await auth.start()
            events = bus or EventBus(
                settings.nats_url,
                settings.nats_prefix,
                instance_id=settings.instance_id,
                replicas=settings.nats_replicas,
                credentials=settings.nats_creds,
                tls_ca=settings.nats_tls_ca,
                tls_cert=settings.nats_tls_cert,
                tls_key=settings.nats_tls_key,
                tls_first=settings.nats_tls_first,
            )
            manager = SecretsManager(
                vault,
                cache_ttl=settings.cache_ttl,
                cache_max_entries=settings.cache_max_entries,
                fallback_ttl=settings.cache_fallback_ttl,
                instance_id=settings.instance_id,
                events=events,
                validator=Validator.from_policy(pol.raw),
            )
            stack.push_async_callback(manager.aclose)
            stack.push_async_callback(events.aclose)
            await events.connect(manager)
            audit = AuditLog(
                line=LineSink.open(settings.audit_sink),
                publisher=events,
                fail_closed=settings.audit_fail_closed,
                instance_id=settings.instance_id,
            )
            await audit.start()
            stack.push_async_callback(audit.aclose)  # before the bus closes: it drains to NATS
            metrics.bind(manager=manager, bus=events, audit=audit)
            if settings.metrics_port:
                await _serve_metrics(stack, metrics, settings.host, settings.metrics_port)
            if settings.vault_poll_interval > 0:
                watcher = asyncio.get_running_loop().create_task(
                    manager.watch_versions(settings.vault_poll_interval)
                )
                stack.callback(watcher.cancel)
            log.info(
                "service ready",
                extra={
                    "instance_id": settings.instance_id,
                    "vault": redact_url(settings.vault_addr),  # never a user:password@
                    "event_loop": type(asyncio.get_running_loop()).__module__.partition(".")[0],
                },
            )
            # Also on app.state, for code embedding the app (and tests) to reach the manager.
            app.state.manager = manager
            app.state.bus = events
            app.state.audit = audit
            yield {
                "manager": manager,
                "verifier": auth,
                "policy": pol,
                "bus": events,
                "vault": vault,
                "readiness": _Readiness(vault, events),
                "audit": audit,
            }

    routes = [
        # The endpoint answers 405 (JSON, with Allow) for a method the path or verb does not take.
        Route("/secrets/{rest:path}", _secret_endpoint, methods=_HTTP_METHODS),
        Route("/secrets:list", _secret_endpoint, methods=_HTTP_METHODS),  # the top of the tree
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", _readyz, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
    ]
    app = _SecretsApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={SecretsError: _error_response, 404: _route_not_found},
    )
    app.state.settings = settings
    app.state.startup_error = None
    app.state.metrics = metrics
    app.state.openapi = encoder.encode(openapi_document())
    app.context = _RequestContext(None, metrics)
    app.add_middleware(_RequestContext, metrics=metrics, ids=app.context.ids)
    return app


# -- routes ------------------------------------------------------------------------------


async def _secret_endpoint(request: Request) -> Response:
    principal = await _authenticate(request)
    # /secrets:list has no path parameter: it is the listing of the top of the tree.
    rest: str = request.path_params.get("rest", ":list")
    if not request.scope["path"].endswith(rest):
        # A route's regex ends in `$`, which also matches before a final newline: for
        # `/secrets/app/db%0A` the parameter is `app/db`. The path as received decides.
        raise InvalidPath("a path or custom method must not end with a line break")
    path, verb = split_custom_method(rest)
    if verb == "list":
        validate_prefix(path)
    else:
        validate_path(path)
    ctx = request_context.get()
    if ctx is not None:
        ctx["path"] = path
    return await _SECRET_METHODS.dispatch(request, principal, path, verb)


async def _read(request: Request, principal: Principal, path: str) -> Response:
    _require(request, principal, READ, path, op="read")
    version = _version_param(request)
    manager: SecretsManager = request.state.manager
    secret, body = await manager.get_document(path, version)
    ctx = request_context.get()
    if ctx is not None:
        ctx["version"] = secret.version
    headers = {"ETag": f'"{secret.version}"', **_NO_STORE}
    return _Json(body, headers=headers)


async def _write(request: Request, principal: Principal, path: str) -> Response:
    _require(request, principal, WRITE, path, op="write")
    settings: Settings = request.app.state.settings
    raw = await _read_body(request, settings.max_body_bytes)
    body = decode_body(raw, write_request_decoder, _WRITE_BODY, path)
    manager: SecretsManager = request.state.manager
    secret = await manager.set(path, body.data, body.version, actor=principal.subject)
    ctx = request_context.get()
    if ctx is not None:
        ctx["version"] = secret.version
    return _Json(
        encoder.encode(WriteResponse(path=path, version=secret.version)), headers=_NO_STORE
    )


async def _healthz(request: Request) -> Response:
    return _Json(b'{"status":"ok"}')


async def _readyz(request: Request) -> Response:
    readiness: _Readiness = request.state.readiness
    checks = await readiness.check()
    ok = all(checks.values())
    body = encoder.encode({"status": "ready" if ok else "unavailable", "checks": checks})
    return _Json(body, status_code=200 if ok else 503)


async def _metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    if settings.metrics_port:
        return await _route_not_found(request, LookupError())  # served on its own port
    if settings.metrics_role is not None:
        principal = await _authenticate(request)
        scopes = principal.scopes  # as for secrets: scopes narrow what the role grants
        if settings.metrics_role not in principal.roles or (
            scopes is not None and METRICS not in scopes
        ):
            raise Forbidden("no grant for the metrics")
    metrics: Metrics = request.app.state.metrics
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _serve_metrics(
    stack: contextlib.AsyncExitStack, metrics: Metrics, host: str, port: int
) -> None:
    """/metrics on its own port (SECRETS_METRICS_PORT), from prometheus-client's thread."""
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(
            "SECRETS_METRICS_PORT", f"cannot listen on {port}: {exc.strerror}"
        ) from None

    async def stop() -> None:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(timeout=5)

    stack.push_async_callback(stop)


async def _openapi(request: Request) -> Response:
    return _Json(request.app.state.openapi)


# -- helpers -----------------------------------------------------------------------------


async def _authenticate(request: Request) -> Principal:
    verifier: OIDCVerifier = request.state.verifier
    try:
        principal = await verifier.verify(bearer_token(request.headers.get("authorization")))
    except Unauthenticated as exc:
        metrics: Metrics = request.app.state.metrics
        metrics.auth_failures.labels(exc.reason).inc()
        raise
    ctx = request_context.get()
    if ctx is not None:
        ctx["actor"] = principal.subject
        ctx["client_id"] = principal.client_id
    return principal


def _require(request: Request, principal: Principal, permission: str, path: str, op: str) -> None:
    ctx = request_context.get()
    if ctx is not None:
        ctx["op"] = op
    audit: AuditLog = request.state.audit
    audit.check(op)  # fail-closed: refused before Vault is asked when no audit sink works
    policy: Policy = request.state.policy
    if not policy.allows(principal.roles, principal.scopes, permission, path):
        raise Forbidden(path=path)


def _version_param(request: Request) -> int | None:
    raw = request.query_params.get("version")
    if raw is None:
        return None
    if _VERSION_PARAM.fullmatch(raw) is None:
        raise InvalidRequest("version must be a positive integer")
    return int(raw)


async def _read_body(request: Request, limit: int, expected: str = _WRITE_BODY) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length")
        if int(declared) > limit:
            raise TooLarge(f"the body exceeds {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    if size == 0:
        raise InvalidRequest(f"a JSON body {expected} is required")
    raw = b"".join(chunks)
    _refuse_duplicate_keys(raw)
    return raw


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _refuse_duplicate_keys(raw: bytes) -> None:
    """A key named twice in one object is ambiguous (parsers disagree on which one wins): 400.

    msgspec keeps the last silently, so the stdlib parser looks first; writes only, not reads.
    """
    try:
        json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise InvalidRequest("the body names a key twice in one object") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValueError:
        pass  # not JSON, or not UTF-8: the typed decoder that follows says so


async def _error_response(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SecretsError)
    headers = dict(_NO_STORE)
    body: msgspec.Struct
    if isinstance(exc, VersionConflict):
        body = ConflictError(exc.code, exc.detail, exc.current_version)
    elif isinstance(exc, InvalidSecret):
        body = InvalidSecretError(
            exc.code, exc.detail, [ViolationBody(v.field, v.rule) for v in exc.violations]
        )
    else:
        body = ErrorBody(exc.code, exc.detail)
    ctx = request_context.get()
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = exc.www_authenticate
        if ctx is not None:
            ctx["reason"] = exc.reason
    elif ctx is not None and isinstance(exc, Forbidden | AuditUnavailable):
        ctx["reason"] = "no_grant" if isinstance(exc, Forbidden) else "audit_unavailable"
    if exc.status >= 500:
        log.error("request failed", extra={"error": exc.code, "error_type": type(exc).__name__})
    return _Json(encoder.encode(body), status_code=exc.status, headers=headers)


async def _route_not_found(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/secrets/"):
        # `{rest:path}` matches anything but a newline: such a path is invalid, not unrouted.
        try:
            validate_path(request.url.path.removeprefix("/secrets/"))
        except InvalidPath as invalid:
            return await _error_response(request, invalid)
    return _Json(encoder.encode(ErrorBody("not_found", "no such route")), status_code=404)


class _Readiness:
    """Vault and NATS answer. Checked at most once a second, however often it is asked."""

    def __init__(self, vault: VaultBackend, bus: EventBus) -> None:
        self.vault = vault
        self.bus = bus
        self._at = 0.0
        self._checks: dict[str, bool] = {}

    async def check(self) -> dict[str, bool]:
        now = time.monotonic()
        if now - self._at >= 1.0:
            try:
                await self.vault.ping()
                vault_ok = True
            except SecretsError:
                vault_ok = False
            self._checks = {"vault": vault_ok, "nats": self.bus.connected}
            self._at = now
        return self._checks


class _SecretsApp(Starlette):
    """Starlette, with `GET /secrets/{path}` answered from the caches before its middleware
    stack when they can (`_RequestContext.answer_cached`): the answer is the same, as are its
    audit record, metrics and log line, without Starlette's outer layers."""

    context: _RequestContext

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and not scope["query_string"]
            and await self.context.answer_cached(scope, send)
        ):
            return
        await super().__call__(scope, receive, send)


class _RequestIds:
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


class _RequestContext:
    """Pure ASGI middleware: request id, audit record, one structured log line and metrics.

    Every /secrets request that reached a decision (authenticated or refused) gets one audit
    record. Where the audit log is fail-closed for the op, the response is held until a sink
    accepted the record, and replaced by a 503 if none did.

    A `GET /secrets/{path}` is first offered to the caches (`answer_cached`, called by
    `_SecretsApp` before Starlette's own layers); when they can answer, the answer is the
    route's byte for byte, sent without Starlette's routing, Request and Response objects or
    this middleware's send wrapper (measured, served: 76 µs of CPU against 127 µs for the same
    read routed). Anything else goes on to the routes, which decide, refuse and log as usual.
    Both leave the same audit record, metrics and log line.
    """

    def __init__(
        self, app: ASGIApp | None, metrics: Metrics, ids: _RequestIds | None = None
    ) -> None:
        self.app: ASGIApp = app or _no_app  # none: the instance for answer_cached alone
        self.metrics = metrics
        self.ids = ids or _RequestIds()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx: dict[str, Any] = {"request_id": self.ids.next()}
        theirs = _request_id(scope)
        if theirs is not None:
            ctx["client_request_id"] = theirs
        await self._routed(scope, receive, send, ctx, time.perf_counter())

    async def answer_cached(self, scope: Scope, send: Send) -> bool:
        """Answer a `GET /secrets/{path}` (no query) from the caches if they can; False if not,
        for the routes to answer."""
        started = time.perf_counter()
        ctx: dict[str, Any] = {"request_id": ""}  # first: the log line shows it first
        answer = _cached_read(scope, ctx)
        if answer is None:
            return False  # the routes give the request its ids
        theirs = _request_id(scope)
        if theirs is not None:  # right after the request id, as on the routes
            ctx = {"request_id": "", "client_request_id": theirs, **ctx}
        request_id = ctx["request_id"] = self.ids.next()
        response_start, response_body = answer
        response_start["headers"].append((b"x-request-id", request_id.encode()))
        try:
            await send(response_start)
            await send(response_body)
        finally:
            self._trace(scope, ctx, 200, started, scope["state"]["audit"])
        return True

    async def _routed(
        self, scope: Scope, receive: Receive, send: Send, ctx: dict[str, Any], started: float
    ) -> None:
        request_id: str = ctx["request_id"]
        token = request_context.set(ctx)
        status = 500
        secrets_route = scope["path"].startswith("/secrets")
        audit: AuditLog | None = scope.get("state", {}).get("audit") if secrets_route else None
        held: list[Message] | None = None
        recorded = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, held, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
                if audit is not None and audit.must_confirm(ctx.get("op")):
                    held = [message]
                    return
            elif held is not None:
                held.append(message)
                if message.get("more_body", False):
                    return
                messages, held = held, None
                recorded = True
                assert audit is not None
                if not await audit.confirm(_audit_record(audit, scope, ctx, status)):
                    if ctx.get("reason") != "audit_unavailable":
                        audit.refused += 1  # else already counted when the route refused it
                    log.error("audit log unavailable: answer replaced by 503")
                    ctx["reason"] = "audit_unavailable"
                    status = 503
                    messages = _audit_refusal(request_id)
                for held_message in messages:
                    await send(held_message)
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            try:
                if secrets_route:
                    self._trace(scope, ctx, status, started, None if recorded else audit)
                elif "op" in ctx:
                    self.metrics.observe_operation(
                        ctx["op"], outcome_for(status), time.perf_counter() - started
                    )
            finally:
                request_context.reset(token)

    def _trace(
        self,
        scope: Scope,
        ctx: dict[str, Any],
        status: int,
        started: float,
        audit: AuditLog | None,
    ) -> None:
        """What a /secrets request leaves behind: audit record (unless `audit` is None: none,
        or already confirmed), metrics and the request's log line."""
        duration = time.perf_counter() - started
        outcome = outcome_for(status)
        now = utc_now()  # one reading for the audit record and the log line
        if audit is not None and _decided(ctx):
            audit.submit(_audit_record(audit, scope, ctx, status, now))
        op = ctx.get("op")
        if op is not None:
            self.metrics.observe_operation(op, outcome, duration)
        # The line shows the context, then the answer; the context is this request's alone and
        # done with, so it is completed in place rather than copied.
        ctx["method"] = scope["method"]
        ctx["status"] = status
        ctx["outcome"] = outcome
        ctx["duration_ms"] = round(duration * 1000, 3)
        log_request(log, ctx, now)


def _cached_read(scope: Scope, ctx: dict[str, Any]) -> tuple[Message, Message] | None:
    """The two response messages of a `GET /secrets/{path}` the caches can answer, with `ctx`
    filled in as the routes would; None to take the routes."""
    path: str = scope["path"]
    state = scope.get("state")
    if not path.startswith("/secrets/") or not state:
        return None
    path = path[9:]
    audit: AuditLog = state["audit"]
    if audit.must_confirm("read"):  # SECRETS_AUDIT_FAIL_CLOSED=all: the response is held
        return None
    authorization = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
            break
    try:
        token = bearer_token(authorization)
    except Unauthenticated:
        return None
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
    ctx["actor"] = principal.subject
    ctx["client_id"] = principal.client_id
    ctx["path"] = path
    ctx["op"] = "read"
    ctx["version"] = secret.version
    headers = [
        (b"etag", b'"%d"' % secret.version),
        (b"cache-control", b"no-store"),
        (b"content-length", b"%d" % len(body)),
        (b"content-type", b"application/json"),
    ]
    return (
        {"type": "http.response.start", "status": 200, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("this _RequestContext only answers cached reads")


def _decided(ctx: dict[str, Any]) -> bool:
    # Authenticated (actor), refused at authentication (reason), or an op was chosen.
    return "actor" in ctx or "reason" in ctx or "op" in ctx


def _audit_record(
    audit: AuditLog, scope: Scope, ctx: dict[str, Any], status: int, at: str | None = None
) -> AuditRecord:
    client = scope.get("client")
    return audit.record(
        at=at,
        request_id=ctx["request_id"],
        op=ctx.get("op") or _fallback_op(scope),
        method=scope["method"],
        path=ctx.get("path"),
        version=ctx.get("version"),
        allowed=status not in (401, 403) and ctx.get("reason") != "audit_unavailable",
        outcome=outcome_for(status),
        status=status,
        reason=ctx.get("reason"),
        sub=ctx.get("actor"),
        client_id=ctx.get("client_id"),
        source=client[0] if client else None,
        client_request_id=ctx.get("client_request_id"),
    )


def _fallback_op(scope: Scope) -> str:
    """The op of a request refused before its route chose one (a 401): from verb or method."""
    _, colon, verb = scope["path"].rpartition(":")
    if colon and verb.isalpha():
        return verb if verb in OPS else "other"
    return {"GET": "read", "HEAD": "read", "PATCH": "write", "DELETE": "delete"}.get(
        scope["method"], "other"
    )


def _audit_refusal(request_id: str) -> list[Message]:
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


def _request_id(scope: Scope) -> str | None:
    """The caller's X-Request-ID if it is well-formed."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            candidate: str = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return None


_SECRET_METHODS = SecretMethods(read=_read, write=_write, require=_require, read_body=_read_body)

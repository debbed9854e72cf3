"""The operator's routes: `/healthz` (alive), `/readyz` (Vault and NATS answer), `/metrics`
(Prometheus text, unless served on its own port) and `/openapi.json`."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from schemas.api import encoder
from schemas.errors import Forbidden
from service.auth.policy import METRICS
from service.http.access import authenticate
from service.http.errors import route_not_found
from service.http.resources import Readiness
from service.http.responses import JsonResponse
from service.obs.metrics import Metrics
from service.settings import Settings

__all__ = ["healthz", "metrics", "openapi", "readyz"]


async def healthz(request: Request) -> Response:
    return JsonResponse(b'{"status":"ok"}')


async def readyz(request: Request) -> Response:
    readiness: Readiness = request.state.readiness
    checks = await readiness.check()
    ok = all(checks.values())
    body = encoder.encode({"status": "ready" if ok else "unavailable", "checks": checks})
    return JsonResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    if settings.metrics_port:
        return await route_not_found(request, LookupError())  # served on its own port
    if settings.metrics_role is not None:
        principal = await authenticate(request)
        scopes = principal.scopes  # as for secrets: scopes narrow what the role grants
        if settings.metrics_role not in principal.roles or (
            scopes is not None and METRICS not in scopes
        ):
            raise Forbidden("no grant for the metrics")
    registry: Metrics = request.app.state.metrics
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JsonResponse(request.app.state.openapi)

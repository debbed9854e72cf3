"""The app factory: routes, the one error handler, and the middleware stack in one expression.

A request goes protocol -> CachedReads (fast_path) -> ServerErrorMiddleware -> TraceMiddleware
(middleware) -> ExceptionMiddleware (errors) -> routes -> access -> secrets | lifecycle |
listing -> SecretsManager; what it leaves behind is the recorder's. Resources: resources.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp

from events.bus import EventBus
from schemas.api import encoder
from schemas.errors import SecretsError
from service.auth import OIDCVerifier, Policy
from service.http import changes, ops
from service.http.errors import error_response, route_not_found
from service.http.fast_path import CachedReads
from service.http.middleware import TraceMiddleware
from service.http.openapi import openapi_document
from service.http.recorder import Recorder
from service.http.resources import lifespan
from service.http.routes import HTTP_METHODS, secret_endpoint
from service.http.trace import RequestIds
from service.obs.metrics import Metrics
from service.settings import Settings
from service.vault import VaultBackend

__all__ = ["create_app"]


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
    app = _SecretsApp(
        routes=[
            # The endpoint answers 405 (JSON, with Allow) for a method the path or verb does
            # not take.
            Route("/secrets/{rest:path}", secret_endpoint, methods=HTTP_METHODS),
            Route("/secrets:list", secret_endpoint, methods=HTTP_METHODS),  # the top of the tree
            Route("/secrets:watch", secret_endpoint, methods=HTTP_METHODS),
            # These answer 405 themselves too (JSON, with the exact Allow).
            Route("/changes", changes.changes_endpoint, methods=HTTP_METHODS),
            Route("/changes/{rest:path}", changes.change_endpoint, methods=HTTP_METHODS),
            Route("/healthz", ops.healthz, methods=["GET"]),
            Route("/readyz", ops.readyz, methods=["GET"]),
            Route("/metrics", ops.metrics, methods=["GET"]),
            Route("/openapi.json", ops.openapi, methods=["GET"]),
        ],
        lifespan=lifespan(
            settings, metrics, backend=backend, verifier=verifier, policy=policy, bus=bus
        ),
        exception_handlers={SecretsError: error_response, 404: route_not_found},
    )
    app.state.settings = settings
    app.state.startup_error = None
    app.state.metrics = metrics
    app.state.openapi = encoder.encode(openapi_document())
    return app


class _SecretsApp(Starlette):
    """Starlette, with the service's own middleware stack."""

    def add_middleware(self, middleware_class: Any, *args: Any, **kwargs: Any) -> None:
        raise TypeError("the middleware stack is fixed in build_middleware_stack: add it there")

    def build_middleware_stack(self) -> ASGIApp:
        # One request id sequence and one recorder for both read paths.
        ids = RequestIds()
        recorder = Recorder(self.state.metrics)
        handlers: dict[Any, Any] = dict(self.exception_handlers)
        return CachedReads(
            ServerErrorMiddleware(
                TraceMiddleware(
                    ExceptionMiddleware(self.router, handlers=handlers, debug=self.debug),
                    ids=ids,
                    recorder=recorder,
                ),
                debug=self.debug,
            ),
            ids=ids,
            recorder=recorder,
        )

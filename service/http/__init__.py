"""The HTTP adapter around `SecretsManager`: app factory, middleware, fast path, handlers."""

from service.http.app import create_app

__all__ = ["create_app"]

"""What the answers look like: JSON responses, and the headers of a secret's document, built in
one place for both read paths (routed and cached) so that their bytes cannot drift apart."""

from __future__ import annotations

import msgspec
from starlette.responses import Response

from schemas.api import encoder

__all__ = ["NO_STORE", "JsonResponse", "json_response", "secret_headers", "secret_response"]

NO_STORE = {"Cache-Control": "no-store"}


class JsonResponse(Response):
    """Bytes already encoded as JSON."""

    media_type = "application/json"


def json_response(
    body: msgspec.Struct, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """`body` encoded, `Cache-Control: no-store` unless `headers` are given."""
    return JsonResponse(encoder.encode(body), status_code=status, headers=headers or NO_STORE)


def secret_headers(version: int, body: bytes) -> list[tuple[bytes, bytes]]:
    """The raw headers of a secret's document: its version as ETag, never stored by a cache."""
    return [
        (b"etag", b'"%d"' % version),
        (b"cache-control", b"no-store"),
        (b"content-length", b"%d" % len(body)),
        (b"content-type", b"application/json"),
    ]


def secret_response(version: int, body: bytes) -> Response:
    """A secret's document (`GET /secrets/{path}`), as the routes answer it."""
    response = Response(body)
    response.raw_headers = secret_headers(version, body)
    return response

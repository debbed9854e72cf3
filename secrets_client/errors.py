"""`ClientError`, the one exception of the client library, and its translation from httpx.

httpx's exceptions and the API's JSON error bodies become a `ClientError` here, once; nothing
else in `secrets_client` raises an httpx type.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

__all__ = [
    "MAX_REFUSAL",
    "ClientError",
    "aread_refusal",
    "error_from_response",
    "error_from_transport",
    "read_refusal",
]

MAX_REFUSAL = 64 * 1024  # bytes of a refused watch request's body read for its error


class ClientError(Exception):
    """The service refused a request, or could not be asked.

    `error` is the API's error code (`not_found`, `version_conflict`, ...) or, with `status` 0,
    what kept the request from being answered: `timeout`, `unreachable`, `invalid_url`,
    `invalid_path`, `invalid_request`, `invalid_token` (the token provider's answer cannot be
    sent), `invalid_stream` (the watch stream broke the SSE rules or this client's size bounds).
    `current_version` is the path's current version on a 409 `version_conflict`, else None.
    `body` is the API's error body (never a secret value: the API puts none in one), with
    `status` added.
    """

    def __init__(self, error: str, detail: str, *, status: int = 0, body: Any = None) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail
        self.status = status
        shown: dict[str, Any] = dict(body) if isinstance(body, Mapping) else {"error": error}
        shown.setdefault("detail", detail)
        if status:
            shown["status"] = status
        self.body = shown
        current = shown.get("current_version")
        is_version = isinstance(current, int) and not isinstance(current, bool)
        self.current_version: int | None = current if is_version else None
        self.retry_after: float | None = None  # from a 429's or 503's Retry-After header


def error_from_response(response: httpx.Response, content: bytes | None = None) -> ClientError:
    """The `ClientError` for an answer that is not a success: its body must have been read, or
    be given as `content` (the start of a streamed one)."""
    try:
        body = json.loads(response.content if content is None else content)
    except ValueError:
        body = None
    fields: dict[str, Any] = body if isinstance(body, dict) else {}
    error, detail = fields.get("error"), fields.get("detail")
    exc = ClientError(
        error if isinstance(error, str) else "http_error",
        str(detail) if detail is not None else response.reason_phrase,
        status=response.status_code,
        body=fields or None,
    )
    exc.retry_after = _seconds(response.headers.get("Retry-After"))
    return exc


def error_from_transport(exc: httpx.TransportError, url: str, timeout: float) -> ClientError:
    """`timeout` or `unreachable`, naming the service's URL and the exception's class only (its
    text may quote a request)."""
    if isinstance(exc, httpx.TimeoutException):
        return ClientError("timeout", f"no answer from {url} within {timeout}s")
    return ClientError("unreachable", f"cannot reach {url}: {type(exc).__name__}")


def read_refusal(response: httpx.Response, limit: int = MAX_REFUSAL) -> ClientError:
    """The `ClientError` for a streamed answer that is not a 200, reading no more than `limit`
    bytes of its body (what a refusal says fits; a hostile server's endless one is cut)."""
    return error_from_response(response, _head(response.iter_bytes(), limit))


async def aread_refusal(response: httpx.Response, limit: int = MAX_REFUSAL) -> ClientError:
    """`read_refusal` for an async response."""
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) >= limit:
            break
    return error_from_response(response, bytes(content[:limit]))


def _head(chunks: Iterable[bytes], limit: int) -> bytes:
    content = bytearray()
    for chunk in chunks:
        content += chunk
        if len(content) >= limit:
            break
    return bytes(content[:limit])


def _seconds(value: str | None) -> float | None:
    # Only the delay-seconds form; an HTTP date is not worth a parser here.
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return float(value)

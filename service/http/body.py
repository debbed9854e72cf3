"""What a request carries besides its path: the bounded body, refused when it names a key twice,
decoded into its msgspec Struct, and the query parameters `version` and `versions`.

The one place input errors are worded: messages name locations and types, never the input.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request

from schemas.api import MAX_VERSIONS_PER_REQUEST
from schemas.errors import InvalidRequest, TooLarge
from service.settings import Settings

__all__ = [
    "decode_body",
    "read_body",
    "read_json",
    "read_optional_json",
    "version_param",
    "versions_param",
]

T = TypeVar("T")

_VERSION_PARAM = re.compile(r"[1-9][0-9]{0,15}")


async def read_json(
    request: Request, path: str, decoder: msgspec.json.Decoder[T], expected: str
) -> T:
    """The body, bounded by SECRETS_MAX_BODY_BYTES, decoded by `decoder`; `expected` names the
    shape wanted in every refusal."""
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes, expected)
    return decode_body(raw, decoder, expected, path)


async def read_optional_json(
    request: Request, path: str, decoder: msgspec.json.Decoder[T], expected: str
) -> T | None:
    """As `read_json`, but a request without a body gets None."""
    settings: Settings = request.app.state.settings
    raw = await read_body(request, settings.max_body_bytes, expected, optional=True)
    return decode_body(raw, decoder, expected, path) if raw else None


async def read_body(
    request: Request, limit: int, expected: str, *, optional: bool = False
) -> bytes:
    """The body, at most `limit` bytes (413 beyond), no key named twice; never empty unless
    `optional`."""
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
        if optional:
            return b""
        raise InvalidRequest(f"a JSON body {expected} is required")
    raw = b"".join(chunks)
    _refuse_duplicate_keys(raw)
    return raw


def decode_body(raw: bytes, decoder: msgspec.json.Decoder[T], expected: str, path: str) -> T:
    """Decode a request body with `decoder`; anything wrong is a 400 naming the shape expected."""
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.startswith("Object contains unknown field"):
            # The field's name is not echoed: it is the caller's input.
            message = "the body has an unknown field"
        else:
            message = f"the body has the wrong shape: {message}"
        raise InvalidRequest(f"{message}; expected {expected}", path=path) from None
    except (msgspec.DecodeError, UnicodeDecodeError):  # invalid UTF-8 raises the latter
        raise InvalidRequest(
            f"the body is not valid JSON; expected {expected}", path=path
        ) from None
    except RecursionError:
        raise InvalidRequest(
            f"the body is nested too deeply; expected {expected}", path=path
        ) from None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


def _refuse_duplicate_keys(raw: bytes) -> None:
    """A key named twice in one object is ambiguous (parsers disagree on which one wins): 400.

    msgspec keeps the last silently, so the stdlib parser looks first; bodies only, not reads.
    """
    try:
        json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        raise InvalidRequest("the body names a key twice in one object") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    except ValueError:
        pass  # not JSON, or not UTF-8: the typed decoder that follows says so


def version_param(request: Request) -> int | None:
    """``?version=N``: the version to read; None (the current one) when absent."""
    raw = request.query_params.get("version")
    if raw is None:
        return None
    if _VERSION_PARAM.fullmatch(raw) is None:
        raise InvalidRequest("version must be a positive integer")
    return int(raw)


def versions_param(request: Request) -> list[int] | None:
    """``?versions=1,2``: the versions to delete; None (the current one) when absent."""
    raw = request.query_params.get("versions")
    if raw is None:
        return None
    parts = raw.split(",")
    if len(parts) > MAX_VERSIONS_PER_REQUEST or not all(
        part.isascii() and part.isdigit() and len(part) <= 16 and part[0] != "0" for part in parts
    ):
        raise InvalidRequest(
            f"versions must be 1 to {MAX_VERSIONS_PER_REQUEST} positive integers, "
            "comma-separated, like ?versions=1,2"
        )
    return [int(part) for part in parts]

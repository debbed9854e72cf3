"""HTTP handlers for the version history and lifecycle of a secret, and the method table.

`/secrets/{path}:verb` is an AIP-136 custom method; `SecretMethods.dispatch` picks the handler
by (HTTP method, verb): an unknown verb is 404, a known one with the wrong method 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from schemas.api import (
    MAX_VERSIONS_PER_REQUEST,
    ErrorBody,
    KeyList,
    LifecycleResponse,
    WriteResponse,
    encoder,
    rollback_request_decoder,
    versions_request_decoder,
)
from schemas.errors import Forbidden, InvalidRequest, NotFound
from service.auth.principal import Principal
from service.auth.policy import DESTROY, READ, WRITE, Policy
from service.core.listing import readable_keys
from service.core.manager import SecretsManager
from service.obs.logs import request_context
from service.settings import Settings

__all__ = ["Handler", "SecretMethods", "decode_body", "visible_keys"]

Handler = Callable[[Request, Principal, str], Awaitable[Response]]
T = TypeVar("T")

_NO_STORE = {"Cache-Control": "no-store"}
_VERSIONS_BODY = '{"versions": [N, ...]}'
_ROLLBACK_BODY = '{"to_version": N, "version": N}'
_NOTHING_READABLE = "nothing readable under this prefix"  # missing or not: the same words


class Require(Protocol):
    """app._require: record the operation for logs, metrics and audit, then check the grant."""

    def __call__(
        self, request: Request, principal: Principal, permission: str, path: str, op: str
    ) -> None: ...


class ReadBody(Protocol):
    """app._read_body: the request body, bounded; `expected` names the shape when it is empty."""

    async def __call__(self, request: Request, limit: int, expected: str = ...) -> bytes: ...


class SecretMethods:
    """Every handler of `/secrets/{path}`, keyed by (HTTP method, custom verb or None).

    Read and write come from the app module; the helpers it shares (authorization with the
    request context, the bounded body reader) are passed in rather than imported back.
    """

    def __init__(
        self, *, read: Handler, write: Handler, require: Require, read_body: ReadBody
    ) -> None:
        self._require = require
        self._read_body = read_body
        self.table: dict[tuple[str, str | None], Handler] = {
            ("GET", None): read,
            ("PATCH", None): write,
            ("DELETE", None): self.delete,
            ("GET", "versions"): self.versions,
            ("GET", "list"): self.list_keys,
            ("POST", "undelete"): self.undelete,
            ("POST", "destroy"): self.destroy,
            ("POST", "rollback"): self.rollback,
        }

    async def dispatch(
        self, request: Request, principal: Principal, path: str, verb: str | None
    ) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        handler = self.table.get((method, verb))
        if handler is not None:
            return await handler(request, principal, path)
        allowed = sorted({m for m, v in self.table if v == verb})
        if not allowed:
            raise NotFound(f"no method ':{verb}'", path=path)
        if "GET" in allowed:
            allowed.insert(allowed.index("GET") + 1, "HEAD")
        what = "this path" if verb is None else f"':{verb}'"
        body = ErrorBody("method_not_allowed", f"{what} allows {', '.join(allowed)}")
        return _json(body, status=405, headers={"Allow": ", ".join(allowed), **_NO_STORE})

    # -- handlers ------------------------------------------------------------------------

    async def versions(self, request: Request, principal: Principal, path: str) -> Response:
        self._require(request, principal, READ, path, op="versions")
        manager: SecretsManager = request.state.manager
        return _json(await manager.versions(path))

    async def list_keys(self, request: Request, principal: Principal, path: str) -> Response:
        # Not `require`: a prefix is judged by what could lie below it, not by a path grant.
        # The rest of what it does is repeated here: the op for logs and audit, and the audit
        # log's fail-closed check before Vault is asked.
        _note(op="list")
        audit = getattr(request.state, "audit", None)
        if audit is not None:
            audit.check("list")
        policy: Policy = request.state.policy
        globs = policy.grants(principal.roles, principal.scopes, READ)
        # Forbidden unless some readable path could lie below: decided by the policy alone, so
        # the same answer whether the prefix exists or not.
        if not any(glob.could_match_under(path) for glob in globs):
            raise Forbidden(path=path)
        manager: SecretsManager = request.state.manager
        try:
            keys = await manager.list_keys(path)
        except NotFound:
            raise NotFound(_NOTHING_READABLE, path=path) from None
        candidates = visible_keys(policy, principal, path, keys)
        # A folder is shown only if a readable secret exists below it: walking to find one
        # is bounded (service.core.listing), and a folder left undecided is hidden.
        listing = await readable_keys(manager.list_keys, globs, path, candidates)
        _note(list_calls=listing.calls + 1, list_truncated=listing.truncated)
        if listing.truncated:
            request.app.state.metrics.listings_truncated += 1
        if not listing.keys:
            # Nothing readable: the answer a missing prefix gets, byte for byte. A truncated
            # walk that found nothing says so only in the log: saying it here would tell that
            # the prefix exists.
            raise NotFound(_NOTHING_READABLE, path=path)
        return _json(KeyList(prefix=path, keys=listing.keys, truncated=listing.truncated))

    async def delete(self, request: Request, principal: Principal, path: str) -> Response:
        self._require(request, principal, WRITE, path, op="delete")
        wanted = _versions_param(request)
        manager: SecretsManager = request.state.manager
        done = await manager.delete(path, wanted, actor=principal.subject)
        return _acted(path, done)

    async def undelete(self, request: Request, principal: Principal, path: str) -> Response:
        self._require(request, principal, WRITE, path, op="undelete")
        body = await self._body(request, path, versions_request_decoder, _VERSIONS_BODY)
        manager: SecretsManager = request.state.manager
        done = await manager.undelete(path, body.versions, actor=principal.subject)
        return _acted(path, done)

    async def destroy(self, request: Request, principal: Principal, path: str) -> Response:
        self._require(request, principal, DESTROY, path, op="destroy")
        body = await self._body(request, path, versions_request_decoder, _VERSIONS_BODY)
        manager: SecretsManager = request.state.manager
        done = await manager.destroy(path, body.versions, actor=principal.subject)
        return _acted(path, done)

    async def rollback(self, request: Request, principal: Principal, path: str) -> Response:
        # Read as well as write: the answer (422 naming fields and rules, 404) tells what the
        # old version holds. Both are checked before the body is read or Vault is asked.
        self._require(request, principal, READ, path, op="rollback")
        self._require(request, principal, WRITE, path, op="rollback")
        body = await self._body(request, path, rollback_request_decoder, _ROLLBACK_BODY)
        _note(from_version=body.to_version)
        manager: SecretsManager = request.state.manager
        secret = await manager.rollback(
            path, body.to_version, body.version, actor=principal.subject
        )
        _note(version=secret.version)
        return _json(WriteResponse(path=path, version=secret.version))

    async def _body(
        self, request: Request, path: str, decoder: msgspec.json.Decoder[T], expected: str
    ) -> T:
        settings: Settings = request.app.state.settings
        raw = await self._read_body(request, settings.max_body_bytes, expected=expected)
        return decode_body(raw, decoder, expected, path)


def decode_body(raw: bytes, decoder: msgspec.json.Decoder[T], expected: str, path: str) -> T:
    """Decode a request body with `decoder`; anything wrong is a 400 naming the shape expected.

    The one place body errors are mapped: messages name locations and types, never the input.
    """
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


def visible_keys(policy: Policy, principal: Principal, prefix: str, keys: list[str]) -> list[str]:
    """The listed `keys` the policy alone lets the caller see: a key if the caller may read
    it, a folder key (ending in ``/``) if some path the caller may read could lie below it.

    Whether a folder really holds a readable secret is for `service.core.listing.readable_keys`."""
    globs = policy.grants(principal.roles, principal.scopes, READ)
    shown = []
    for key in keys:
        full = f"{prefix}/{key}" if prefix else key
        if key.endswith("/"):
            visible = any(glob.could_match_under(full[:-1]) for glob in globs)
        else:
            visible = any(glob.matches(full) for glob in globs)
        if visible:
            shown.append(key)
    return shown


def _versions_param(request: Request) -> list[int] | None:
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


def _acted(path: str, versions: tuple[int, ...]) -> Response:
    # The audit record holds one version; the log line holds them all.
    _note(versions=list(versions), version=versions[0] if len(versions) == 1 else None)
    return _json(LifecycleResponse(path=path, versions=list(versions)))


def _note(**fields: object) -> None:
    """Add fields to the request context: the request's log line and audit record."""
    ctx = request_context.get()
    if ctx is not None:
        ctx.update(fields)


def _json(
    body: msgspec.Struct, *, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        encoder.encode(body),
        status_code=status,
        headers=headers or _NO_STORE,
        media_type="application/json",
    )

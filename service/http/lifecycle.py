"""A secret's version history and lifecycle, as AIP-136 custom methods and DELETE:
`:versions`, `DELETE` (soft delete), `:undelete`, `:destroy` and `:rollback`."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import (
    LifecycleResponse,
    WriteResponse,
    rollback_request_decoder,
    versions_request_decoder,
)
from service.auth import Principal
from service.auth.policy import DESTROY, READ, WRITE
from service.core import SecretsManager
from service.http.access import require
from service.http.body import read_json, versions_param
from service.http.gate import Bypass, gate
from service.http.responses import json_response
from service.http.trace import trace_of

__all__ = ["delete", "destroy", "rollback", "undelete", "versions"]

_VERSIONS_BODY = '{"versions": [N, ...]}'
_ROLLBACK_BODY = '{"to_version": N, "version": N}'


async def versions(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, READ, path, op="versions")
    manager: SecretsManager = request.state.manager
    return json_response(await manager.versions(path))


async def delete(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, WRITE, path, op="delete")
    bypass = gate(request, principal, path, "delete")
    wanted = versions_param(request)
    manager: SecretsManager = request.state.manager
    done = await manager.delete(path, wanted, actor=principal.subject)
    return _acted(request, principal, path, done, bypass)


async def undelete(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, WRITE, path, op="undelete")
    bypass = gate(request, principal, path, "undelete")
    body = await read_json(request, path, versions_request_decoder, _VERSIONS_BODY)
    manager: SecretsManager = request.state.manager
    done = await manager.undelete(path, body.versions, actor=principal.subject)
    return _acted(request, principal, path, done, bypass)


async def destroy(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, DESTROY, path, op="destroy")
    bypass = gate(request, principal, path, "destroy")
    body = await read_json(request, path, versions_request_decoder, _VERSIONS_BODY)
    manager: SecretsManager = request.state.manager
    done = await manager.destroy(path, body.versions, actor=principal.subject)
    return _acted(request, principal, path, done, bypass)


async def rollback(request: Request, principal: Principal, path: str) -> Response:
    # Read as well as write: the answer (422 naming fields and rules, 404) tells what the
    # old version holds. Both are checked before the body is read or Vault is asked.
    require(request, principal, READ, path, op="rollback")
    require(request, principal, WRITE, path, op="rollback")
    bypass = gate(request, principal, path, "rollback")
    body = await read_json(request, path, rollback_request_decoder, _ROLLBACK_BODY)
    trace = trace_of(request)
    trace.from_version = body.to_version
    manager: SecretsManager = request.state.manager
    secret = await manager.rollback(path, body.to_version, body.version, actor=principal.subject)
    trace.version = secret.version
    if bypass is not None:
        bypass.done(principal.subject, secret.version)
    return json_response(WriteResponse(path=path, version=secret.version))


def _acted(
    request: Request,
    principal: Principal,
    path: str,
    done: tuple[int, ...],
    bypass: Bypass | None,
) -> Response:
    # The audit record holds one version; the log line holds them all.
    trace = trace_of(request)
    trace.versions = list(done)
    trace.version = done[0] if len(done) == 1 else None
    if bypass is not None:
        bypass.done(principal.subject, trace.version)
    return json_response(LifecycleResponse(path=path, versions=list(done)))

"""`GET` and `PATCH /secrets/{path}`: read a secret (a version with `?version=N`) and write the
next version with check-and-set. A read the caches can answer never gets here (fast_path)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import WriteResponse, write_request_decoder
from service.auth import Principal
from service.auth.policy import READ, WRITE
from service.core import SecretsManager
from service.http.access import require
from service.http.body import read_json, version_param
from service.http.gate import gate
from service.http.responses import json_response, secret_response
from service.http.trace import trace_of

__all__ = ["read", "write"]

_WRITE_BODY = '{"data": {...}, "version": N}'


async def read(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, READ, path, op="read")
    version = version_param(request)
    manager: SecretsManager = request.state.manager
    secret, body = await manager.get_document(path, version)
    trace_of(request).version = secret.version
    return secret_response(secret.version, body)


async def write(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, WRITE, path, op="write")
    bypass = gate(request, principal, path, "write")
    body = await read_json(request, path, write_request_decoder, _WRITE_BODY)
    manager: SecretsManager = request.state.manager
    secret = await manager.set(path, body.data, body.version, actor=principal.subject)
    trace_of(request).version = secret.version
    if bypass is not None:
        bypass.done(principal.subject, secret.version)
    return json_response(WriteResponse(path=path, version=secret.version))

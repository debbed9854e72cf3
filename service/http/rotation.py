"""`POST /secrets/{path}:rotate` (rotate now, `secrets:rotate`) and `GET /secrets/{path}:rotation`
(the rotation state, `secrets:read`): both handed to the coordinator (service.rotation)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import RotateResponse, rotate_request_decoder
from service.auth import Principal
from service.auth.policy import READ, ROTATE
from service.http.access import require
from service.http.body import read_optional_json
from service.http.gate import gate
from service.http.responses import json_response
from service.http.trace import trace_of
from service.rotation.coordinator import Coordinator

__all__ = ["rotate", "rotation"]

_ROTATE_BODY = '{"version": N} (or no body)'


async def rotate(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, ROTATE, path, op="rotate")
    bypass = gate(request, principal, path, "rotate")
    body = await read_optional_json(request, path, rotate_request_decoder, _ROTATE_BODY)
    coordinator: Coordinator = request.state.rotation
    trace = trace_of(request)
    done = await coordinator.rotate(
        path,
        actor=principal.subject,
        version=None if body is None else body.version,
        request_id=trace.request_id,
    )
    assert done is not None  # a request always rotates, or raises
    trace.version = done.version
    trace.from_version = done.previous_version
    if bypass is not None:
        bypass.done(principal.subject, done.version)
    return json_response(
        RotateResponse(path=path, version=done.version, previous_version=done.previous_version)
    )


async def rotation(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, READ, path, op="rotation")
    coordinator: Coordinator = request.state.rotation
    return json_response(await coordinator.status(path))

"""Change requests over HTTP: `POST /secrets/{path}:propose`, `GET /changes`, `GET /changes/{id}`
and `POST /changes/{id}:approve | :reject | :cancel | :apply`, handed to service.approvals.

A request is visible to callers who may read, write or approve its path; to anyone else it does
not exist (404, the answer an unknown id gets). Approving and rejecting need `secrets:approve`;
cancelling is the requester's; applying the requester's or an approver's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import ErrorBody
from schemas.approvals import CHANGE_STATES, ChangeList, propose_request_decoder
from schemas.errors import Forbidden, InvalidRequest, NotFound
from schemas.paths import validate_path
from service.approvals.store import ID_FORMAT, ChangeRequest
from service.approvals.workflow import Approvals
from service.auth import Policy, Principal
from service.auth.policy import APPROVE, READ, WRITE
from service.http.access import authenticate, require, start_op
from service.http.body import read_json
from service.http.responses import NO_STORE, json_response
from service.http.trace import trace_of

__all__ = ["change_endpoint", "changes_endpoint", "propose"]

_PROPOSE_BODY = '{"data": {...}, "version": N, "reason": "..."}'
_VERBS = {"approve", "reject", "cancel", "apply"}


async def propose(request: Request, principal: Principal, path: str) -> Response:
    require(request, principal, WRITE, path, op="propose")
    body = await read_json(request, path, propose_request_decoder, _PROPOSE_BODY)
    approvals: Approvals = request.state.approvals
    change = await approvals.propose(
        path, body.data, body.version, body.reason, actor=principal.subject
    )
    trace_of(request).change_id = change.id
    return json_response(change.view(), status=201)


async def changes_endpoint(request: Request) -> Response:
    """GET /changes[?state=&path=]: the requests the caller may see, newest first."""
    if request.method not in ("GET", "HEAD"):
        return _not_allowed("/changes", ["GET", "HEAD"])
    principal = await authenticate(request)
    start_op(request, "changes")
    state = request.query_params.get("state")
    if state is not None and state not in CHANGE_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(CHANGE_STATES)}")
    path = request.query_params.get("path")
    if path is not None:
        validate_path(path)
        trace_of(request).path = path
    approvals: Approvals = request.state.approvals
    found, truncated = await approvals.list(state=state, path=path)
    visible = [c.view() for c in found if _visible(request, principal, c)]
    return json_response(ChangeList(changes=visible, truncated=truncated))


async def change_endpoint(request: Request) -> Response:
    """GET /changes/{id} and POST /changes/{id}:verb."""
    rest: str = request.path_params["rest"]
    change_id, _, verb = rest.partition(":")
    if verb and verb not in _VERBS:
        raise NotFound(f"no method ':{verb}'")
    allowed = ["POST"] if verb else ["GET", "HEAD"]
    if request.method not in allowed:
        return _not_allowed(f"':{verb}'" if verb else "a change request", allowed)
    principal = await authenticate(request)
    op = verb or "changes"
    start_op(request, op)
    if ID_FORMAT.fullmatch(change_id) is None or not request.scope["path"].endswith(rest):
        raise NotFound("no such change request")
    trace = trace_of(request)
    trace.change_id = change_id
    approvals: Approvals = request.state.approvals
    change = await approvals.get(change_id)
    trace.path = change.path
    if not _visible(request, principal, change):
        raise NotFound("no such change request")  # the answer an unknown id gets
    if op == "changes":
        return json_response(change.view())
    actor = principal.subject
    policy: Policy = request.state.policy
    approver = policy.allows(principal.roles, principal.scopes, APPROVE, change.path)
    if verb in ("approve", "reject") and not approver:
        raise Forbidden(f"{verb} needs secrets:approve on the path", path=change.path)
    if verb == "cancel" and actor != change.requester:
        raise Forbidden("only the requester can cancel a request", path=change.path)
    if verb == "apply" and not (approver or actor == change.requester):
        raise Forbidden("only the requester or an approver can apply", path=change.path)
    if verb == "approve":
        change = await approvals.approve(change_id, actor)
    elif verb == "reject":
        change = await approvals.reject(change_id, actor)
    elif verb == "cancel":
        change = await approvals.cancel(change_id, actor)
    else:
        change = await approvals.apply(change_id, actor)
        trace.version = change.applied_version
    return json_response(change.view())


def _not_allowed(what: str, allowed: list[str]) -> Response:
    body = ErrorBody("method_not_allowed", f"{what} allows {', '.join(allowed)}")
    return json_response(body, status=405, headers={"Allow": ", ".join(allowed), **NO_STORE})


def _visible(request: Request, principal: Principal, change: ChangeRequest) -> bool:
    policy: Policy = request.state.policy
    return any(
        policy.allows(principal.roles, principal.scopes, permission, change.path)
        for permission in (READ, WRITE, APPROVE)
    )

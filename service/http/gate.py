"""The approval gate of every direct change (PATCH, DELETE, :undelete, :destroy, :rollback,
:rotate): 428 on a path under `[[approvals.rules]]`, unless the caller holds `secrets:bypass`
there and says why in `X-Bypass-Reason` (break-glass: audited with the reason, announced)."""

from __future__ import annotations

from starlette.requests import Request

from service.approvals.workflow import Approvals, check_reason
from service.auth import Policy, Principal
from service.auth.policy import BYPASS
from service.http.trace import trace_of

__all__ = ["Bypass", "gate"]


class Bypass:
    """A break-glass change under way: `done` announces it once it was made."""

    def __init__(self, request: Request, approvals: Approvals, path: str, op: str) -> None:
        self.request = request
        self.approvals = approvals
        self.path = path
        self.op = op

    def done(self, actor: str, version: int | None) -> None:
        change_id = self.approvals.bypassed(self.path, self.op, actor, version)
        trace_of(self.request).change_id = change_id


def gate(request: Request, principal: Principal, path: str, op: str) -> Bypass | None:
    """After the permission check, before the body is read: None if no rule covers `path`, a
    Bypass for break-glass, else ApprovalRequired (428)."""
    approvals: Approvals = request.state.approvals
    if approvals.rule_for(path) is None:
        return None
    reason = check_reason(request.headers.get("x-bypass-reason"))
    policy: Policy = request.state.policy
    may = policy.allows(principal.roles, principal.scopes, BYPASS, path)
    approvals.gate(path, may_bypass=may, reason=reason)  # raises ApprovalRequired
    trace_of(request).bypass = True
    request.scope["bypass_reason"] = reason
    return Bypass(request, approvals, path, op)

"""Who is calling and whether they may: the bearer token verified into a Principal, the op
chosen (and refused at once when the fail-closed audit log cannot record it), the grant checked.

Every handler that answers for a secret goes through here; each step is noted on its trace.
"""

from __future__ import annotations

from starlette.requests import Request

from schemas.errors import Forbidden, Unauthenticated
from service.audit import AuditLog
from service.auth import OIDCVerifier, Policy, Principal, bearer_token
from service.http.trace import trace_of
from service.obs.metrics import Metrics

__all__ = ["authenticate", "require", "start_op"]


async def authenticate(request: Request) -> Principal:
    """The Principal of the request's bearer token; Unauthenticated (401) otherwise."""
    verifier: OIDCVerifier = request.state.verifier
    trace = trace_of(request)
    try:
        principal = await verifier.verify(bearer_token(request.headers.get("authorization")))
    except Unauthenticated as exc:
        metrics: Metrics = request.app.state.metrics
        metrics.auth_failures.labels(exc.reason).inc()
        trace.unauthenticated(exc.reason)
        raise
    trace.authenticated(principal)
    return principal


def start_op(request: Request, op: str) -> None:
    """Note the op for the log line, metrics and audit record; where the audit log is
    fail-closed for it and no sink works, refuse it (503) before Vault is asked."""
    trace_of(request).op = op
    audit: AuditLog = request.state.audit
    audit.check(op)


def require(request: Request, principal: Principal, permission: str, path: str, op: str) -> None:
    """Start `op`, then check that the policy grants `permission` on `path`: 403 if not."""
    start_op(request, op)
    policy: Policy = request.state.policy
    if not policy.allows(principal.roles, principal.scopes, permission, path):
        raise Forbidden(path=path)

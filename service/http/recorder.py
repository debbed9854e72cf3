"""What a request leaves behind, from its trace and its status: the audit record, the operation
metrics and the one `request` log line; the same for the routed and the cached read.

The fail-closed half is here too: `confirm` writes a held answer's record before it may leave.
"""

from __future__ import annotations

import logging
import time

from msgspec import UNSET
from starlette.types import Scope

from schemas.audit import OPS, AuditRecord, outcome_for
from service.audit import AuditLog
from service.http.trace import RequestTrace, TraceState
from service.obs.logs import log_request
from service.obs.metrics import Metrics
from service.timestamps import utc_now

__all__ = ["Recorder"]

log = logging.getLogger("secrets.http")

_RECEIVED = TraceState.RECEIVED  # looked up once (an Enum attribute is slow on 3.11)
_OP_BY_METHOD = {"GET": "read", "HEAD": "read", "PATCH": "write", "DELETE": "delete"}


class Recorder:
    """The audit record, metrics and log line of each request (one per app)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def finish(
        self,
        trace: RequestTrace,
        scope: Scope,
        status: int,
        started: float,
        audit: AuditLog | None,
    ) -> None:
        """Record a /secrets request answered with `status`, which arrived at `started`
        (time.perf_counter()): its audit record (unless `audit` is None: no audit log, or the
        record was confirmed already), metrics and log line."""
        duration = time.perf_counter() - started
        outcome = outcome_for(status)
        now = utc_now()  # one reading for the audit record and the log line
        if audit is not None and trace.state is not _RECEIVED:
            audit.submit(self.audit_record(audit, trace, scope, status, outcome, now))
        op = trace.op
        if op is not UNSET:
            self.metrics.observe_operation(op, outcome, duration)
        # The answer goes on the line after the context: set only now, so that lines logged
        # within the request showed the context alone.
        trace.method = scope["method"]
        trace.status = status
        trace.outcome = outcome
        trace.duration_ms = round(duration * 1000, 3)
        log_request(log, trace, now)

    def observe(self, trace: RequestTrace, status: int, started: float) -> None:
        """Metrics alone, for a request outside /secrets that chose an op."""
        if trace.op is not UNSET:
            duration = time.perf_counter() - started
            self.metrics.observe_operation(trace.op, outcome_for(status), duration)

    async def confirm(
        self, audit: AuditLog, trace: RequestTrace, scope: Scope, status: int
    ) -> bool:
        """Write the record of a held answer now; False (and the trace refused for want of an
        audit sink) if no sink accepted it: the answer must not leave."""
        record = self.audit_record(audit, trace, scope, status, outcome_for(status))
        if await audit.confirm(record):
            return True
        if trace.reason != "audit_unavailable":
            audit.refused += 1  # else already counted when the route refused it
        log.error("audit log unavailable: answer replaced by 503")
        trace.reason = "audit_unavailable"
        return False

    @staticmethod
    def audit_record(
        audit: AuditLog,
        trace: RequestTrace,
        scope: Scope,
        status: int,
        outcome: str,
        at: str | None = None,
    ) -> AuditRecord:
        """The audit record of `trace` answered with `status` (`outcome`), at `at` (now)."""
        # A field the trace never set is None in the record (tested inline: every request runs it).
        t = trace
        client = scope.get("client")
        reason = None if t.reason is UNSET else t.reason
        return audit.record(
            at=at,
            request_id=t.request_id,
            op=_fallback_op(scope) if t.op is UNSET else t.op,
            method=scope["method"],
            path=None if t.path is UNSET else t.path,
            version=None if t.version is UNSET else t.version,
            allowed=status not in (401, 403) and reason != "audit_unavailable",
            outcome=outcome,
            status=status,
            reason=reason,
            sub=None if t.actor is UNSET else t.actor,
            client_id=None if t.client_id is UNSET else t.client_id,
            source=client[0] if client else None,
            client_request_id=None if t.client_request_id is UNSET else t.client_request_id,
            change_id=None if t.change_id is UNSET else t.change_id,
            bypass_reason=scope.get("bypass_reason"),
        )


def _fallback_op(scope: Scope) -> str:
    """The op of a request refused before its route chose one (a 401): from verb or method."""
    _, colon, verb = scope["path"].rpartition(":")
    if colon and verb.isalpha():
        return verb if verb in OPS else "other"
    return _OP_BY_METHOD.get(scope["method"], "other")

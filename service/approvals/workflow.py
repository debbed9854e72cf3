"""`Approvals`: the life of a change request, from proposal to applied (or rejected, cancelled,
expired, stale), every transition a CAS write of its document, audited by the HTTP layer and
announced on `<prefix>.approvals.<path>`. Also the gate that answers 428 to a direct change of a
covered path, and the break-glass bypass.

Who may do what is the caller's business (service.http.changes checks the permissions); this
module holds the rules every caller meets: never the requester as an approver, an approver
counted once and only for the content it saw, validation at proposal and again at apply, and an
apply that is a CAS write on `base_version`, so that a stale request can never overwrite.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.approvals import (
    APPROVAL_EVENT_TYPES,
    ApprovalEvent,
    ChangeApplied,
    ChangeApproved,
    ChangeBypassed,
    ChangeCancelled,
    ChangeExpired,
    ChangeProposed,
    ChangeRejected,
    ChangeStale,
)
from schemas.errors import (
    ApprovalRequired,
    ChangeConflict,
    InvalidRequest,
    InvalidSecret,
    NoApprovalRule,
    NotFound,
    SelfApproval,
    VersionConflict,
)
from service.approvals.rules import ApprovalRule, ApprovalRules
from service.approvals.store import (
    Approval,
    ChangeRequest,
    ChangeStore,
    Raced,
    content_digest,
)
from service.audit.log import AuditLog
from service.core.manager import SecretsManager

__all__ = ["FINAL_STATES", "MAX_LISTED", "ApprovalSink", "Approvals"]

log = logging.getLogger("secrets.approvals")

FINAL_STATES = frozenset({"applied", "rejected", "cancelled", "expired", "stale"})
MAX_LISTED = 500
"""Requests one `GET /changes` reads at most (newest ids are not ordered: a bound, not a page)."""
_RETRIES = 8  # CAS retries of one transition against other instances' transitions

EventFactory = Callable[..., ApprovalEvent]


class ApprovalSink(Protocol):
    """Where approval events go (the bus). `publish_approval` must never raise."""

    def publish_approval(self, event: ApprovalEvent) -> None: ...


class Approvals:
    def __init__(
        self,
        manager: SecretsManager,
        rules: ApprovalRules,
        *,
        store: ChangeStore | None = None,
        events: ApprovalSink | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.rules = rules
        self.store = store or ChangeStore(manager.backend)
        self.events = events
        self.audit = audit
        self.clock = clock
        # Transitions this instance made, by event type (plain ints, read at scrape time).
        self.transitions: dict[str, int] = dict.fromkeys(APPROVAL_EVENT_TYPES, 0)

    def rule_for(self, path: str) -> ApprovalRule | None:
        return self.rules.rule_for(path)

    # -- the gate ------------------------------------------------------------------------------

    def gate(self, path: str, *, may_bypass: bool, reason: str | None) -> bool:
        """Before a direct change of `path`: False if no rule covers it, True for a bypass (the
        caller may and gave a reason); else ApprovalRequired (428)."""
        if self.rules.rule_for(path) is None:
            return False
        if may_bypass and reason is not None:
            return True
        raise ApprovalRequired(path=path)

    def bypassed(self, path: str, op: str, actor: str, version: int | None) -> str:
        """Announce a break-glass change that was made; its id (for the audit record)."""
        change_id = uuid.uuid4().hex
        self._announce(
            ChangeBypassed,
            id=change_id,
            path=path,
            state="applied",
            actor=actor,
            applied_version=version,
            op=op,
        )
        log.warning("approval bypassed", extra={"path": path, "op": op, "change_id": change_id})
        return change_id

    # -- requests ------------------------------------------------------------------------------

    async def propose(
        self, path: str, data: Mapping[str, Any], version: int, reason: str, actor: str
    ) -> ChangeRequest:
        rule = self.rules.rule_for(path)
        if rule is None:
            raise NoApprovalRule(path=path)
        proposed = dict(data)
        violations = self.manager.validator.violations(path, proposed)
        if violations:
            raise InvalidSecret(violations, path=path)
        current = await self.manager.backend.current_version(path)
        base: Mapping[str, Any] = {}
        if version > 0 and current == version:
            try:
                base = (await self.manager.backend.read(path, version)).data
            except NotFound:
                pass  # the current version is deleted: every proposed field counts as new
        if current != version:
            raise VersionConflict(
                f"the current version is {current}, not {version}",
                path=path,
                current_version=current,
            )
        now = self.clock()
        request = ChangeRequest(
            id=uuid.uuid4().hex,
            path=path,
            base_version=version,
            data=proposed,
            fields=changed_fields(base, proposed),
            reason=reason,
            requester=actor,
            required=rule.required,
            created=now,
            expires_at=now + rule.expires,
            digest=content_digest(path, version, proposed),
        )
        await self.store.create(request)
        self._announce_request(ChangeProposed, request, actor)
        return request

    async def get(self, change_id: str) -> ChangeRequest:
        """The request (turned expired first if its time is up); NotFound if unknown."""
        request, version = await self.store.load(change_id)
        return (await self._expire_if_due(request, version))[0]

    async def list(
        self, *, state: str | None, path: str | None
    ) -> tuple[list[ChangeRequest], bool]:
        """Requests, newest first, at most MAX_LISTED read; True if there were more."""
        ids = await self.store.ids()
        truncated = len(ids) > MAX_LISTED
        found: list[ChangeRequest] = []
        for change_id in ids[:MAX_LISTED]:
            try:
                request = await self.get(change_id)
            except NotFound:
                continue  # removed in between
            if (state is None or request.state == state) and (path is None or request.path == path):
                found.append(request)
        found.sort(key=lambda r: r.created, reverse=True)
        return found, truncated

    async def approve(self, change_id: str, actor: str) -> ChangeRequest:
        def approve(request: ChangeRequest) -> bool:
            if actor == request.requester:
                raise SelfApproval(path=request.path)
            self._require_open(request, "approve")
            if any(a.sub == actor and a.digest == request.digest for a in request.approvals):
                return False  # counted once: nothing to write
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            request.approvals.append(Approval(sub=actor, time=stamp, digest=request.digest))
            if len(request.counted()) >= request.required:
                request.state = "approved"
            return True

        request, changed = await self._transition(change_id, approve)
        if changed:
            self._announce_request(ChangeApproved, request, actor)
        return request

    async def reject(self, change_id: str, actor: str) -> ChangeRequest:
        return await self._close(change_id, actor, "rejected", ChangeRejected)

    async def cancel(self, change_id: str, actor: str) -> ChangeRequest:
        return await self._close(change_id, actor, "cancelled", ChangeCancelled)

    async def apply(self, change_id: str, actor: str) -> ChangeRequest:
        """Write the proposal with CAS on base_version. If the secret moved on: stale, 409."""
        request, version = await self.store.load(change_id)
        request, version = await self._expire_if_due(request, version)
        if request.state == "applied":
            return request  # applied already (by another caller, or a retry of this one)
        if request.state != "approved":
            have = len(request.counted())
            raise ChangeConflict(
                f"the request is {request.state}"
                + (
                    f" ({have} of {request.required} approvals)"
                    if request.state == "pending"
                    else ""
                )
                + ": it cannot be applied",
                path=request.path,
            )
        applied: int | None
        try:
            secret = await self.manager.set(
                request.path, request.data, request.base_version, actor=actor
            )
            applied = secret.version
        except VersionConflict as conflict:
            applied = await self._landed(request)
            if applied is None:
                await self._settle(change_id, "stale", ChangeStale, actor)
                raise VersionConflict(
                    f"the secret moved past version {request.base_version}: the request is "
                    "stale and can never be applied; propose again",
                    path=request.path,
                    current_version=conflict.current_version,
                ) from None

        def applied_now(current: ChangeRequest) -> bool:
            if current.state == "applied":
                return False
            current.state = "applied"
            current.applied_version = applied
            current.decided_by = actor
            return True

        # The write is done: recorded as applied even if the request's time ran out meanwhile.
        request, changed = await self._transition(change_id, applied_now, expire=False)
        if changed:
            self._announce_request(ChangeApplied, request, actor)
        return request

    async def sweep(self) -> int:
        """Turn every pending or approved request past its time expired; how many were."""
        turned = 0
        for change_id in await self.store.ids():
            try:
                request, version = await self.store.load(change_id)
            except NotFound:
                continue
            before = request.state
            request, _ = await self._expire_if_due(request, version)
            turned += request.state == "expired" and before != "expired"
        return turned

    async def run_sweeps(self, interval: float) -> None:
        """`sweep` every `interval` seconds until cancelled; failures are logged, not fatal."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("approval sweep failed", extra={"error_type": type(exc).__name__})
            await asyncio.sleep(interval)

    # -- transitions -----------------------------------------------------------------------------

    async def _transition(
        self, change_id: str, change: Callable[[ChangeRequest], bool], *, expire: bool = True
    ) -> tuple[ChangeRequest, bool]:
        """Apply `change` to the request and CAS-write it; retried against other instances.
        `change` raises to refuse, returns False when there is nothing to write. With `expire`,
        a request past its time is turned expired first (and `change` then refuses it)."""
        for _ in range(_RETRIES):
            request, version = await self.store.load(change_id)
            if expire:
                request, version = await self._expire_if_due(request, version)
            if not change(request):
                return request, False
            try:
                await self.store.save(request, version)
            except Raced:
                continue
            return request, True
        raise ChangeConflict("the request kept changing under this action; try again")

    async def _close(
        self, change_id: str, actor: str, state: str, kind: EventFactory
    ) -> ChangeRequest:
        def close(request: ChangeRequest) -> bool:
            self._require_open(request, "reject" if state == "rejected" else "cancel")
            request.state = state
            request.decided_by = actor
            return True

        request, _ = await self._transition(change_id, close)
        self._announce_request(kind, request, actor)
        return request

    async def _settle(self, change_id: str, state: str, kind: EventFactory, actor: str) -> None:
        def settle(request: ChangeRequest) -> bool:
            if request.state in FINAL_STATES:
                return False
            request.state = state
            return True

        request, changed = await self._transition(change_id, settle)
        if changed:
            self._announce_request(kind, request, actor)

    async def _expire_if_due(
        self, request: ChangeRequest, version: int
    ) -> tuple[ChangeRequest, int]:
        """The request, turned expired (CAS) if pending or approved past its time."""
        if request.state in FINAL_STATES or self.clock() < request.expires_at:
            return request, version
        request.state = "expired"
        try:
            version = await self.store.save(request, version)
        except Raced:
            return await self.store.load(request.id)  # another instance decided first
        self._announce_request(ChangeExpired, request, "expiry")
        if self.audit is not None:  # no request made this transition: its own record
            self.audit.submit(
                self.audit.record(
                    request_id=uuid.uuid4().hex,
                    op="expire",
                    method="SCHEDULE",
                    path=request.path,
                    version=None,
                    allowed=True,
                    outcome="ok",
                    status=200,
                    reason=None,
                    sub=None,
                    client_id=None,
                    source=None,
                    change_id=request.id,
                )
            )
        return request, version

    async def _landed(self, request: ChangeRequest) -> int | None:
        """After a CAS conflict: the version this request's write became, if it did land (a
        retry, or another caller applying it at the same time); None if the secret moved."""
        try:
            after = await self.manager.backend.read(request.path, request.base_version + 1)
        except NotFound:
            return None
        return after.version if dict(after.data) == request.data else None

    @staticmethod
    def _require_open(request: ChangeRequest, action: str) -> None:
        if request.state in FINAL_STATES:
            raise ChangeConflict(
                f"the request is {request.state}: it cannot {action} any more", path=request.path
            )

    # -- events ----------------------------------------------------------------------------------

    def _announce_request(self, kind: EventFactory, request: ChangeRequest, actor: str) -> None:
        self._announce(
            kind,
            id=request.id,
            path=request.path,
            state=request.state,
            actor=actor,
            base_version=request.base_version,
            applied_version=request.applied_version,
            approvals=len(request.counted()),
            required=request.required,
        )

    def _announce(self, kind: EventFactory, **fields: Any) -> None:
        tag = str(kind.__struct_config__.tag)  # type: ignore[attr-defined]
        self.transitions[tag] = self.transitions.get(tag, 0) + 1
        if self.events is None:
            return
        self.events.publish_approval(
            kind(
                event_id=uuid.uuid4().hex,
                instance_id=self.manager.instance_id,
                time=datetime.now(UTC).isoformat(timespec="microseconds"),
                **fields,
            )
        )


def changed_fields(base: Mapping[str, Any], proposed: Mapping[str, Any]) -> list[str]:
    """The field names the proposal adds, changes or removes (names, never values)."""
    names = set(base) | set(proposed)
    return sorted(n for n in names if n not in base or n not in proposed or base[n] != proposed[n])


def check_reason(raw: str | None) -> str | None:
    """An X-Bypass-Reason header: None if absent; 400 if empty, too long or not printable."""
    if raw is None:
        return None
    reason = raw.strip()
    if not reason or len(reason) > 500 or not reason.isprintable():
        raise InvalidRequest("X-Bypass-Reason must be 1 to 500 printable characters")
    return reason

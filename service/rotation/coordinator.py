"""`Coordinator`: one rotation of one path, exactly once however many instances run, resumable
after a crash at any step, and loud when it fails.

A run goes claimed -> generated -> (applied) -> written -> done, each step recorded in the path's
state document (service.rotation.state) with CAS before the next begins:

1. claim: CAS-write the state document with a run and a lease. Of the instances that read the
   same document version, one succeeds; the others see `running` (a request gets 409).
2. generate: the new values, checked against the path's validation rules, recorded.
3. apply (postgres): PostgreSQL gets the new login, and a login with it must work.
4. write: the new version, with CAS on the version the run started from. A human write in
   between wins: the run is undone (postgres: the role gets back what the latest version
   holds) and the rotation re-plans from the new version (the schedule finds it not due).
5. finish: postgres with `master` retires the previous login after `grace`; the state is idle.

A run whose lease ran out (its instance died) is taken over by the next attempt from any
instance, with the values it recorded: a crash after step 3 or 4 is finished, never redone with
new values, so no credential is left that no version in Vault holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from schemas.api import RotationStatus
from schemas.errors import (
    InvalidSecret,
    NoRotationRule,
    NotFound,
    RotationFailed,
    RotationInProgress,
    SecretsError,
    VersionConflict,
)
from schemas.events import SecretRotationFailed
from schemas.secret import Secret
from service.audit.log import AuditLog
from service.core.manager import SecretsManager
from service.rotation.errors import BaseUnreadable, MasterNotFound, error_code
from service.rotation.generators import new_values
from service.rotation.logins import Logins
from service.rotation.postgres import PostgresRotator
from service.rotation.rules import RotationRule, RotationRules
from service.rotation.schedule import next_due
from service.rotation.state import RotationState, Run, StateConflict, StateStore
from service.timestamps import utc_now

__all__ = ["ATTEMPT_OUTCOMES", "ROTATION_OUTCOMES", "Coordinator", "Rotated"]

log = logging.getLogger("secrets.rotation")

ROTATION_OUTCOMES = ("ok", "failed", "stalled", "conflict")
"""`secrets_rotations_total{outcome}`: cycles that rotated, failed, failed into `stalled`, or
lost to a write and planned again."""
ATTEMPT_OUTCOMES = ("ok", "failed")

MAX_REPLANS = 3


@dataclass(frozen=True, slots=True)
class Rotated:
    path: str
    version: int
    previous_version: int


class _Replan(Exception):
    """A human write won: the run was undone and dropped; plan again from the new version."""


class _Lost(Exception):
    """Another instance took the run over (this one was too slow): stop without a trace."""


@dataclass(slots=True)
class _Context:
    path: str
    rule: RotationRule
    state: RotationState
    doc_version: int
    run: Run
    published: bool = False
    master: Mapping[str, Any] | None = None


class Coordinator:
    """Rotates paths under the rules, through the manager (CAS writes, events) and Vault."""

    def __init__(
        self,
        manager: SecretsManager,
        rules: RotationRules,
        *,
        store: StateStore | None = None,
        postgres: Logins | None = None,
        audit: AuditLog | None = None,
        lease: float = 60.0,
        attempts: int = 3,
        backoff: float = 0.5,
        stall_after: int = 3,
        retry_base: float = 30.0,
        retry_max: float = 3600.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.manager = manager
        self.backend = manager.backend
        self.rules = rules
        self.store = store or StateStore(manager.backend)
        self.postgres: Logins = postgres or PostgresRotator()
        self.audit = audit
        self.lease = lease
        self.attempts = attempts
        self.backoff = backoff
        self.stall_after = stall_after
        self.retry_base = retry_base
        self.retry_max = retry_max
        self.clock = clock
        self.sleep = sleep
        self._busy: set[str] = set()  # paths this instance is rotating now
        # Plain numbers, read by the metrics collector at scrape time.
        self.rotations: dict[str, int] = dict.fromkeys(ROTATION_OUTCOMES, 0)
        self.attempt_outcomes: dict[str, int] = dict.fromkeys(ATTEMPT_OUTCOMES, 0)
        self.last_success = 0.0

    def after_step(self, path: str, step: str) -> None:
        """Called after each step (claimed, generated, applied, written, finished): the seam the
        crash tests override to kill an instance between two steps. Does nothing."""

    @property
    def instance_id(self) -> str:
        return self.manager.instance_id

    def rule_for(self, path: str) -> RotationRule:
        rule = self.rules.rule_for(path)
        if rule is None:
            raise NoRotationRule(path=path)
        return rule

    # -- entry points ----------------------------------------------------------------------

    async def status(self, path: str) -> RotationStatus:
        """What `GET :rotation` shows: NoRotationRule, or NotFound for a path never written."""
        rule = self.rule_for(path)
        state, _ = await self.store.load(path)
        meta = await self.manager.versions(path)
        due = next_due(rule, meta, state)
        return RotationStatus(
            path=path,
            state=state.state,
            last_rotated=state.last_rotated,
            next_rotation=None if due is None else due.isoformat(),
            failures=state.failures,
            last_error=state.last_error,
        )

    async def rotate(
        self,
        path: str,
        *,
        actor: str,
        version: int | None = None,
        trigger: str = "request",
        request_id: str | None = None,
    ) -> Rotated | None:
        """Rotate `path` now (trigger `request`), or if due (`schedule`), or finish an abandoned
        run (`resume`). None when the schedule finds it not due, or nothing left to resume.

        NoRotationRule, NotFound, VersionConflict (`version` is stale), RotationInProgress
        (another run holds the path), RotationFailed (every attempt failed; the old credential
        stands).
        """
        rule = self.rule_for(path)
        if path in self._busy:
            raise RotationInProgress(path=path)
        self._busy.add(path)
        try:
            for _ in range(MAX_REPLANS):
                context = await self._claim(path, rule, actor, version, trigger)
                if context is None:
                    return None
                try:
                    return await self._attempts(context, trigger, request_id)
                except _Lost:
                    # Another instance took the run over (this one was slower than its lease):
                    # it finishes the run with the same values.
                    log.warning("rotation run taken over", extra={"path": path})
                    if trigger == "request":
                        raise RotationInProgress(path=path) from None
                    return None
                except _Replan:
                    self.rotations["conflict"] += 1
                    version = None  # the caller's version was the base: it is stale now
                    if trigger == "request":
                        continue
                    return None  # the schedule looks again, from the new version
            await self._fail(path, rule, "conflict", trigger, None)
            raise RotationFailed("conflict", "writes kept racing the rotation", path=path)
        finally:
            self._busy.discard(path)

    async def _claim(
        self, path: str, rule: RotationRule, actor: str, version: int | None, trigger: str
    ) -> _Context | None:
        state, doc_version = await self.store.load(path)
        meta = await self.manager.versions(path)
        now = self.clock()
        if version is not None and version != meta.current_version:
            raise VersionConflict(
                f"version {version} is not the current version {meta.current_version}",
                path=path,
                current_version=meta.current_version,
            )
        run = state.run
        if run is not None and run.lease_until > now and run.owner != self.instance_id:
            if trigger == "request":
                raise RotationInProgress(path=path)
            return None
        if run is None:
            if trigger == "resume":
                return None
            if trigger == "schedule":
                due = next_due(rule, meta, state)
                if due is None or due.timestamp() > now:
                    return None
            run = Run(
                id=uuid.uuid4().hex,
                owner=self.instance_id,
                lease_until=now + self.lease,
                base_version=meta.current_version,
                trigger=trigger,
                actor=actor,
            )
        else:
            # Abandoned (its lease ran out, or it is this instance's own from before a
            # restart): take it over with the values it recorded.
            log.warning(
                "rotation taken over",
                extra={"path": path, "run_id": run.id, "step": run.step, "from": run.owner},
            )
            run.owner = self.instance_id
            run.lease_until = now + self.lease
        state.run = run
        state.state = "running"
        try:
            doc_version = await self.store.save(path, state, doc_version)
        except StateConflict:
            if trigger == "request":
                raise RotationInProgress(path=path) from None
            return None
        self.after_step(path, "claimed")
        return _Context(path=path, rule=rule, state=state, doc_version=doc_version, run=run)

    async def _attempts(self, ctx: _Context, trigger: str, request_id: str | None) -> Rotated:
        code = "internal"
        for attempt in range(1, self.attempts + 1):
            started = self.clock()
            try:
                done = await self._steps(ctx)
            except (_Replan, _Lost):
                raise
            except StateConflict:
                raise _Lost from None
            except Exception as exc:  # every failure is counted, audited and retried
                code = error_code(exc)
                self.attempt_outcomes["failed"] += 1
                self._audit(ctx, trigger, request_id, "failed", 502, code)
                log.warning(
                    "rotation attempt failed",
                    extra={
                        "path": ctx.path,
                        "run_id": ctx.run.id,
                        "attempt": attempt,
                        "step": ctx.run.step,
                        "error": code,
                        "error_type": type(exc).__name__,
                        "seconds": round(self.clock() - started, 3),
                    },
                )
                if attempt < self.attempts:
                    await self.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            self.attempt_outcomes["ok"] += 1
            self.rotations["ok"] += 1
            self.last_success = self.clock()
            self._audit(ctx, trigger, request_id, "ok", 200, None, version=done.version)
            log.info(
                "secret rotated",
                extra={
                    "path": ctx.path,
                    "run_id": ctx.run.id,
                    "version": done.version,
                    "previous_version": done.previous_version,
                    "trigger": trigger,
                },
            )
            return done
        written = ctx.run.written_version if ctx.run.step == "written" else None
        await self._fail(ctx.path, ctx.rule, code, trigger, ctx)
        if written is not None:
            detail = (
                f"version {written} was written, but finishing the rotation failed ({code}); "
                "the next attempt finishes it"
            )
        else:
            detail = f"the rotation failed ({code}); the current version stands"
        raise RotationFailed(code, detail, path=ctx.path)

    # -- the steps ---------------------------------------------------------------------------

    async def _steps(self, ctx: _Context) -> Rotated:
        run, path = ctx.run, ctx.path
        try:
            base = await self.backend.read(path, run.base_version)
        except NotFound:
            raise BaseUnreadable() from None
        if run.step == "claimed":
            run.pending = await self._generate(ctx, base)
            run.step = "generated"
            await self._save(ctx)
            self.after_step(path, "generated")
        pending = run.pending or {}
        if run.step in ("generated", "applied"):
            current = await self.backend.current_version(path)
            if current != run.base_version:
                await self._settle_moved(ctx, base)
        if run.step == "generated" and ctx.rule.generator == "postgres":
            ctx.master = await self._master(ctx.rule)
            await self.postgres.apply(base.data, pending, ctx.master)
            self.after_step(path, "applied")
            run.step = "applied"
            await self._save(ctx)
        if run.step in ("generated", "applied"):
            data = {**base.data, **pending}
            try:
                secret = await self.manager.write_rotation(
                    path, data, run.base_version, actor=run.actor
                )
            except VersionConflict:
                await self._settle_moved(ctx, base)
            else:
                ctx.published = True
                self.after_step(path, "written")
                run.written_version = secret.version
                run.step = "written"
                await self._save(ctx)
        return await self._finish(ctx, base)

    async def _generate(self, ctx: _Context, base: Secret) -> dict[str, Any]:
        rule, path = ctx.rule, ctx.path
        validator = self.manager.validator
        values = new_values(rule, path, base.data, validator)
        if rule.generator != "postgres":
            return values
        pending = self.postgres.plan(
            base.data, values[rule.fields[0]], alternating=rule.master is not None
        )
        violations = validator.violations(path, {**base.data, **pending})
        if violations:
            raise InvalidSecret(violations, path=path)
        return pending

    async def _settle_moved(self, ctx: _Context, base: Secret) -> None:
        """The path moved past the run's base: either this run's own write landed (a crash
        came between the write and its record) and the run goes on to finish, or a human write
        won: undo, drop the run, re-plan (`_Replan`)."""
        run, path = ctx.run, ctx.path
        pending = run.pending or {}
        ours: Secret | None
        try:
            ours = await self.backend.read(path, run.base_version + 1)
        except NotFound:
            ours = None
        if ours is not None and all(ours.data.get(k) == v for k, v in pending.items()):
            run.written_version = ours.version
            run.step = "written"
            await self._save(ctx)
            return
        if ctx.rule.generator == "postgres" and run.step in ("generated", "applied"):
            await self._undo(ctx, base)
        ctx.state.run = None
        ctx.state.state = "idle" if ctx.state.failures == 0 else ctx.state.state
        await self._save(ctx)
        await self._forget(ctx)
        log.info("rotation lost to a write; re-planning", extra={"path": path, "run_id": run.id})
        raise _Replan()

    async def _undo(self, ctx: _Context, base: Secret) -> None:
        """Leave PostgreSQL holding what the latest readable version says, nothing else."""
        try:
            latest: Mapping[str, Any] | None = (await self.backend.read(ctx.path)).data
        except NotFound:
            latest = None
        if ctx.master is None and ctx.rule.master is not None:
            ctx.master = await self._master(ctx.rule)
        await self.postgres.undo(latest, base.data, ctx.run.pending or {}, ctx.master)

    async def _finish(self, ctx: _Context, base: Secret) -> Rotated:
        run, path = ctx.run, ctx.path
        assert run.written_version is not None
        if ctx.rule.generator == "postgres" and ctx.rule.master is not None:
            if ctx.master is None:
                ctx.master = await self._master(ctx.rule)
            await self.postgres.finish(base.data, run.pending or {}, ctx.master, ctx.rule.grace)
        self.after_step(path, "finished")
        if not ctx.published:
            # Found written by a run taken over: its event may never have gone out.
            self.manager.rotation_found(
                path, run.written_version, run.base_version, actor=run.actor
            )
        ctx.state = RotationState(
            last_rotated=utc_now(), last_version=run.written_version, state="idle"
        )
        ctx.doc_version = await self.store.save(path, ctx.state, ctx.doc_version)
        await self._forget(ctx)
        return Rotated(path=path, version=run.written_version, previous_version=run.base_version)

    async def _forget(self, ctx: _Context) -> None:
        """Destroy the state document's older versions: some held the run's generated values."""
        try:
            await self.store.forget_history(ctx.path, keep=ctx.doc_version)
        except SecretsError as exc:  # they stay in Vault only, until the next run ends
            log.warning(
                "rotation history not destroyed", extra={"path": ctx.path, "error": exc.code}
            )

    async def _master(self, rule: RotationRule) -> Mapping[str, Any] | None:
        if rule.master is None:
            return None
        try:
            return (await self.backend.read(rule.master)).data
        except NotFound:
            raise MasterNotFound() from None

    async def _save(self, ctx: _Context) -> None:
        """Record the run's progress (CAS) and renew its lease; `StateConflict` if taken over."""
        if ctx.state.run is not None:
            ctx.run.lease_until = self.clock() + self.lease
        ctx.doc_version = await self.store.save(ctx.path, ctx.state, ctx.doc_version)

    # -- failure ---------------------------------------------------------------------------

    async def _fail(
        self, path: str, rule: RotationRule, code: str, trigger: str, ctx: _Context | None
    ) -> None:
        """A cycle failed: undo what an outside system holds if possible, count the failure,
        back off, stall after `stall_after` cycles, announce it."""
        if ctx is not None:
            state, doc_version = ctx.state, ctx.doc_version
        else:
            state, doc_version = await self.store.load(path)
        run = state.run
        if run is not None and ctx is not None:
            keep = run.step == "written"  # the version exists: the next attempt finishes it
            if run.step in ("generated", "applied") and rule.generator == "postgres":
                try:
                    base = await self.backend.read(path, run.base_version)
                    await self._undo(ctx, base)
                except Exception as exc:  # the next attempt resumes the run, values and all
                    keep = True
                    log.warning(
                        "rotation undo failed; the run stays for the next attempt",
                        extra={"path": path, "run_id": run.id, "error": error_code(exc)},
                    )
            if keep:
                run.lease_until = 0.0  # any instance may resume it at once
            else:
                state.run = None
        state.failures += 1
        state.last_error = code
        state.state = "stalled" if state.failures >= self.stall_after else "failed"
        backoff = min(self.retry_max, self.retry_base * 2 ** (state.failures - 1))
        state.retry_after = self.clock() + backoff
        try:
            saved = await self.store.save(path, state, doc_version)
        except (StateConflict, SecretsError) as exc:
            log.warning(
                "rotation failure not recorded",
                extra={"path": path, "error_type": type(exc).__name__},
            )
        else:
            if ctx is not None and state.run is None:
                ctx.doc_version = saved
                await self._forget(ctx)
        self.rotations[state.state] += 1
        log.error(
            "rotation failed",
            extra={"path": path, "error": code, "failures": state.failures, "state": state.state},
        )
        current = run.base_version if run is not None else 0
        events = self.manager.events
        if events is not None:
            events.publish(
                SecretRotationFailed(
                    event_id=uuid.uuid4().hex,
                    path=path,
                    version=current,
                    actor=run.actor if run is not None else "rotation",
                    instance_id=self.instance_id,
                    time=datetime.now(UTC).isoformat(timespec="microseconds"),
                    error=code,
                    failures=state.failures,
                    state=state.state,
                )
            )

    def _audit(
        self,
        ctx: _Context,
        trigger: str,
        request_id: str | None,
        outcome: str,
        status: int,
        reason: str | None,
        *,
        version: int | None = None,
    ) -> None:
        """One audit record per attempt, whatever started it (a request also has its own)."""
        if self.audit is None:
            return
        self.audit.submit(
            self.audit.record(
                request_id=uuid.uuid4().hex,
                op="rotate",
                method="POST" if trigger == "request" else "SCHEDULE",
                path=ctx.path,
                version=version,
                allowed=True,
                outcome=outcome,
                status=status,
                reason=reason,
                sub=ctx.run.actor,
                client_id=None,
                source=None,
                client_request_id=request_id,
            )
        )

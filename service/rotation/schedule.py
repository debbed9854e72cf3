"""When a path is due, and `Scheduler`: the loop each instance runs to rotate due paths and to
resume runs whose instance died. Instances need not agree on anything: the coordinator's CAS
claim lets one of them through per due rotation.

A rule's clock starts at the path's current version, whoever wrote it: a path written by hand
an hour ago with `every = "24h"` is due in 23 hours. After a failed cycle, the next one waits
`retry_after` (a backoff); a `stalled` path is not tried again on schedule.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from schemas.api import SecretMetadata
from schemas.errors import NotFound, SecretsError
from schemas.paths import is_reserved
from service.rotation.rules import RotationRule
from service.rotation.state import STATE_FOLDER, RotationState

if TYPE_CHECKING:
    from service.rotation.coordinator import Coordinator

__all__ = ["MAX_SCAN_CALLS", "Scheduler", "next_due"]

log = logging.getLogger("secrets.rotation")

MAX_SCAN_CALLS = 2000
"""Vault LIST calls one scan may spend finding the paths under the rules."""


def next_due(rule: RotationRule, meta: SecretMetadata, state: RotationState) -> datetime | None:
    """When `rule` next rotates the path: None if only on request, or stalled."""
    if not rule.scheduled or state.state == "stalled":
        return None
    current = meta.version(meta.current_version)
    if current is None or not current.readable:
        return None  # a deleted or destroyed credential is in use nowhere: nothing to rotate
    baseline = datetime.fromisoformat(current.created_time)
    due = rule.next_after(baseline)
    if due is not None and state.state == "failed" and state.retry_after is not None:
        retry = datetime.fromtimestamp(state.retry_after, due.tzinfo)
        due = max(due, retry)
    return due


class Scheduler:
    """Finds the paths the rules schedule (a Vault walk every `scan_interval` seconds), sleeps
    until the earliest is due, and asks the coordinator to rotate it if it still is."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        scan_interval: float = 30.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.coordinator = coordinator
        self.scan_interval = scan_interval
        self.jitter = jitter
        self.clock = clock
        self._due: dict[str, float] = {}  # path -> epoch seconds it is due (or resumable)
        self._resume: set[str] = set()
        self._next_scan = 0.0
        # Gauges, read by the metrics collector at scrape time.
        self.overdue = 0
        self.stalled = 0
        self.scans = 0

    async def run(self) -> None:
        """Until cancelled. A failing scan or rotation is logged and tried again later."""
        while True:
            now = self.clock()
            if now >= self._next_scan:
                try:
                    await self.scan()
                except Exception as exc:  # the loop must outlive any one failure
                    log.warning("rotation scan failed", extra={"error_type": type(exc).__name__})
                self._next_scan = self.clock() + self.scan_interval
            for path in [p for p, at in self._due.items() if at <= self.clock()]:
                await self._attempt(path)
            wake = min([self._next_scan, *self._due.values()])
            delay = max(0.05, wake - self.clock()) + random.uniform(0, self.jitter)  # noqa: S311
            await asyncio.sleep(delay)

    async def scan(self) -> None:
        """Find every path a scheduled rule covers, and every run left by a dead instance."""
        paths = await self._scheduled_paths() | await self._runs()
        due: dict[str, float] = {}
        overdue = stalled = 0
        now = self.clock()
        for path in sorted(paths):
            at, state = await self._due_time(path)
            stalled += state is not None and state.state == "stalled"
            if at is None:
                continue
            due[path] = at
            overdue += at < now - self.scan_interval
        self._due = due
        self.overdue, self.stalled = overdue, stalled
        self.scans += 1

    async def _due_time(self, path: str) -> tuple[float | None, RotationState | None]:
        """When to try `path` next (None: not on schedule), and its state."""
        coordinator = self.coordinator
        rule = coordinator.rules.rule_for(path)
        if rule is None:
            return None, None
        state, _ = await coordinator.store.load(path)
        run = state.run
        if run is not None:
            self._resume.add(path)
            return max(run.lease_until, state.retry_after or 0.0), state
        self._resume.discard(path)
        try:
            meta = await coordinator.manager.versions(path)
        except NotFound:
            return None, state
        at = next_due(rule, meta, state)
        return (None if at is None else at.timestamp()), state

    async def _attempt(self, path: str) -> None:
        trigger = "resume" if path in self._resume else "schedule"
        try:
            await self.coordinator.rotate(path, actor="rotation", trigger=trigger)
        except SecretsError as exc:
            # Counted, audited and announced by the coordinator; busy paths are someone else's.
            log.debug("scheduled rotation not done", extra={"path": path, "error": exc.code})
        except Exception as exc:  # a defect: logged, tried again a scan later, never in a spin
            log.error(
                "scheduled rotation crashed",
                extra={"path": path, "error_type": type(exc).__name__},
            )
            self._due[path] = self.clock() + self.scan_interval
            return
        try:
            at, _ = await self._due_time(path)
        except Exception:
            at = self.clock() + self.scan_interval
        if at is None:
            self._due.pop(path, None)
        else:
            self._due[path] = at

    async def _scheduled_paths(self) -> set[str]:
        """The secrets under the scheduled rules, by a breadth-first walk of Vault LIST calls
        that only enters folders a rule's glob could match under."""
        rules = [rule for rule in self.coordinator.rules.rules if rule.scheduled]
        globs = [glob for rule in rules for glob in rule.paths]
        found: set[str] = set()
        if not globs:
            return found
        queue: deque[str] = deque([""])
        calls = 0
        while queue and calls < MAX_SCAN_CALLS:
            prefix = queue.popleft()
            calls += 1
            try:
                keys = await self.coordinator.manager.list_keys(prefix)
            except NotFound:
                continue
            for key in keys:
                full = f"{prefix}/{key}" if prefix else key
                if is_reserved(full.rstrip("/")):
                    continue
                if key.endswith("/"):
                    if any(glob.could_match_under(full[:-1]) for glob in globs):
                        queue.append(full[:-1])
                elif any(glob.matches(full) for glob in globs):
                    found.add(full)
        if queue:
            log.warning("rotation scan stopped at its budget", extra={"calls": calls})
        return found

    async def _runs(self) -> set[str]:
        """Paths whose state document holds a run: resumed once their lease runs out."""
        found: set[str] = set()
        queue: deque[str] = deque([STATE_FOLDER])
        calls = 0
        coordinator = self.coordinator
        while queue and calls < MAX_SCAN_CALLS:
            prefix = queue.popleft()
            calls += 1
            try:
                keys = await coordinator.manager.list_keys(prefix)
            except NotFound:
                continue
            for key in keys:
                full = f"{prefix}/{key}"
                if key.endswith("/"):
                    queue.append(full[:-1])
                    continue
                path = full.removeprefix(STATE_FOLDER + "/")
                state, _ = await coordinator.store.load(path)
                if state.run is not None:
                    found.add(path)
        return found

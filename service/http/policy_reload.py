"""Policy reload: `PolicyReloader` re-reads SECRETS_POLICY_FILE (on SIGHUP, or when called) and
swaps every part built from it at once; a file that does not load leaves all of them in force.

What reloads: the roles (`Policy.replace_with`, seen by every holder of the Policy object),
the `[validation]` rules (the manager's validator), `[[rotation.rules]]` (the coordinator's) and
`[[approvals.rules]]` (the workflow's). What does not: `auth.roles_claim`, which the OIDC verifier
read at start-up and baked into the principals it caches; a file changing it is refused like a
broken one, since it takes a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

from schemas.errors import ConfigError
from service.approvals.rules import ApprovalRules
from service.approvals.workflow import Approvals
from service.auth.policy import POLICY_SETTING, Policy
from service.core import SecretsManager
from service.core.validation import Validator
from service.obs.metrics import Metrics
from service.rotation.coordinator import Coordinator
from service.rotation.rules import RotationRules

__all__ = ["PolicyReloader", "PolicySections", "reload_on_sighup"]

log = logging.getLogger("secrets.policy")


@dataclass(frozen=True)
class PolicySections:
    """Everything built from one policy file, each section checked."""

    policy: Policy
    validator: Validator
    rotation: RotationRules
    approvals: ApprovalRules

    @classmethod
    def of(cls, policy: Policy) -> PolicySections:
        """Check the sections other features own; a wrong one raises `ConfigError` naming it."""
        validator = Validator.from_policy(policy.raw)
        rotation = RotationRules.from_policy(policy.raw, validator)
        return cls(policy, validator, rotation, ApprovalRules.from_policy(policy.raw))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PolicySections:
        return cls.of(Policy.load(path))


class PolicyReloader:
    """Re-reads the policy file into the objects that hold what it says.

    `reload()` is the function to call (tests do); `request()` is what SIGHUP does: a reload
    soon, and one more after it if signals arrive while it runs (the file may have changed
    after it was read). `then` runs after each swap, for what a new rule needs started.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        in_force: PolicySections,
        *,
        manager: SecretsManager,
        rotation: Coordinator,
        approvals: Approvals,
        metrics: Metrics,
        then: Callable[[PolicySections], Awaitable[None]] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.policy = in_force.policy  # the object every holder keeps: it never changes
        self.manager = manager
        self.rotation = rotation
        self.approvals = approvals
        self.metrics = metrics
        self.then = then
        self.reloads = 0
        self.failures = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._again = False
        metrics.policy_loaded(ok=True)

    async def reload(self) -> bool:
        """Read and check the file, then swap it in; False (and one error line, and the
        failure counted) when it does not load: the policy in force stays."""
        async with self._lock:
            try:
                # In a thread: 10,000 globs take a while to compile, and requests go on meanwhile.
                new = await asyncio.to_thread(PolicySections.load, self.path)
                self._check_restart_free(new.policy)
            except Exception as exc:
                self._failed(exc)
                return False
            self._swap(new)
            self.reloads += 1
            self.metrics.policy_loaded(ok=True)
            log.info(
                "policy reloaded",
                extra={"policy_file": self.path, "roles": len(new.policy.role_names)},
            )
            if self.then is not None:
                await self.then(new)
            return True

    def request(self) -> None:
        """A reload soon (the SIGHUP handler: it cannot await)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._reload_while_asked())
        else:
            self._again = True

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _reload_while_asked(self) -> None:
        while True:
            self._again = False
            await self.reload()
            if not self._again:
                return

    def _check_restart_free(self, new: Policy) -> None:
        if new.roles_claim != self.policy.roles_claim:
            raise ConfigError(
                POLICY_SETTING,
                f"auth.roles_claim: changed from {self.policy.roles_claim!r} to "
                f"{new.roles_claim!r}, which takes a restart",
            )

    def _swap(self, new: PolicySections) -> None:
        # No await in here: no request runs between the first assignment and the last.
        new.validator.failures = self.manager.validator.failures  # counters carry on
        self.policy.replace_with(new.policy)
        self.manager.validator = new.validator
        self.rotation.rules = new.rotation
        self.approvals.rules = new.approvals

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if isinstance(exc, ConfigError):
            problem = exc.problem  # names the key or glob at fault, never a secret (none is here)
        else:  # a defect: its type only, as the log formatter would
            problem = f"unexpected {type(exc).__name__}"
        log.error(
            "policy reload failed, the policy in force is kept",
            extra={"policy_file": self.path, "problem": problem},
        )
        self.metrics.policy_loaded(ok=False)  # after the line: whoever sees it finds the line


class _Sighup:
    """The reloaders of this process's apps (tests run several in one process): one SIGHUP
    handler serves them all, installed with the first and removed with the last."""

    def __init__(self) -> None:
        self.reloaders: list[PolicyReloader] = []
        self.before: Callable[[int, FrameType | None], Any] | int | None = None

    def add(self, reloader: PolicyReloader) -> None:
        if not self.reloaders:
            self.before = signal.getsignal(signal.SIGHUP)
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_all)
        self.reloaders.append(reloader)

    def remove(self, reloader: PolicyReloader) -> None:
        self.reloaders.remove(reloader)
        if not self.reloaders:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            # Back to what was there (the loop leaves SIG_DFL, which ends the process): one
            # that ignored SIGHUP until its app was up ignores it while it stops.
            if self.before is not None:
                signal.signal(signal.SIGHUP, self.before)

    def reload_all(self) -> None:
        for reloader in list(self.reloaders):
            reloader.request()


_SIGHUP = _Sighup()


@contextlib.contextmanager
def reload_on_sighup(reloader: PolicyReloader) -> Iterator[None]:
    """While the block runs, SIGHUP makes `reloader` reload (from the main thread only, where
    signals are delivered; elsewhere it does nothing). uvicorn handles SIGINT and SIGTERM only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGHUP.add(reloader)
    try:
        yield
    finally:
        _SIGHUP.remove(reloader)

"""`Listeners`: the in-process callbacks told of each change, and the calls to them: each in
the background, sync ones in worker threads, failures logged and counted, never raised.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable

import anyio
from anyio import to_thread

from schemas.errors import NotFound, SecretsError
from schemas.secret import Secret, SecretData
from service.core.ledger import KNOWN_MAX
from service.lru import LRU
from service.tasks import BackgroundTasks

__all__ = ["Listener", "Listeners"]

log = logging.getLogger("secrets.manager")

Listener = Callable[[str, SecretData | None], Awaitable[None] | None]


class Listeners:
    """Callbacks by name, and which version of each path they last heard of.

    Listeners hear each version at most once and never an older after a newer: events from
    several instances may arrive out of order (`hear` decides). `read(path)` is the manager's
    read through the cache, for the value of a change.
    """

    def __init__(
        self,
        tasks: BackgroundTasks,
        read: Callable[[str], Awaitable[Secret]],
        *,
        concurrency: int,
    ) -> None:
        self._tasks = tasks
        self._read = read
        self._callbacks: dict[str, Listener] = {}
        self._limiter = anyio.CapacityLimiter(concurrency)
        # path -> the version listeners last heard: each is told of a version once, in order.
        self._heard: LRU[str, int] = LRU(KNOWN_MAX)
        self.errors = 0  # a plain int, read by the metrics collector at scrape time

    def __len__(self) -> int:
        """How many are registered: with none, changes need not be read for them."""
        return len(self._callbacks)

    def add(self, name: str, callback: Listener) -> None:
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._callbacks[name] = callback

    def remove(self, name: str) -> None:
        self._callbacks.pop(name, None)

    def heard(self, path: str) -> int:
        """The version of `path` listeners last heard of; 0 if none."""
        return self._heard.get(path, 0)

    def hear(self, path: str, version: int, *, again: bool = False) -> bool:
        """Record that listeners are told of `version`; False if they heard it or a newer one."""
        if self._heard.get(path, 0) >= version and not again:
            return False
        self._heard.put(path, version)
        return True

    def forget(self, path: str) -> None:
        """The current version of `path` is gone: whatever comes next is news."""
        self._heard.pop(path, None)

    def notify(self, path: str, value: SecretData | None) -> None:
        """Call every listener with (`path`, `value`), each in the background."""
        for name, callback in list(self._callbacks.items()):
            self._tasks.spawn(self._call(name, callback, path, value))

    def notify_current(self, path: str, *, again: bool = False) -> None:
        """Read `path` in the background, then tell listeners its value unless they heard that
        version already (`again`: an undelete, which brings back a version they heard before
        its deletion)."""
        self._tasks.spawn(self._read_and_notify(path, again=again))

    async def _read_and_notify(self, path: str, *, again: bool) -> None:
        value: SecretData | None
        try:
            secret = await self._read(path)
            if not self.hear(path, secret.version, again=again):
                return
            value = secret.data
        except NotFound:
            value = None  # deleted meanwhile: listeners still hear of the change
        except SecretsError:
            log.warning("could not read a changed secret for listeners", extra={"path": path})
            value = None
        self.notify(path, value)

    async def _call(
        self, name: str, callback: Listener, path: str, value: SecretData | None
    ) -> None:
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(path, value)
            else:
                # A sync callback may block: it runs in a worker thread, never on the loop.
                result = await to_thread.run_sync(callback, path, value, limiter=self._limiter)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:  # noqa: BLE001 - a listener's failure is logged and counted
            self.errors += 1
            log.error(
                "listener failed",
                extra={"listener": name, "path": path, "error_type": type(exc).__name__},
            )

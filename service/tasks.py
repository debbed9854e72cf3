"""Tasks started and not awaited, kept until done: `BackgroundTasks` (spawn or keep, close) and
`SingleFlight` (one shared task per key, which callers join instead of starting another).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

__all__ = ["BackgroundTasks", "SingleFlight"]

K = TypeVar("K")
T = TypeVar("T")


class BackgroundTasks:
    """Tasks nobody awaits, each kept referenced until it is done.

    The event loop keeps only weak references to tasks: one that nothing holds may be
    collected mid-run. Done tasks are let go at once; `aclose` waits for the rest.
    """

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coroutine` as a task on the running loop, kept until done."""
        return self.keep(asyncio.get_running_loop().create_task(coroutine))

    def keep(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Keep a task started elsewhere until it is done (and `aclose` waits for it)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the running tasks, then cancel what is left.

        The cancelled ones are not awaited: one may be waiting on a worker thread that
        cancellation cannot stop, and closing must not hang on it.
        """
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()


class SingleFlight(Generic[K, T]):
    """At most one task per key: callers of `run` while one is in flight share its result.

    Each caller waits through `asyncio.shield`: one that gives up (timeout, disconnect) cancels
    only its own wait, never the task the others share. `forget` makes the next caller start
    a new task (the one in flight may return something already outdated) and leaves the old
    one to finish for those who joined it.
    """

    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Task[T]] = {}

    async def run(self, key: K, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """The result of the task in flight for `key`, or of a new one made by `start()`."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(start())
            self._flights[key] = flight
            flight.add_done_callback(lambda task: self._land(key, task))
        return await asyncio.shield(flight)

    def forget(self, key: K) -> None:
        """Let the next caller for `key` start afresh instead of joining the task in flight."""
        self._flights.pop(key, None)

    def _land(self, key: K, task: asyncio.Task[T]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

"""In-memory fakes for unit tests: KV v2 behind the VaultBackend seam, an event sink, a clock.

No server, no thread, no network: each fake records what it was asked so tests can count calls.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from schemas.events import ChangeEvent
from service.errors import NotFound, VaultUnavailable, VersionConflict
from service.secret import Secret, SecretData

__all__ = ["FakeClock", "FakeVault", "RecordingSink", "eventually"]


class FakeVault:
    """KV v2 in memory, following the `service.vault.VaultBackend` protocol.

    Versions start at 1. `write(path, data, cas)` succeeds only if `cas` is the current version
    (0: the path must not exist yet), else VersionConflict(current_version=...). Data is stored
    as JSON, as Vault stores it, so a value JSON cannot hold fails here as it would over HTTP.

    A read takes its snapshot when called, then waits `delay` seconds: Vault has answered and the
    response is on its way, which is the window where a change event can overtake it.
    `calls["read"]` etc. count every call, including failed ones.
    """

    def __init__(self, *, delay: float = 0.0, write_delay: float = 0.0) -> None:
        self.delay = delay
        self.write_delay = write_delay
        self.calls: Counter[str] = Counter()
        self.closed = False
        self._versions: dict[str, list[Secret]] = {}
        self._failures = 0

    # -- test hooks --------------------------------------------------------------------------

    def fail_next(self, times: int = 1) -> None:
        """Make the next `times` calls (any method) raise VaultUnavailable."""
        self._failures += times

    def seed(self, path: str, data: Mapping[str, Any]) -> Secret:
        """Write the next version of `path` directly, as another instance would: not counted."""
        return self._store(path, data)

    def current(self, path: str) -> int:
        return len(self._versions.get(path, ()))

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    # -- VaultBackend ------------------------------------------------------------------------

    async def read(self, path: str, version: int | None = None) -> Secret:
        self.calls["read"] += 1
        failing = self._take_failure()
        versions = list(self._versions.get(path, ()))
        if self.delay:
            await asyncio.sleep(self.delay)
        if failing:  # after the delay, as a timeout would: concurrent readers share it
            raise VaultUnavailable("the secrets backend is unavailable", path=path)
        if not versions:
            raise NotFound("no secret at this path", path=path)
        if version is None:
            return versions[-1]
        if not 1 <= version <= len(versions):
            raise NotFound("no such version", path=path)
        return versions[version - 1]

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        self._enter("write")
        current = self.current(path)
        if cas != current:
            raise VersionConflict(
                f"the current version is {current}, not {cas}",
                path=path,
                current_version=current,
            )
        secret = self._store(path, data)
        if self.write_delay:
            await asyncio.sleep(self.write_delay)
        return secret

    async def current_version(self, path: str) -> int:
        self._enter("current_version")
        return self.current(path)

    async def ping(self) -> None:
        self._enter("ping")

    async def aclose(self) -> None:
        self.calls["aclose"] += 1
        self.closed = True

    # -- internals ---------------------------------------------------------------------------

    def _enter(self, method: str) -> None:
        self.calls[method] += 1
        if self._take_failure():
            raise VaultUnavailable("the secrets backend is unavailable")

    def _take_failure(self) -> bool:
        if self._failures:
            self._failures -= 1
            return True
        return False

    def _store(self, path: str, data: Mapping[str, Any]) -> Secret:
        stored = json.loads(json.dumps(dict(data)))  # TypeError for what JSON cannot hold
        versions = self._versions.setdefault(path, [])
        secret = Secret(
            path=path,
            version=len(versions) + 1,
            data=SecretData(stored),
            created_time=datetime.now(UTC).isoformat(timespec="microseconds"),
        )
        versions.append(secret)
        return secret


class RecordingSink:
    """An EventSink that keeps every event published, in order."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []

    def publish(self, event: ChangeEvent) -> None:
        self.events.append(event)


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(
    condition: Callable[[], bool], timeout: float = 2.0, interval: float = 0.005
) -> None:
    """Poll `condition` until it holds; fail the test if it does not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout}s")
        await asyncio.sleep(interval)

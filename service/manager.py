"""SecretsManager: reads through the cache, CAS writes to Vault, change events and listeners.

It knows nothing of HTTP or NATS: the HTTP routes call it, an `EventSink` publishes what it
writes, and the bus subscriber calls `apply_change` for changes made elsewhere.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import msgspec
from anyio import to_thread

from schemas.api import SecretBody
from schemas.events import ChangeEvent, SecretCreated, SecretUpdated
from service.cache import SecretCache
from service.errors import InvalidRequest, InvalidSecret, NotFound, SecretsError
from service.paths import validate_path
from service.secret import Secret, SecretData
from service.validation import validate_data
from service.vault import VaultBackend

__all__ = ["EventSink", "Listener", "SecretsManager"]

log = logging.getLogger("secrets.manager")

Listener = Callable[[str, SecretData | None], Awaitable[None] | None]
_encode = msgspec.json.Encoder().encode
_KNOWN_MAX = 100_000  # paths whose newest version is remembered (about 100 bytes each)
_REREADS = 3  # reads of a path that Vault answers with a version older than one announced


class EventSink(Protocol):
    """Where the manager hands the events of its own writes. `publish` must never raise."""

    def publish(self, event: ChangeEvent) -> None: ...


class SecretsManager:
    def __init__(
        self,
        backend: VaultBackend,
        *,
        cache_ttl: float = 300.0,
        cache_max_entries: int = 10000,
        fallback_ttl: float = 5.0,
        instance_id: str | None = None,
        events: EventSink | None = None,
        listener_concurrency: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.cache = SecretCache(max_entries=cache_max_entries, ttl=cache_ttl, clock=clock)
        self.fallback_ttl = fallback_ttl
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self.events = events
        # While the bus is down, invalidations may be missed: serve cached entries only
        # within fallback_ttl of their fetch. Start pessimistic until the bus says it is up.
        self.bus_connected = events is None
        self._flights: dict[str, asyncio.Task[Secret]] = {}
        self._listeners: dict[str, Listener] = {}
        self._listener_limiter = anyio.CapacityLimiter(listener_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        # path -> the newest version this instance knows exists (its own writes and events).
        # Nothing older is ever cached or returned from a fresh read.
        self._known: OrderedDict[str, int] = OrderedDict()
        self.listener_errors = 0

    # -- reads ---------------------------------------------------------------------------

    async def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (or version `version`). Raises NotFound."""
        return (await self.get_document(path, version))[0]

    async def get_document(self, path: str, version: int | None = None) -> tuple[Secret, bytes]:
        """The secret and its JSON document (path, version, data, created_time), encoded once."""
        validate_path(path)
        if version is not None and (isinstance(version, bool) or version < 1):
            raise InvalidRequest("version must be a positive integer", path=path)
        max_age = self.cache.ttl if self.bus_connected else self.fallback_ttl
        entry = self.cache.get(path, version, max_age)
        if entry is not None:
            return entry.secret, entry.body
        if version is not None:
            secret = await self.backend.read(path, version)
            body = _document(secret)
            if secret.version == version:
                self.cache.put(secret, body, pinned=True)
            return secret, body
        secret = await self._load(path)
        entry = self.cache.get(path, None, max_age)
        if entry is not None and entry.secret.version == secret.version:
            return entry.secret, entry.body
        return secret, _document(secret)

    async def _load(self, path: str) -> Secret:
        # The read runs as its own task: a caller that gives up (timeout, disconnect) cancels
        # only its own wait, never the read the other callers share.
        flight = self._flights.get(path)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(self._fetch(path))
            self._flights[path] = flight
            flight.add_done_callback(lambda task: self._land(path, task))
        return await asyncio.shield(flight)

    def _land(self, path: str, task: asyncio.Task[Secret]) -> None:
        if self._flights.get(path) is task:
            del self._flights[path]
        if not task.cancelled():
            task.exception()  # retrieved here, so an unawaited failure is not reported twice

    async def _fetch(self, path: str) -> Secret:
        secret = await self.backend.read(path)
        for _ in range(_REREADS):
            if secret.version >= self._known.get(path, 0):
                break
            # A newer version was announced while we read: read again.
            secret = await self.backend.read(path)
        self._cache_latest(secret)
        return secret

    def _cache_latest(self, secret: Secret) -> None:
        # A write or read that finishes after a newer version's event must not cache the older.
        if secret.version >= self._known.get(secret.path, 0):
            self.cache.put(secret, _document(secret))

    # -- writes --------------------------------------------------------------------------

    async def set(
        self, path: str, data: Mapping[str, Any], version: int, *, actor: str = "in-process"
    ) -> Secret:
        """Write `data` as the next version if the current version is `version` (CAS).

        `version=0` creates: it fails with VersionConflict if the path already exists.
        """
        validate_path(path)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequest("version must be an integer >= 0", path=path)
        violations = validate_data(data)
        if violations:
            raise InvalidSecret(violations, path=path)
        secret = await self.backend.write(path, data, version)
        newest = self._advance(path, secret.version)
        self._cache_latest(secret)
        self._announce(path, secret.version, actor)
        if newest:
            # If a newer version's event came first, listeners heard of that one instead.
            self._notify(path, secret.data)
        return secret

    def _announce(self, path: str, version: int, actor: str) -> None:
        if self.events is None:
            return
        kind = SecretCreated if version == 1 else SecretUpdated
        self.events.publish(
            kind(
                event_id=uuid.uuid4().hex,
                path=path,
                version=version,
                actor=actor,
                instance_id=self.instance_id,
                time=datetime.now(UTC).isoformat(timespec="microseconds"),
            )
        )

    # -- changes made elsewhere ------------------------------------------------------------

    def apply_change(self, path: str, version: int) -> None:
        """Another instance (or Vault directly) made `version` of `path`: evict, then notify.

        Eviction happens before this returns; listeners are called in the background with the
        value read once and shared by all of them.
        """
        newest = self._advance(path, version)
        self.cache.invalidate(path, version)
        if self._listeners and newest:
            task = asyncio.get_running_loop().create_task(self._read_and_notify(path))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read_and_notify(self, path: str) -> None:
        value: SecretData | None
        try:
            value = (await self.get(path)).data
        except NotFound:
            value = None  # deleted meanwhile: listeners still hear of the change
        except SecretsError:
            log.warning("could not read a changed secret for listeners", extra={"path": path})
            value = None
        self._notify(path, value)

    def _advance(self, path: str, version: int) -> bool:
        """Record that `version` of `path` exists; True if it is newer than any known before.

        Replayed and duplicated events are not newer, so listeners hear of each change once.
        """
        if version <= self._known.get(path, 0):
            return False
        self._known[path] = version
        self._known.move_to_end(path)
        if len(self._known) > _KNOWN_MAX:
            self._known.popitem(last=False)
        # New readers must not join a read that may predate this version.
        self._flights.pop(path, None)
        return True

    async def check_versions(self, *, concurrency: int = 8) -> list[tuple[str, int]]:
        """Find writes made straight to Vault: compare every cached path with its metadata.

        A newer version is handled like an event (evict, notify listeners) and announced on
        the bus for the other instances. Returns the (path, version) pairs found.
        """
        gate = asyncio.Semaphore(concurrency)
        found: list[tuple[str, int]] = []

        async def check(path: str, cached: int) -> None:
            async with gate:
                try:
                    current = await self.backend.current_version(path)
                except SecretsError:
                    return  # Vault trouble: the next round tries again, the TTL still bounds
            if current > cached:
                found.append((path, current))
                self.apply_change(path, current)
                self._announce(path, current, "vault-direct")

        await asyncio.gather(*(check(p, v) for p, v in self.cache.latest_paths()))
        if found:
            log.info("writes made outside the service found", extra={"count": len(found)})
        return found

    async def watch_versions(self, interval: float) -> None:
        """Run check_versions every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_versions()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one round
                log.exception("version check failed")

    def bus_down(self) -> None:
        self.bus_connected = False

    def bus_up(self, *, replayed: bool = False) -> None:
        """The bus is back. Unless the missed events were replayed, drop the whole cache."""
        if not replayed:
            self.cache.clear()
        self.bus_connected = True

    # -- listeners -------------------------------------------------------------------------

    def add_listener(self, name: str, callback: Listener) -> None:
        """Call `callback(path, value)` after each change, on any instance. Sync or async."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._listeners[name] = callback

    def remove_listener(self, name: str) -> None:
        self._listeners.pop(name, None)

    def _notify(self, path: str, value: SecretData | None) -> None:
        for name, callback in list(self._listeners.items()):
            task = asyncio.get_running_loop().create_task(
                self._call_listener(name, callback, path, value)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call_listener(
        self, name: str, callback: Listener, path: str, value: SecretData | None
    ) -> None:
        try:
            if inspect.iscoroutinefunction(callback):
                await callback(path, value)
            else:
                # A sync callback may block: it runs in a worker thread, never on the loop.
                result = await to_thread.run_sync(
                    callback, path, value, limiter=self._listener_limiter
                )
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:  # noqa: BLE001 - a listener's failure is logged and counted
            self.listener_errors += 1
            log.error(
                "listener failed",
                extra={"listener": name, "path": path, "error_type": type(exc).__name__},
            )

    async def aclose(self) -> None:
        """Wait briefly for running listener calls, then cancel what is left."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()


def _document(secret: Secret) -> bytes:
    return _encode(
        SecretBody(
            path=secret.path,
            version=secret.version,
            data=secret.data.reveal(),
            created_time=secret.created_time,
        )
    )

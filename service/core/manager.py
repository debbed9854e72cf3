"""`SecretsManager`, the heart of the service and its one public face: reads, writes, changes
made elsewhere and listeners, each handed to the module of this package that does that job.

It knows nothing of HTTP or NATS: the HTTP routes call it, an `EventSink` publishes what it
writes, and the bus subscriber calls `apply_change` (`apply_lifecycle` for deletions,
undeletions and destructions) for changes made elsewhere. Where each goes:

    get, get_document, cached_document   -> reads.py (cache | one Vault read per path)
    versions, list_keys                  -> reads.py (straight from Vault, never cached)
    set, rollback, delete, undelete, ... -> writes.py (Vault, then events on the bus)
    apply_change, apply_lifecycle        -> coherence.py (evict, check claims against Vault)
    add_listener, remove_listener        -> listeners.py
    check_versions, watch_versions       -> watcher.py (changes made straight to Vault)
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from schemas.api import SecretMetadata
from schemas.events import LifecycleEvent
from schemas.secret import Secret
from service.core.cache import SecretCache
from service.core.coherence import VERIFY_CONCURRENCY, VERIFY_QUEUE, Coherence
from service.core.ledger import VersionLedger
from service.core.listeners import Listener, Listeners
from service.core.reads import Reads
from service.core.validation import Validator
from service.core.watcher import VersionWatcher
from service.core.writes import EventSink, Writes
from service.lru import LRU
from service.tasks import BackgroundTasks, SingleFlight
from service.vault.protocol import VaultBackend

__all__ = ["EventSink", "Listener", "SecretsManager"]


class SecretsManager:
    """Secrets read through a cache, written to Vault with CAS, coherent across instances.

    The composition root of this package: it builds the parts (reads, writes, coherence,
    listeners, watcher), which share the cache, the version ledger and the background tasks,
    and hands each call to the part that does that job.
    """

    VERIFY_CONCURRENCY = VERIFY_CONCURRENCY
    VERIFY_QUEUE = VERIFY_QUEUE

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
        validator: Validator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.cache = SecretCache(max_entries=cache_max_entries, ttl=cache_ttl, clock=clock)
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._tasks = BackgroundTasks()
        flights = SingleFlight[str, Secret]()
        self._ledger = VersionLedger(on_newer=flights.forget)
        self._reads = Reads(
            backend,
            self.cache,
            self._ledger,
            flights,
            fallback_ttl=fallback_ttl,
            # Until the bus says it is up, invalidations may be missed: start pessimistic.
            bus_connected=events is None,
            # Built below; a read calls it only when Vault answers older than an event claimed.
            confirm=lambda path: self._coherence.confirm_stale(path),
        )
        self._listeners = Listeners(self._tasks, self._reads.get, concurrency=listener_concurrency)
        self._coherence = Coherence(
            backend, self.cache, self._ledger, self._reads, self._listeners, self._tasks
        )
        self._writes = Writes(
            backend,
            # The built-in rules unless the policy's [validation] section says more.
            validator=validator or Validator(),
            ledger=self._ledger,
            reads=self._reads,
            listeners=self._listeners,
            coherence=self._coherence,
            events=events,
            instance_id=self.instance_id,
        )
        self._watcher = VersionWatcher(
            backend, self.cache, self._ledger, self._coherence, self._writes
        )

    # -- reads: reads.py -------------------------------------------------------------------

    async def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (or version `version`). Raises NotFound."""
        return (await self._reads.get_document(path, version))[0]

    async def get_document(self, path: str, version: int | None = None) -> tuple[Secret, bytes]:
        """The secret and its JSON document (path, version, data, created_time), encoded once."""
        return await self._reads.get_document(path, version)

    def cached_document(self, path: str) -> tuple[Secret, bytes] | None:
        """The latest version of `path` and its document if the cache holds it fresh, else None.

        Synchronous, for the HTTP fast path: nothing is read, and a miss is not counted (the
        caller then calls `get_document`, which counts it). `path` must be valid already.
        """
        return self._reads.cached_document(path)

    async def versions(self, path: str) -> SecretMetadata:
        """The version history of `path`: current version, times, and each version's state.

        Deleted and destroyed versions are listed too (a path whose every version is deleted
        still has a history). Raises NotFound for a path never written. Never cached.
        """
        return await self._reads.versions(path)

    async def list_keys(self, prefix: str = "") -> list[str]:
        """The keys right under `prefix` (``""``: the top); folders end in ``/``.

        Unfiltered: code acting for a caller filters them by the caller's grants, and shows a
        folder only if a readable secret exists below it (`service.core.listing`). Raises NotFound
        when nothing is under `prefix`.
        """
        return await self._reads.list_keys(prefix)

    # -- writes: writes.py -----------------------------------------------------------------

    async def set(
        self, path: str, data: Mapping[str, Any], version: int, *, actor: str = "in-process"
    ) -> Secret:
        """Write `data` as the next version if the current version is `version` (CAS).

        `version=0` creates: it fails with VersionConflict if the path already exists.
        """
        return await self._writes.set(path, data, version, actor)

    async def write_rotation(
        self, path: str, data: Mapping[str, Any], version: int, *, actor: str
    ) -> Secret:
        """`set`, announced as `secret.rotated` (with `previous_version=version`): for the
        rotation coordinator (service.rotation), which makes `data` and checks it first."""
        return await self._writes.set(path, data, version, actor, rotation=True)

    def rotation_found(self, path: str, version: int, previous: int, *, actor: str) -> None:
        """A rotation's write that another (crashed) instance made is found in Vault: apply it
        here as a change, and announce it as `secret.rotated`, which it may never have been."""
        self._coherence.apply_change(path, version)
        self._writes.announce_rotation(path, version, previous, actor)

    async def rollback(
        self, path: str, to_version: int, version: int, *, actor: str = "in-process"
    ) -> Secret:
        """Write version `to_version`'s data as the next version if the current is `version`.

        NotFound if `to_version` does not exist or is deleted or destroyed; VersionConflict and
        InvalidSecret as for `set`. Announced as an ordinary write (`secret.updated`).
        """
        return await self._writes.rollback(path, to_version, version, actor)

    async def delete(
        self, path: str, versions: Iterable[int] | None = None, *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Soft-delete `versions` of `path` (its current version when None); return them.

        A deleted version reads as NotFound on every instance until undeleted. Deleting a
        deleted or destroyed version changes nothing. NotFound for an unknown path or version.
        """
        return await self._writes.delete(path, versions, actor)

    async def undelete(
        self, path: str, versions: Iterable[int], *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Restore soft-deleted `versions`; return them. NotFound for a destroyed one."""
        return await self._writes.undelete(path, versions, actor)

    async def destroy(
        self, path: str, versions: Iterable[int], *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Remove the data of `versions` for good; return them."""
        return await self._writes.destroy(path, versions, actor)

    # -- changes made elsewhere (the bus): coherence.py ------------------------------------

    def apply_change(self, path: str, version: int) -> None:
        """Another instance (or Vault directly) says it made `version` of `path`: evict now,
        then tell listeners once Vault confirms it (see `Coherence.apply_change`)."""
        self._coherence.apply_change(path, version)

    def apply_lifecycle(self, event: LifecycleEvent) -> None:
        """Another instance (or Vault directly) says it deleted, undeleted or destroyed
        versions: evict now, apply once Vault confirms it (see `Coherence.apply_lifecycle`)."""
        self._coherence.apply_lifecycle(event)

    def bus_down(self) -> None:
        self._reads.bus_connected = False

    def bus_up(self, *, replayed: bool = False) -> None:
        """The bus is back. Unless the missed events were replayed, drop the whole cache."""
        if not replayed:
            self.cache.clear()
        self._reads.bus_connected = True

    # -- changes made straight to Vault: watcher.py ----------------------------------------

    async def check_versions(self, *, concurrency: int = 8) -> list[tuple[str, int]]:
        """Find changes made straight to Vault: compare every cached path with its metadata.

        A newer version is handled like an event (evict, notify listeners) and announced on
        the bus for the other instances; so is a cached version (latest or pinned) found
        deleted or destroyed. Returns the (path, newer version) pairs found.
        """
        return await self._watcher.check(concurrency=concurrency)

    async def watch_versions(self, interval: float) -> None:
        """Run check_versions every `interval` seconds until cancelled."""
        await self._watcher.run(interval)

    @property
    def watcher(self) -> VersionWatcher:
        """The out-of-band check, for the cluster's poller (service.core.poller) to drive."""
        return self._watcher

    # -- listeners: listeners.py -----------------------------------------------------------

    def add_listener(self, name: str, callback: Listener) -> None:
        """Call `callback(path, value)` after each change, on any instance. Sync or async."""
        self._listeners.add(name, callback)

    def remove_listener(self, name: str) -> None:
        self._listeners.remove(name)

    async def aclose(self) -> None:
        """Wait briefly for running listener calls and checks, then cancel what is left."""
        await self._tasks.aclose(timeout=2.0)

    # -- state, read by the metrics collector at scrape time and by tests ------------------

    @property
    def events(self) -> EventSink | None:
        return self._writes.events

    @property
    def validator(self) -> Validator:
        return self._writes.validator

    @validator.setter
    def validator(self, validator: Validator) -> None:
        self._writes.validator = validator

    @property
    def fallback_ttl(self) -> float:
        return self._reads.fallback_ttl

    @property
    def bus_connected(self) -> bool:
        """False while the bus is down: cached entries are then served within fallback_ttl."""
        return self._reads.bus_connected

    @property
    def cas_conflicts(self) -> int:
        return self._writes.cas_conflicts

    @property
    def listener_errors(self) -> int:
        return self._listeners.errors

    @property
    def events_dropped(self) -> dict[str, int]:
        """reason -> event claims Vault did not confirm, or that were not checked."""
        return self._coherence.dropped

    @property
    def unconfirmed_claims(self) -> int:
        """Paths whose newest known version an event claimed and no read or check confirmed."""
        return len(self._ledger.unconfirmed)

    @property
    def pending_checks(self) -> int:
        """Paths whose event claims wait for (or are in) a check against Vault."""
        return self._coherence.pending_checks

    @property
    def UNCONFIRMED_MAX(self) -> int:  # noqa: N802 - a bound tests lower on one instance
        """Paths whose newest known version only an event vouches for; beyond, the oldest such
        path is forgotten."""
        return self._ledger.unconfirmed.maxsize

    @UNCONFIRMED_MAX.setter
    def UNCONFIRMED_MAX(self, bound: int) -> None:  # noqa: N802
        self._ledger.unconfirmed.maxsize = bound

    @property
    def _known(self) -> LRU[str, int]:
        """path -> the newest version known here (for tests of the bookkeeping)."""
        return self._ledger.known

    @property
    def _unconfirmed(self) -> LRU[str, int]:
        """path -> the version Vault last confirmed, while an event claims a newer one."""
        return self._ledger.unconfirmed

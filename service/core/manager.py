"""SecretsManager: reads through the cache, CAS writes to Vault, change events and listeners.

It knows nothing of HTTP or NATS: the HTTP routes call it, an `EventSink` publishes what it
writes, and the bus subscriber calls `apply_change` (`apply_lifecycle` for deletions, undeletions
and destructions) for changes made elsewhere.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
import msgspec
from anyio import to_thread

from schemas.api import MAX_VERSIONS_PER_REQUEST, SecretBody, SecretMetadata
from schemas.errors import InvalidRequest, InvalidSecret, NotFound, SecretsError, VersionConflict
from schemas.events import (
    ChangeEvent,
    LifecycleEvent,
    SecretCreated,
    SecretDeleted,
    SecretDestroyed,
    SecretUndeleted,
    SecretUpdated,
)
from schemas.paths import validate_path, validate_prefix
from schemas.secret import Secret, SecretData
from service.core.cache import SecretCache
from service.core.validation import Validator
from service.vault.protocol import VaultBackend

__all__ = ["EventSink", "Listener", "SecretsManager"]

log = logging.getLogger("secrets.manager")

Listener = Callable[[str, SecretData | None], Awaitable[None] | None]
_encode = msgspec.json.Encoder().encode
_KNOWN_MAX = 100_000  # paths whose newest version is remembered (about 100 bytes each)
_REREADS = 3  # reads of a path that Vault answers with a version older than one announced
_SEEN_MAX = 10_000  # lifecycle event ids remembered, so a replayed one is applied once
_CHECK_VERSIONS = 1000  # versions lifecycle claims on one path may name while it waits


class EventSink(Protocol):
    """Where the manager hands the events of its own writes. `publish` must never raise."""

    def publish(self, event: ChangeEvent) -> None: ...


class _Claims:
    """What events claim about one path, waiting for a check against Vault (see _verify)."""

    __slots__ = ("events", "version")

    def __init__(self) -> None:
        self.version = 0  # the highest version change events claim (0: none)
        # kind -> the lifecycle claims of that kind, merged: Vault's state at the check decides.
        self.events: dict[type[LifecycleEvent], LifecycleEvent] = {}

    def add(self, event: LifecycleEvent) -> bool:
        """Merge `event` into the claims waiting; False if that would name too many versions."""
        kind = type(event)
        waiting = self.events.get(kind)
        if waiting is not None:
            versions: tuple[int, ...] = ()  # none named: every version of the path
            if waiting.versions and event.versions:
                versions = tuple(sorted({*waiting.versions, *event.versions}))
            if len(versions) > _CHECK_VERSIONS:
                return False
            version = max(waiting.version, event.version)
            event = msgspec.structs.replace(waiting, version=version, versions=versions)
        self.events[kind] = event
        return True


class SecretsManager:
    VERIFY_CONCURRENCY = 8  # Vault checks of what events claim, in flight at once
    VERIFY_QUEUE = 1024  # paths with claims waiting for a check; beyond, events only evict
    # Paths whose newest known version only an event vouches for; beyond, the oldest such path
    # is forgotten (about 150 bytes each, plus the path).
    UNCONFIRMED_MAX = 10_000

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
        # path -> the newest version Vault confirmed, for each path whose `_known` version only
        # an event vouches for so far (see apply_change); restored if Vault does not hold it.
        self._unconfirmed: OrderedDict[str, int] = OrderedDict()
        # path -> versions known deleted or destroyed: never cached, whatever read lands late.
        self._gone: OrderedDict[str, set[int]] = OrderedDict()
        self._seen_lifecycle: OrderedDict[str, None] = OrderedDict()
        # path -> what events claim about it, while a check against Vault is on its way.
        self._claims: dict[str, _Claims] = {}
        self._verify_gate = asyncio.Semaphore(self.VERIFY_CONCURRENCY)
        self.events_dropped: dict[str, int] = {}  # reason -> events Vault did not confirm
        # path -> the version listeners last heard: each is told of a version once, in order.
        self._heard: OrderedDict[str, int] = OrderedDict()
        self.listener_errors = 0
        # The built-in rules unless the policy's [validation] section says more.
        self.validator = validator or Validator()
        self.cas_conflicts = 0  # plain ints, read by the metrics collector at scrape time

    # -- reads ---------------------------------------------------------------------------

    async def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (or version `version`). Raises NotFound."""
        return (await self.get_document(path, version))[0]

    async def get_document(self, path: str, version: int | None = None) -> tuple[Secret, bytes]:
        """The secret and its JSON document (path, version, data, created_time), encoded once."""
        validate_path(path)
        if version is not None and (isinstance(version, bool) or version < 1):
            raise InvalidRequest("version must be a positive integer", path=path)
        max_age = self._max_age
        entry = self.cache.get(path, version, max_age)
        if entry is not None:
            return entry.secret, entry.body
        if version is not None:
            secret = await self.backend.read(path, version)
            compact, body = _compact(secret)
            if secret.version == version and version not in self._gone.get(path, ()):
                self.cache.put(compact, body, pinned=True)
            return secret, body
        secret = await self._load(path)
        entry = self.cache.get(path, None, max_age, count=False)
        if entry is not None and entry.secret.version == secret.version:
            return secret, entry.body
        return secret, _document(secret)

    def cached_document(self, path: str) -> tuple[Secret, bytes] | None:
        """The latest version of `path` and its document if the cache holds it fresh, else None.

        Synchronous, for the HTTP fast path: nothing is read, and a miss is not counted (the
        caller then calls `get_document`, which counts it). `path` must be valid already.
        """
        entry = self.cache.get(path, None, self._max_age, count=False)
        if entry is None:
            return None
        self.cache.hits += 1
        return entry.secret, entry.body

    @property
    def _max_age(self) -> float:
        # While the bus is down, invalidations may be missed: only young entries are served,
        # pinned versions included (one destroyed meanwhile must not outlive the bound).
        return self.cache.ttl if self.bus_connected else self.fallback_ttl

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
        if (
            secret.version < self._known.get(path, 0)
            and path in self._unconfirmed
            and path not in self._claims
        ):
            # Only an event vouches for the newer version, and no check is on its way: ask
            # Vault now, the one time the claim matters (see apply_change).
            await self._confirm(path)
        for _ in range(_REREADS):
            if secret.version >= self._known.get(path, 0):
                break
            # A newer version was announced while we read: read again.
            secret = await self.backend.read(path)
        self._cache_latest(secret)
        return secret

    def _cache_latest(self, secret: Secret) -> None:
        # A write or read that finishes after a newer version's event must not cache the older,
        # nor one that finishes after its version was deleted.
        path, version = secret.path, secret.version
        if version < self._known.get(path, 0):
            return
        self._unconfirmed.pop(path, None)  # Vault shows that version or a newer: confirmed
        if version not in self._gone.get(path, ()):
            self.cache.put(*_compact(secret))

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
        violations = self.validator.validate(path, data)
        if violations:
            raise InvalidSecret(violations, path=path)
        try:
            secret = await self.backend.write(path, data, version)
        except VersionConflict:
            self.cas_conflicts += 1
            raise
        newest = self._advance(path, secret.version)
        self._cache_latest(secret)
        self._announce(path, secret.version, actor)
        if newest and self._hear(path, secret.version):
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

    # -- version history and lifecycle -----------------------------------------------------

    async def versions(self, path: str) -> SecretMetadata:
        """The version history of `path`: current version, times, and each version's state.

        Deleted and destroyed versions are listed too (a path whose every version is deleted
        still has a history). Raises NotFound for a path never written. Never cached.
        """
        validate_path(path)
        return await self.backend.read_metadata(path)

    async def list_keys(self, prefix: str = "") -> list[str]:
        """The keys right under `prefix` (``""``: the top); folders end in ``/``.

        Unfiltered: code acting for a caller filters them by the caller's grants, and shows a
        folder only if a readable secret exists below it (`service.core.listing`). Raises NotFound
        when nothing is under `prefix`.
        """
        validate_prefix(prefix)
        return await self.backend.list_keys(prefix)

    async def delete(
        self, path: str, versions: Iterable[int] | None = None, *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Soft-delete `versions` of `path` (its current version when None); return them.

        A deleted version reads as NotFound on every instance until undeleted. Deleting a
        deleted or destroyed version changes nothing. NotFound for an unknown path or version.
        """
        validate_path(path)
        wanted = None if versions is None else _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        # The current version is resolved here rather than by Vault's "delete latest", so the
        # event names the exact version even if a write lands meanwhile.
        targets = (meta.current_version,) if wanted is None else _existing(meta, wanted)
        await self.backend.delete_versions(path, targets)
        self._lifecycle(SecretDeleted, path, meta.current_version, targets, actor)
        return targets

    async def undelete(
        self, path: str, versions: Iterable[int], *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Restore soft-deleted `versions`; return them. NotFound for a destroyed one."""
        validate_path(path)
        wanted = _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        targets = _existing(meta, wanted, restorable=True)
        await self.backend.undelete_versions(path, targets)
        self._lifecycle(SecretUndeleted, path, meta.current_version, targets, actor)
        return targets

    async def destroy(
        self, path: str, versions: Iterable[int], *, actor: str = "in-process"
    ) -> tuple[int, ...]:
        """Remove the data of `versions` for good; return them."""
        validate_path(path)
        wanted = _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        targets = _existing(meta, wanted)
        await self.backend.destroy_versions(path, targets)
        self._lifecycle(SecretDestroyed, path, meta.current_version, targets, actor)
        return targets

    async def rollback(
        self, path: str, to_version: int, version: int, *, actor: str = "in-process"
    ) -> Secret:
        """Write version `to_version`'s data as the next version if the current is `version`.

        NotFound if `to_version` does not exist or is deleted or destroyed; VersionConflict and
        InvalidSecret as for `set`. Announced as an ordinary write (`secret.updated`).
        """
        validate_path(path)
        if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
            raise InvalidRequest("to_version must be a positive integer", path=path)
        # Straight from Vault: a pinned copy may outlive a deletion made outside the service.
        old = await self.backend.read(path, to_version)
        return await self.set(path, old.data, version, actor=actor)

    def _lifecycle(
        self,
        kind: type[SecretDeleted | SecretUndeleted | SecretDestroyed],
        path: str,
        current: int,
        versions: tuple[int, ...],
        actor: str,
    ) -> None:
        event = kind(
            event_id=uuid.uuid4().hex,
            path=path,
            version=current,
            versions=versions,
            actor=actor,
            instance_id=self.instance_id,
            time=datetime.now(UTC).isoformat(timespec="microseconds"),
        )
        self._apply_lifecycle(event)
        if self.events is not None:
            self.events.publish(event)

    # -- changes made elsewhere ------------------------------------------------------------

    def apply_change(self, path: str, version: int) -> None:
        """Another instance (or Vault directly) says it made `version` of `path`: evict now,
        then tell listeners once Vault confirms it.

        The claim comes off the bus, where whoever may publish can forge one, so what it says
        counts only as far as Vault confirms it. Evicting is safe whatever the claim (it costs
        one re-read) and happens before this returns; then:

        - a version the cache holds already (it came from Vault) is applied at once;
        - the next version after the newest known here (and the next after that, and so on),
          or any version of a path this instance knows nothing of, is the common case. It is
          recorded at once, unconfirmed, so that a read or write in flight cannot cache an
          older version, and Vault is not asked: the next read or write that shows it (or a
          newer one) confirms it at no cost. Only a read that Vault answers with an older
          version asks Vault's metadata, once (a real write that the read raced, or a forgery,
          which is then taken back: the read is cached and the claim counted `beyond_vault`).
          With listeners registered it is checked at once instead: they need the new value
          anyway, and the read that fetches it confirms the version;
        - a jump past that (a missed event causes one, and so does a forger) is recorded, and
          told to listeners, only once a check against Vault shows it.

        So a change event costs no Vault call by itself unless it jumps or listeners are
        registered. The unconfirmed versions of at most `UNCONFIRMED_MAX` paths are kept (the
        oldest beyond that is forgotten, as if its event had only evicted); the checks are
        bounded (`VERIFY_QUEUE` paths waiting, `VERIFY_CONCURRENCY` at once, one per path,
        claims merged), and a claim beyond them is not checked. Listeners hear each version at
        most once and never an older after a newer: events from several instances may arrive
        out of order, and a version already superseded when its event (or read) lands is not
        told again.
        """
        held = self._held_version(path)
        self.cache.invalidate(path, version)
        known = self._known.get(path, 0)
        if version <= known:
            # A duplicate, a replay or a late event: nothing newer. But if only an event
            # vouches for the version known, and listeners came since, check it for them.
            if self._listeners and path in self._unconfirmed:
                self._check(path, version)
            return
        if version <= held:
            self._apply_confirmed(path, version)  # Vault gave us this version already
            return
        base = max(known, held)
        if base and version > base + 1:
            self._check(path, version)  # a jump: recorded only once Vault shows it
            return
        self._believe(path, version)
        if self._listeners:
            self._check(path, version)

    def _apply_confirmed(self, path: str, version: int) -> None:
        newest = self._advance(path, version)
        self.cache.invalidate(path, version)
        if self._listeners and newest:
            self._spawn(self._read_and_notify(path))

    async def _read_and_notify(self, path: str, *, again: bool = False) -> None:
        """Tell listeners the value a read now returns: unless they heard that version already
        (`again`: an undelete, which brings back a version they heard before its deletion)."""
        value: SecretData | None
        try:
            secret = await self.get(path)
            if not self._hear(path, secret.version, again=again):
                return
            value = secret.data
        except NotFound:
            value = None  # deleted meanwhile: listeners still hear of the change
        except SecretsError:
            log.warning("could not read a changed secret for listeners", extra={"path": path})
            value = None
        self._notify(path, value)

    def apply_lifecycle(self, event: LifecycleEvent) -> None:
        """Another instance (or Vault directly) says it deleted, undeleted or destroyed versions.

        The entries concerned (with no versions named, every entry of the path) are evicted
        before this returns; whatever the event claims is recorded (a version never to be
        cached again) and told to listeners only once Vault's metadata shows it, in the
        background, bounded as for `apply_change`.
        """
        if event.event_id in self._seen_lifecycle:
            return  # replayed after a reconnect: already applied
        self._seen_lifecycle[event.event_id] = None
        if len(self._seen_lifecycle) > _SEEN_MAX:
            self._seen_lifecycle.popitem(last=False)
        path, versions = event.path, frozenset(event.versions)
        # New readers must not join a read that may predate the change.
        self._flights.pop(path, None)
        self.cache.drop_latest(path)
        if not isinstance(event, SecretUndeleted):
            self.cache.drop_versions(path, versions or None)
        claims = self._claims_for(path)
        if claims is not None and not claims.add(event):
            self._drop("verify_overflow")

    def _apply_lifecycle(self, event: LifecycleEvent) -> None:
        """Apply a lifecycle change known to be true: made here, or confirmed by Vault."""
        path, versions = event.path, set(event.versions)
        self._advance(path, event.version)
        # New readers must not join a read that may predate the change.
        self._flights.pop(path, None)
        self.cache.drop_latest(path)
        gone = self._gone.pop(path, set())
        if isinstance(event, SecretUndeleted):
            changed = True
            gone = gone - versions if versions else set()
        else:
            self.cache.drop_versions(path, frozenset(versions) if versions else None)
            # Found again (a second watcher, a replay): listeners already heard of it.
            changed = not versions or not versions <= gone
            gone |= versions
        if gone:
            self._gone[path] = gone
            if len(self._gone) > _KNOWN_MAX:
                self._gone.popitem(last=False)
        if not changed or not self._listeners:
            return
        if not isinstance(event, SecretUndeleted) and event.version in versions:
            self._heard.pop(path, None)
            self._notify(path, None)  # the current version is gone: nothing to read
            return
        again = isinstance(event, SecretUndeleted)
        task = asyncio.get_running_loop().create_task(self._read_and_notify(path, again=again))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _hear(self, path: str, version: int, *, again: bool = False) -> bool:
        """Record that listeners are told of `version`; False if they heard it or a newer one."""
        if self._heard.get(path, 0) >= version and not again:
            return False
        self._heard[path] = version
        self._heard.move_to_end(path)
        if len(self._heard) > _KNOWN_MAX:
            self._heard.popitem(last=False)
        return True

    def _advance(self, path: str, version: int, *, confirmed: bool = True) -> bool:
        """Record that `version` of `path` exists; True if it is newer than any known before,
        or than any Vault confirmed, when `confirmed` (a write, read or check showed it).

        Replayed and duplicated events are not newer, so listeners hear of each change once.
        """
        known = self._known.get(path, 0)
        if confirmed and version >= known and path in self._unconfirmed:
            del self._unconfirmed[path]  # what events claimed, up to this version, is true
            if version == known:
                return True  # only an event vouched for it: news to what Vault confirmed
        if version <= known:
            return False
        self._known[path] = version
        self._known.move_to_end(path)
        if len(self._known) > _KNOWN_MAX:
            oldest, _ = self._known.popitem(last=False)
            self._unconfirmed.pop(oldest, None)
        # New readers must not join a read that may predate this version.
        self._flights.pop(path, None)
        return True

    # -- checking what events claim -----------------------------------------------------------
    #
    # A version a change event claims goes through these states on this instance:
    #
    # - unconfirmed (`_believe`: the next version, or any of a path unknown here): `_known`
    #   holds it, `_unconfirmed` the version Vault last confirmed, and no Vault call is made.
    #   A write, read or check that shows that version or a newer confirms it (`_advance`,
    #   `_cache_latest`); a read that gets an older one asks Vault once (`_confirm`); a check
    #   of the path (`_settle`, `check_versions`) settles it too (`_judge`: confirmed, or taken
    #   back to what Vault holds). Beyond UNCONFIRMED_MAX paths, the oldest is forgotten.
    # - checking (`_check`): `_claims` holds it while `_verify` runs; for jumps (recorded only
    #   once confirmed), lifecycle events, and every claim while listeners are registered.
    # - afterwards: an ordinary `_known` version if confirmed, nothing if refuted.

    @property
    def unconfirmed_claims(self) -> int:
        """Paths whose newest known version an event claimed and no read or check confirmed."""
        return len(self._unconfirmed)

    @property
    def pending_checks(self) -> int:
        """Paths whose event claims wait for (or are in) a check against Vault."""
        return len(self._claims)

    def _held_version(self, path: str) -> int:
        """The version of the cached latest entry of `path` (it came from Vault), else 0."""
        entry = self.cache.get(path, None, math.inf, count=False)
        return 0 if entry is None else entry.secret.version

    def _believe(self, path: str, version: int) -> None:
        """Record `version` of `path` before Vault confirms it: unconfirmed (see above)."""
        if path in self._unconfirmed:
            self._unconfirmed.move_to_end(path)  # a newer claim: the confirmed one stays
        else:
            self._unconfirmed[path] = self._known.get(path, 0)
            if len(self._unconfirmed) > self.UNCONFIRMED_MAX:
                # Forgotten, as if its event had only evicted: this many claims later, a read
                # in flight since is unlikely, and no unconfirmed version outlives the bound.
                oldest, _ = self._unconfirmed.popitem(last=False)
                self._known.pop(oldest, None)  # its own LRU may have dropped it already
        self._advance(path, version, confirmed=False)

    async def _confirm(self, path: str) -> None:
        """Ask Vault whether it holds the unconfirmed version of `path` (a read found older)."""
        claimed = self._known.get(path, 0)
        try:
            current = await self.backend.current_version(path)
        except SecretsError as exc:
            # Still unconfirmed: this read is not cached, the next one asks again.
            log.warning(
                "could not check a change event against Vault",
                extra={"path": path, "error_type": type(exc).__name__},
            )
            self._drop("unverified")
            return
        if self._judge(path, claimed, current):
            self._drop("beyond_vault")

    def _judge(self, path: str, claimed: int, current: int) -> bool:
        """Vault's current version of `path` is `current`, asked while `_known` held `claimed`:
        confirm the unconfirmed version of `path`, or take it back; True if taken back."""
        before = self._unconfirmed.get(path)
        if before is None:
            return False  # confirmed already, or nothing unconfirmed
        known = self._known.get(path, 0)  # 0: dropped by the LRU of `_known` meanwhile
        if known <= current:
            del self._unconfirmed[path]
            return False
        if known != claimed:
            return False  # a newer claim came while Vault answered: judged the next time
        del self._unconfirmed[path]
        restored = max(before, current)
        if restored:
            self._known[path] = restored
        else:
            self._known.pop(path, None)
        return True

    def _check(self, path: str, version: int) -> None:
        """Have Vault checked for the change claim `version` of `path`, in the background."""
        # New readers must not join a read that may predate the change, if it is real.
        self._flights.pop(path, None)
        claims = self._claims_for(path)
        if claims is not None:
            claims.version = max(claims.version, version)

    def _claims_for(self, path: str) -> _Claims | None:
        """The pending claims of `path`, with a check on its way; None (counted) when full."""
        claims = self._claims.get(path)
        if claims is None:
            if len(self._claims) >= self.VERIFY_QUEUE:
                self._drop("verify_overflow")
                return None
            claims = self._claims[path] = _Claims()
            self._spawn(self._verify(path, claims))
        return claims

    async def _verify(self, path: str, claims: _Claims) -> None:
        """Check the claims on `path` against Vault until none is left (one check a path)."""
        try:
            async with self._verify_gate:
                while claims.version or claims.events:
                    version, claims.version = claims.version, 0
                    events, claims.events = list(claims.events.values()), {}
                    try:
                        await self._settle(path, version, events)
                    except SecretsError as exc:
                        # Not confirmed, so not applied: the eviction stands, and an unconfirmed
                        # version stays so, for the next read (or check) to judge.
                        log.warning(
                            "could not check a change event against Vault",
                            extra={"path": path, "error_type": type(exc).__name__},
                        )
                        self._drop("unverified")
        finally:
            if self._claims.get(path) is claims:
                del self._claims[path]

    async def _settle(self, path: str, version: int, events: list[LifecycleEvent]) -> None:
        claimed = self._known.get(path, 0)
        secret: Secret | None = None
        meta: SecretMetadata | None = None
        if events:
            try:
                meta = await self.backend.read_metadata(path)
            except NotFound:
                meta = None  # no history at all
            current = 0 if meta is None else meta.current_version
        elif self._listeners:
            # Listeners need the value anyway: a read that shows the version confirms it.
            try:
                secret = await self.get(path)
            except NotFound:
                secret = None
            if secret is not None and secret.version >= version:
                current = secret.version
            else:
                current = await self.backend.current_version(path)
        else:
            current = await self.backend.current_version(path)
        refuted = self._judge(path, claimed, current)  # a version recorded unconfirmed
        if refuted or version > current:
            self._drop("beyond_vault")
        if version:
            self._settle_change(path, version, current, secret)
        for event in events:
            self._settle_lifecycle(event, meta)

    def _settle_change(self, path: str, version: int, current: int, secret: Secret | None) -> None:
        """Vault's current version of `path` is `current`: apply what it confirms of `version`."""
        confirmed = min(version, current)
        if confirmed <= 0:
            return
        self._advance(path, confirmed)
        self.cache.invalidate(path, confirmed)  # a read that was in flight may have landed
        if not self._listeners or self._heard.get(path, 0) >= confirmed:
            return
        if secret is not None and secret.version >= confirmed:
            if self._hear(path, secret.version):
                self._notify(path, secret.data)
        else:
            self._spawn(self._read_and_notify(path))

    def _settle_lifecycle(self, event: LifecycleEvent, meta: SecretMetadata | None) -> None:
        """Apply what Vault's metadata confirms of a lifecycle event; drop the rest."""
        undeleted = isinstance(event, SecretUndeleted)
        current = 0 if meta is None else meta.current_version
        readable = {} if meta is None else {v.version: v.readable for v in meta.versions}

        def holds(version: int) -> bool:
            if undeleted:
                return readable.get(version, False)
            # Gone: deleted, destroyed, or pruned; never a version Vault has not reached yet
            # (marking those would keep future versions out of the cache).
            return version <= current and not readable.get(version, False)

        named = event.versions
        if not named:
            # No versions named (an older publisher): those Vault shows in that state.
            named = tuple(sorted(self._gone.get(event.path, ()) if undeleted else readable))
        confirmed = tuple(v for v in named if holds(v))
        if len(confirmed) < len(event.versions) or not confirmed:
            self._drop("beyond_vault")
        if not confirmed:
            return
        self._apply_lifecycle(
            msgspec.structs.replace(event, version=min(event.version, current), versions=confirmed)
        )

    def _drop(self, reason: str) -> None:
        count = self.events_dropped[reason] = self.events_dropped.get(reason, 0) + 1
        if count & (count - 1) == 0:  # at 1, 2, 4, 8, ...: a flood must not flood the log
            log.warning("change event claims dropped", extra={"reason": reason, "count": count})

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def check_versions(self, *, concurrency: int = 8) -> list[tuple[str, int]]:
        """Find changes made straight to Vault: compare every cached path with its metadata.

        A newer version is handled like an event (evict, notify listeners) and announced on
        the bus for the other instances; so is a cached version (latest or pinned) found
        deleted or destroyed. Returns the (path, newer version) pairs found.
        """
        gate = asyncio.Semaphore(concurrency)
        found: list[tuple[str, int]] = []
        latest = dict(self.cache.latest_paths())

        async def check(path: str, held: set[int]) -> None:
            meta: SecretMetadata | None
            async with gate:
                claimed = self._known.get(path, 0)
                try:
                    meta = await self.backend.read_metadata(path)
                except NotFound:
                    meta = None  # the whole history was removed: every version is gone
                except SecretsError:
                    return  # Vault trouble: the next round tries again, the TTL still bounds
            current = 0 if meta is None else meta.current_version
            if self._judge(path, claimed, current):  # free, for a version recorded unconfirmed
                self._drop("beyond_vault")
            cached = latest.get(path)
            if cached is not None and current > cached:
                found.append((path, current))
                self.apply_change(path, current)
                self._announce(path, current, "vault-direct")
            deleted: list[int] = []
            destroyed: list[int] = []
            for version in sorted(held):
                info = None if meta is None else meta.version(version)
                if info is None or info.destroyed:
                    destroyed.append(version)  # pruned by max_versions counts as destroyed
                elif info.deleted:
                    deleted.append(version)
            if deleted:
                self._lifecycle(SecretDeleted, path, current, tuple(deleted), "vault-direct")
            if destroyed:
                self._lifecycle(SecretDestroyed, path, current, tuple(destroyed), "vault-direct")

        await asyncio.gather(*(check(p, v) for p, v in self.cache.cached_versions().items()))
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


def _version_list(path: str, versions: Iterable[int]) -> tuple[int, ...]:
    """`versions` checked (1 to 100 positive integers), sorted and without duplicates."""
    if isinstance(versions, str | bytes):
        raise InvalidRequest("versions must be a list of positive integers", path=path)
    checked = tuple(versions)
    for version in checked:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequest("versions must be positive integers", path=path)
    if not 1 <= len(checked) <= MAX_VERSIONS_PER_REQUEST:
        raise InvalidRequest(
            f"give 1 to {MAX_VERSIONS_PER_REQUEST} versions, not {len(checked)}", path=path
        )
    return tuple(sorted(set(checked)))


def _existing(
    meta: SecretMetadata, versions: tuple[int, ...], *, restorable: bool = False
) -> tuple[int, ...]:
    """`versions`, each known to `meta`, else NotFound (with `restorable`: not destroyed)."""
    path = meta.path
    for version in versions:
        info = meta.version(version)
        if info is None:
            raise NotFound(f"no version {version}", path=path)
        if restorable and info.destroyed:
            raise NotFound(f"version {version} is destroyed: it cannot be undeleted", path=path)
    return versions


def _compact(secret: Secret) -> tuple[Secret, bytes]:
    """`secret` as the cache keeps it, with its document: the data is decoded from the document
    when first read in process, so that a cached secret is held once, as JSON."""
    body = _document(secret)
    data = SecretData.from_document(body)
    return Secret(secret.path, secret.version, data, secret.created_time), body


def _document(secret: Secret) -> bytes:
    return _encode(
        SecretBody(
            path=secret.path,
            version=secret.version,
            data=secret.data.reveal(),
            created_time=secret.created_time,
        )
    )

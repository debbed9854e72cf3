"""`Coherence`: where a bus event goes: changes other instances (or Vault directly) announce, what
they claim checked against Vault before anything but an eviction happens, forgeries counted.

A version a change event claims goes through these states on this instance:

- unconfirmed (`VersionLedger.believe`: the next version, or any of a path unknown here): no
  Vault call is made. A write, read or check that shows that version or a newer confirms it;
  a read that gets an older one asks Vault once (`confirm_stale`); a check of the path
  (`_settle`, the version watcher) settles it too (`VersionLedger.judge`). Beyond
  `UNCONFIRMED_MAX` paths, the oldest is forgotten.
- checking (`_check`): `_claims` holds it while `_verify` runs; for jumps (recorded only once
  confirmed), lifecycle events, and every claim while listeners are registered.
- afterwards: an ordinary known version if confirmed, nothing if refuted.
"""

from __future__ import annotations

import asyncio
import logging
import math

import msgspec

from schemas.api import SecretMetadata
from schemas.errors import NotFound, SecretsError
from schemas.events import LifecycleEvent, SecretUndeleted
from schemas.secret import Secret
from service.core.cache import SecretCache
from service.core.ledger import VersionLedger
from service.core.listeners import Listeners
from service.core.reads import Reads
from service.lru import LRU
from service.tasks import BackgroundTasks
from service.vault.protocol import VaultBackend

__all__ = ["VERIFY_CONCURRENCY", "VERIFY_QUEUE", "Coherence"]

log = logging.getLogger("secrets.manager")

VERIFY_CONCURRENCY = 8
"""Vault checks of what events claim, in flight at once."""
VERIFY_QUEUE = 1024
"""Paths with claims waiting for a check; beyond, events only evict."""
_SEEN_MAX = 10_000  # lifecycle event ids remembered, so a replayed one is applied once
_CHECK_VERSIONS = 1000  # versions lifecycle claims on one path may name while it waits


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


class Coherence:
    """Keeps the cache, the ledger and listeners true to changes made anywhere."""

    def __init__(
        self,
        backend: VaultBackend,
        cache: SecretCache,
        ledger: VersionLedger,
        reads: Reads,
        listeners: Listeners,
        tasks: BackgroundTasks,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.ledger = ledger
        self.reads = reads
        self.listeners = listeners
        self._tasks = tasks
        self._seen_lifecycle: LRU[str, None] = LRU(_SEEN_MAX)
        # path -> what events claim about it, while a check against Vault is on its way.
        self._claims: dict[str, _Claims] = {}
        self._verify_gate = asyncio.Semaphore(VERIFY_CONCURRENCY)
        self.dropped: dict[str, int] = {}  # reason -> events Vault did not confirm

    @property
    def pending_checks(self) -> int:
        """Paths whose event claims wait for (or are in) a check against Vault."""
        return len(self._claims)

    # -- changes -------------------------------------------------------------------------

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
        known = self.ledger.newest(path)
        if version <= known:
            # A duplicate, a replay or a late event: nothing newer. But if only an event
            # vouches for the version known, and listeners came since, check it for them.
            if self.listeners and path in self.ledger.unconfirmed:
                self._check(path, version)
            return
        if version <= held:
            self._apply_confirmed(path, version)  # Vault gave us this version already
            return
        base = max(known, held)
        if base and version > base + 1:
            self._check(path, version)  # a jump: recorded only once Vault shows it
            return
        self.ledger.believe(path, version)
        if self.listeners:
            self._check(path, version)

    def _apply_confirmed(self, path: str, version: int) -> None:
        newest = self.ledger.advance(path, version)
        self.cache.invalidate(path, version)
        if self.listeners and newest:
            self.listeners.notify_current(path)

    def _held_version(self, path: str) -> int:
        """The version of the cached latest entry of `path` (it came from Vault), else 0."""
        entry = self.cache.get(path, None, math.inf, count=False)
        return 0 if entry is None else entry.secret.version

    # -- lifecycle -----------------------------------------------------------------------

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
        path, versions = event.path, frozenset(event.versions)
        # New readers must not join a read that may predate the change.
        self.reads.forget_flight(path)
        self.cache.drop_latest(path)
        if not isinstance(event, SecretUndeleted):
            self.cache.drop_versions(path, versions or None)
        claims = self._claims_for(path)
        if claims is not None and not claims.add(event):
            self.drop("verify_overflow")

    def apply_confirmed_lifecycle(self, event: LifecycleEvent) -> None:
        """Apply a lifecycle change known to be true: made here, or confirmed by Vault."""
        path, versions = event.path, set(event.versions)
        undeleted = isinstance(event, SecretUndeleted)
        self.ledger.advance(path, event.version)
        # New readers must not join a read that may predate the change.
        self.reads.forget_flight(path)
        self.cache.drop_latest(path)
        if not undeleted:
            self.cache.drop_versions(path, frozenset(versions) if versions else None)
        changed = self.ledger.mark_gone(path, versions, undeleted=undeleted)
        if not changed or not self.listeners:
            return
        if not undeleted and event.version in versions:
            self.listeners.forget(path)
            self.listeners.notify(path, None)  # the current version is gone: nothing to read
            return
        self.listeners.notify_current(path, again=undeleted)

    # -- checking what events claim against Vault ----------------------------------------

    async def confirm_stale(self, path: str) -> None:
        """A read of `path` got an older version than the newest known: if only an event
        vouches for that one and no check is on its way, ask Vault whether it holds it."""
        if path not in self.ledger.unconfirmed or path in self._claims:
            return
        claimed = self.ledger.newest(path)
        try:
            current = await self.backend.current_version(path)
        except SecretsError as exc:
            # Still unconfirmed: this read is not cached, the next one asks again.
            log.warning(
                "could not check a change event against Vault",
                extra={"path": path, "error_type": type(exc).__name__},
            )
            self.drop("unverified")
            return
        if self.ledger.judge(path, claimed, current):
            self.drop("beyond_vault")

    def _check(self, path: str, version: int) -> None:
        """Have Vault checked for the change claim `version` of `path`, in the background."""
        # New readers must not join a read that may predate the change, if it is real.
        self.reads.forget_flight(path)
        claims = self._claims_for(path)
        if claims is not None:
            claims.version = max(claims.version, version)

    def _claims_for(self, path: str) -> _Claims | None:
        """The pending claims of `path`, with a check on its way; None (counted) when full."""
        claims = self._claims.get(path)
        if claims is None:
            if len(self._claims) >= VERIFY_QUEUE:
                self.drop("verify_overflow")
                return None
            claims = self._claims[path] = _Claims()
            self._tasks.spawn(self._verify(path, claims))
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
                        self.drop("unverified")
        finally:
            if self._claims.get(path) is claims:
                del self._claims[path]

    async def _settle(self, path: str, version: int, events: list[LifecycleEvent]) -> None:
        claimed = self.ledger.newest(path)
        secret: Secret | None = None
        meta: SecretMetadata | None = None
        if events:
            try:
                meta = await self.backend.read_metadata(path)
            except NotFound:
                meta = None  # no history at all
            current = 0 if meta is None else meta.current_version
        elif self.listeners:
            # Listeners need the value anyway: a read that shows the version confirms it.
            try:
                secret = await self.reads.get(path)
            except NotFound:
                secret = None
            if secret is not None and secret.version >= version:
                current = secret.version
            else:
                current = await self.backend.current_version(path)
        else:
            current = await self.backend.current_version(path)
        refuted = self.ledger.judge(path, claimed, current)  # a version recorded unconfirmed
        if refuted or version > current:
            self.drop("beyond_vault")
        if version:
            self._settle_change(path, version, current, secret)
        for event in events:
            self._settle_lifecycle(event, meta)

    def _settle_change(self, path: str, version: int, current: int, secret: Secret | None) -> None:
        """Vault's current version of `path` is `current`: apply what it confirms of `version`."""
        confirmed = min(version, current)
        if confirmed <= 0:
            return
        self.ledger.advance(path, confirmed)
        self.cache.invalidate(path, confirmed)  # a read that was in flight may have landed
        if not self.listeners or self.listeners.heard(path) >= confirmed:
            return
        if secret is not None and secret.version >= confirmed:
            if self.listeners.hear(path, secret.version):
                self.listeners.notify(path, secret.data)
        else:
            self.listeners.notify_current(path)

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
            gone = self.ledger.gone.get(event.path, ())
            named = tuple(sorted(gone if undeleted else readable))
        confirmed = tuple(v for v in named if holds(v))
        if len(confirmed) < len(event.versions) or not confirmed:
            self.drop("beyond_vault")
        if not confirmed:
            return
        self.apply_confirmed_lifecycle(
            msgspec.structs.replace(event, version=min(event.version, current), versions=confirmed)
        )

    def drop(self, reason: str) -> None:
        """Count a claim Vault did not confirm (or that was not checked) under `reason`."""
        count = self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if count & (count - 1) == 0:  # at 1, 2, 4, 8, ...: a flood must not flood the log
            log.warning("change event claims dropped", extra={"reason": reason, "count": count})

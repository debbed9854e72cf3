"""`ClientCache`: the latest version of each path read through a client, kept fresh by the
client's watch stream, with the service's own staleness rule while that stream is down.

A hit is a dict lookup and a clock check, without a lock; entries are added and removed under a
lock, so the blocking client's watch thread and its callers' threads can share one cache.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from events.listener import Change
from schemas.secret import Secret
from secrets_client.stream import StreamReset, WatchItem

__all__ = ["REREADS", "CacheStats", "ClientCache", "Fetch"]

REREADS = 3  # reads of a path answered older than an event said, before the older is returned
_FLOORS = 10_000  # paths whose announced version is remembered (the oldest is forgotten first)


class CacheStats(NamedTuple):
    """Counters since the client was made (plain ints: a racing thread may lose an increment)."""

    hits: int
    misses: int  # not cached, or older than the bound in force
    evictions: int  # entries dropped by an event, a reset or the entry limit
    reconnects: int  # watch connections made after the first
    entries: int


class Fetch:
    """A read of `path` in flight: an event for the path (or a reset) arriving before the answer
    marks it `stale`, and a stale answer is returned to its caller but never cached."""

    __slots__ = ("path", "started", "stale")

    def __init__(self, path: str, started: float) -> None:
        self.path = path
        self.started = started
        self.stale = False


class ClientCache:
    """Latest versions by path. While the watch stream is up an entry lives `ttl` seconds; while
    it is down (not yet connected, reconnecting), `fallback_ttl` seconds from the start of the
    read that fetched it: invalidations may be missed then, as in the service without NATS.

    When full (`max_entries`), the oldest entry added goes first (no reordering on a hit, which
    stays a lookup).
    """

    def __init__(
        self,
        *,
        ttl: float = 300.0,
        fallback_ttl: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0 or fallback_ttl < 0 or max_entries < 0:
            raise ValueError("ttl, fallback_ttl and max_entries must not be negative")
        self.ttl = ttl
        self.fallback_ttl = fallback_ttl
        self.max_entries = max_entries
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.reconnects = 0
        self._entries: dict[str, tuple[Secret, float]] = {}
        self._max_age = min(ttl, fallback_ttl)  # the bound in force: ttl while the stream is up
        self._connected = False
        self._opened = False  # a watch connection was made once
        self._fetches: dict[str, list[Fetch]] = {}
        # The newest version an event announced per path, until a read shows it: the instance
        # that answers a read may hear of a change after this client did (its own NATS
        # subscription lags the stream), and must not put the older version back here.
        self._floors: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.evictions, self.reconnects, len(self))

    def fresh(self, path: str) -> Secret | None:
        """The cached latest version of `path` if it is within the bound in force, else None."""
        entry = self._entries.get(path)
        if entry is not None and self.clock() - entry[1] < self._max_age:
            self.hits += 1
            return entry[0]
        self.misses += 1
        return None

    def begin(self, path: str) -> Fetch:
        """Call before asking the service for the latest version of `path`."""
        fetch = Fetch(path, self.clock())
        with self._lock:
            self._fetches.setdefault(path, []).append(fetch)
        return fetch

    def finish(self, fetch: Fetch, secret: Secret | None) -> bool:
        """The read ended: cache `secret` (None: the read failed) unless it went stale. False
        if `secret` is older than a version an event announced: read again (the instance that
        answered may not have heard of that event yet), it is not cached."""
        with self._lock:
            pending = self._fetches.get(fetch.path, [])
            if fetch in pending:
                pending.remove(fetch)
                if not pending:
                    del self._fetches[fetch.path]
            if secret is None:
                return True
            floor = self._floors.get(fetch.path, 0)
            if secret.version < floor:
                return False
            if floor:
                del self._floors[fetch.path]  # shown: the entry holds that version or a newer
            if fetch.stale or self.max_entries == 0 or self.ttl == 0:
                return True
            current = self._entries.get(fetch.path)
            if current is not None and current[0].version > secret.version:
                return True  # a newer read finished first
            self._entries.pop(fetch.path, None)  # re-added last: the newest entry
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
                self.evictions += 1
            self._entries[fetch.path] = (secret, fetch.started)
            return True

    def evict(self, path: str, version: int = 0) -> None:
        """A change to `path`: from the watch stream (any event type), or a write by this
        client. `version`, if known, is the path's current version since: a read showing an
        older one is not cached."""
        with self._lock:
            for fetch in self._fetches.get(path, ()):
                fetch.stale = True
            if self._entries.pop(path, None) is not None:
                self.evictions += 1
            if version > self._floors.get(path, 0):
                self._floors.pop(path, None)  # re-added last: the newest
                while len(self._floors) >= _FLOORS:
                    del self._floors[next(iter(self._floors))]
                self._floors[path] = version

    def clear(self) -> None:
        """Forget everything, reads in flight included: a `reset` event, or a stream (re)started
        with no event to resume after."""
        with self._lock:
            for pending in self._fetches.values():
                for fetch in pending:
                    fetch.stale = True
            self.evictions += len(self._entries)
            self._entries.clear()

    def apply(self, item: WatchItem) -> None:
        """What the watch stream said: a change evicts its path, a reset everything."""
        if isinstance(item, Change):
            self.evict(item.event.path, item.event.version)
        elif isinstance(item, StreamReset):
            self.clear()

    def stream_up(self, *, resumed: bool) -> None:
        """A watch connection delivers events. Unless it `resumed` after an event seen before
        (Last-Event-ID), changes since the entries were read may never be told: forget them."""
        if not resumed:
            self.clear()
        if self._opened:
            self.reconnects += 1
        self._opened = True
        self._connected = True
        self._max_age = self.ttl

    def stream_down(self) -> None:
        self._connected = False
        self._max_age = min(self.ttl, self.fallback_ttl)

"""The in-process secret cache: LRU by entry count, TTL by age, version-monotonic invalidation.

Entries are keyed by (path, None) for the latest version and (path, N) for a pinned old version;
both age alike (a version deleted or destroyed straight in Vault must not outlive the bound).
An invalidation for version V evicts a latest-entry older than V and never a newer one, so events
that arrive out of order cannot roll the cache back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, ItemsView
from typing import NamedTuple

from schemas.secret import Secret
from service.lru import LRU

__all__ = ["CacheEntry", "SecretCache"]

Key = tuple[str, int | None]


class CacheEntry(NamedTuple):
    secret: Secret
    fetched_at: float  # monotonic seconds
    body: bytes  # the HTTP response body, encoded once per version


class SecretCache:
    def __init__(
        self,
        *,
        max_entries: int = 10000,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._entries: LRU[Key, CacheEntry] = LRU(max_entries, on_evict=self._evicted)
        # Plain ints, read by the metrics collector at scrape time: no lock or label lookup here.
        self.evictions = 0
        self.stores = 0  # puts that changed what is held (a new key or another version)
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def max_entries(self) -> int:
        return self._entries.maxsize

    def _evicted(self, key: Key, entry: CacheEntry) -> None:
        self.evictions += 1

    def get(
        self, path: str, version: int | None, max_age: float, *, count: bool = True
    ) -> CacheEntry | None:
        """The entry if it is younger than min(ttl, max_age), pinned versions too.

        `count=False` leaves the hit and miss counters alone (a second look within one read).
        """
        key = (path, version)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += count
            return None
        if self._clock() - entry.fetched_at >= min(self.ttl, max_age):
            del self._entries[key]
            self.evictions += 1
            self.misses += count
            return None
        self._entries.move_to_end(key)
        self.hits += count
        return entry

    def put(self, secret: Secret, body: bytes, *, pinned: bool = False) -> None:
        """Store `secret` as the latest version (or as a pinned old version)."""
        if self.max_entries <= 0 or self.ttl <= 0:
            return
        key = (secret.path, secret.version if pinned else None)
        current = self._entries.get(key)
        if current is not None and current.secret.version > secret.version:
            return  # never replace a newer version with an older one
        if current is None or current.secret.version != secret.version:
            self.stores += 1
        self._entries.put(key, CacheEntry(secret, self._clock(), body))

    def invalidate(self, path: str, version: int) -> bool:
        """A change to `version` happened: drop a latest-entry older than it. True if dropped."""
        entry = self._entries.get((path, None))
        if entry is not None and entry.secret.version < version:
            del self._entries[(path, None)]
            self.evictions += 1
            return True
        return False

    def drop_versions(self, path: str, versions: frozenset[int] | None = None) -> None:
        """Drop pinned versions (all when `versions` is None) and the latest entry if listed."""
        for key in [k for k in self._entries if k[0] == path]:
            entry = self._entries[key]
            if versions is None or entry.secret.version in versions:
                del self._entries[key]
                self.evictions += 1

    def drop_latest(self, path: str) -> bool:
        """Drop the latest-entry of `path`, whatever its version. True if there was one."""
        if self._entries.pop((path, None), None) is None:
            return False
        self.evictions += 1
        return True

    @property
    def generation(self) -> int:
        """Grows whenever what the cache holds (paths, versions) may have changed: a snapshot
        taken at one generation is still exact while it has not moved."""
        return self.stores + self.evictions

    def items(self) -> ItemsView[Key, CacheEntry]:
        """Every (key, entry), least recently used first: a live view, to iterate at once."""
        return self._entries.items()

    def clear(self) -> None:
        self.evictions += len(self._entries)
        self._entries.clear()

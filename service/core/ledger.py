"""`VersionLedger`: the versions of each path this instance knows of, so nothing older is cached,
and nothing deleted or destroyed; a version only an event vouches for is held "unconfirmed".
"""

from __future__ import annotations

from collections.abc import Callable

from service.lru import LRU

__all__ = ["KNOWN_MAX", "UNCONFIRMED_MAX", "VersionLedger"]

KNOWN_MAX = 100_000
"""Paths whose newest version (and whose versions gone) are remembered: about 100 bytes each."""
UNCONFIRMED_MAX = 10_000
"""Paths whose newest known version only an event vouches for; beyond, the oldest is forgotten
(about 150 bytes each, plus the path)."""


class VersionLedger:
    """The newest version known of each path, whether Vault confirmed it, and versions gone.

    A version a change event claims is first recorded unconfirmed (`believe`): `known` holds
    it and `unconfirmed` the version Vault last confirmed. A write, read or check that shows
    that version or a newer confirms it (`advance`, `confirms`); a check of Vault settles it
    (`judge`: confirmed, or taken back to what Vault holds).
    """

    __slots__ = ("_on_newer", "gone", "known", "unconfirmed")

    def __init__(
        self,
        *,
        on_newer: Callable[[str], None],
        known_max: int = KNOWN_MAX,
        unconfirmed_max: int = UNCONFIRMED_MAX,
    ) -> None:
        # path -> the newest version this instance knows exists (its own writes and events).
        # Nothing older is ever cached or returned from a fresh read.
        self.known: LRU[str, int] = LRU(known_max, on_evict=self._forget_unconfirmed)
        # path -> the newest version Vault confirmed, for each path whose `known` version only
        # an event vouches for so far; restored if Vault does not hold it.
        self.unconfirmed: LRU[str, int] = LRU(unconfirmed_max, on_evict=self._forget_known)
        # path -> versions known deleted or destroyed: never cached, whatever read lands late.
        self.gone: LRU[str, set[int]] = LRU(known_max)
        # Told of each path whose known version went up: reads in flight may predate it.
        self._on_newer = on_newer

    def newest(self, path: str) -> int:
        """The newest version of `path` known here (confirmed or not); 0 if none."""
        return self.known.get(path, 0)

    def advance(self, path: str, version: int, *, confirmed: bool = True) -> bool:
        """Record that `version` of `path` exists; True if it is newer than any known before,
        or than any Vault confirmed, when `confirmed` (a write, read or check showed it).

        Replayed and duplicated events are not newer, so listeners hear of each change once.
        """
        known = self.known.get(path, 0)
        if confirmed and version >= known and path in self.unconfirmed:
            del self.unconfirmed[path]  # what events claimed, up to this version, is true
            if version == known:
                return True  # only an event vouched for it: news to what Vault confirmed
        if version <= known:
            return False
        self.known.put(path, version)
        # New readers must not join a read that may predate this version.
        self._on_newer(path)
        return True

    def believe(self, path: str, version: int) -> None:
        """Record `version` of `path` before Vault confirms it: unconfirmed."""
        if path in self.unconfirmed:
            self.unconfirmed.move_to_end(path)  # a newer claim: the confirmed one stays
        else:
            self.unconfirmed[path] = self.known.get(path, 0)
        self.advance(path, version, confirmed=False)

    def confirms(self, path: str, version: int) -> bool:
        """Vault returned `version` of `path` as its latest: True if it may be cached.

        A write or read that finishes after a newer version's event must not cache the older,
        nor one that finishes after its version was deleted.
        """
        if version < self.known.get(path, 0):
            return False
        self.unconfirmed.pop(path, None)  # Vault shows that version or a newer: confirmed
        return version not in self.gone.get(path, ())

    def judge(self, path: str, claimed: int, current: int) -> bool:
        """Vault's current version of `path` is `current`, asked while `known` held `claimed`:
        confirm the unconfirmed version of `path`, or take it back; True if taken back."""
        before = self.unconfirmed.get(path)
        if before is None:
            return False  # confirmed already, or nothing unconfirmed
        known = self.known.get(path, 0)  # 0: dropped by the LRU of `known` meanwhile
        if known <= current:
            del self.unconfirmed[path]
            return False
        if known != claimed:
            return False  # a newer claim came while Vault answered: judged the next time
        del self.unconfirmed[path]
        restored = max(before, current)
        if restored:
            self.known[path] = restored
        else:
            self.known.pop(path, None)
        return True

    def is_gone(self, path: str, version: int) -> bool:
        """True if `version` of `path` is known deleted or destroyed."""
        return version in self.gone.get(path, ())

    def mark_gone(self, path: str, versions: set[int], *, undeleted: bool) -> bool:
        """Record `versions` of `path` deleted or destroyed (`undeleted`: readable again; none
        named: every version); True unless it was known already (a second watcher, a replay)."""
        gone = self.gone.pop(path, set())
        if undeleted:
            changed = True
            gone = gone - versions if versions else set()
        else:
            changed = not versions or not versions <= gone
            gone |= versions
        if gone:
            self.gone.put(path, gone)
        return changed

    def _forget_unconfirmed(self, path: str, _version: int) -> None:
        self.unconfirmed.pop(path, None)

    def _forget_known(self, path: str, _confirmed: int) -> None:
        # Forgotten, as if its event had only evicted: this many claims later, a read in flight
        # since is unlikely, and no unconfirmed version outlives the bound.
        self.known.pop(path, None)  # its own LRU may have dropped it already

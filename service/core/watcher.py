"""`VersionWatcher`: the out-of-band check that finds changes made straight to Vault (not through
any instance) by comparing cached paths with their metadata, and handles them as events.

It checks the paths this instance caches (`cache_targets`), or, on the instance elected to poll
for the whole cluster (service.core.poller), the union of every instance's, with `Findings` so
that each change is announced once although instances report what they hold a little late.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import NamedTuple

from schemas.api import SecretMetadata
from schemas.errors import NotFound, SecretsError
from schemas.events import SecretDeleted, SecretDestroyed
from service.core.cache import SecretCache
from service.core.coherence import Coherence
from service.core.ledger import VersionLedger
from service.core.writes import Writes
from service.vault.protocol import VaultBackend

__all__ = ["Findings", "Target", "VersionWatcher", "cache_targets"]

log = logging.getLogger("secrets.manager")


class Target(NamedTuple):
    """What is cached of one path: the version of its latest-entry (0: none, only pinned old
    versions) and every version held (latest and pinned)."""

    latest: int
    held: frozenset[int]


def cache_targets(cache: SecretCache) -> dict[str, Target]:
    """path -> what `cache` holds of it.

    One pass, taken on the event loop: most paths hold their latest version only, and share
    one frozenset per distinct version rather than one each (half the time of a set per path).
    """
    targets: dict[str, Target] = {}
    alone: dict[int, frozenset[int]] = {}
    for (path, pinned), entry in cache.items():
        version = entry.secret.version
        found = targets.get(path)
        if found is not None:
            latest = version if pinned is None else found.latest
            targets[path] = Target(latest, found.held | {version})
        elif pinned is None:
            shared = alone.get(version)
            if shared is None:
                shared = alone[version] = frozenset((version,))
            targets[path] = Target(version, shared)
        else:
            targets[path] = Target(0, frozenset((version,)))
    return targets


class Findings:
    """The cluster's poller's memory, per path: what it announced (the newest version, the
    versions gone) and what one round found and the next must find again before it is told.

    Instances report what they hold up to a flush (half an interval) late. So a change is
    announced only when two rounds in a row find the instances behind it: a write made through
    an instance was announced by it, and the others' reports catch up before the next round;
    and once announced, a change is not announced again while reports catch up.
    """

    def __init__(self) -> None:
        self.newest: dict[str, int] = {}
        self.gone: dict[str, set[int]] = {}
        self.seen: dict[str, int] = {}  # path -> a newer version one round found
        self.seen_gone: dict[str, set[int]] = {}  # path -> versions one round found gone

    def keep_only(self, paths: Mapping[str, object]) -> None:
        """Forget paths no longer watched: their memory would only grow."""
        for table in (self.newest, self.gone, self.seen, self.seen_gone):
            for path in [p for p in table if p not in paths]:
                del table[path]

    def found_again(self, path: str, version: int) -> bool:
        """A round finds `version` of `path` newer than some instance holds: True if the round
        before found it too (or an older one), so it is time to tell."""
        if path in self.seen:
            del self.seen[path]
            return True
        self.seen[path] = version
        return False

    def gone_again(self, path: str, versions: set[int]) -> set[int]:
        """Of `versions` a round finds gone, those the round before found gone too."""
        before = self.seen_gone.pop(path, set())
        if versions - before:
            self.seen_gone[path] = versions - before
        return versions & before


class VersionWatcher:
    """Rounds of metadata reads over cached paths, `concurrency` at a time."""

    def __init__(
        self,
        backend: VaultBackend,
        cache: SecretCache,
        ledger: VersionLedger,
        coherence: Coherence,
        writes: Writes,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.ledger = ledger
        self.coherence = coherence
        self.writes = writes
        # Plain ints, read by the metrics collector at scrape time.
        self.metadata_reads = 0  # Vault metadata reads made by the checks
        self.last_round_paths = 0  # paths the last round checked

    async def check(
        self,
        *,
        concurrency: int = 8,
        targets: Mapping[str, Target] | None = None,
        findings: Findings | None = None,
    ) -> list[tuple[str, int]]:
        """Find changes made straight to Vault: compare each target (by default every path this
        instance caches) with its metadata.

        A version newer than the one cached is handled like an event (evict, notify listeners)
        and announced on the bus for the other instances; so is a held version (latest or
        pinned) found deleted or destroyed. With `findings`, what it records as announced is
        not announced again. Returns the (path, newer version) pairs found.
        """
        if targets is None:
            targets = cache_targets(self.cache)
        gate = asyncio.Semaphore(concurrency)
        found: list[tuple[str, int]] = []
        self.last_round_paths = len(targets)

        async def check(path: str, target: Target) -> None:
            meta: SecretMetadata | None
            async with gate:
                claimed = self.ledger.newest(path)
                self.metadata_reads += 1
                try:
                    meta = await self.backend.read_metadata(path)
                except NotFound:
                    meta = None  # the whole history was removed: every version is gone
                except SecretsError:
                    return  # Vault trouble: the next round tries again, the TTL still bounds
            current = 0 if meta is None else meta.current_version
            if self.ledger.judge(path, claimed, current):  # free, for a version unconfirmed
                self.coherence.drop("beyond_vault")
            told = 0 if findings is None else findings.newest.get(path, 0)
            if not (target.latest and current > max(target.latest, told)):
                if findings is not None:
                    findings.seen.pop(path, None)  # the instances caught up
            elif findings is None or findings.found_again(path, current):
                found.append((path, current))
                if findings is not None:
                    findings.newest[path] = current
                self.coherence.apply_change(path, current)
                self.writes.announce(path, current, "vault-direct")
            self._lifecycle(path, target, meta, findings)

        await asyncio.gather(*(check(p, t) for p, t in targets.items()))
        if findings is not None:
            findings.keep_only(targets)
        if found:
            log.info("writes made outside the service found", extra={"count": len(found)})
        return found

    def _lifecycle(
        self, path: str, target: Target, meta: SecretMetadata | None, findings: Findings | None
    ) -> None:
        """Announce the held versions that metadata shows deleted or destroyed."""
        current = 0 if meta is None else meta.current_version
        told = set() if findings is None else findings.gone.get(path, set())
        deleted: list[int] = []
        destroyed: list[int] = []
        for version in sorted(target.held):
            info = None if meta is None else meta.version(version)
            if info is not None and not info.destroyed and not info.deleted:
                told.discard(version)  # readable again (undeleted): may go again
            elif version in told:
                continue
            elif info is None or info.destroyed:
                destroyed.append(version)  # pruned by max_versions counts as destroyed
            else:
                deleted.append(version)
        if findings is not None:
            again = findings.gone_again(path, {*deleted, *destroyed})
            deleted = [v for v in deleted if v in again]
            destroyed = [v for v in destroyed if v in again]
            if told or again:
                findings.gone[path] = told | again
        if deleted:
            self.writes.record_lifecycle(
                SecretDeleted, path, current, tuple(deleted), "vault-direct"
            )
        if destroyed:
            self.writes.record_lifecycle(
                SecretDestroyed, path, current, tuple(destroyed), "vault-direct"
            )

    async def run(self, interval: float) -> None:
        """Run `check` every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one round
                log.exception("version check failed")

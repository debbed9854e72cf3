"""`VersionWatcher`: the out-of-band poller that finds changes made straight to Vault (not through
any instance) by comparing every cached path with its metadata, and handles them as events.
"""

from __future__ import annotations

import asyncio
import logging

from schemas.api import SecretMetadata
from schemas.errors import NotFound, SecretsError
from schemas.events import SecretDeleted, SecretDestroyed
from service.core.cache import SecretCache
from service.core.coherence import Coherence
from service.core.ledger import VersionLedger
from service.core.writes import Writes
from service.vault.protocol import VaultBackend

__all__ = ["VersionWatcher"]

log = logging.getLogger("secrets.manager")


class VersionWatcher:
    """Rounds of metadata reads over the paths the cache holds, `concurrency` at a time."""

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

    async def check(self, *, concurrency: int = 8) -> list[tuple[str, int]]:
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
                claimed = self.ledger.newest(path)
                try:
                    meta = await self.backend.read_metadata(path)
                except NotFound:
                    meta = None  # the whole history was removed: every version is gone
                except SecretsError:
                    return  # Vault trouble: the next round tries again, the TTL still bounds
            current = 0 if meta is None else meta.current_version
            if self.ledger.judge(path, claimed, current):  # free, for a version unconfirmed
                self.coherence.drop("beyond_vault")
            cached = latest.get(path)
            if cached is not None and current > cached:
                found.append((path, current))
                self.coherence.apply_change(path, current)
                self.writes.announce(path, current, "vault-direct")
            deleted: list[int] = []
            destroyed: list[int] = []
            for version in sorted(held):
                info = None if meta is None else meta.version(version)
                if info is None or info.destroyed:
                    destroyed.append(version)  # pruned by max_versions counts as destroyed
                elif info.deleted:
                    deleted.append(version)
            if deleted:
                self.writes.record_lifecycle(
                    SecretDeleted, path, current, tuple(deleted), "vault-direct"
                )
            if destroyed:
                self.writes.record_lifecycle(
                    SecretDestroyed, path, current, tuple(destroyed), "vault-direct"
                )

        await asyncio.gather(*(check(p, v) for p, v in self.cache.cached_versions().items()))
        if found:
            log.info("writes made outside the service found", extra={"count": len(found)})
        return found

    async def run(self, interval: float) -> None:
        """Run `check` every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one round
                log.exception("version check failed")

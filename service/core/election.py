"""`Lease`: who polls Vault for the cluster, decided by one key of the SECRETS_POLLER bucket.

The compare-and-set is JetStream's: the key is taken with `create` (which fails while it holds a
value) and kept with `update` at the revision last written (which fails once anyone else wrote).
The bucket's TTL removes a lease its holder stopped refreshing, and another instance's next
`create` takes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from events.kv import KvConflict, KvError, KvStore

__all__ = ["Lease"]

log = logging.getLogger("secrets.poller")


class Lease:
    """One instance's side of the election: call `step` every third of `ttl` or so."""

    def __init__(
        self,
        kv: KvStore,
        key: str,
        holder: str,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.key = key
        self.holder = holder
        self.ttl = ttl
        self._clock = clock
        self._revision = 0  # the revision this instance last wrote (0: it does not hold it)
        self._valid_until = 0.0
        # The bucket answered the last step (taken, kept or held by another): otherwise
        # nobody may be polling for this instance, which then polls its own paths.
        self.answered: bool | None = None  # None: not asked yet
        self.terms = 0  # times this instance took the lease

    @property
    def held(self) -> bool:
        """This instance holds the lease: it wrote it less than `ttl` ago (counted from before
        the write was sent, so the bucket cannot have let it lapse yet)."""
        return self._revision != 0 and self._clock() < self._valid_until

    async def step(self) -> bool:
        """Keep the lease if held, else try to take it; True if held afterwards."""
        started = self._clock()
        value = self.holder.encode()
        try:
            if self._revision:
                try:
                    self._revision = await self.kv.update(self.key, value, self._revision)
                    self._valid_until = started + self.ttl
                except KvConflict:
                    # Written by another since (our lease lapsed, and it took it), or lapsed.
                    log.warning("poller lease lost", extra={"instance_id": self.holder})
                    self._revision = 0
            if not self._revision:
                try:
                    self._revision = await self.kv.create(self.key, value)
                except KvConflict:
                    pass  # another instance holds it
                else:
                    self._valid_until = started + self.ttl
                    self.terms += 1
                    log.info("poller lease taken", extra={"instance_id": self.holder})
            self.answered = True
        except KvError as exc:
            if self.answered is not False:  # once per outage, not at every step
                log.warning("poller lease unreachable", extra={"error": str(exc)})
            self.answered = False
            if self._revision and not self.held:
                self._revision = 0  # lapsed without a refresh: another may hold it now
        return self.held

    async def release(self) -> None:
        """Give the lease up (this instance stops) so that another takes it at its next step
        instead of a TTL later. Never raises."""
        if not self._revision:
            return
        revision, self._revision = self._revision, 0
        try:
            await self.kv.delete(self.key, revision)
        except KvError:
            pass  # taken meanwhile, or unreachable: the TTL ends it

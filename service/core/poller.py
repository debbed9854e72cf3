"""`ClusterPoller`: one instance of the cluster polls Vault's metadata for every path any instance
caches, and its findings reach the others as events; without NATS, each polls its own paths.

Each instance, every poll interval, is in one of three modes:

- leader: it holds the lease (service.core.election) and checks the union of cached paths
  (service.core.interest), announcing each change once (`Findings`);
- follower: the bus is up, the lease answered (another holds it) and its own interest is in
  the bucket: it reads nothing from Vault, the leader's events reach it;
- local: the bus is down (no event could reach it anyway), or the lease or the interest bucket
  does not answer: it checks its own cached paths as every instance did before.

So Vault's metadata load is one read per distinct cached path per interval, whatever the number
of instances. Timings, with I the poll interval and T the lease's TTL (3 I, at least 3 s): the
lease lapses T after its holder's last refresh (every T/3), so another takes over within about
T to 4T/3 (at its next step when the holder stops cleanly); a path cached is in the bucket
within I/2, and a change straight to Vault is announced by the second round in a row that finds
it (`Findings`: the others' reports lag by up to I/2), so within about 2 I.
SECRETS_VAULT_POLL_INTERVAL must be the same on every instance (it sets the buckets' TTLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from events.kv import INTEREST_BUCKET, LEASE_BUCKET, KvError, KvStore
from service.core.election import Lease
from service.core.interest import InterestBoard, InterestUnion, kv_token
from service.core.watcher import Findings, Target, VersionWatcher

__all__ = ["ClusterPoller", "Mode", "PollerBus", "interest_ttl", "lease_ttl", "poller_buckets"]

log = logging.getLogger("secrets.poller")

_STOP_TIMEOUT = 2.0  # seconds to give up the lease and withdraw the interest when stopping
_FLUSH_SHARE = 50  # a flush waits at least this many times its own duration before the next


def lease_ttl(interval: float) -> float:
    """Seconds a lease lives without a refresh: three rounds, and at least 3 s, so that a
    stall of the event loop or of NATS on a loaded machine does not end it (sub-second
    intervals are for tests)."""
    return max(3 * interval, 3.0)


def interest_ttl(interval: float) -> float:
    """Seconds an instance's interest lives without a refresh. A dead instance's paths are
    polled for that long after it died: a cost, never a fault, so long enough that the
    rewrites of every shard (each third of it) stay rare."""
    return max(10 * interval, 30.0)


def poller_buckets(interval: float) -> dict[str, float]:
    """The buckets the bus makes for the poller (name -> TTL), for `EventBus(buckets=...)`."""
    return {LEASE_BUCKET: lease_ttl(interval), INTEREST_BUCKET: interest_ttl(interval)}


class PollerBus(Protocol):
    """What the poller needs of the bus (events.bus.EventBus)."""

    @property
    def connected(self) -> bool: ...

    @property
    def disconnects(self) -> int: ...

    @property
    def kv(self) -> Mapping[str, KvStore]: ...


class Mode(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"
    LOCAL = "local"


class ClusterPoller:
    """Runs the out-of-band check for this instance in the mode the cluster's state allows."""

    def __init__(
        self,
        watcher: VersionWatcher,
        snapshot: Callable[[], Mapping[str, Target]],
        interval: float,
        *,
        bus: PollerBus | None,
        prefix: str,
        instance_id: str,
        generation: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.watcher = watcher
        self.snapshot = snapshot
        self.interval = interval
        self.bus = bus
        self.mode = Mode.LOCAL
        self.rounds = 0
        self.lease: Lease | None = None
        self.board: InterestBoard | None = None
        self.union = InterestUnion(
            prefix, ttl=interest_ttl(interval), alive=lease_ttl(interval), clock=clock
        )
        self._interest: KvStore | None = None
        self._findings = Findings()
        self._watching: asyncio.Task[None] | None = None
        self._watch_disconnects = 0
        self._flush_failing = False
        kv = {} if bus is None else bus.kv
        if LEASE_BUCKET in kv and INTEREST_BUCKET in kv:
            ttl = lease_ttl(interval)
            key = f"{kv_token(prefix)}.lease"
            self.lease = Lease(kv[LEASE_BUCKET], key, instance_id, ttl=ttl, clock=clock)
            self._interest = kv[INTEREST_BUCKET]
            refresh = interest_ttl(interval) / 3
            self.board = InterestBoard(
                self._interest,
                prefix,
                instance_id,
                snapshot,
                refresh=refresh,
                beat=interval,
                generation=generation,
                clock=clock,
            )

    @property
    def leader(self) -> bool:
        return self.lease is not None and self.lease.held

    def current_mode(self) -> Mode:
        if self.lease is None or self.board is None or self.bus is None:
            return Mode.LOCAL
        if not self.bus.connected or not self.lease.answered:
            return Mode.LOCAL
        if self.lease.held:
            return Mode.LEADER
        return Mode.FOLLOWER if self.board.covered else Mode.LOCAL

    async def run(self) -> None:
        """Until cancelled; then give up the lease and withdraw this instance's interest."""
        try:
            async with asyncio.TaskGroup() as group:
                if self.lease is not None:
                    group.create_task(self._keep_lease())
                    group.create_task(self._flush_interest())
                group.create_task(self._poll())
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop watching, give up the lease and withdraw this instance's interest, so that
        another instance leads at its next step (and the leader drops these paths) without
        waiting for the TTLs. Never raises KvError."""
        await self._stop_watch()
        with contextlib.suppress(TimeoutError, KvError):
            async with asyncio.timeout(_STOP_TIMEOUT):
                if self.lease is not None:
                    await self.lease.release()
                if self.board is not None:
                    await self.board.withdraw()

    async def round(self) -> list[tuple[str, int]]:
        """One check in the current mode: the union (leader), own paths (local) or nothing."""
        self.mode = self.current_mode()
        if self.mode is Mode.FOLLOWER:
            return []
        self.rounds += 1
        if self.mode is Mode.LOCAL:
            return await self.watcher.check()
        targets = self.union.targets()
        # Its own cache as it is now: its interest in the bucket may be half an interval old.
        for path, own in self.snapshot().items():
            seen = targets.get(path, own)
            latest = min((v for v in (own.latest, seen.latest) if v), default=0)
            targets[path] = Target(latest, own.held | seen.held)
        return await self.watcher.check(targets=targets, findings=self._findings)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.round()
            except Exception:  # noqa: BLE001 - the poller must outlive any one round
                log.exception("version check failed")

    async def step(self) -> None:
        """One step of the election (every third of the lease's TTL); the leader watches the
        interest bucket from its first step on."""
        if self.lease is None or self.bus is None:
            return
        if not self.bus.connected:
            await self._stop_watch()  # no event could go out anyway
            return
        was = self.lease.held
        held = await self.lease.step()
        if held and not was:
            self._findings = Findings()  # a new term: start from what is cached
        await self._follow_interest(held)

    async def flush(self) -> None:
        """Record this instance's cache interest (every half interval). Never raises KvError:
        `board.covered` stays False, and this instance polls its own paths meanwhile."""
        if self.board is None or self.bus is None:
            return
        if not self.bus.connected:
            self.board.covered = False
            return
        try:
            await self.board.flush()
            self._flush_failing = False
        except KvError as exc:
            if not self._flush_failing:  # once per outage
                log.warning("cannot record the cache's interest", extra={"error": str(exc)})
            self._flush_failing = True

    async def _keep_lease(self) -> None:
        assert self.lease is not None
        while True:
            try:
                await self.step()
            except Exception:  # noqa: BLE001 - the election must outlive any one step
                log.exception("poller lease step failed")
            await asyncio.sleep(self.lease.ttl / 3)

    async def _follow_interest(self, held: bool) -> None:
        """While this instance leads, watch the interest bucket (again after a reconnect)."""
        assert self.bus is not None
        if not held:
            await self._stop_watch()
            return
        if self._watching is not None and (
            self._watching.done() or self._watch_disconnects != self.bus.disconnects
        ):
            await self._stop_watch()
        if self._watching is None:
            self._watch_disconnects = self.bus.disconnects
            self._watching = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        assert self._interest is not None
        self.union.clear()
        try:
            # Closed here, in this task, when cancelled: its consumer goes with it.
            async with contextlib.aclosing(self._interest.watch(self.union.pattern)) as entries:
                async for entry in entries:
                    self.union.apply(entry)
        except KvError as exc:
            # Retried at the next lease step; meanwhile this leader checks its own paths.
            log.warning("cannot watch the cluster's cache interest", extra={"error": str(exc)})

    async def _stop_watch(self) -> None:
        task, self._watching = self._watching, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.union.clear()

    async def _flush_interest(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - the interest must outlive any one flush
                log.exception("cache interest flush failed")
            # A flush reads the whole cache on the event loop (measured: 40 ms for 10k
            # entries, 0.95 s for 100k): a large cache is flushed less often than I/2.
            spent = time.perf_counter() - started
            await asyncio.sleep(max(self.interval / 2, 0.25, _FLUSH_SHARE * spent))

"""The cluster's cache interest in the SECRETS_INTEREST bucket: `InterestBoard` keeps this
instance's share there (paths cached, versions held); `InterestUnion` rebuilds the union of all.

Layout: one key per (instance, shard), `<prefix>.<instance>.<shard>`, where a path's shard is
crc32(path) mod 64 and the value is that shard's {path: [latest, pinned...]} in msgpack.
Chosen with 1M cached entries across the cluster in mind:

- One key per path listing its holders would be contended (every instance that caches a hot
  path compare-and-sets the same key), and a dead instance's versions inside a shared value
  cannot lapse by TTL: someone would have to clean them out.
- One key per (instance, path) lapses cleanly but makes 1M keys, each rewritten within the TTL
  to stay alive: about 1M messages per TTL period, a JetStream message of overhead each.
- One key per instance would need one value of the whole cache (a million entries is tens of
  MB, past NATS's 1 MB payload limit) rewritten at each change.
- So shards: at most 64 keys per instance, each written only when its content changed (one
  flush per half poll interval), and all rewritten once per third of the bucket's TTL, so a dead
  instance's shards lapse a TTL after its last flush; a stopping instance deletes its own. 10k
  entries make 64 values of about 6 KB; a million on one instance about 600 KB each, still
  under 1 MB (past it a put fails and the instance polls its own paths again).

Each instance also writes a heartbeat, `<prefix>.<instance>.alive`, every poll interval. The
elected poller watches `<prefix>.>` (current values, then changes) and merges the shards of the
instances whose heartbeat is younger than the lease's TTL: a dead instance's shards (whose
versions may predate changes already announced) stop counting as soon as its lease would lapse,
long before the bucket's TTL removes them. Expiry by TTL is not told to watchers, so the union
ages what it holds itself.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping

import msgspec

from events.kv import KvEntry, KvStore
from service.core.watcher import Target

__all__ = ["SHARDS", "InterestBoard", "InterestUnion", "kv_token", "shard_of"]

log = logging.getLogger("secrets.poller")

SHARDS = 64
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(dict[str, list[int]])
_KEY_CHARS = re.compile(r"[^-/_.a-zA-Z0-9]")
_ALIVE = "alive"  # the key suffix of an instance's heartbeat (a shard's is two hex digits)


def kv_token(text: str) -> str:
    """`text` as part of a KV key (letters, digits, `-/_.`); any other character as `=XX`."""
    return _KEY_CHARS.sub(lambda m: "".join(f"={b:02X}" for b in m.group().encode()), text)


def shard_of(path: str) -> int:
    return zlib.crc32(path.encode()) % SHARDS


def _encode(targets: Mapping[str, Target]) -> bytes:
    # Sorted, so that the same content gives the same bytes and is not written again.
    return _encoder.encode(
        {p: [t.latest, *sorted(t.held - {t.latest})] for p, t in sorted(targets.items())}
    )


class InterestBoard:
    """This instance's share of the interest bucket, written from snapshots of its cache."""

    def __init__(
        self,
        kv: KvStore,
        prefix: str,
        instance_id: str,
        snapshot: Callable[[], Mapping[str, Target]],
        *,
        refresh: float,
        beat: float,
        generation: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kv = kv
        self.snapshot = snapshot
        # The cache's generation: while it has not moved since the last flush, the snapshot
        # (the costly part: ~4 us an entry) is skipped and the values sent stand.
        self.generation = generation
        self._flushed: int | None = None  # the generation the bucket's values were made from
        self.refresh = refresh  # seconds between rewrites of every shard (a third of the TTL)
        self.beat = beat  # seconds between heartbeats
        self._clock = clock
        self._beaten = -float("inf")
        self._key = f"{kv_token(prefix)}.{kv_token(instance_id)}."
        self._sent: dict[int, bytes] = {}  # shard -> the value the bucket holds
        self._refreshed = -float("inf")
        # True once the bucket holds every path of the last snapshot: the poller covers them.
        self.covered = False
        self.writes = 0  # values put or deleted

    def key(self, shard: int) -> str:
        return f"{self._key}{shard:02x}"

    @property
    def alive_key(self) -> str:
        return f"{self._key}{_ALIVE}"

    async def flush(self) -> None:
        """Write the shards whose content changed (all of them once per `refresh`), delete
        those now empty. Raises KvError, leaving `covered` False until a flush succeeds."""
        self.covered = False
        now = self._clock()
        full = now - self._refreshed >= self.refresh
        generation = None if self.generation is None else self.generation()
        if generation is not None and generation == self._flushed:
            if full:  # nothing changed: the same values again, to keep them alive
                for shard, value in list(self._sent.items()):
                    await self.kv.put(self.key(shard), value)
                    self.writes += 1
        else:
            self._flushed = None  # until this flush has succeeded
            await self._write_changed(full)
            self._flushed = generation
        if full:
            self._refreshed = now
        if now - self._beaten >= self.beat:
            await self.kv.put(self.alive_key, b"")
            self._beaten = now
            self.writes += 1
        self.covered = True

    async def _write_changed(self, full: bool) -> None:
        shards: dict[int, dict[str, Target]] = {}
        for path, target in self.snapshot().items():
            shards.setdefault(shard_of(path), {})[path] = target
        for shard in range(SHARDS):
            content = shards.get(shard)
            sent = self._sent.get(shard)
            if content is None:
                if sent is not None:
                    await self.kv.delete(self.key(shard))
                    del self._sent[shard]
                    self.writes += 1
                continue
            value = _encode(content)
            if full or value != sent:
                await self.kv.put(self.key(shard), value)
                self._sent[shard] = value
                self.writes += 1

    async def withdraw(self) -> None:
        """Delete this instance's shards (it stops): the poller drops them at once."""
        self.covered = False
        self._beaten = -float("inf")
        self._flushed = None
        await self.kv.delete(self.alive_key)
        for shard in list(self._sent):
            await self.kv.delete(self.key(shard))
            del self._sent[shard]


class InterestUnion:
    """The union of every instance's shards, fed by a watch of the bucket (`apply`)."""

    def __init__(
        self,
        prefix: str,
        *,
        ttl: float,
        alive: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pattern = f"{kv_token(prefix)}.>"
        self._prefix = f"{kv_token(prefix)}."
        self.ttl = ttl
        self.alive = alive  # seconds without a heartbeat after which an instance is dead
        self._clock = clock
        # key -> (when it was last written, as seen here; its instance; its paths)
        self._shards: dict[str, tuple[float, str, dict[str, list[int]]]] = {}
        self._beats: dict[str, float] = {}  # instance -> when its last heartbeat was written
        self.ready = False  # the watch delivered every value the bucket held when it started
        self.undecodable = 0

    def __len__(self) -> int:
        return len(self._shards)

    def apply(self, entry: KvEntry | None) -> None:
        """One item of the watch: a value, a deletion, or None (the current values are in)."""
        if entry is None:
            self.ready = True
            return
        if not entry.key.startswith(self._prefix):
            return
        instance, _, suffix = entry.key[len(self._prefix) :].rpartition(".")
        # The values there when the watch began are as old as the bucket says; later ones new.
        at = self._clock() - (0.0 if self.ready else entry.age)
        if suffix == _ALIVE:
            if entry.value is None:
                self._beats.pop(instance, None)
            else:
                self._beats[instance] = at
            return
        if entry.value is None:
            self._shards.pop(entry.key, None)
            return
        try:
            paths = _decoder.decode(entry.value)
        except msgspec.DecodeError:
            self.undecodable += 1  # not ours (or corrupted): its instance rewrites it soon
            return
        self._shards[entry.key] = (at, instance, paths)

    def clear(self) -> None:
        self._shards.clear()
        self._beats.clear()
        self.ready = False

    def live(self) -> set[str]:
        """The instances whose heartbeat is younger than `alive`."""
        since = self._clock() - self.alive
        return {instance for instance, at in self._beats.items() if at > since}

    def targets(self) -> dict[str, Target]:
        """path -> the oldest latest version any live instance caches (0: only pinned ones)
        and every version one holds. A dead instance's shards are left out as soon as its
        heartbeat stops (a stale version there would be announced again by a new leader), and
        dropped once not rewritten within the TTL."""
        now = self._clock()
        for key in [k for k, (at, _, _) in self._shards.items() if at <= now - self.ttl]:
            del self._shards[key]
        live = self.live()
        latest: dict[str, int] = {}
        held: dict[str, set[int]] = {}
        for _, instance, paths in self._shards.values():
            if instance not in live:
                continue
            for path, versions in paths.items():
                if not versions:
                    continue
                first = versions[0]
                if first > 0:
                    known = latest.get(path, 0)
                    latest[path] = first if not known else min(known, first)
                held.setdefault(path, set()).update(v for v in versions if v > 0)
        return {p: Target(latest.get(p, 0), frozenset(v)) for p, v in held.items()}

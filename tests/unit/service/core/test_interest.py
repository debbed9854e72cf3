"""The cluster's cache interest: `InterestBoard` writes an instance's shards, `InterestUnion`
merges every instance's, each shard lapsing when its instance stops rewriting it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from events.kv import KvEntry
from service.core.interest import SHARDS, InterestBoard, InterestUnion, kv_token, shard_of
from service.core.watcher import Target
from tests.fakes import FakeClock, FakeKeyValue
from tests.support import eventually

TTL = 30.0
BEAT = 1.0  # seconds between heartbeats
ALIVE = 3.0  # seconds without one after which an instance is dead


def target(latest: int, *pinned: int) -> Target:
    return Target(latest, frozenset({latest, *pinned} - {0}))


class Cache:
    """A stand-in for the cache's snapshot: path -> Target, changed by the test."""

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}

    def __call__(self) -> Mapping[str, Target]:
        return dict(self.targets)


def board(kv: FakeKeyValue, cache: Cache, clock: FakeClock, instance: str = "i1") -> InterestBoard:
    return InterestBoard(kv, "secrets", instance, cache, refresh=TTL / 3, beat=BEAT, clock=clock)


@contextlib.asynccontextmanager
async def following(kv: FakeKeyValue, union: InterestUnion) -> AsyncIterator[InterestUnion]:
    """`union` fed by a watch of `kv` until the block ends, once it holds the current values."""

    async def follow() -> None:
        async for entry in kv.watch(union.pattern):
            union.apply(entry)

    watching = asyncio.get_running_loop().create_task(follow())
    try:
        await eventually(lambda: union.ready)
        yield union
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def union_of(kv: FakeKeyValue, clock: FakeClock) -> InterestUnion:
    union = InterestUnion("secrets", ttl=TTL, alive=ALIVE, clock=clock)
    async for entry in kv.watch(union.pattern):
        union.apply(entry)
        if entry is None:
            break
    return union


async def test_a_flush_writes_only_the_shards_that_changed_and_every_shard_once_per_refresh() -> (
    None
):
    clock, cache = FakeClock(), Cache()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    cache.targets = {f"app/p{i}": target(1) for i in range(200)}
    ours = board(kv, cache, clock)
    await ours.flush()
    shards = {shard_of(p) for p in cache.targets}
    assert kv.calls["put"] == len(shards) + 1 <= SHARDS + 1  # and the heartbeat
    assert ours.covered
    cache.targets["app/p0"] = target(2)
    clock.advance(BEAT / 2)
    await ours.flush()
    assert kv.calls["put"] == len(shards) + 2, "one shard changed: one put"
    clock.advance(TTL / 3)
    await ours.flush()
    assert kv.calls["put"] == 2 * len(shards) + 3, "every shard rewritten before it lapses"


async def test_a_shard_left_empty_is_deleted_and_a_withdrawal_deletes_every_shard() -> None:
    clock, cache = FakeClock(), Cache()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    cache.targets = {"app/a": target(1), "app/b": target(3, 1)}
    ours = board(kv, cache, clock)
    await ours.flush()
    assert len(kv.keys()) == len({shard_of("app/a"), shard_of("app/b")}) + 1
    del cache.targets["app/a"]
    await ours.flush()
    assert kv.keys() == sorted([ours.key(shard_of("app/b")), ours.alive_key])
    await ours.withdraw()
    assert kv.keys() == []
    assert not ours.covered


async def test_a_failed_flush_leaves_the_instance_uncovered_until_one_succeeds() -> None:
    clock, cache = FakeClock(), Cache()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    cache.targets = {"app/a": target(1)}
    ours = board(kv, cache, clock)
    kv.down = True
    try:
        await ours.flush()
    except Exception:  # noqa: BLE001 - KvError, what the poller catches
        pass
    assert not ours.covered
    kv.down = False
    await ours.flush()
    assert ours.covered and kv.keys()


async def test_the_union_holds_the_oldest_latest_version_and_every_version_held() -> None:
    clock = FakeClock()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    first, second = Cache(), Cache()
    first.targets = {"app/a": target(3), "app/b": target(0, 1)}
    second.targets = {"app/a": target(2, 1), "app/c": target(5)}
    await board(kv, first, clock, "i1").flush()
    await board(kv, second, clock, "i2").flush()
    union = await union_of(kv, clock)
    assert union.ready
    assert union.targets() == {
        "app/a": Target(2, frozenset({1, 2, 3})),  # i2 still holds 2: a 3 found is news to it
        "app/b": Target(0, frozenset({1})),  # only pinned: deletions matter, not new versions
        "app/c": Target(5, frozenset({5})),
    }


async def test_the_union_follows_changes_and_forgets_shards_not_rewritten_within_the_ttl() -> None:
    clock = FakeClock()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    alive, dead = Cache(), Cache()
    alive.targets = {"app/a": target(1)}
    dead.targets = {"app/z": target(1)}
    alive_board = board(kv, alive, clock, "alive")
    await alive_board.flush()
    await board(kv, dead, clock, "dead").flush()
    async with following(kv, InterestUnion("secrets", ttl=TTL, alive=TTL, clock=clock)) as union:
        assert set(union.targets()) == {"app/a", "app/z"}
        alive.targets["app/b"] = target(4)
        clock.advance(TTL / 3)
        await alive_board.flush()  # app/b's shard, and every shard again (a refresh)
        await eventually(lambda: "app/b" in union.targets())
        clock.advance(TTL * 2 / 3)
        assert set(union.targets()) == {"app/a", "app/b"}, "the dead instance's interest lapsed"


async def test_the_union_ignores_other_prefixes_and_values_it_cannot_decode() -> None:
    union = InterestUnion("secrets", ttl=TTL, alive=ALIVE, clock=FakeClock())
    union.apply(KvEntry("other.i1.00", b"\x80", 1))
    union.apply(KvEntry("secrets.i1.00", b"not msgpack \xc1", 2))
    assert union.targets() == {}
    assert union.undecodable == 1


def test_key_tokens_keep_the_characters_a_key_allows_and_escape_the_rest() -> None:
    assert kv_token("svc-A_1.w2") == "svc-A_1.w2"
    assert kv_token("a:b c") == "a=3Ab=20c"
    assert kv_token("é") == "=C3=A9"


async def test_a_dead_instances_shards_are_left_out_once_its_heartbeat_stops() -> None:
    clock = FakeClock()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    alive, dead = Cache(), Cache()
    alive.targets = {"app/a": target(2)}
    dead.targets = {"app/a": target(1)}  # it died before it heard of version 2
    alive_board = board(kv, alive, clock, "alive")
    await alive_board.flush()
    await board(kv, dead, clock, "dead").flush()
    union = InterestUnion("secrets", ttl=TTL, alive=ALIVE, clock=clock)
    async with following(kv, union):
        assert union.targets()["app/a"].latest == 1
        for _ in range(3):
            clock.advance(BEAT)
            await alive_board.flush()  # a heartbeat each time; the dead one sends none
        await eventually(lambda: union.live() == {"alive"})
        assert union.targets()["app/a"] == Target(2, frozenset({2})), "long before its TTL"


def test_values_older_than_the_watch_count_from_when_the_bucket_stored_them() -> None:
    clock = FakeClock()
    union = InterestUnion("secrets", ttl=TTL, alive=ALIVE, clock=clock)
    union.apply(KvEntry("secrets.old.alive", b"", 1, age=ALIVE + 1))
    union.apply(KvEntry("secrets.new.alive", b"", 2, age=0.5))
    union.apply(None)
    union.apply(KvEntry("secrets.later.alive", b"", 3, age=ALIVE + 1))  # live: age is ignored
    assert union.live() == {"new", "later"}


async def test_an_unchanged_cache_is_not_snapshot_again_yet_its_shards_are_kept_alive() -> None:
    clock = FakeClock()
    kv = FakeKeyValue(ttl=TTL, clock=clock)
    cache = Cache()
    cache.targets = {"app/a": target(2), "app/b": target(5, 1)}
    snapshots = 0

    def counted() -> Mapping[str, Target]:
        nonlocal snapshots
        snapshots += 1
        return cache()

    generation = 7
    owner = InterestBoard(
        kv, "secrets", "i1", counted, refresh=TTL / 3, beat=BEAT,
        generation=lambda: generation, clock=clock,
    )  # fmt: skip
    await owner.flush()
    shards = {k: kv.value(k) for k in kv.keys() if not k.endswith("alive")}
    await owner.flush()
    assert snapshots == 1  # the generation did not move: nothing to look at
    clock.advance(TTL / 3)  # a full refresh: the same values again, with no snapshot
    puts = kv.calls["put"]
    await owner.flush()
    assert snapshots == 1 and kv.calls["put"] - puts >= len(shards)
    clock.advance(TTL * 0.9)  # past the first values' TTL: alive only thanks to the refresh
    assert {k: kv.value(k) for k in shards} == shards
    generation += 1
    cache.targets["app/c"] = target(1)
    await owner.flush()
    assert snapshots == 2 and kv.value(owner.key(shard_of("app/c"))) is not None


def test_a_cache_snapshot_names_each_path_with_its_latest_and_pinned_versions() -> None:
    from schemas.secret import Secret, SecretData
    from service.core.cache import SecretCache
    from service.core.watcher import cache_targets

    cache = SecretCache(max_entries=10, ttl=60)

    def secret(path: str, version: int) -> Secret:
        return Secret(path=path, version=version, data=SecretData({}), created_time="t")

    cache.put(secret("app/a", 3), b"")
    cache.put(secret("app/b", 1), b"", pinned=True)
    cache.put(secret("app/b", 4), b"")
    cache.put(secret("app/b", 2), b"", pinned=True)
    cache.put(secret("app/c", 3), b"")
    before = cache.generation
    assert cache_targets(cache) == {
        "app/a": Target(3, frozenset({3})),
        "app/b": Target(4, frozenset({1, 2, 4})),
        "app/c": Target(3, frozenset({3})),
    }
    cache.put(secret("app/a", 3), b"")  # the same version again: nothing changed
    assert cache.generation == before
    cache.invalidate("app/a", 4)
    assert cache.generation > before

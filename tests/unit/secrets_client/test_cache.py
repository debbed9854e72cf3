"""secrets_client/cache.py with a fake clock: which bound is in force while the watch stream is up
and down, eviction by events and resets, and reads that a change overtook."""

from __future__ import annotations

import pytest

from events.listener import Change, UnknownChange
from schemas.secret import Secret, SecretData
from secrets_client.cache import CacheStats, ClientCache
from secrets_client.stream import StreamReset


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def secret(path: str = "app/db", version: int = 1) -> Secret:
    return Secret(path, version, SecretData({"k": f"v{version}"}), "2025-01-01T00:00:00Z")


def cached(cache: ClientCache, value: Secret) -> None:
    cache.finish(cache.begin(value.path), value)


def changed(path: str, sequence: int = 1) -> Change:
    return Change(UnknownChange(type="secret.anything", path=path), sequence)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> ClientCache:
    cache = ClientCache(ttl=300.0, fallback_ttl=5.0, clock=clock)
    cache.stream_up(resumed=False)
    return cache


def test_a_read_is_served_from_the_cache_until_the_ttl_while_the_stream_is_up(
    cache: ClientCache, clock: Clock
) -> None:
    cached(cache, secret())
    clock.now += 299
    assert cache.fresh("app/db") == secret()
    clock.now += 1
    assert cache.fresh("app/db") is None
    assert cache.stats() == CacheStats(hits=1, misses=1, evictions=0, reconnects=0, entries=1)


def test_while_the_stream_is_down_an_entry_older_than_the_fallback_bound_is_not_served(
    cache: ClientCache, clock: Clock
) -> None:
    cached(cache, secret())
    clock.now += 4.9
    cache.stream_down()  # the bound applies at once, to entries cached before too
    assert cache.fresh("app/db") is not None
    clock.now += 0.1
    assert cache.fresh("app/db") is None
    cache.stream_up(resumed=True)  # resumed after the last event: no gap, the entry is good
    assert cache.fresh("app/db") is not None and cache.connected


def test_an_entrys_age_counts_from_the_start_of_its_read(cache: ClientCache, clock: Clock) -> None:
    cache.stream_down()
    fetch = cache.begin("app/db")
    clock.now += 3
    cache.finish(fetch, secret())
    clock.now += 2
    assert cache.fresh("app/db") is None


def test_an_event_of_any_type_evicts_its_path_and_no_other(cache: ClientCache) -> None:
    cached(cache, secret("app/db"))
    cached(cache, secret("app/api"))
    cache.apply(changed("app/db"))
    cache.apply(changed("app/nothing-cached"))
    assert cache.fresh("app/db") is None and cache.fresh("app/api") is not None
    assert cache.evictions == 1


def test_a_reset_forgets_everything(cache: ClientCache) -> None:
    cached(cache, secret("app/db"))
    cached(cache, secret("app/api"))
    cache.apply(StreamReset("history_gone", 9))
    assert len(cache) == 0 and cache.evictions == 2


def test_a_stream_started_without_a_resume_point_forgets_what_was_read_before_it(
    cache: ClientCache,
) -> None:
    cached(cache, secret())
    cache.stream_down()
    cache.stream_up(resumed=False)  # changes since the read may never be told
    assert len(cache) == 0
    assert cache.reconnects == 1


def test_a_read_overtaken_by_an_event_for_its_path_is_not_cached(cache: ClientCache) -> None:
    fetch = cache.begin("app/db")
    other = cache.begin("app/api")
    cache.evict("app/db")  # version 2 written while version 1 was on its way
    cache.finish(fetch, secret("app/db", 1))
    cache.finish(other, secret("app/api"))
    assert cache.fresh("app/db") is None and cache.fresh("app/api") is not None


def test_a_read_older_than_an_announced_version_is_not_cached_and_asks_for_another(
    cache: ClientCache,
) -> None:
    cached(cache, secret(version=1))
    cache.apply(Change(UnknownChange(type="secret.updated", path="app/db", version=2), 7))
    # The instance answering has not heard of version 2 yet: its cache still holds version 1.
    assert cache.finish(cache.begin("app/db"), secret(version=1)) is False
    assert cache.fresh("app/db") is None
    assert cache.finish(cache.begin("app/db"), secret(version=2)) is True
    assert cache.fresh("app/db") == secret(version=2)
    assert cache._floors == {}  # shown: nothing more to remember


def test_a_read_overtaken_by_a_reset_is_not_cached(cache: ClientCache) -> None:
    fetch = cache.begin("app/db")
    cache.clear()
    cache.finish(fetch, secret())
    assert len(cache) == 0


def test_a_read_that_failed_caches_nothing_and_leaves_no_trace(cache: ClientCache) -> None:
    cache.finish(cache.begin("app/db"), None)
    assert len(cache) == 0 and cache._fetches == {}


def test_an_older_version_never_replaces_a_newer_one(cache: ClientCache) -> None:
    slow = cache.begin("app/db")
    cached(cache, secret(version=2))
    cache.finish(slow, secret(version=1))
    entry = cache.fresh("app/db")
    assert entry is not None and entry.version == 2


def test_when_full_the_oldest_entry_goes_first(clock: Clock) -> None:
    cache = ClientCache(max_entries=2, clock=clock)
    for name in ("a", "b", "c"):
        cached(cache, secret(f"app/{name}"))
    assert [cache.fresh(f"app/{n}") is not None for n in "abc"] == [False, True, True]
    assert cache.evictions == 1


def test_a_cache_of_no_entries_or_no_ttl_keeps_nothing(clock: Clock) -> None:
    for cache in (ClientCache(max_entries=0, clock=clock), ClientCache(ttl=0, clock=clock)):
        cached(cache, secret())
        assert len(cache) == 0


def test_a_fallback_bound_longer_than_the_ttl_never_outlives_the_ttl(clock: Clock) -> None:
    cache = ClientCache(ttl=2.0, fallback_ttl=5.0, clock=clock)
    cached(cache, secret())
    clock.now += 2
    assert cache.fresh("app/db") is None


def test_negative_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ClientCache(fallback_ttl=-1)

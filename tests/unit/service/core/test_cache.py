"""SecretCache: LRU bound, TTL and max_age with an injected clock, pinned versions, invalidation."""

from __future__ import annotations

import pytest

from schemas.secret import Secret, SecretData
from service.core.cache import SecretCache
from service.core.watcher import cache_targets
from tests.fakes import FakeClock

TTL = 300.0


def secret(path: str = "app/db", version: int = 1) -> Secret:
    return Secret(
        path=path,
        version=version,
        data=SecretData({"password": f"v{version}"}),
        created_time="2025-01-01T00:00:00Z",
    )


def put(cache: SecretCache, path: str = "app/db", version: int = 1, **kw: bool) -> Secret:
    s = secret(path, version)
    cache.put(s, f"{path}@{version}".encode(), **kw)
    return s


def cached_version(cache: SecretCache, path: str = "app/db", max_age: float = TTL) -> int | None:
    entry = cache.get(path, None, max_age)
    return None if entry is None else entry.secret.version


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> SecretCache:
    return SecretCache(max_entries=100, ttl=TTL, clock=clock)


def test_a_stored_secret_is_returned_with_its_body(cache: SecretCache) -> None:
    s = put(cache)
    entry = cache.get("app/db", None, TTL)
    assert entry is not None
    assert entry.secret is s
    assert entry.body == b"app/db@1"
    assert len(cache) == 1


def test_an_unknown_path_misses(cache: SecretCache) -> None:
    assert cache.get("app/none", None, TTL) is None
    assert cache.get("app/none", 1, TTL) is None


def test_the_least_recently_stored_entry_is_evicted_past_max_entries(clock: FakeClock) -> None:
    cache = SecretCache(max_entries=2, ttl=TTL, clock=clock)
    put(cache, "a")
    put(cache, "b")
    put(cache, "c")
    assert len(cache) == 2
    assert cached_version(cache, "a") is None
    assert cached_version(cache, "b") == 1
    assert cached_version(cache, "c") == 1
    assert cache.evictions == 1


def test_reading_an_entry_refreshes_it_so_the_next_oldest_is_evicted(clock: FakeClock) -> None:
    cache = SecretCache(max_entries=2, ttl=TTL, clock=clock)
    put(cache, "a")
    put(cache, "b")
    assert cached_version(cache, "a") == 1  # "a" is now the most recently used
    put(cache, "c")
    assert cached_version(cache, "a") == 1
    assert cached_version(cache, "b") is None
    assert cached_version(cache, "c") == 1


def test_pinned_versions_count_towards_max_entries(clock: FakeClock) -> None:
    cache = SecretCache(max_entries=2, ttl=TTL, clock=clock)
    put(cache, "a", 1, pinned=True)
    put(cache, "a", 2, pinned=True)
    put(cache, "a", 3)
    assert len(cache) == 2
    assert cache.get("a", 1, TTL) is None
    assert cache.get("a", 2, TTL) is not None


def test_a_latest_entry_expires_once_it_is_ttl_old(cache: SecretCache, clock: FakeClock) -> None:
    put(cache)
    clock.advance(TTL - 0.001)
    assert cached_version(cache) == 1
    clock.advance(0.001)
    assert cached_version(cache) is None
    assert len(cache) == 0, "an expired entry is dropped, not kept"


def test_a_max_age_shorter_than_the_ttl_bounds_the_age(
    cache: SecretCache, clock: FakeClock
) -> None:
    put(cache)
    clock.advance(4.0)
    assert cached_version(cache, max_age=5.0) == 1
    clock.advance(1.0)
    assert cached_version(cache, max_age=5.0) is None


def test_a_max_age_longer_than_the_ttl_does_not_extend_it(
    cache: SecretCache, clock: FakeClock
) -> None:
    put(cache)
    clock.advance(TTL)
    assert cached_version(cache, max_age=TTL * 10) is None


def test_reading_an_entry_does_not_extend_its_ttl(cache: SecretCache, clock: FakeClock) -> None:
    put(cache)
    clock.advance(TTL / 2)
    assert cached_version(cache) == 1
    clock.advance(TTL / 2)
    assert cached_version(cache) is None


def test_a_pinned_version_older_than_the_ttl_is_not_served(
    cache: SecretCache, clock: FakeClock
) -> None:
    # A version destroyed straight in Vault must not outlive SECRETS_CACHE_TTL in the cache.
    put(cache, version=1, pinned=True)
    clock.advance(TTL - 0.001)
    assert cache.get("app/db", 1, TTL) is not None
    clock.advance(0.001)
    assert cache.get("app/db", 1, TTL) is None
    assert len(cache) == 0, "an expired pinned entry is dropped, not kept"


def test_a_pinned_version_older_than_max_age_is_not_served(
    cache: SecretCache, clock: FakeClock
) -> None:
    # While the bus is down the manager asks for SECRETS_CACHE_FALLBACK_TTL: pinned ones too.
    put(cache, version=1, pinned=True)
    clock.advance(4.0)
    assert cache.get("app/db", 1, max_age=5.0) is not None
    clock.advance(1.0)
    assert cache.get("app/db", 1, max_age=5.0) is None


def test_a_pinned_version_is_separate_from_the_latest_entry(cache: SecretCache) -> None:
    put(cache, version=1, pinned=True)
    assert cached_version(cache) is None
    put(cache, version=2)
    assert cache.get("app/db", 2, TTL) is None
    assert cached_version(cache) == 2


def test_drop_versions_removes_only_the_listed_versions_of_that_path(cache: SecretCache) -> None:
    put(cache, version=1, pinned=True)
    put(cache, version=2, pinned=True)
    put(cache, version=3)
    put(cache, "app/db2", 1, pinned=True)
    cache.drop_versions("app/db", frozenset({1}))
    assert cache.get("app/db", 1, TTL) is None
    assert cache.get("app/db", 2, TTL) is not None
    assert cached_version(cache) == 3
    assert cache.get("app/db2", 1, TTL) is not None


def test_drop_versions_removes_the_latest_entry_when_its_version_is_listed(
    cache: SecretCache,
) -> None:
    put(cache, version=3)
    cache.drop_versions("app/db", frozenset({3}))
    assert cached_version(cache) is None


def test_drop_versions_without_a_list_drops_every_entry_of_the_path_only(
    cache: SecretCache,
) -> None:
    put(cache, version=1, pinned=True)
    put(cache, version=2, pinned=True)
    put(cache, version=2)
    put(cache, "app", 1)
    put(cache, "app/db/x", 1, pinned=True)
    cache.drop_versions("app/db")
    assert cache.get("app/db", 1, TTL) is None
    assert cache.get("app/db", 2, TTL) is None
    assert cached_version(cache) is None
    assert cached_version(cache, "app") == 1
    assert cache.get("app/db/x", 1, TTL) is not None


def test_invalidate_evicts_a_latest_entry_older_than_the_changed_version(
    cache: SecretCache,
) -> None:
    put(cache, version=2)
    assert cache.invalidate("app/db", 3) is True
    assert cached_version(cache) is None


@pytest.mark.parametrize("version", [1, 2])
def test_invalidate_never_evicts_an_entry_as_new_or_newer_than_the_change(
    cache: SecretCache, version: int
) -> None:
    put(cache, version=2)
    assert cache.invalidate("app/db", version) is False
    assert cached_version(cache) == 2


def test_out_of_order_invalidations_cannot_roll_the_cache_back(cache: SecretCache) -> None:
    put(cache, version=3)
    for late in (3, 2, 1):  # events for older versions arriving after the newer one
        cache.invalidate("app/db", late)
    assert cached_version(cache) == 3


def test_invalidate_leaves_pinned_versions_and_other_paths_alone(cache: SecretCache) -> None:
    put(cache, version=1, pinned=True)
    put(cache, version=1)
    put(cache, "app/other", 1)
    cache.invalidate("app/db", 5)
    assert cache.get("app/db", 1, TTL) is not None
    assert cached_version(cache) is None
    assert cached_version(cache, "app/other") == 1


def test_invalidate_of_an_uncached_path_is_a_no_op(cache: SecretCache) -> None:
    assert cache.invalidate("app/none", 1) is False
    assert len(cache) == 0


def test_put_never_replaces_a_newer_latest_with_an_older_one(cache: SecretCache) -> None:
    put(cache, version=3)
    put(cache, version=2)
    assert cached_version(cache) == 3
    put(cache, version=4)
    assert cached_version(cache) == 4


def test_put_of_the_same_version_refreshes_its_age(cache: SecretCache, clock: FakeClock) -> None:
    put(cache, version=1)
    clock.advance(TTL - 1)
    put(cache, version=1)
    clock.advance(2)
    assert cached_version(cache) == 1


@pytest.mark.parametrize(("ttl", "max_entries"), [(0.0, 100), (TTL, 0)])
def test_a_zero_ttl_or_zero_max_entries_disables_caching(
    clock: FakeClock, ttl: float, max_entries: int
) -> None:
    cache = SecretCache(max_entries=max_entries, ttl=ttl, clock=clock)
    put(cache, version=1)
    put(cache, version=1, pinned=True)
    assert len(cache) == 0
    assert cache.get("app/db", None, TTL) is None
    assert cache.get("app/db", 1, TTL) is None


def latest(cache: SecretCache) -> dict[str, int]:
    """path -> the version of its latest-entry, from the poller's snapshot of `cache`."""
    return {path: t.latest for path, t in cache_targets(cache).items() if t.latest}


def held(cache: SecretCache) -> dict[str, set[int]]:
    """path -> every version `cache` holds of it, from the same snapshot."""
    return {path: set(t.held) for path, t in cache_targets(cache).items()}


def test_a_snapshot_names_each_latest_entry_with_its_version(cache: SecretCache) -> None:
    put(cache, "app/a", 3)
    put(cache, "app/b", 1)
    put(cache, "app/c", 7, pinned=True)
    assert latest(cache) == {"app/a": 3, "app/b": 1}


def test_clear_drops_everything_and_counts_the_evictions(cache: SecretCache) -> None:
    put(cache, "app/a", 1)
    put(cache, "app/b", 2, pinned=True)
    before = cache.evictions
    cache.clear()
    assert len(cache) == 0
    assert latest(cache) == {}
    assert cache.get("app/b", 2, TTL) is None
    assert cache.evictions == before + 2


def test_the_cache_drops_a_latest_entry_whatever_its_version_and_lists_what_it_holds() -> None:
    cache = SecretCache()
    for version, pinned in ((3, False), (1, True), (2, True)):
        cache.put(Secret("app/db", version, SecretData({}), "t"), b"{}", pinned=pinned)
    cache.put(Secret("app/other", 1, SecretData({}), "t"), b"{}")
    assert held(cache) == {"app/db": {1, 2, 3}, "app/other": {1}}
    assert cache.drop_latest("app/db") is True
    assert cache.drop_latest("app/db") is False
    assert held(cache) == {"app/db": {1, 2}, "app/other": {1}}

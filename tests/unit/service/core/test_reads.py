"""The manager's reads on the cached-read hot path: `cached_document`, a synchronous lookup that
counts a hit and leaves a miss to the caller's get; the cache holding a secret as its document."""

from __future__ import annotations

from service.core.manager import SecretsManager
from tests.fakes import FakeClock, FakeVault

PATH = "app/db"
CANARY = "canary-5e0b-hot-path"


async def test_cached_document_answers_a_hit_and_counts_it_but_leaves_a_miss_uncounted() -> None:
    vault = FakeVault()
    vault.seed(PATH, {"password": CANARY})
    manager = SecretsManager(vault)
    assert manager.cached_document(PATH) is None
    assert (manager.cache.hits, manager.cache.misses) == (0, 0)  # the caller's get counts it
    secret, body = await manager.get_document(PATH)
    assert manager.cache.misses == 1
    found = manager.cached_document(PATH)
    assert found is not None
    assert found[1] == body and found[0].version == secret.version == 1
    assert (manager.cache.hits, manager.cache.misses) == (1, 1)
    assert vault.calls["read"] == 1


async def test_cached_document_honours_the_ttl_and_the_fallback_ttl_while_the_bus_is_down() -> None:
    clock = FakeClock()
    vault = FakeVault()
    vault.seed(PATH, {"password": CANARY})
    manager = SecretsManager(vault, cache_ttl=300, fallback_ttl=5, clock=clock)
    await manager.get(PATH)
    clock.advance(6)
    assert manager.cached_document(PATH) is not None
    manager.bus_down()
    assert manager.cached_document(PATH) is None  # older than the fallback TTL


async def test_a_hit_returns_the_data_written_though_the_cache_holds_only_the_document() -> None:
    manager = SecretsManager(FakeVault())
    written = await manager.set(PATH, {"password": CANARY, "n": 1}, 0)
    entry = manager.cache.get(PATH, None, 300)
    assert entry is not None and entry.secret.data._data is None
    hit = await manager.get(PATH)
    assert hit.version == written.version and hit.data == {"password": CANARY, "n": 1}
    assert CANARY not in repr(hit)

"""Version history and lifecycle in SecretsManager, against the in-memory Vault: delete,
undelete, destroy, roll back, listing; caches never serve a deleted or destroyed version."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from schemas.errors import InvalidPath, InvalidRequest, NotFound, VersionConflict
from schemas.events import (
    SecretDeleted,
    SecretDestroyed,
    SecretUndeleted,
    SecretUpdated,
)
from schemas.secret import SecretData
from service.core.manager import SecretsManager
from tests.fakes import FakeVault, RecordingSink, lifecycle_event
from tests.support import eventually

PATH = "app/db"
V1, V2, V3 = {"password": "one"}, {"password": "two"}, {"password": "three"}

MakeManager = Callable[..., SecretsManager]


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault()


@pytest.fixture
async def make(vault: FakeVault) -> AsyncIterator[MakeManager]:
    made: list[SecretsManager] = []

    def build(**kwargs: Any) -> SecretsManager:
        manager = SecretsManager(vault, **kwargs)
        made.append(manager)
        return manager

    yield build
    for manager in made:
        await manager.aclose()


def three_versions(vault: FakeVault, path: str = PATH) -> None:
    for data in (V1, V2, V3):
        vault.seed(path, data)


# -- the fake follows KV v2 ------------------------------------------------------------------


async def test_the_fake_vault_hides_deleted_and_destroyed_versions_like_kv_v2(
    vault: FakeVault,
) -> None:
    three_versions(vault)
    await vault.delete_versions(PATH, [3, 9])
    await vault.destroy_versions(PATH, [1])
    with pytest.raises(NotFound):
        await vault.read(PATH)  # the current version is deleted: the path reads as missing
    with pytest.raises(NotFound):
        await vault.read(PATH, 1)
    assert (await vault.read(PATH, 2)).data == V2
    meta = await vault.read_metadata(PATH)
    states = [(v.version, v.deleted, v.destroyed) for v in meta.versions]
    assert states == [(1, False, True), (2, False, False), (3, True, False)]
    assert meta.current_version == 3 and meta.versions[2].deletion_time is not None
    await vault.undelete_versions(PATH, [1, 3])
    assert (await vault.read(PATH)).data == V3
    with pytest.raises(NotFound):
        await vault.read(PATH, 1)  # destroyed stays destroyed
    with pytest.raises(NotFound):
        await vault.read_metadata("app/none")


async def test_the_fake_vault_lists_keys_with_folders_ending_in_a_slash(vault: FakeVault) -> None:
    for path in ("app/db", "app/x/y", "app/x/z", "ops/k"):
        vault.seed(path, V1)
    assert await vault.list_keys("") == ["app/", "ops/"]
    assert await vault.list_keys("app") == ["db", "x/"]
    assert await vault.list_keys("app/x") == ["y", "z"]
    with pytest.raises(NotFound):
        await vault.list_keys("app/db")


# -- versions and list -------------------------------------------------------------------------


async def test_versions_lists_every_version_with_its_state(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    await manager.delete(PATH, [2])
    meta = await manager.versions(PATH)
    assert meta.path == PATH and meta.current_version == 3
    assert [(v.version, v.deleted) for v in meta.versions] == [(1, False), (2, True), (3, False)]
    with pytest.raises(NotFound):
        await manager.versions("app/none")
    with pytest.raises(InvalidPath):
        await manager.versions("app/../x")


async def test_list_keys_checks_the_prefix_and_accepts_the_top(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    vault.seed("app/x/db", V1)
    assert await manager.list_keys() == ["app/"]
    assert await manager.list_keys("app") == ["x/"]
    with pytest.raises(InvalidPath):
        await manager.list_keys("app/")
    assert vault.calls["list_keys"] == 2


# -- delete ------------------------------------------------------------------------------------


async def test_deleting_the_current_version_evicts_it_and_announces_exactly_that_version(
    make: MakeManager, vault: FakeVault
) -> None:
    sink = RecordingSink()
    manager = make(events=sink)
    three_versions(vault)
    assert (await manager.get(PATH)).version == 3  # cached
    assert await manager.delete(PATH, actor="alice") == (3,)
    with pytest.raises(NotFound):
        await manager.get(PATH)
    [event] = sink.events
    assert isinstance(event, SecretDeleted)
    assert (event.path, event.version, event.versions, event.actor) == (PATH, 3, (3,), "alice")
    assert (await manager.get(PATH, 2)).data == V2


async def test_a_deleted_pinned_version_is_never_served_from_the_cache(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    assert (await manager.get(PATH, 1)).data == V1
    reads = vault.calls["read"]
    assert (await manager.get(PATH, 1)).data == V1
    assert vault.calls["read"] == reads  # served from the cache
    await manager.delete(PATH, [1, 1])
    with pytest.raises(NotFound):
        await manager.get(PATH, 1)


async def test_a_read_landing_after_the_delete_does_not_cache_the_deleted_version(
    make: MakeManager,
) -> None:
    slow = FakeVault(delay=0.05)
    manager = SecretsManager(slow)
    try:
        three_versions(slow)
        reading = asyncio.create_task(manager.get(PATH))
        await eventually(lambda: slow.calls["read"] == 1)  # Vault answered version 3 ...
        await manager.delete(PATH)  # ... and it is deleted before the answer lands
        assert (await reading).version == 3  # the caller asked before the delete
        with pytest.raises(NotFound):
            await manager.get(PATH)
    finally:
        await manager.aclose()


async def test_deleting_is_idempotent_and_unknown_versions_are_404(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    assert await manager.delete(PATH, [2]) == (2,)
    assert await manager.delete(PATH, [2]) == (2,)
    with pytest.raises(NotFound, match="no version 4"):
        await manager.delete(PATH, [1, 4])
    with pytest.raises(NotFound):
        await manager.delete("app/none")
    assert (await manager.get(PATH, 1)).data == V1  # the failed request deleted nothing


@pytest.mark.parametrize("versions", [[], [0], [-1], [True], ["1"], "12", list(range(1, 102))])
async def test_bad_version_lists_are_refused_before_vault_is_asked(
    make: MakeManager, vault: FakeVault, versions: Any
) -> None:
    manager = make()
    with pytest.raises(InvalidRequest):
        await manager.delete(PATH, versions)
    with pytest.raises(InvalidRequest):
        await manager.destroy(PATH, versions)
    assert vault.total_calls == 0


# -- undelete and destroy ----------------------------------------------------------------------


async def test_undelete_restores_and_announces(make: MakeManager, vault: FakeVault) -> None:
    sink = RecordingSink()
    manager = make(events=sink)
    three_versions(vault)
    await manager.delete(PATH)
    assert await manager.undelete(PATH, [3], actor="alice") == (3,)
    assert (await manager.get(PATH)).data == V3
    assert [type(e) for e in sink.events] == [SecretDeleted, SecretUndeleted]
    undeleted = sink.events[1]
    assert isinstance(undeleted, SecretUndeleted) and undeleted.versions == (3,)


async def test_destroy_removes_for_good_and_undeleting_a_destroyed_version_is_404(
    make: MakeManager, vault: FakeVault
) -> None:
    sink = RecordingSink()
    manager = make(events=sink)
    three_versions(vault)
    assert (await manager.get(PATH)).version == 3
    assert (await manager.get(PATH, 2)).version == 2
    assert await manager.destroy(PATH, [3, 2]) == (2, 3)
    for version in (None, 2, 3):
        with pytest.raises(NotFound):
            await manager.get(PATH, version)
    with pytest.raises(NotFound, match="destroyed"):
        await manager.undelete(PATH, [2])
    assert isinstance(sink.events[-1], SecretDestroyed)
    assert sink.events[-1].versions == (2, 3)


# -- rollback ----------------------------------------------------------------------------------


async def test_rollback_writes_the_old_data_as_the_next_version_with_cas(
    make: MakeManager, vault: FakeVault
) -> None:
    sink = RecordingSink()
    manager = make(events=sink)
    three_versions(vault)
    secret = await manager.rollback(PATH, 1, 3, actor="alice")
    assert (secret.version, dict(secret.data)) == (4, V1)
    assert (await manager.get(PATH)).data == V1
    assert isinstance(sink.events[-1], SecretUpdated) and sink.events[-1].version == 4
    with pytest.raises(VersionConflict) as conflict:
        await manager.rollback(PATH, 2, 3)
    assert conflict.value.current_version == 4


async def test_rolling_back_to_a_deleted_or_missing_version_is_404(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    await manager.delete(PATH, [1])
    for target in (1, 9):
        with pytest.raises(NotFound):
            await manager.rollback(PATH, target, 3)
    with pytest.raises(InvalidRequest):
        await manager.rollback(PATH, 0, 3)
    assert vault.current(PATH) == 3


# -- changes made elsewhere --------------------------------------------------------------------


async def test_a_remote_delete_evicts_and_tells_listeners_the_value_is_gone(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    await manager.get(PATH)
    await manager.get(PATH, 2)
    heard: list[tuple[str, SecretData | None]] = []
    manager.add_listener("t", lambda p, v: heard.append((p, v)))
    await vault.delete_versions(PATH, [2, 3])  # done by another instance
    event = lifecycle_event(SecretDeleted, 2, 3)
    manager.apply_lifecycle(event)
    manager.apply_lifecycle(event)  # replayed after a reconnect: applied once
    for version in (None, 2):
        with pytest.raises(NotFound):
            await manager.get(PATH, version)
    await eventually(lambda: len(heard) == 1)
    await asyncio.sleep(0.02)
    assert heard == [(PATH, None)]


async def test_a_remote_undelete_lets_the_next_read_refetch_and_notifies_the_value(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    await manager.delete(PATH)
    heard: list[Any] = []
    manager.add_listener("t", lambda p, v: heard.append(None if v is None else v.reveal()))
    await vault.undelete_versions(PATH, [3])
    manager.apply_lifecycle(lifecycle_event(SecretUndeleted, 3))
    assert (await manager.get(PATH)).data == V3
    await eventually(lambda: heard == [V3])


async def test_a_remote_event_without_versions_drops_every_entry_of_the_path(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make()
    three_versions(vault)
    await manager.get(PATH)
    await manager.get(PATH, 1)
    assert len(manager.cache) == 2
    manager.apply_lifecycle(lifecycle_event(SecretDestroyed))
    assert len(manager.cache) == 0


async def test_the_version_check_finds_deletions_made_straight_in_vault(
    make: MakeManager, vault: FakeVault
) -> None:
    sink = RecordingSink()
    manager = make(events=sink)
    three_versions(vault)
    await manager.get(PATH)
    await manager.get(PATH, 1)
    await vault.delete_versions(PATH, [3])
    await vault.destroy_versions(PATH, [1])
    assert await manager.check_versions() == []  # no newer version ...
    lifecycle = [e for e in sink.events if isinstance(e, SecretDeleted | SecretDestroyed)]
    assert lifecycle == sink.events  # ... but two lifecycle changes
    kinds = {type(e): e.versions for e in lifecycle}
    assert kinds == {SecretDeleted: (3,), SecretDestroyed: (1,)}
    assert {e.actor for e in sink.events} == {"vault-direct"}
    for version in (None, 1):
        with pytest.raises(NotFound):
            await manager.get(PATH, version)
    sink.events.clear()
    assert await manager.check_versions() == []
    assert sink.events == []  # nothing cached is gone any more: nothing announced twice


async def test_the_version_check_still_finds_newer_versions(
    make: MakeManager, vault: FakeVault
) -> None:
    manager = make(events=RecordingSink())
    vault.seed(PATH, V1)
    await manager.get(PATH)
    vault.seed(PATH, V2)
    assert await manager.check_versions() == [(PATH, 2)]
    assert (await manager.get(PATH)).data == V2

"""Coherence under forged and lost events, against the in-memory Vault: what a change event claims
is checked against Vault before anything but an eviction happens, and forgeries are counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from schemas.errors import VaultUnavailable
from schemas.events import SecretDestroyed
from service.core.manager import SecretsManager
from tests.fakes import FakeVault
from tests.support import eventually

PATH = "app/db"


Fake = tuple[FakeVault, Callable[[], SecretsManager]]
"""The `fake` fixture: an in-memory Vault, and a builder of managers over it."""


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    vault = FakeVault()
    managers: list[SecretsManager] = []

    def build() -> SecretsManager:
        manager = SecretsManager(vault)
        managers.append(manager)
        return manager

    yield vault, build
    for manager in managers:
        await manager.aclose()


def settled(manager: SecretsManager) -> bool:
    return manager.pending_checks == 0


async def test_a_jump_is_evicted_at_once_and_applied_once_vault_shows_it(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    for n in (1, 2, 3):
        vault.seed(PATH, {"n": n})
    assert (await manager.get(PATH)).version == 3
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    vault.seed(PATH, {"n": 4})  # its event was lost
    vault.seed(PATH, {"n": 5})
    manager.apply_change(PATH, 5)
    assert manager.cached_document(PATH) is None, "not evicted before apply_change returned"
    await eventually(lambda: settled(manager) and heard == [5])
    assert (await manager.get(PATH)).version == 5
    assert manager.events_dropped == {}


async def test_claims_on_one_path_share_one_check(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    for version in range(10, 1010):
        manager.apply_change(PATH, version)
    assert manager.pending_checks == 1
    await eventually(lambda: settled(manager))
    assert vault.calls["current_version"] == 1
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_claims_beyond_the_queue_only_evict_and_are_counted(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    manager.add_listener("l", lambda p, v: None)  # with listeners, every claim is checked
    extra = 300
    for i in range(SecretsManager.VERIFY_QUEUE + extra):
        manager.apply_change(f"app/flood-{i}", 7)
    assert manager.pending_checks == SecretsManager.VERIFY_QUEUE
    assert manager.events_dropped["verify_overflow"] == extra
    await eventually(lambda: settled(manager), timeout=10)
    assert vault.calls["current_version"] == SecretsManager.VERIFY_QUEUE
    assert manager.events_dropped["beyond_vault"] == SecretsManager.VERIFY_QUEUE
    # What is left is what was not checked: unconfirmed, for the first read to judge.
    assert manager._known.keys() == manager._unconfirmed.keys(), "a refuted claim was kept"
    assert len(manager._unconfirmed) == extra


async def test_a_check_vault_does_not_answer_applies_nothing_but_the_eviction(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v))
    vault.fail_next()
    manager.apply_change(PATH, 2)  # the next version, with listeners: checked at once
    await eventually(lambda: settled(manager))
    assert manager.events_dropped == {"unverified": 1}
    reads = vault.calls["read"]
    await manager.get(PATH)  # it meets the claim, still unconfirmed: Vault refutes it
    await manager.get(PATH)
    assert vault.calls["read"] == reads + 1, "the path is no longer cached"
    assert manager.events_dropped == {"unverified": 1, "beyond_vault": 1}
    assert heard == []


async def test_a_listeners_read_confirms_the_next_version_without_a_metadata_read(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v["n"] if v else None))
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    await eventually(lambda: settled(manager) and heard == [2])
    assert vault.calls["current_version"] == 0 and vault.calls["read_metadata"] == 0


async def test_a_forged_destruction_of_versions_vault_has_not_reached_marks_nothing(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    event = SecretDestroyed(
        event_id="e", path=PATH, version=5, versions=(2, 3, 4, 5), actor="m",
        instance_id="forger", time="t",
    )  # fmt: skip
    manager.apply_lifecycle(event)
    await eventually(lambda: settled(manager))
    vault.seed(PATH, {"n": 2})  # version 2 now really exists
    manager.apply_change(PATH, 2)
    await eventually(lambda: settled(manager))
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 2
    assert (await manager.get(PATH)).version == 2
    assert vault.calls["read"] == reads + 1, "version 2 is never cached"
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_a_forged_undelete_does_not_tell_listeners_a_deleted_version_is_back(
    fake: Fake,
) -> None:
    from schemas.events import SecretUndeleted

    vault, build = fake
    manager = build()
    for n in (1, 2):
        vault.seed(PATH, {"n": n})
    await manager.delete(PATH, [2])
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(v))
    event = SecretUndeleted(
        event_id="u", path=PATH, version=2, versions=(2,), actor="m", instance_id="forger",
        time="t",
    )  # fmt: skip
    manager.apply_lifecycle(event)
    await eventually(lambda: settled(manager))
    await asyncio.sleep(0.02)
    assert heard == []
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_forged_lifecycle_claims_on_a_path_cannot_crowd_out_a_real_deletion(
    fake: Fake,
) -> None:
    from schemas.errors import NotFound
    from schemas.events import SecretDeleted

    vault, build = fake
    manager = build()
    for n in (1, 2, 3):
        vault.seed(PATH, {"n": n})
    await manager.get(PATH, 1)
    await manager.get(PATH, 2)
    for i in range(40):
        manager.apply_lifecycle(
            SecretDestroyed(
                event_id=f"forged-{i}",
                path=PATH,
                version=3,
                versions=(1,),
                actor="m",
                instance_id="forger",
                time="t",
            )  # fmt: skip
        )
    await vault.delete_versions(PATH, [2])  # by another instance, which announces it
    manager.apply_lifecycle(
        SecretDeleted(
            event_id="real",
            path=PATH,
            version=3,
            versions=(2,),
            actor="a",
            instance_id="b",
            time="t",
        )  # fmt: skip
    )
    await eventually(lambda: settled(manager))
    assert vault.calls["read_metadata"] == 1, "one check for all the claims on the path"
    assert manager.events_dropped == {"beyond_vault": 1}
    with pytest.raises(NotFound):
        await manager.get(PATH, 2)
    reads = vault.calls["read"]
    await manager.get(PATH, 1)
    await manager.get(PATH, 1)
    assert vault.calls["read"] == reads + 1, "version 1 is still cached after one re-read"


# -- the next version, confirmed lazily: by the first read that needs it -------------------------


async def test_an_event_for_the_next_version_costs_no_vault_call_until_someone_reads(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    calls = vault.total_calls
    vault.seed(PATH, {"n": 2})  # another instance writes, and its event comes
    manager.apply_change(PATH, 2)
    assert manager.cached_document(PATH) is None, "not evicted before apply_change returned"
    await asyncio.sleep(0.02)  # room for any background check to run
    assert manager.pending_checks == 0
    assert manager.unconfirmed_claims == 1  # secrets_events_unconfirmed
    assert vault.total_calls == calls, "the event cost a Vault call by itself"
    assert (await manager.get(PATH)).version == 2
    assert (await manager.get(PATH)).version == 2
    assert manager.unconfirmed_claims == 0
    assert vault.total_calls == calls + 1, "the read confirms it: one read, no metadata read"
    assert vault.calls["current_version"] == 0
    assert manager.events_dropped == {}


async def test_a_forged_next_version_costs_one_metadata_read_when_a_read_meets_it(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    calls = Counter(vault.calls)
    manager.apply_change(PATH, 2)  # forged: Vault holds version 1 only
    await asyncio.sleep(0.02)
    assert vault.calls == calls
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1, current_version=1)
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1, current_version=1), "not cached again"
    assert manager.events_dropped == {"beyond_vault": 1}
    vault.seed(PATH, {"n": 2})  # the real version 2 is still evicted and read
    manager.apply_change(PATH, 2)
    assert (await manager.get(PATH)).data == {"n": 2}
    assert manager.events_dropped == {"beyond_vault": 1}


@pytest.mark.parametrize("known", [True, False], ids=["a-known-path", "a-path-never-read"])
async def test_a_forged_far_version_without_listeners_does_not_stop_caching(
    fake: Fake, known: bool
) -> None:
    # On a path read here it is a jump, checked at once; on one never read here it is
    # recorded unconfirmed, and the first read refutes it. Either way: one metadata read.
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    if known:
        await manager.get(PATH)
    manager.apply_change(PATH, 2**62)
    await eventually(lambda: settled(manager))
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 1
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == reads + 1, "the path is no longer cached"
    assert vault.calls["current_version"] == 1
    assert manager.events_dropped == {"beyond_vault": 1}


async def test_with_listeners_a_forged_next_version_is_never_heard_and_the_real_one_is(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    await manager.set(PATH, {"n": 1}, 0)
    await eventually(lambda: heard == [1])
    manager.apply_change(PATH, 2)  # forged
    await eventually(lambda: settled(manager))
    await asyncio.sleep(0.02)
    assert heard == [1]
    assert manager.events_dropped == {"beyond_vault": 1}
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    await eventually(lambda: heard == [1, 2])


@pytest.mark.parametrize("written", ["elsewhere", "here"])
async def test_a_listener_added_after_a_forged_next_version_still_hears_the_real_one(
    fake: Fake, written: str
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    manager.apply_change(PATH, 2)  # forged, while nobody listens: recorded unconfirmed
    heard: list[Any] = []
    manager.add_listener("l", lambda p, v: heard.append(None if v is None else v["n"]))
    if written == "elsewhere":
        vault.seed(PATH, {"n": 2})  # the real version 2, and its event
        manager.apply_change(PATH, 2)
    else:
        await manager.set(PATH, {"n": 2}, 1)
    await eventually(lambda: settled(manager) and heard == [2])
    assert (await manager.get(PATH)).version == 2


async def test_a_thousand_next_version_events_on_a_thousand_paths_cost_no_vault_call(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    paths = [f"app/svc-{i}/db" for i in range(1000)]
    for path in paths:
        await manager.set(path, {"n": 1}, 0)
    calls = vault.total_calls
    for version in (2, 3):  # two writes elsewhere on each path
        for path in paths:
            vault.seed(path, {"n": version})
            manager.apply_change(path, version)
    await asyncio.sleep(0.05)
    assert manager.pending_checks == 0
    assert vault.total_calls == calls
    assert (await manager.get(paths[7])).version == 3
    assert vault.total_calls == calls + 1
    assert manager.events_dropped == {}


async def test_unconfirmed_versions_are_bounded_and_the_oldest_is_forgotten_at_no_vault_cost(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    manager.UNCONFIRMED_MAX = 10
    for i in range(15):
        manager.apply_change(f"app/p-{i}", 4)  # paths this instance knows nothing of
    assert vault.total_calls == 0
    assert len(manager._unconfirmed) == 10
    assert set(manager._known) == set(manager._unconfirmed), "a forgotten claim was kept"
    vault.seed("app/p-0", {"n": 1})  # forgotten: a read caches what Vault holds
    assert (await manager.get("app/p-0")).version == 1
    assert (await manager.get("app/p-0")).version == 1
    assert vault.total_calls == 1


async def test_a_version_a_write_or_read_shows_confirms_what_events_claimed(fake: Fake) -> None:
    vault, build = fake
    manager = build()
    await manager.set(PATH, {"n": 1}, 0)
    vault.seed(PATH, {"n": 2})
    manager.apply_change(PATH, 2)
    assert PATH in manager._unconfirmed
    await manager.set(PATH, {"n": 3}, 2)  # our own write of a newer version
    assert PATH not in manager._unconfirmed
    vault.seed(PATH, {"n": 4})
    manager.apply_change(PATH, 4)
    assert (await manager.get(PATH)).version == 4
    assert PATH not in manager._unconfirmed
    assert vault.calls["current_version"] == 0


async def test_a_read_whose_check_vault_does_not_answer_is_served_but_not_cached(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH)
    manager.apply_change(PATH, 2)  # forged

    async def unanswered(path: str) -> int:
        raise VaultUnavailable("the secrets backend is unavailable", path=path)

    monkeypatch.setattr(vault, "current_version", unanswered)
    assert (await manager.get(PATH)).version == 1
    assert manager.cached_document(PATH) is None, "cached although the claim stands"
    assert manager.events_dropped == {"unverified": 1}
    monkeypatch.undo()
    reads = vault.calls["read"]
    assert (await manager.get(PATH)).version == 1  # this read's check refutes the claim
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == reads + 1
    assert manager.events_dropped == {"unverified": 1, "beyond_vault": 1}


async def test_the_version_check_judges_an_unconfirmed_version_of_a_path_it_reads_anyway(
    fake: Fake,
) -> None:
    vault, build = fake
    manager = build()
    vault.seed(PATH, {"n": 1})
    await manager.get(PATH, 1)  # a pinned version keeps the path in the version check
    manager.apply_change(PATH, 2)  # forged
    await manager.check_versions()
    assert manager.events_dropped == {"beyond_vault": 1}
    calls = Counter(vault.calls)
    assert (await manager.get(PATH)).version == 1
    assert (await manager.get(PATH)).version == 1
    assert vault.calls - calls == Counter(read=1), "no metadata read: the check settled it"

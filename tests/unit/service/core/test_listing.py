"""`readable_keys`, the walk behind `:list`, against the in-memory Vault: a covering glob decides
at once, the walk stops at the first readable secret, within its budget, fairly, concurrently."""

from __future__ import annotations

import asyncio

import pytest

from schemas.errors import NotFound, VaultUnavailable
from schemas.globs import PathGlob
from service.core.listing import LIST_BUDGET, readable_keys
from service.core.manager import SecretsManager
from tests.fakes import FakeVault


def globs(*patterns: str) -> list[PathGlob]:
    return [PathGlob(p) for p in patterns]


def seeded(*paths: str) -> FakeVault:
    vault = FakeVault()
    for path in paths:
        vault.seed(path, {"note": "x"})
    return vault


class Spy:
    """A lister over a FakeVault that records the folders asked for and the calls in flight."""

    def __init__(self, vault: FakeVault, *, gone: tuple[str, ...] = ()) -> None:
        self.vault = vault
        self.gone = gone
        self.asked: list[str] = []
        self.running = 0
        self.most = 0

    async def __call__(self, prefix: str) -> list[str]:
        self.asked.append(prefix)
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0)  # every call of a batch is in flight before any returns
            if prefix in self.gone:
                raise NotFound("nothing under this prefix", path=prefix)
            return await self.vault.list_keys(prefix)
        finally:
            self.running -= 1


async def test_a_covering_glob_decides_a_folder_without_walking_it() -> None:
    vault = seeded("app/x/a/b/c", "app/y", "ops/z")
    manager = SecretsManager(vault)
    keys = await manager.list_keys("app")
    listing = await readable_keys(manager.list_keys, globs("app/**"), "app", keys)
    assert listing == (["x/", "y"], False, 0)
    assert vault.calls["list_keys"] == 1
    await manager.aclose()


async def test_the_walk_stops_at_the_first_readable_secret_and_skips_hopeless_folders() -> None:
    vault = seeded("x/a/config", "x/b/config", "x/c/d/e", "y/config")
    spy = Spy(vault)
    listing = await readable_keys(spy, globs("x/*/config"), "", ["x/", "y/"], concurrency=1)
    assert listing.keys == ["x/"] and not listing.truncated
    assert spy.asked == ["x", "x/a"]  # y/ and x/c/d could never match; x/b was not needed
    assert listing.calls == 2


async def test_a_folder_with_no_readable_secret_is_hidden_after_its_whole_walk() -> None:
    vault = seeded("c/acme-merger-2027/notes", "c/acme/x/y", "p/2027/q1")
    spy = Spy(vault)
    listing = await readable_keys(spy, globs("**/config"), "", ["c/", "p/"])
    assert listing == ([], False, 6)
    assert sorted(spy.asked) == ["c", "c/acme", "c/acme-merger-2027", "c/acme/x", "p", "p/2027"]


async def test_the_walk_never_spends_more_than_its_budget_and_says_so() -> None:
    paths = [f"wide/f{i:03d}/x" for i in range(30)] + ["wide/zzz/config", "open/config"]
    vault = seeded(*paths)
    for budget in (0, 1, 5, 10, 30):
        vault.calls.clear()
        listing = await readable_keys(
            vault.list_keys, globs("**/config"), "", ["open/", "wide/"], budget=budget
        )
        assert vault.calls["list_keys"] == listing.calls <= budget
        assert listing.truncated and "wide/" not in listing.keys
        assert listing.keys == ([] if budget == 0 else ["open/"])
    listing = await readable_keys(
        vault.list_keys, globs("**/config"), "", ["open/", "wide/"], budget=LIST_BUDGET
    )
    assert listing == (["open/", "wide/"], False, 2 + 31)


async def test_a_wide_folder_cannot_spend_the_budget_before_the_others_had_their_turn() -> None:
    vault = seeded(*(f"a/f{i:02d}/x/y" for i in range(20)), "b/c/config")
    listing = await readable_keys(vault.list_keys, globs("**/config"), "", ["a/", "b/"], budget=6)
    assert listing.keys == ["b/"] and listing.truncated


async def test_a_folder_removed_during_the_walk_is_passed_over() -> None:
    vault = seeded("c/a/config", "c/b/config", "d/e/config")
    spy = Spy(vault, gone=("c/a", "d"))
    listing = await readable_keys(spy, globs("**/config"), "", ["c/", "d/"])
    assert listing == (["c/"], False, 4)


async def test_vault_failing_during_the_walk_fails_the_listing() -> None:
    vault = seeded("c/a/config", "d/b/config")
    vault.fail_next()
    with pytest.raises(VaultUnavailable):
        await readable_keys(vault.list_keys, globs("**/config"), "", ["c/", "d/"])


async def test_the_walk_has_at_most_its_concurrency_of_calls_in_flight() -> None:
    vault = seeded(*(f"w/f{i:02d}/x" for i in range(20)), "w/zz/config")
    spy = Spy(vault)
    listing = await readable_keys(spy, globs("**/config"), "", ["w/"], concurrency=3)
    assert listing.keys == ["w/"]
    assert spy.most == 3
    assert spy.running == 0


async def test_leaves_are_shown_only_if_readable() -> None:
    vault = seeded("p/config", "p/notes")
    listing = await readable_keys(vault.list_keys, globs("**/config"), "p", ["config", "notes"])
    assert listing == (["config"], False, 0)
    assert vault.calls["list_keys"] == 0

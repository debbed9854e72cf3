"""SecretsManager against an in-memory Vault: cache, single-flight, CAS, events, listeners."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest

from schemas.api import WriteRequest, write_request_decoder
from schemas.errors import (
    InvalidPath,
    InvalidRequest,
    InvalidSecret,
    NotFound,
    VaultUnavailable,
    VersionConflict,
    Violation,
)
from schemas.events import SecretCreated, SecretUpdated, event_encoder
from schemas.secret import Secret, SecretData
from service.core.manager import SecretsManager
from service.settings import Settings
from tests.fakes import FakeClock, FakeVault, RecordingSink
from tests.support import eventually

PATH = "app/db"
ONE = {"password": "one"}
TWO = {"password": "two"}
CANARY = "canary-7d1f3a-must-never-be-printed"
TOKEN_CANARY = "hvs.token-canary-0b9e2c"

MakeManager = Callable[..., SecretsManager]


@pytest.fixture
def vault() -> FakeVault:
    return FakeVault()


@pytest.fixture
async def make(vault: FakeVault) -> AsyncIterator[MakeManager]:
    """Build managers on the fake vault; each one's listener tasks are drained afterwards."""
    made: list[SecretsManager] = []

    def build(backend: FakeVault | None = None, **kwargs: Any) -> SecretsManager:
        manager = SecretsManager(backend or vault, **kwargs)
        made.append(manager)
        return manager

    yield build
    for manager in made:
        await manager.aclose()


# -- the fake itself -------------------------------------------------------------------------


async def test_the_fake_vault_numbers_versions_from_one_and_checks_cas() -> None:
    vault = FakeVault()
    first = await vault.write(PATH, ONE, 0)
    second = await vault.write(PATH, TWO, 1)
    assert (first.version, second.version) == (1, 2)
    assert (await vault.read(PATH)).data == TWO
    assert (await vault.read(PATH, 1)).data == ONE
    assert await vault.current_version(PATH) == 2
    assert await vault.current_version("app/none") == 0
    with pytest.raises(VersionConflict) as conflict:
        await vault.write(PATH, ONE, 1)
    assert conflict.value.current_version == 2
    with pytest.raises(NotFound):
        await vault.read(PATH, 3)
    with pytest.raises(NotFound):
        await vault.read("app/none")
    vault.fail_next()
    with pytest.raises(VaultUnavailable):
        await vault.ping()
    await vault.ping()
    assert vault.calls["ping"] == 2


# -- reads -----------------------------------------------------------------------------------


async def test_a_second_get_is_served_from_the_cache(vault: FakeVault, make: MakeManager) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    first = await manager.get(PATH)
    second = await manager.get(PATH)
    assert first.version == second.version == 1
    assert second.data == ONE
    assert vault.calls["read"] == 1


async def test_get_document_returns_the_secret_and_its_json_body(
    vault: FakeVault, make: MakeManager
) -> None:
    created = vault.seed(PATH, ONE)
    manager = make()
    secret, body = await manager.get_document(PATH)
    assert json.loads(body) == {
        "path": PATH,
        "version": 1,
        "data": ONE,
        "created_time": created.created_time,
    }
    assert (await manager.get_document(PATH))[1] == body


async def test_concurrent_misses_for_one_path_make_a_single_vault_read(make: MakeManager) -> None:
    vault = FakeVault(delay=0.05)
    vault.seed(PATH, ONE)
    manager = make(vault)
    results = await asyncio.gather(*(manager.get(PATH) for _ in range(50)))
    assert vault.calls["read"] == 1
    assert {r.version for r in results} == {1}
    assert all(r.data == ONE for r in results)


async def test_concurrent_misses_for_different_paths_read_each_path(make: MakeManager) -> None:
    vault = FakeVault(delay=0.02)
    for path in ("app/a", "app/b", "app/c"):
        vault.seed(path, ONE)
    manager = make(vault)
    await asyncio.gather(*(manager.get(p) for p in ("app/a", "app/b", "app/c") * 5))
    assert vault.calls["read"] == 3


async def test_a_missing_path_raises_not_found_and_is_not_cached(
    vault: FakeVault, make: MakeManager
) -> None:
    manager = make()
    with pytest.raises(NotFound):
        await manager.get(PATH)
    vault.seed(PATH, ONE)
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == 2


async def test_a_failed_shared_read_fails_every_waiter_and_the_next_get_retries(
    make: MakeManager,
) -> None:
    vault = FakeVault(delay=0.02)
    vault.seed(PATH, ONE)
    manager = make(vault)
    vault.fail_next()
    results = await asyncio.gather(*(manager.get(PATH) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, VaultUnavailable) for r in results)
    assert vault.calls["read"] == 1
    assert (await manager.get(PATH)).version == 1
    assert vault.calls["read"] == 2


async def test_cancelling_the_first_reader_does_not_cancel_the_others(make: MakeManager) -> None:
    vault = FakeVault(delay=0.05)
    vault.seed(PATH, ONE)
    manager = make(vault)
    owner = asyncio.create_task(manager.get(PATH))
    await eventually(lambda: vault.calls["read"] == 1)
    joiner = asyncio.create_task(manager.get(PATH))
    await asyncio.sleep(0)  # the joiner now waits on the owner's read
    owner.cancel()
    await asyncio.gather(owner, return_exceptions=True)
    (result,) = await asyncio.gather(joiner, return_exceptions=True)
    assert isinstance(result, Secret), f"the joiner got {result!r}"


async def test_a_change_event_during_a_read_of_an_older_version_makes_it_read_again(
    make: MakeManager,
) -> None:
    vault = FakeVault(delay=0.05)
    vault.seed(PATH, ONE)
    manager = make(vault)
    reader = asyncio.create_task(manager.get(PATH))
    await eventually(lambda: vault.calls["read"] == 1)  # Vault has answered with version 1
    vault.seed(PATH, TWO)
    manager.apply_change(PATH, 2)
    result = await reader
    assert result.version >= 2
    assert result.data == TWO
    assert vault.calls["read"] == 2
    assert (await manager.get(PATH)).version == 2, "the cache keeps the newer version"
    assert vault.calls["read"] == 2


async def test_a_get_started_after_a_change_event_does_not_share_the_older_read(
    make: MakeManager,
) -> None:
    vault = FakeVault(delay=0.05)
    vault.seed(PATH, ONE)
    manager = make(vault)
    early = asyncio.create_task(manager.get(PATH))
    await eventually(lambda: vault.calls["read"] == 1)
    vault.seed(PATH, TWO)
    manager.apply_change(PATH, 2)
    late = await manager.get(PATH)
    assert late.version == 2
    assert (await early).version == 2


async def test_get_of_an_old_version_is_cached_pinned_within_the_ttl(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    vault.seed(PATH, TWO)
    clock = FakeClock()
    manager = make(clock=clock, cache_ttl=300)
    old = await manager.get(PATH, version=1)
    assert old.version == 1
    assert old.data == ONE
    clock.advance(299)
    assert (await manager.get(PATH, version=1)).data == ONE
    assert vault.calls["read"] == 1
    latest = await manager.get(PATH)
    assert latest.version == 2, "a pinned version is not the latest entry"
    assert vault.calls["read"] == 2


async def test_a_pinned_version_older_than_the_ttl_is_read_again_from_vault(
    vault: FakeVault, make: MakeManager
) -> None:
    # The attack: version 1 is destroyed straight in Vault; a cached copy must not be served
    # past SECRETS_CACHE_TTL, however long ago it was pinned.
    vault.seed(PATH, ONE)
    vault.seed(PATH, TWO)
    clock = FakeClock()
    manager = make(clock=clock, cache_ttl=60)
    assert (await manager.get(PATH, version=1)).data == ONE
    await vault.destroy_versions(PATH, [1])
    clock.advance(59)
    assert (await manager.get(PATH, version=1)).data == ONE  # within the bound
    assert vault.calls["read"] == 1
    clock.advance(1)
    with pytest.raises(NotFound):
        await manager.get(PATH, version=1)
    assert vault.calls["read"] == 2


async def test_while_the_bus_is_down_pinned_versions_older_than_fallback_ttl_are_read_again(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    vault.seed(PATH, TWO)
    clock = FakeClock()
    manager = make(clock=clock, fallback_ttl=5.0, cache_ttl=300.0)
    await manager.get(PATH, version=1)
    manager.bus_down()
    await vault.destroy_versions(PATH, [1])
    clock.advance(4.0)
    assert (await manager.get(PATH, version=1)).data == ONE
    assert vault.calls["read"] == 1
    clock.advance(1.0)
    with pytest.raises(NotFound):
        await manager.get(PATH, version=1)
    assert vault.calls["read"] == 2


async def test_get_of_a_version_that_does_not_exist_raises_not_found(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    with pytest.raises(NotFound):
        await manager.get(PATH, version=5)


@pytest.mark.parametrize(
    "path", ["", "/app/db", "app/db/", "app//db", "../app", "app/./db", "app/d b", "app/db:x"]
)
async def test_an_invalid_path_is_refused_before_any_vault_call(
    vault: FakeVault, make: MakeManager, path: str
) -> None:
    manager = make()
    with pytest.raises(InvalidPath):
        await manager.get(path)
    with pytest.raises(InvalidPath):
        await manager.get(path, version=1)
    with pytest.raises(InvalidPath):
        await manager.set(path, ONE, 0)
    assert vault.total_calls == 0


async def test_the_cache_expires_latest_entries_after_the_ttl(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    clock = FakeClock()
    manager = make(clock=clock, cache_ttl=60)
    await manager.get(PATH)
    clock.advance(59)
    await manager.get(PATH)
    assert vault.calls["read"] == 1
    clock.advance(1)
    await manager.get(PATH)
    assert vault.calls["read"] == 2


async def test_a_zero_cache_ttl_reads_vault_every_time(vault: FakeVault, make: MakeManager) -> None:
    vault.seed(PATH, ONE)
    manager = make(cache_ttl=0)
    for _ in range(3):
        assert (await manager.get(PATH)).data == ONE
    assert vault.calls["read"] == 3


# -- writes ----------------------------------------------------------------------------------


async def test_set_refreshes_the_cache_so_the_next_get_needs_no_vault_read(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    assert (await manager.get(PATH)).version == 1
    written = await manager.set(PATH, TWO, 1)
    assert written.version == 2
    got = await manager.get(PATH)
    assert got.version == 2
    assert got.data == TWO
    assert vault.calls["read"] == 1
    assert vault.calls["write"] == 1


async def test_set_with_version_zero_creates_and_a_second_one_conflicts(
    vault: FakeVault, make: MakeManager
) -> None:
    manager = make()
    created = await manager.set(PATH, ONE, 0)
    assert created.version == 1
    with pytest.raises(VersionConflict) as conflict:
        await manager.set(PATH, TWO, 0)
    assert conflict.value.current_version == 1
    assert (await manager.get(PATH)).data == ONE


async def test_set_with_a_stale_version_conflicts_with_the_current_version(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    vault.seed(PATH, TWO)
    manager = make()
    with pytest.raises(VersionConflict) as conflict:
        await manager.set(PATH, {"password": CANARY}, 1)  # the refused value: never echoed
    assert conflict.value.current_version == 2
    assert CANARY not in str(conflict.value)
    assert CANARY not in repr(conflict.value)


async def test_a_write_that_returns_after_a_newer_versions_event_does_not_cache_the_older(
    make: MakeManager,
) -> None:
    vault = FakeVault(write_delay=0.05)
    manager = make(vault)
    writer = asyncio.create_task(manager.set(PATH, ONE, 0))
    await eventually(lambda: vault.current(PATH) == 1)  # committed; the answer is on its way
    vault.seed(PATH, TWO)  # another instance writes version 2 ...
    manager.apply_change(PATH, 2)  # ... and its event overtakes our write's answer
    assert (await writer).version == 1
    latest = await manager.get(PATH)
    assert latest.version == 2
    assert latest.data == TWO


@pytest.mark.parametrize("data", [["password", "x"], "password=x", None, 42, [("k", "v")]])
async def test_set_with_data_that_is_not_a_mapping_is_an_invalid_request(
    vault: FakeVault, make: MakeManager, data: Any
) -> None:
    with pytest.raises(InvalidRequest):
        await make().set(PATH, data, 0)
    assert vault.total_calls == 0


@pytest.mark.parametrize("data", [{1: "x"}, {("a",): "x"}, {"ok": "x", None: "y"}])
async def test_set_with_keys_that_are_not_strings_is_an_invalid_request(
    vault: FakeVault, make: MakeManager, data: Any
) -> None:
    with pytest.raises(InvalidRequest):
        await make().set(PATH, data, 0)
    assert vault.total_calls == 0


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(object(), id="object"),
        pytest.param(1j, id="complex"),
        pytest.param({"a", "b"}, id="set"),
        pytest.param(b"raw", id="bytes"),
    ],
)
async def test_set_with_a_value_json_cannot_hold_is_an_invalid_request(
    vault: FakeVault, make: MakeManager, value: Any
) -> None:
    with pytest.raises(InvalidRequest):
        await make().set(PATH, {"password": value}, 0)
    assert vault.calls["write"] == 0


@pytest.mark.parametrize("version", [-1, True, "1", 1.0, None])
async def test_set_with_a_version_that_is_not_a_non_negative_integer_is_an_invalid_request(
    vault: FakeVault, make: MakeManager, version: Any
) -> None:
    with pytest.raises(InvalidRequest):
        await make().set(PATH, ONE, version)
    assert vault.total_calls == 0


async def test_set_with_empty_data_is_an_invalid_secret(
    vault: FakeVault, make: MakeManager
) -> None:
    with pytest.raises(InvalidSecret) as invalid:
        await make().set(PATH, {}, 0)
    assert Violation("", "not_empty") in invalid.value.violations
    assert vault.total_calls == 0


async def test_a_rejected_value_is_not_named_in_the_error(
    vault: FakeVault, make: MakeManager
) -> None:
    with pytest.raises(InvalidSecret) as invalid:
        await make().set(PATH, {f"bad key {CANARY}": "", "ok": CANARY}, 0)
    shown = str(invalid.value) + repr(invalid.value.violations)
    assert CANARY not in shown


# -- changes made elsewhere ------------------------------------------------------------------


async def test_a_change_event_evicts_an_older_cached_version(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    await manager.get(PATH)
    vault.seed(PATH, TWO)
    manager.apply_change(PATH, 2)
    assert (await manager.get(PATH)).data == TWO
    assert vault.calls["read"] == 2


async def test_a_change_event_for_an_older_or_the_same_version_does_not_evict(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    vault.seed(PATH, TWO)
    manager = make()
    assert (await manager.get(PATH)).version == 2
    manager.apply_change(PATH, 1)
    manager.apply_change(PATH, 2)
    assert (await manager.get(PATH)).version == 2
    assert vault.calls["read"] == 1


async def test_while_the_bus_is_down_entries_older_than_fallback_ttl_miss(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    clock = FakeClock()
    manager = make(clock=clock, fallback_ttl=5.0, cache_ttl=300.0)
    await manager.get(PATH)
    manager.bus_down()
    clock.advance(4.0)
    await manager.get(PATH)
    assert vault.calls["read"] == 1
    clock.advance(1.0)
    await manager.get(PATH)
    assert vault.calls["read"] == 2


async def test_bus_up_without_replay_drops_the_cache(vault: FakeVault, make: MakeManager) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    await manager.get(PATH)
    manager.bus_down()
    manager.bus_up(replayed=False)
    assert len(manager.cache) == 0
    await manager.get(PATH)
    assert vault.calls["read"] == 2


async def test_bus_up_after_a_replay_keeps_the_cache(vault: FakeVault, make: MakeManager) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    await manager.get(PATH)
    manager.bus_down()
    manager.bus_up(replayed=True)
    await manager.get(PATH)
    assert vault.calls["read"] == 1


# -- listeners -------------------------------------------------------------------------------


async def test_sync_and_async_listeners_are_called_with_the_new_value_after_set(
    make: MakeManager,
) -> None:
    manager = make()
    sync_calls: list[tuple[str, Any]] = []
    async_calls: list[tuple[str, Any]] = []

    def on_sync(path: str, value: SecretData | None) -> None:
        sync_calls.append((path, value))

    async def on_async(path: str, value: SecretData | None) -> None:
        async_calls.append((path, value))

    manager.add_listener("sync", on_sync)
    manager.add_listener("async", on_async)
    await manager.set(PATH, ONE, 0)
    await eventually(lambda: bool(sync_calls and async_calls))
    assert sync_calls == [(PATH, ONE)]
    assert async_calls == [(PATH, ONE)]


async def test_a_slow_sync_listener_delays_neither_async_listeners_nor_the_event_loop(
    make: MakeManager,
) -> None:
    manager = make()
    slow_done = threading.Event()
    fast_called_at: list[float] = []
    gaps: list[float] = []
    stop = asyncio.Event()

    def slow(path: str, value: SecretData | None) -> None:
        time.sleep(0.5)
        slow_done.set()

    async def fast(path: str, value: SecretData | None) -> None:
        fast_called_at.append(time.perf_counter())

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    manager.add_listener("slow", slow)
    manager.add_listener("fast", fast)
    ticking = asyncio.create_task(ticker())
    started = time.perf_counter()
    await manager.set(PATH, ONE, 0)
    assert time.perf_counter() - started < 0.3, "set does not wait for listeners"
    await eventually(lambda: bool(fast_called_at))
    assert fast_called_at[0] - started < 0.3
    assert not slow_done.is_set()
    await eventually(slow_done.is_set)
    stop.set()
    await ticking
    assert max(gaps) < 0.3, f"the event loop stalled for {max(gaps):.3f}s"


async def test_a_failing_listener_is_counted_and_the_others_still_run(make: MakeManager) -> None:
    manager = make()
    good: list[str] = []

    def bad_sync(path: str, value: SecretData | None) -> None:
        raise RuntimeError(f"boom {CANARY}")

    async def bad_async(path: str, value: SecretData | None) -> None:
        raise ValueError("boom")

    async def ok(path: str, value: SecretData | None) -> None:
        good.append(path)

    manager.add_listener("bad-sync", bad_sync)
    manager.add_listener("bad-async", bad_async)
    manager.add_listener("ok", ok)
    await manager.set(PATH, ONE, 0)
    await eventually(lambda: manager.listener_errors == 2 and good == [PATH])
    await manager.set(PATH, TWO, 1)
    await eventually(lambda: manager.listener_errors == 4 and good == [PATH, PATH])


async def test_remove_listener_stops_its_calls(make: MakeManager) -> None:
    manager = make()
    removed: list[int] = []
    kept: list[int] = []

    async def gone(path: str, value: SecretData | None) -> None:
        removed.append(1)

    async def sentinel(path: str, value: SecretData | None) -> None:
        kept.append(1)

    manager.add_listener("gone", gone)
    manager.add_listener("sentinel", sentinel)
    await manager.set(PATH, ONE, 0)
    await eventually(lambda: len(kept) == 1)
    manager.remove_listener("gone")
    manager.remove_listener("never-added")
    await manager.set(PATH, TWO, 1)
    await eventually(lambda: len(kept) == 2)
    await manager.aclose()
    assert removed == [1]


async def test_a_remote_change_calls_each_listener_once_with_a_value_read_once(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, ONE)
    manager = make()
    await manager.get(PATH)
    vault.seed(PATH, TWO)
    a_calls: list[Any] = []
    b_calls: list[Any] = []

    async def a(path: str, value: SecretData | None) -> None:
        a_calls.append((path, value))

    def b(path: str, value: SecretData | None) -> None:
        b_calls.append((path, value))

    manager.add_listener("a", a)
    manager.add_listener("b", b)
    manager.apply_change(PATH, 2)
    manager.apply_change(PATH, 2)  # a duplicate delivery
    await eventually(lambda: len(a_calls) == 1 and len(b_calls) == 1)
    manager.apply_change(PATH, 2)  # a replay after the listeners ran
    await manager.aclose()
    assert a_calls == [(PATH, TWO)]
    assert b_calls == [(PATH, TWO)]
    assert vault.calls["read"] == 2, "one read before, one shared by both listeners"


async def test_the_echo_of_an_own_write_does_not_call_listeners_again(make: MakeManager) -> None:
    manager = make()
    calls: list[Any] = []

    async def listener(path: str, value: SecretData | None) -> None:
        calls.append((path, value))

    manager.add_listener("l", listener)
    written = await manager.set(PATH, ONE, 0)
    manager.apply_change(PATH, written.version)  # our own event, back from the bus
    await eventually(lambda: len(calls) == 1)
    await manager.aclose()
    assert calls == [(PATH, ONE)]


async def test_listeners_hear_each_version_once_in_order_when_events_arrive_out_of_order(
    vault: FakeVault, make: MakeManager
) -> None:
    manager = make()
    calls: list[Any] = []

    async def listener(path: str, value: SecretData | None) -> None:
        calls.append(None if value is None else value["n"])

    manager.add_listener("l", listener)
    for n in ("1", "2", "3"):
        vault.seed(PATH, {"n": n})
    manager.apply_change(PATH, 2)  # its read answers version 3, already written
    await eventually(lambda: calls == ["3"])
    manager.apply_change(PATH, 3)  # nothing newer to tell
    manager.apply_change(PATH, 1)  # late, from another instance's route
    vault.seed(PATH, {"n": "4"})
    manager.apply_change(PATH, 4)
    await eventually(lambda: len(calls) >= 2)
    await manager.aclose()
    assert calls == ["3", "4"]


async def test_a_change_to_a_path_that_cannot_be_read_notifies_listeners_with_none(
    vault: FakeVault, make: MakeManager
) -> None:
    # Vault holds version 3, deleted by the time the listeners' read runs.
    for n in range(3):
        vault.seed("app/gone", {"n": n})
    await vault.delete_versions("app/gone", [3])
    manager = make()
    calls: list[Any] = []

    async def listener(path: str, value: SecretData | None) -> None:
        calls.append((path, value))

    manager.add_listener("l", listener)
    manager.apply_change("app/gone", 3)
    await eventually(lambda: bool(calls))
    assert calls == [("app/gone", None)]


# -- events ----------------------------------------------------------------------------------


async def test_writes_publish_created_then_updated_events_without_data(
    make: MakeManager,
) -> None:
    sink = RecordingSink()
    manager = make(events=sink, instance_id="inst-1")
    await manager.set(PATH, {"password": CANARY}, 0, actor="alice")
    await manager.set(PATH, {"password": CANARY + "2"}, 1, actor="bob")
    created, updated = sink.events
    assert type(created) is SecretCreated
    assert (created.path, created.version, created.actor) == (PATH, 1, "alice")
    assert type(updated) is SecretUpdated
    assert (updated.path, updated.version, updated.actor) == (PATH, 2, "bob")
    assert created.event_id != updated.event_id
    for event in sink.events:
        assert event.instance_id == "inst-1"
        assert "data" not in msgspec.structs.asdict(event)
        encoded = event_encoder.encode(event)
        assert CANARY.encode() not in encoded
        document = json.loads(encoded)
        assert "data" not in document
        assert set(document) == {
            "type",
            "event_id",
            "path",
            "version",
            "actor",
            "instance_id",
            "time",
        }


async def test_a_failed_write_publishes_no_event(vault: FakeVault, make: MakeManager) -> None:
    vault.seed(PATH, ONE)
    sink = RecordingSink()
    manager = make(events=sink)
    with pytest.raises(VersionConflict):
        await manager.set(PATH, TWO, 0)
    with pytest.raises(InvalidSecret):
        await manager.set(PATH, {}, 1)
    vault.fail_next()
    with pytest.raises(VaultUnavailable):
        await manager.set(PATH, TWO, 1)
    assert sink.events == []


# -- redaction -------------------------------------------------------------------------------


def _printed(obj: object) -> str:
    return "\n".join([repr(obj), str(obj), f"{obj}", f"{obj!r}", repr([obj]), str({"k": obj})])


async def test_secret_and_secret_data_never_print_their_values(
    vault: FakeVault, make: MakeManager
) -> None:
    vault.seed(PATH, {"password": CANARY})
    secret = await make().get(PATH)
    for obj in (secret, secret.data, SecretData({"password": CANARY})):
        shown = _printed(obj)
        assert CANARY not in shown
        assert "**redacted**" in shown
    assert secret.data["password"] == CANARY, "the value is still there to use"


def test_a_write_request_never_prints_its_data() -> None:
    decoded = write_request_decoder.decode(
        json.dumps({"data": {"password": CANARY}, "version": 1}).encode()
    )
    for request in (WriteRequest(data={"password": CANARY}, version=1), decoded):
        shown = _printed(request)
        assert CANARY not in shown
        assert "version=1" in shown


def test_settings_never_print_the_vault_token_or_approle_secret_id() -> None:
    settings = Settings.from_environ(
        {
            "SECRETS_VAULT_ADDR": "http://127.0.0.1:8200",
            "SECRETS_VAULT_TOKEN": TOKEN_CANARY,
            "SECRETS_VAULT_ROLE_ID": "role",
            "SECRETS_VAULT_SECRET_ID": TOKEN_CANARY + "-secret-id",
            "SECRETS_OIDC_ISSUER": "https://issuer.example",
            "SECRETS_OIDC_AUDIENCE": "secrets",
            "SECRETS_POLICY_FILE": "policy.toml",
        }
    )
    shown = _printed(settings)
    assert TOKEN_CANARY not in shown
    assert "**redacted**" in shown
    assert "http://127.0.0.1:8200" in shown, "the rest is still shown"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_data_cannot_be_pickled(protocol: int) -> None:
    data = SecretData({"password": CANARY})
    secret = Secret(path=PATH, version=1, data=data, created_time="t")
    with pytest.raises(TypeError):
        pickle.dumps(data, protocol=protocol)
    with pytest.raises(TypeError):
        pickle.dumps(secret, protocol=protocol)

"""service/rotation/schedule.py: when a path is due, and the scheduler's scan and attempts against
an in-memory Vault (paths under the scheduled rules, runs left by a dead instance)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from schemas.api import SecretMetadata, VersionMetadata
from service.auth.policy import Policy
from service.core.manager import SecretsManager
from service.core.validation import Validator
from service.rotation.coordinator import Coordinator
from service.rotation.rules import RotationRules
from service.rotation.schedule import Scheduler, next_due
from service.rotation.state import RotationState, Run, StateStore
from tests.fakes import FakeClock, FakeLogins, FakeVault
from tests.support import eventually

POLICY = """
[[rotation.rules]]
paths = ["app/*/key"]
every = "1h"

[[rotation.rules]]
paths = ["manual/*"]
"""
RULES = RotationRules.from_policy(Policy.from_toml(POLICY).raw, Validator())
EVERY, MANUAL = RULES.rules
CREATED = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
OLD = datetime.now(UTC) - timedelta(hours=2)


def meta(*, deleted: bool = False) -> SecretMetadata:
    version = VersionMetadata(version=3, created_time=CREATED.isoformat(), deleted=deleted)
    return SecretMetadata(
        path="app/x/key",
        current_version=3,
        created_time=CREATED.isoformat(),
        updated_time=CREATED.isoformat(),
        versions=(version,),
    )


def test_a_path_is_due_a_period_after_its_current_version_was_written() -> None:
    assert next_due(EVERY, meta(), RotationState()) == CREATED + timedelta(hours=1)


def test_an_on_request_rule_a_stalled_path_and_a_deleted_version_are_never_due() -> None:
    assert next_due(MANUAL, meta(), RotationState()) is None
    assert next_due(EVERY, meta(), RotationState(state="stalled")) is None
    assert next_due(EVERY, meta(deleted=True), RotationState()) is None


def test_after_a_failed_cycle_the_next_waits_for_the_backoff() -> None:
    later = (CREATED + timedelta(hours=5)).timestamp()
    failed = RotationState(state="failed", failures=1, retry_after=later)
    due = next_due(EVERY, meta(), failed)
    assert due is not None and due.timestamp() == later


class World:
    def __init__(self) -> None:
        self.vault = FakeVault()
        self.clock = FakeClock(start=time.time())
        self.manager = SecretsManager(self.vault, instance_id="one")
        self.coordinator = Coordinator(
            self.manager, RULES, postgres=FakeLogins(), clock=self.clock, lease=30.0
        )
        self.scheduler = Scheduler(self.coordinator, scan_interval=30.0, clock=self.clock)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    built = World()
    yield built
    await built.manager.aclose()


async def test_a_scan_finds_the_paths_of_scheduled_rules_only(world: World) -> None:
    world.vault.seed("app/a/key", {"password": "Old-password-1234567"}, at=OLD)
    world.vault.seed("app/b/key", {"password": "Old-password-1234567"})
    world.vault.seed("app/b/other", {"password": "Old-password-1234567"})
    world.vault.seed("manual/x", {"password": "Old-password-1234567"})
    await world.scheduler.scan()
    assert sorted(world.scheduler._due) == ["app/a/key", "app/b/key"]
    assert world.scheduler.overdue == 1  # app/a/key: due an hour ago


async def test_due_paths_are_rotated_and_scheduled_again_a_period_later(world: World) -> None:
    world.vault.seed("app/a/key", {"password": "Old-password-1234567"}, at=OLD)
    await world.scheduler.scan()
    await world.scheduler._attempt("app/a/key")
    assert world.vault.current("app/a/key") == 2
    next_at = world.scheduler._due["app/a/key"]
    assert next_at == pytest.approx(time.time() + 3600, abs=60)


async def test_a_run_left_by_a_dead_instance_is_resumed_once_its_lease_ran_out(
    world: World,
) -> None:
    world.vault.seed("manual/x", {"password": "Old-password-1234567"})
    store = StateStore(world.vault)
    run = Run(
        id="r1",
        owner="dead",
        lease_until=world.clock() + 5,
        base_version=1,
        step="generated",
        pending={"password": "Recorded-Password-123456789"},
    )
    await store.save("manual/x", RotationState(state="running", run=run), 0)
    await world.scheduler.scan()
    assert world.scheduler._due["manual/x"] == run.lease_until
    await world.scheduler._attempt("manual/x")  # still leased: left alone
    assert world.vault.current("manual/x") == 1
    world.clock.advance(6)
    await world.scheduler._attempt("manual/x")
    secret = await world.vault.read("manual/x")
    assert (secret.version, secret.data["password"]) == (2, "Recorded-Password-123456789")
    assert "manual/x" not in world.scheduler._due  # on request only: nothing more to do


async def test_the_loop_outlives_a_coordinator_that_raises_anything(world: World) -> None:
    world.vault.seed("app/a/key", {"password": "Old-password-1234567"}, at=OLD)
    calls = 0

    async def broken(*args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("a defect")

    world.coordinator.rotate = broken  # type: ignore[method-assign]
    world.scheduler.clock = time.time
    world.scheduler.jitter = 0.0
    world.scheduler.scan_interval = 0.2  # a crashed attempt is tried again a scan later
    loop = asyncio.get_running_loop().create_task(world.scheduler.run())
    try:
        await eventually(lambda: calls >= 2 or loop.done(), timeout=5)
        assert not loop.done(), "the scheduler's loop died"
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop

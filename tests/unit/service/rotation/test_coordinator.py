"""The coordinator against an in-memory Vault and database: exactly once, crash resumption at every
step, a human write racing a rotation, failures counted, backed off and stalled, no value leaked."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from schemas.errors import NoRotationRule, RotationFailed, RotationInProgress, VersionConflict
from schemas.events import SecretRotated, SecretRotationFailed
from service.auth.policy import Policy
from service.core.manager import SecretsManager
from service.core.validation import Validator
from service.rotation.coordinator import Coordinator
from service.rotation.postgres import PostgresError
from service.rotation.rules import RotationRules
from service.rotation.state import StateStore
from tests.fakes import FakeClock, FakeLogins, FakeVault, RecordingSink

POLICY = """
[[rotation.rules]]
paths = ["app/*"]
generator = "password"
every = "10s"

[[rotation.rules]]
paths = ["tok/*"]
generator = "token"
fields = ["token", "refresh"]
length = 24

[[rotation.rules]]
paths = ["db/single"]
generator = "postgres"

[[rotation.rules]]
paths = ["db/pair"]
generator = "postgres"
master = "db/admin"
grace = "30s"
every = "1h"
"""
CANARY = "canary-5b0e9d-password-never-shown"
AN_HOUR_AGO = datetime.now(UTC) - timedelta(hours=1)
DB = {"host": "127.0.0.1", "port": 5432, "dbname": "app", "username": "app", "password": CANARY}


class Crash(BaseException):
    """What a kill -9 looks like to the code in flight: nothing after it runs."""


async def _no_sleep(seconds: float) -> None:
    await asyncio.sleep(0)


class World:
    """One Vault, one database, one clock; coordinators (instances) built on them."""

    def __init__(self) -> None:
        self.vault = FakeVault()
        self.logins = FakeLogins()
        self.clock = FakeClock(start=time.time())
        self.events = RecordingSink()
        raw = Policy.from_toml(POLICY).raw
        self.validator = Validator.from_policy(raw)
        self.rules = RotationRules.from_policy(raw, self.validator)
        self.managers: list[SecretsManager] = []

    def instance(self, name: str = "one", **options: Any) -> Coordinator:
        manager = SecretsManager(
            self.vault, instance_id=name, events=self.events, validator=self.validator
        )
        self.managers.append(manager)
        options = {"lease": 30.0, "clock": self.clock, "sleep": _no_sleep, **options}
        return Coordinator(manager, self.rules, postgres=self.logins, **options)

    def crashing(self, at: str, name: str = "doomed") -> Coordinator:
        class Crashing(Coordinator):
            def after_step(self, path: str, step: str) -> None:
                if step == at:
                    raise Crash(step)

        manager = SecretsManager(
            self.vault, instance_id=name, events=self.events, validator=self.validator
        )
        self.managers.append(manager)
        return Crashing(
            manager,
            self.rules,
            postgres=self.logins,
            lease=30.0,
            clock=self.clock,
            sleep=_no_sleep,
        )

    async def state(self, path: str) -> Any:
        return (await StateStore(self.vault).load(path))[0]


@pytest.fixture
async def world() -> AsyncIterator[World]:
    built = World()
    yield built
    for manager in built.managers:
        await manager.aclose()


async def test_a_rotation_writes_one_version_with_the_listed_fields_new_and_the_rest_carried(
    world: World,
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567", "user": "svc"})
    done = await world.instance().rotate("app/api", actor="alice")
    assert done is not None
    assert (done.version, done.previous_version) == (2, 1)
    new = await world.vault.read("app/api")
    assert new.data["user"] == "svc"
    assert new.data["password"] != "Old-password-1234567"
    assert len(new.data["password"]) == 32
    rotated = [e for e in world.events.events if isinstance(e, SecretRotated)]
    assert [(e.version, e.previous_version, e.actor) for e in rotated] == [(2, 1, "alice")]
    state = await world.state("app/api")
    assert (state.state, state.failures, state.last_version, state.run) == ("idle", 0, 2, None)
    assert state.last_rotated is not None


async def test_the_generated_values_do_not_linger_in_the_state_documents_history(
    world: World,
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})
    await world.instance().rotate("app/api", actor="alice")
    meta = await world.vault.read_metadata(".secrets-service/rotation/app/api")
    live = [v.version for v in meta.versions if not v.destroyed]
    assert live == [meta.current_version]


async def test_a_token_rule_regenerates_each_listed_field(world: World) -> None:
    world.vault.seed("tok/ci", {"token": "x" * 40, "refresh": "y" * 40, "scope": "ci"})
    await world.instance().rotate("tok/ci", actor="alice")
    new = await world.vault.read("tok/ci")
    assert new.data["scope"] == "ci"
    assert new.data["token"] != new.data["refresh"]
    assert len(new.data["token"]) == 32  # base64url of 24 bytes


async def test_a_path_without_a_rule_is_refused(world: World) -> None:
    world.vault.seed("other/x", {"password": "Old-password-1234567"})
    with pytest.raises(NoRotationRule):
        await world.instance().rotate("other/x", actor="alice")


async def test_a_stale_version_is_a_conflict_and_nothing_is_written(world: World) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})
    with pytest.raises(VersionConflict) as caught:
        await world.instance().rotate("app/api", actor="alice", version=7)
    assert caught.value.current_version == 1
    assert world.vault.current("app/api") == 1


async def test_instances_racing_for_a_due_rotation_make_exactly_one_version(
    world: World,
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"}, at=AN_HOUR_AGO)
    instances = [world.instance(f"i{n}") for n in range(5)]
    results = await asyncio.gather(
        *(c.rotate("app/api", actor="rotation", trigger="schedule") for c in instances),
        return_exceptions=True,
    )
    assert world.vault.current("app/api") == 2
    assert sum(1 for r in results if r is not None and not isinstance(r, BaseException)) == 1


async def test_a_request_while_another_instance_holds_the_path_is_refused(world: World) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})
    with pytest.raises(Crash):
        await world.crashing("generated").rotate("app/api", actor="alice")
    with pytest.raises(RotationInProgress):
        await world.instance("two").rotate("app/api", actor="bob")


async def test_a_schedule_rotates_only_when_due(world: World) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})
    coordinator = world.instance()
    assert await coordinator.rotate("app/api", actor="rotation", trigger="schedule") is None
    world.clock.advance(11)  # every 10 s
    assert await coordinator.rotate("app/api", actor="rotation", trigger="schedule") is not None


@pytest.mark.parametrize("step", ["claimed", "generated", "written", "finished"])
async def test_a_run_cut_short_at_any_step_is_finished_by_the_next_instance_once(
    world: World, step: str
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567", "user": "svc"})
    with pytest.raises(Crash):
        await world.crashing(step).rotate("app/api", actor="alice")
    recorded = (await world.state("app/api")).run
    world.clock.advance(31)  # the lease ran out
    done = await world.instance("two").rotate("app/api", actor="rotation", trigger="resume")
    assert done is not None
    assert world.vault.current("app/api") == 2
    new = await world.vault.read("app/api")
    assert new.data["user"] == "svc"
    if recorded is not None and recorded.pending is not None:
        assert new.data["password"] == recorded.pending["password"]  # the same values, finished
    assert (await world.state("app/api")).run is None
    assert await world.instance("three").rotate("app/api", actor="r", trigger="resume") is None


@pytest.mark.parametrize("step", ["generated", "applied", "written", "finished"])
async def test_a_postgres_run_cut_short_leaves_the_database_holding_the_latest_version(
    world: World, step: str
) -> None:
    world.vault.seed("db/single", DB)
    world.logins.passwords["app"] = CANARY
    with pytest.raises(Crash):
        await world.crashing(step).rotate("db/single", actor="alice")
    world.clock.advance(31)
    await world.instance("two").rotate("db/single", actor="rotation", trigger="resume")
    latest = await world.vault.read("db/single")
    assert latest.version == 2
    assert world.logins.passwords["app"] == latest.data["password"] != CANARY


async def test_a_human_write_during_a_rotation_wins_and_the_rotation_replans_from_it(
    world: World,
) -> None:
    world.vault.seed("db/single", DB)
    world.logins.passwords["app"] = CANARY
    human = {**DB, "password": "Human-chosen-password-42", "note": "by hand"}

    class Raced(Coordinator):
        def after_step(self, path: str, step: str) -> None:
            if step == "applied" and world.vault.current(path) == 1:
                world.vault.seed(path, human)  # between the database change and the write

    manager = SecretsManager(world.vault, instance_id="one", validator=world.validator)
    world.managers.append(manager)
    coordinator = Raced(manager, world.rules, postgres=world.logins, clock=world.clock)
    done = await coordinator.rotate("db/single", actor="alice")
    assert done is not None
    assert (done.previous_version, done.version) == (2, 3)  # planned again from the human's
    latest = await world.vault.read("db/single")
    assert latest.data["note"] == "by hand"
    assert world.logins.passwords["app"] == latest.data["password"]
    assert "undo" in world.logins.calls
    assert coordinator.rotations["conflict"] == 1


async def test_a_scheduled_rotation_that_loses_to_a_human_write_is_not_redone(
    world: World,
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"}, at=AN_HOUR_AGO)

    class Raced(Coordinator):
        def after_step(self, path: str, step: str) -> None:
            if step == "generated":
                world.vault.seed(path, {"password": "Human-chosen-password-42"})

    manager = SecretsManager(world.vault, instance_id="one", validator=world.validator)
    world.managers.append(manager)
    coordinator = Raced(manager, world.rules, clock=world.clock, sleep=_no_sleep)
    assert await coordinator.rotate("app/api", actor="rotation", trigger="schedule") is None
    assert world.vault.current("app/api") == 2
    assert (await world.vault.read("app/api")).data["password"] == "Human-chosen-password-42"
    assert (await world.state("app/api")).run is None


async def test_alternating_users_switch_role_and_retire_the_previous_one_after_grace(
    world: World,
) -> None:
    world.vault.seed("db/admin", {**DB, "username": "admin", "password": "Admin-pass-1234567"})
    world.vault.seed("db/pair", DB)
    coordinator = world.instance()
    await coordinator.rotate("db/pair", actor="alice")
    first = await world.vault.read("db/pair")
    assert first.data["username"] == "app_clone"
    assert world.logins.retired == {"app": 30.0}
    await coordinator.rotate("db/pair", actor="alice")
    assert (await world.vault.read("db/pair")).data["username"] == "app"
    assert world.logins.retired == {"app": 30.0, "app_clone": 30.0}


async def test_a_database_that_is_down_fails_the_cycle_loudly_and_leaves_the_version(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.vault.seed("db/single", DB)
    world.logins.fail = PostgresError("unreachable", "cannot reach 127.0.0.1:5432")
    coordinator = world.instance()
    with caplog.at_level(logging.INFO), pytest.raises(RotationFailed) as caught:
        await coordinator.rotate("db/single", actor="alice")
    assert caught.value.reason == "postgres_unreachable"
    assert world.logins.calls.count("apply") == 3  # retried within the cycle
    assert world.vault.current("db/single") == 1
    state = await world.state("db/single")
    assert (state.state, state.failures, state.last_error) == ("failed", 1, "postgres_unreachable")
    failed = [e for e in world.events.events if isinstance(e, SecretRotationFailed)]
    assert [(e.error, e.failures, e.state) for e in failed] == [
        ("postgres_unreachable", 1, "failed")
    ]
    assert coordinator.attempt_outcomes["failed"] == 3
    assert coordinator.rotations["failed"] == 1
    assert CANARY not in caplog.text and CANARY not in str(caught.value)


async def test_failed_cycles_stall_the_path_and_a_success_on_request_clears_it(
    world: World,
) -> None:
    world.vault.seed("db/single", DB)
    world.logins.passwords["app"] = CANARY
    world.logins.fail = PostgresError("refused", "refused")
    coordinator = world.instance(stall_after=2)
    for _ in range(2):
        with pytest.raises(RotationFailed):
            await coordinator.rotate("db/single", actor="alice")
    state = await world.state("db/single")
    assert (state.state, state.failures) == ("stalled", 2)
    assert coordinator.rotations["stalled"] == 1
    status = await coordinator.status("db/single")
    assert (status.state, status.next_rotation, status.last_error) == (
        "stalled",
        None,
        "postgres_refused",
    )
    world.logins.fail = None
    await coordinator.rotate("db/single", actor="alice")
    state = await world.state("db/single")
    assert (state.state, state.failures, state.last_error) == ("idle", 0, None)


async def test_a_failed_cycle_backs_off_before_the_schedule_tries_again(world: World) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"}, at=AN_HOUR_AGO)
    coordinator = world.instance(retry_base=30.0)
    coordinator.manager.validator = Validator.from_policy(
        Policy.from_toml("[validation.defaults]\nmax_total_size = 10").raw
    )
    with pytest.raises(RotationFailed) as caught:
        await coordinator.rotate("app/api", actor="rotation", trigger="schedule")
    assert caught.value.reason == "invalid_secret"
    assert await coordinator.rotate("app/api", actor="rotation", trigger="schedule") is None
    world.clock.advance(31)
    with pytest.raises(RotationFailed):
        await coordinator.rotate("app/api", actor="rotation", trigger="schedule")


async def test_the_status_shows_the_next_rotation_from_the_current_versions_time(
    world: World,
) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})
    status = await world.instance().status("app/api")
    created = (await world.vault.read("app/api")).created_time
    assert status.state == "idle" and status.failures == 0 and status.last_rotated is None
    assert status.next_rotation is not None
    expected = datetime.fromisoformat(created) + timedelta(seconds=10)
    assert datetime.fromisoformat(status.next_rotation) == expected


async def test_an_instance_whose_run_was_taken_over_stops_and_says_so(world: World) -> None:
    world.vault.seed("app/api", {"password": "Old-password-1234567"})

    class Slow(Coordinator):
        def after_step(self, path: str, step: str) -> None:
            if step == "generated":  # its lease ran out meanwhile; another instance took over
                doc = f".secrets-service/rotation/{path}"
                world.vault.seed(doc, {"state": "running"})

    manager = SecretsManager(world.vault, instance_id="slow", validator=world.validator)
    world.managers.append(manager)
    slow = Slow(manager, world.rules, clock=world.clock, sleep=_no_sleep)
    with pytest.raises(RotationInProgress):
        await slow.rotate("app/api", actor="alice")
    # Its CAS write of the recorded values (what the taker writes too) may land, once; the
    # record of it cannot: the run is the taker's to finish.
    assert world.vault.current("app/api") <= 2
    assert (await world.state("app/api")).state == "running"


async def test_a_rotation_written_but_not_finished_says_so_and_the_next_attempt_finishes_it(
    world: World,
) -> None:
    world.vault.seed("db/admin", {**DB, "username": "admin", "password": "Admin-pass-1234567"})
    world.vault.seed("db/pair", DB)
    coordinator = world.instance()
    retire = world.logins.finish

    async def down(*args: Any) -> None:
        raise PostgresError("unreachable", "cannot reach 127.0.0.1:5432")

    world.logins.finish = down  # type: ignore[method-assign,assignment]
    with pytest.raises(RotationFailed) as caught:
        await coordinator.rotate("db/pair", actor="alice")
    assert "version 2 was written" in caught.value.detail
    assert world.vault.current("db/pair") == 2
    world.logins.finish = retire  # type: ignore[method-assign]
    done = await coordinator.rotate("db/pair", actor="rotation", trigger="resume")
    assert done is not None and done.version == 2  # finished, not rotated again
    assert world.logins.retired == {"app": 30.0}
    assert (await world.state("db/pair")).state == "idle"

"""The change-request workflow against an in-memory Vault: the rules every caller meets, whatever
instance it reaches (several `Approvals` on one FakeVault stand for several instances)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from schemas.approvals import ApprovalEvent
from schemas.errors import (
    ApprovalRequired,
    ChangeConflict,
    InvalidRequest,
    InvalidSecret,
    NoApprovalRule,
    NotFound,
    SelfApproval,
    VersionConflict,
)
from service.approvals.rules import ApprovalRules
from service.approvals.store import ChangeStore, content_digest
from service.approvals.workflow import Approvals, changed_fields, check_reason
from service.auth.policy import Policy
from service.core.manager import SecretsManager
from service.core.validation import Validator
from tests.fakes import FakeClock, FakeVault

POLICY = """
[[approvals.rules]]
paths = ["prod/**"]
required = 2
expires = "1h"
"""
RULES = ApprovalRules.from_policy(Policy.from_toml(POLICY).raw)
PATH = "prod/db"
CANARY = "canary-1f0a-proposed-value"


class Sink:
    def __init__(self) -> None:
        self.events: list[ApprovalEvent] = []

    def publish_approval(self, event: ApprovalEvent) -> None:
        self.events.append(event)

    def types(self) -> list[str]:
        return [str(e.__struct_config__.tag) for e in self.events]


class World:
    def __init__(self) -> None:
        self.vault = FakeVault()
        self.clock = FakeClock(start=1_800_000_000.0)
        self.sink = Sink()
        self.managers: list[SecretsManager] = []

    def instance(self) -> Approvals:
        manager = SecretsManager(self.vault)
        self.managers.append(manager)
        return Approvals(manager, RULES, events=self.sink, clock=self.clock)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    built = World()
    built.vault.seed(PATH, {"password": "Old-password-1234567", "user": "svc"})
    yield built
    for manager in built.managers:
        await manager.aclose()


async def proposed(approvals: Approvals, **data: Any) -> str:
    request = await approvals.propose(
        PATH, data or {"password": CANARY, "user": "svc"}, 1, "new key", actor="alice"
    )
    return request.id


async def test_a_request_needs_distinct_approvers_then_applies_with_cas(world: World) -> None:
    a, b, c = world.instance(), world.instance(), world.instance()
    change_id = await proposed(a)
    assert (await b.approve(change_id, "bob")).state == "pending"
    assert (await c.approve(change_id, "carol")).state == "approved"
    applied = await a.apply(change_id, "alice")
    assert (applied.state, applied.applied_version) == ("applied", 2)
    assert (await world.vault.read(PATH)).data["password"] == CANARY
    assert world.sink.types() == [
        "change.proposed",
        "change.approved",
        "change.approved",
        "change.applied",
    ]
    assert all(CANARY not in repr(e) for e in world.sink.events)


async def test_the_requester_never_counts_and_an_approver_counts_once(world: World) -> None:
    approvals = world.instance()
    change_id = await proposed(approvals)
    with pytest.raises(SelfApproval):
        await approvals.approve(change_id, "alice")
    for _ in range(3):
        request = await approvals.approve(change_id, "bob")
    assert request.state == "pending" and [a.sub for a in request.counted()] == ["bob"]
    assert world.sink.types() == ["change.proposed", "change.approved"]


async def test_approvals_bind_to_the_content_they_saw(world: World) -> None:
    approvals = world.instance()
    change_id = await proposed(approvals)
    await approvals.approve(change_id, "bob")
    store = ChangeStore(world.vault)
    request, version = await store.load(change_id)
    request.data = {"password": "Something-else-entirely-99"}  # edited behind the workflow
    request.digest = content_digest(PATH, 1, request.data)
    await store.save(request, version)
    assert (await approvals.get(change_id)).counted() == []  # bob approved other content


async def test_a_request_whose_secret_moved_is_stale_and_never_overwrites(world: World) -> None:
    approvals = world.instance()
    change_id = await proposed(approvals)
    await approvals.approve(change_id, "bob")
    await approvals.approve(change_id, "carol")
    world.vault.seed(PATH, {"password": "Newer-written-by-someone-7"})
    with pytest.raises(VersionConflict) as caught:
        await approvals.apply(change_id, "alice")
    assert caught.value.current_version == 2
    assert (await approvals.get(change_id)).state == "stale"
    assert (await world.vault.read(PATH)).data["password"] == "Newer-written-by-someone-7"
    with pytest.raises(ChangeConflict):
        await approvals.apply(change_id, "alice")
    assert world.sink.types()[-1] == "change.stale"


async def test_two_applies_at_once_write_once_and_both_see_it_applied(world: World) -> None:
    a, b = world.instance(), world.instance()
    change_id = await proposed(a)
    await a.approve(change_id, "bob")
    await a.approve(change_id, "carol")
    first, second = await asyncio.gather(a.apply(change_id, "alice"), b.apply(change_id, "bob"))
    assert first.applied_version == second.applied_version == 2
    assert world.vault.current(PATH) == 2
    assert world.sink.types().count("change.applied") == 1


async def test_a_request_past_its_time_expires_once_however_many_instances_sweep(
    world: World,
) -> None:
    a, b = world.instance(), world.instance()
    change_id = await proposed(a)
    world.clock.advance(3601)
    assert await a.sweep() + await b.sweep() == 1
    assert (await b.get(change_id)).state == "expired"
    with pytest.raises(ChangeConflict):
        await b.approve(change_id, "bob")
    with pytest.raises(ChangeConflict):
        await a.apply(change_id, "alice")
    assert world.sink.types() == ["change.proposed", "change.expired"]


async def test_validation_runs_at_proposal_and_again_at_apply(world: World) -> None:
    approvals = world.instance()
    approvals.manager.validator = Validator.from_policy(
        Policy.from_toml("[validation.defaults]\nmax_length = 8\n").raw
    )
    with pytest.raises(InvalidSecret):
        await proposed(approvals)
    approvals.manager.validator = Validator()
    change_id = await proposed(approvals)
    await approvals.approve(change_id, "bob")
    await approvals.approve(change_id, "carol")
    approvals.manager.validator = Validator.from_policy(
        Policy.from_toml("[validation.defaults]\nmax_length = 8\n").raw
    )
    with pytest.raises(InvalidSecret) as caught:
        await approvals.apply(change_id, "alice")
    assert CANARY not in str(caught.value)
    assert (await approvals.get(change_id)).state == "approved"


async def test_proposals_need_a_rule_and_the_current_version(world: World) -> None:
    approvals = world.instance()
    world.vault.seed("dev/db", {"password": "Old-password-1234567"})
    with pytest.raises(NoApprovalRule):
        await approvals.propose("dev/db", {"password": CANARY}, 1, "r", actor="alice")
    with pytest.raises(VersionConflict):
        await approvals.propose(PATH, {"password": CANARY}, 5, "r", actor="alice")
    created = await approvals.propose("prod/new", {"password": CANARY}, 0, "r", actor="alice")
    assert created.fields == ["password"]


async def test_rejected_and_cancelled_requests_are_final(world: World) -> None:
    approvals = world.instance()
    rejected = await proposed(approvals)
    assert (await approvals.reject(rejected, "bob")).decided_by == "bob"
    cancelled = await proposed(approvals)
    assert (await approvals.cancel(cancelled, "alice")).state == "cancelled"
    for change_id in (rejected, cancelled):
        with pytest.raises(ChangeConflict):
            await approvals.approve(change_id, "carol")
        with pytest.raises(ChangeConflict):
            await approvals.cancel(change_id, "alice")


async def test_the_gate_answers_428_unless_a_bypass_with_a_reason(world: World) -> None:
    approvals = world.instance()
    assert approvals.gate("dev/db", may_bypass=False, reason=None) is False
    with pytest.raises(ApprovalRequired):
        approvals.gate(PATH, may_bypass=False, reason="incident")
    with pytest.raises(ApprovalRequired):
        approvals.gate(PATH, may_bypass=True, reason=None)
    assert approvals.gate(PATH, may_bypass=True, reason="incident") is True
    approvals.bypassed(PATH, "write", "root", 2)
    assert world.sink.types() == ["change.bypassed"]


def test_bypass_reasons_are_checked() -> None:
    assert check_reason(None) is None
    assert check_reason("  leaked key  ") == "leaked key"
    for bad in ("", "   ", "x" * 501, "line\nbreak", "bell\x07"):
        with pytest.raises(InvalidRequest):
            check_reason(bad)


def test_changed_fields_name_what_is_added_changed_or_removed() -> None:
    base = {"user": "svc", "password": "a", "port": 5432}
    assert changed_fields(base, {"user": "svc", "password": "b", "host": "db"}) == [
        "host",
        "password",
        "port",
    ]
    assert changed_fields(base, dict(base)) == []


async def test_an_unknown_or_malformed_id_is_not_found_without_asking_vault(world: World) -> None:
    approvals = world.instance()
    calls = world.vault.total_calls
    with pytest.raises(NotFound):
        await approvals.get("../../secret/x")
    assert world.vault.total_calls == calls
    with pytest.raises(NotFound):
        await approvals.get("0" * 32)


async def test_the_stored_request_prints_no_value(world: World) -> None:
    approvals = world.instance()
    change_id = await proposed(approvals)
    request = await approvals.get(change_id)
    assert CANARY not in repr(request) and CANARY not in str(request.view())

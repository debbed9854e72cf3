"""Policy reload (service/http/policy_reload.py): a file that loads replaces roles, validation,
rotation and approval rules at once; one that does not keeps them all, logs one error line and
counts the failure; SIGHUP asks every app of the process to reload."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from service.approvals.rules import ApprovalRules
from service.approvals.workflow import Approvals
from service.auth.policy import READ, WRITE, Policy
from service.core import SecretsManager
from service.http.policy_reload import PolicyReloader, PolicySections, reload_on_sighup
from service.obs.metrics import Metrics
from service.rotation.coordinator import Coordinator
from service.rotation.rules import RotationRules
from tests.fakes import FakeVault
from tests.support import metric_value

FIRST = """
[roles.reader]
read = ["app/**"]
"""
SECOND = """
[roles.reader]
read = ["billing/**"]
[roles.writer]
write = ["billing/**"]

[[validation.rules]]
paths = ["billing/**"]
required = ["password"]

[[rotation.rules]]
paths = ["billing/api/*"]
generator = "password"
fields = ["password"]

[[approvals.rules]]
paths = ["billing/prod/**"]
required = 2
"""


class World:
    """One app's worth of policy holders, on a fake Vault."""

    def __init__(self, tmp_path: Path, text: str = FIRST) -> None:
        self.file = tmp_path / "policy.toml"
        self.file.write_text(text)
        self.sections = PolicySections.load(self.file)
        self.policy = self.sections.policy
        self.manager = SecretsManager(FakeVault(), validator=self.sections.validator)
        self.rotation = Coordinator(self.manager, self.sections.rotation)
        self.approvals = Approvals(self.manager, self.sections.approvals)
        self.metrics = Metrics()
        self.swapped: list[PolicySections] = []
        self.reloader = PolicyReloader(
            self.file,
            self.sections,
            manager=self.manager,
            rotation=self.rotation,
            approvals=self.approvals,
            metrics=self.metrics,
            then=self._then,
        )

    async def _then(self, sections: PolicySections) -> None:
        self.swapped.append(sections)

    def metric(self, name: str) -> float:
        return metric_value(generate_latest(self.metrics.registry).decode(), name)


def reload_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "secrets.policy" and r.levelno >= logging.ERROR]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_reload_replaces_roles_validation_rotation_and_approval_rules_at_once(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    loaded_at = world.metric("secrets_policy_loaded_timestamp_seconds")
    assert loaded_at > 0 and world.metric("secrets_policy_last_reload_successful") == 1
    assert world.policy.allows(["reader"], None, READ, "app/db")
    world.file.write_text(SECOND)

    assert await world.reloader.reload() is True

    policy = world.policy  # the same object every holder keeps
    assert not policy.allows(["reader"], None, READ, "app/db")
    assert policy.allows(["reader"], None, READ, "billing/db")
    assert policy.allows(["writer"], None, WRITE, "billing/db")
    assert world.manager.validator.validate("billing/db", {"user": "x"})  # `password` required
    assert world.rotation.rules.rule_for("billing/api/key") is not None
    assert world.approvals.rules.rule_for("billing/prod/db") is not None
    assert world.swapped and world.swapped[0].policy.role_names == {"reader", "writer"}
    assert world.reloader.reloads == 1 and world.reloader.failures == 0
    assert world.metric("secrets_policy_reload_failures_total") == 0
    assert world.metric("secrets_policy_loaded_timestamp_seconds") >= loaded_at


async def test_validation_failure_counts_carry_over_a_reload(tmp_path: Path) -> None:
    world = World(tmp_path, SECOND)
    world.manager.validator.validate("billing/db", {"user": "x"})
    counted = dict(world.manager.validator.failures)
    assert await world.reloader.reload() is True
    assert world.manager.validator is not world.sections.validator
    assert world.manager.validator.failures == counted


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[roles.reader\nread = 1", "not valid TOML"),
        ('[roles.reader]\nread = ["app/../x"]', "roles.reader.read[0]"),
        ('[roles.reader]\nreed = ["app/**"]', "roles.reader.reed: unknown key"),
        ('[[rotation.rules]]\npaths = ["a/*"]\ngenerator = "nope"', "rotation.rules[0]"),
        ('[[approvals.rules]]\npaths = ["a/**"]\nrequired = 0', "approvals.rules[0]"),
        ("[validation]\nunknown = 1", "validation"),
        ('[auth]\nroles_claim = "groups"', "auth.roles_claim: changed from 'roles' to 'groups'"),
    ],
)
async def test_a_file_that_does_not_load_keeps_everything_logs_one_line_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, problem: str
) -> None:
    world = World(tmp_path, SECOND)
    world.file.write_text(text)
    validator, rules = world.manager.validator, world.rotation.rules
    approvals = world.approvals.rules

    with caplog.at_level(logging.INFO):
        assert await world.reloader.reload() is False

    assert world.policy.allows(["writer"], None, WRITE, "billing/db")
    assert world.manager.validator is validator and world.rotation.rules is rules
    assert world.approvals.rules is approvals
    assert world.swapped == []
    (line,) = [r for r in caplog.records if r.name == "secrets.policy"]
    assert line.levelno == logging.ERROR
    assert line.__dict__["policy_file"] == str(world.file)
    assert problem in line.__dict__["problem"]
    assert world.metric("secrets_policy_reload_failures_total") == 1
    assert world.metric("secrets_policy_last_reload_successful") == 0
    # The next good file is taken, and says so.
    world.file.write_text(FIRST)
    assert await world.reloader.reload() is True
    assert world.metric("secrets_policy_last_reload_successful") == 1
    assert world.policy.allows(["reader"], None, READ, "app/db")


async def test_a_missing_file_keeps_the_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path)
    world.file.unlink()
    assert await world.reloader.reload() is False
    assert world.policy.allows(["reader"], None, READ, "app/db")
    (line,) = reload_errors(caplog)
    assert "cannot read" in line.__dict__["problem"]


async def test_sighup_reloads_every_app_of_the_process_and_is_released_after_the_last(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = World(tmp_path / "a"), World(tmp_path / "b")
    first.file.write_text(SECOND)
    second.file.write_text(SECOND)
    loop = asyncio.get_running_loop()
    with reload_on_sighup(first.reloader):
        with reload_on_sighup(second.reloader):
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: first.reloader.reloads == 1 == second.reloader.reloads)
        assert first.policy.allows(["writer"], None, WRITE, "billing/db")
        assert second.policy.allows(["writer"], None, WRITE, "billing/db")
        first.file.write_text(FIRST)
        os.kill(os.getpid(), signal.SIGHUP)  # the first still listens
        await until(lambda: first.reloader.reloads == 2)
        assert first.policy.allows(["reader"], None, READ, "app/db")
    assert second.reloader.reloads == 1
    assert not loop.remove_signal_handler(signal.SIGHUP)  # none left installed
    await first.reloader.aclose()
    await second.reloader.aclose()


async def test_the_handler_sighup_had_before_is_back_after_the_last_app_stops(
    tmp_path: Path,
) -> None:
    world = World(tmp_path)
    original = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as a worker that is starting
    try:
        with reload_on_sighup(world.reloader):
            assert signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, original)


async def test_signals_before_a_reload_reads_the_file_make_one_reload(tmp_path: Path) -> None:
    world = World(tmp_path)
    for _ in range(5):
        world.reloader.request()
    await until(lambda: world.reloader.reloads == 1)
    await asyncio.sleep(0.05)
    assert world.reloader.reloads == 1
    await world.reloader.aclose()


async def test_a_signal_while_a_reload_runs_makes_one_more_reload_after_it(tmp_path: Path) -> None:
    world = World(tmp_path)

    async def signalled_meanwhile(sections: PolicySections) -> None:
        if world.reloader.reloads == 1:  # the file was read: it may have changed since
            world.reloader.request()

    world.reloader.then = signalled_meanwhile
    world.reloader.request()
    await until(lambda: world.reloader.reloads == 2)
    await asyncio.sleep(0.05)
    assert world.reloader.reloads == 2
    await world.reloader.aclose()


def test_the_sections_of_a_policy_are_checked_together() -> None:
    sections = PolicySections.of(Policy.from_toml(SECOND))
    assert isinstance(sections.rotation, RotationRules) and sections.rotation.rules
    assert isinstance(sections.approvals, ApprovalRules) and sections.approvals.rules

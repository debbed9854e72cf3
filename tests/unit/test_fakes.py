"""tests/fakes.py: each fake offers every member of the protocol it stands in for.

mypy proves the types (tests/fakes.py ends with one typed assignment per fake); this proves the
members and their parameters at run time too, so a protocol that grows fails here under pytest.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from events.bus import ChangeHandler
from events.kv import KvStore
from service.audit.log import AuditPublisher
from service.core import EventSink
from service.rotation.logins import Logins
from service.vault import VaultBackend
from tests.fakes import (
    FakeKeyValue,
    FakeLogins,
    FakePublisher,
    FakeVault,
    RecordingHandler,
    RecordingSink,
    SpyBackend,
)

FAKES = [
    pytest.param(VaultBackend, FakeVault, id="FakeVault"),
    pytest.param(VaultBackend, lambda: SpyBackend(FakeVault()), id="SpyBackend"),
    pytest.param(EventSink, RecordingSink, id="RecordingSink"),
    pytest.param(ChangeHandler, RecordingHandler, id="RecordingHandler"),
    pytest.param(AuditPublisher, FakePublisher, id="FakePublisher"),
    pytest.param(Logins, FakeLogins, id="FakeLogins"),
    pytest.param(KvStore, FakeKeyValue, id="FakeKeyValue"),
]


def members(protocol: type) -> list[str]:
    return [name for name in vars(protocol) if not name.startswith("_")]


def parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
    """Names, kinds and defaults: the types are mypy's to check."""
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize(("protocol", "make"), FAKES)
def test_each_fake_offers_every_member_of_its_protocol_with_the_same_parameters(
    protocol: type, make: Callable[[], object]
) -> None:
    fake = make()
    assert members(protocol), "a protocol without members proves nothing"
    for name in members(protocol):
        expected = vars(protocol)[name]
        assert hasattr(fake, name), f"{type(fake).__name__} has no {name}"
        if isinstance(expected, property):
            continue  # a plain attribute serves a read-only property
        got = getattr(type(fake), name)
        assert parameters(got) == parameters(expected), name
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(expected), name

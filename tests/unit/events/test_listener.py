"""ChangeListener without a server: options refused at construction, iteration before `async
with`, the fallback for unknown event types, and what the events package exports."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

import events
from events.listener import ChangeListener, UnknownChange, decode_change


@pytest.mark.parametrize(
    "options",
    [
        {"start_sequence": 3, "start_time": datetime.now(UTC)},
        {"start_sequence": 3, "deliver_new": True},
        {"start_sequence": 0},
        {"start_time": datetime(2026, 1, 1)},  # naive
        {"pattern": "app/**/**"},
        {"prefix": "bad prefix"},
        {"heartbeat": 0},
    ],
)
def test_invalid_options_are_refused_at_construction(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChangeListener("nats://127.0.0.1:4222", **options)


async def test_iterating_before_entering_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await anext(ChangeListener("nats://127.0.0.1:4222"))


def test_decode_change_falls_back_only_for_unknown_types() -> None:
    assert isinstance(decode_change(b'{"type": "secret.renamed", "path": "a"}'), UnknownChange)
    with pytest.raises(ValueError):  # msgspec.DecodeError is a ValueError
        decode_change(b'{"type": "secret.created", "path": "a"}')
    with pytest.raises(ValueError):
        decode_change(b'{"type": "secret.renamed"}')


def test_events_package_exports_the_client() -> None:
    assert events.__all__ == sorted(events.__all__)
    for name in ["Change", "ChangeListener", "UnknownChange", "decode_change"]:
        assert name in events.__all__ and hasattr(events, name)

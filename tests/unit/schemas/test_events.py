"""schemas/events.py: the tagged change events, their codecs and schema evolution."""

from __future__ import annotations

import msgspec
import pytest

from schemas.events import (
    EVENT_TYPES,
    SecretDeleted,
    SecretDestroyed,
    SecretRotated,
    SecretRotationFailed,
    SecretUndeleted,
    event_decoder,
    event_encoder,
)
from tests.fakes import lifecycle_event


def test_lifecycle_events_round_trip_and_old_payloads_decode_with_no_versions() -> None:
    assert EVENT_TYPES[2:5] == ("secret.deleted", "secret.undeleted", "secret.destroyed")
    for kind in (SecretDeleted, SecretUndeleted, SecretDestroyed):
        event = lifecycle_event(kind, 1, 2)
        assert event_decoder.decode(event_encoder.encode(event)) == event
    bare = (
        b'{"type": "secret.deleted", "event_id": "e", "path": "app/db", "version": 3,'
        b' "actor": "a", "instance_id": "i", "time": "t"}'
    )
    decoded = event_decoder.decode(bare)
    assert isinstance(decoded, SecretDeleted) and decoded.versions == ()
    with pytest.raises(msgspec.ValidationError):
        event_decoder.decode(bare.replace(b'"version": 3', b'"version": 3, "versions": [0]'))


def test_rotation_events_carry_the_versions_and_a_code_never_a_value() -> None:
    assert EVENT_TYPES[-2:] == ("secret.rotated", "secret.rotation_failed")
    rotated = SecretRotated(
        event_id="e",
        path="db/app",
        version=8,
        previous_version=7,
        actor="rotation",
        instance_id="i",
        time="t",
    )
    payload = msgspec.json.decode(event_encoder.encode(rotated))
    assert payload["type"] == "secret.rotated"
    assert (payload["version"], payload["previous_version"]) == (8, 7)
    assert event_decoder.decode(event_encoder.encode(rotated)) == rotated
    failed = SecretRotationFailed(
        event_id="f",
        path="db/app",
        version=7,
        actor="rotation",
        instance_id="i",
        time="t",
        error="postgres_unreachable",
        failures=2,
        state="failed",
    )
    payload = msgspec.json.decode(event_encoder.encode(failed))
    assert set(payload) == {
        "type", "event_id", "path", "version", "actor", "instance_id", "time",
        "error", "failures", "state",
    }  # fmt: skip
    assert event_decoder.decode(event_encoder.encode(failed)) == failed

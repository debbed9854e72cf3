"""schemas/events.py: the tagged change events, their codecs and schema evolution."""

from __future__ import annotations

import msgspec
import pytest

from schemas.events import (
    EVENT_TYPES,
    SecretDeleted,
    SecretDestroyed,
    SecretUndeleted,
    event_decoder,
    event_encoder,
)
from tests.fakes import lifecycle_event


def test_lifecycle_events_round_trip_and_old_payloads_decode_with_no_versions() -> None:
    assert EVENT_TYPES[-3:] == ("secret.deleted", "secret.undeleted", "secret.destroyed")
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

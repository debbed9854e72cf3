"""Change events published on NATS, as tagged msgspec Structs. They never carry secret data.

Every field added later gets a default, so old consumers and old events keep decoding
(msgspec's schema evolution rules).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "ChangeEvent",
    "EVENT_TYPES",
    "LifecycleEvent",
    "NewVersionEvent",
    "SecretCreated",
    "SecretDeleted",
    "SecretDestroyed",
    "SecretRotated",
    "SecretRotationFailed",
    "SecretUndeleted",
    "SecretUpdated",
    "event_decoder",
    "event_encoder",
]


class _Change(msgspec.Struct, frozen=True, tag_field="type", kw_only=True):
    event_id: str
    path: str
    version: Annotated[int, msgspec.Meta(ge=0)]
    actor: str
    instance_id: str
    time: str  # RFC 3339, UTC


class SecretCreated(_Change, tag="secret.created", frozen=True):
    """Version 1 of a path was written (or the first version after the path was emptied)."""


class SecretUpdated(_Change, tag="secret.updated", frozen=True):
    """A new version of an existing path was written."""


class _Lifecycle(_Change, frozen=True, kw_only=True):
    """Versions changed state; `version` is the path's current version at the time."""

    versions: tuple[Annotated[int, msgspec.Meta(ge=1)], ...] = ()  # empty: unknown, assume all


class SecretDeleted(_Lifecycle, tag="secret.deleted", frozen=True):
    """`versions` were soft-deleted: unreadable until undeleted."""


class SecretUndeleted(_Lifecycle, tag="secret.undeleted", frozen=True):
    """Soft-deleted `versions` were restored."""


class SecretDestroyed(_Lifecycle, tag="secret.destroyed", frozen=True):
    """`versions` were destroyed: their data is gone for good."""


class SecretRotated(_Change, tag="secret.rotated", frozen=True):
    """A rotation wrote `version` in place of `previous_version`: switch to `version` now."""

    previous_version: Annotated[int, msgspec.Meta(ge=0)] = 0


class SecretRotationFailed(_Change, tag="secret.rotation_failed", frozen=True):
    """A rotation of `path` failed; `version` is its current version, unchanged.

    `error` is a code (`ROTATION_ERRORS` in service/rotation), never a value; `failures` counts
    the failed cycles in a row; `state` is `failed`, or `stalled` once scheduling gave up.
    """

    error: str = "internal"
    failures: Annotated[int, msgspec.Meta(ge=0)] = 0
    state: str = "failed"


LifecycleEvent = SecretDeleted | SecretUndeleted | SecretDestroyed
NewVersionEvent = SecretCreated | SecretUpdated | SecretRotated
"""Events that announce a new version: caches drop the path, listeners hear the value."""
ChangeEvent = (
    SecretCreated
    | SecretUpdated
    | SecretDeleted
    | SecretUndeleted
    | SecretDestroyed
    | SecretRotated
    | SecretRotationFailed
)
EVENT_TYPES: tuple[str, ...] = (
    "secret.created",
    "secret.updated",
    "secret.deleted",
    "secret.undeleted",
    "secret.destroyed",
    "secret.rotated",
    "secret.rotation_failed",
)

event_encoder = msgspec.json.Encoder()
event_decoder = msgspec.json.Decoder(ChangeEvent)

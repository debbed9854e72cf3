"""`Writes`: what this instance changes in Vault: CAS writes, rollbacks, deletions, undeletions
and destructions; each applied here at once and announced on the bus as an event.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from schemas.api import MAX_VERSIONS_PER_REQUEST, SecretMetadata
from schemas.errors import InvalidRequest, InvalidSecret, NotFound, VersionConflict
from schemas.events import (
    ChangeEvent,
    SecretCreated,
    SecretDeleted,
    SecretDestroyed,
    SecretRotated,
    SecretUndeleted,
    SecretUpdated,
)
from schemas.paths import validate_path
from schemas.secret import Secret
from service.core.coherence import Coherence
from service.core.ledger import VersionLedger
from service.core.listeners import Listeners
from service.core.reads import Reads
from service.core.validation import Validator
from service.vault.protocol import VaultBackend

__all__ = ["EventSink", "Writes"]


class EventSink(Protocol):
    """Where the manager hands the events of its own writes. `publish` must never raise."""

    def publish(self, event: ChangeEvent) -> None: ...


class Writes:
    """Changes made through this instance, and the events that announce them."""

    def __init__(
        self,
        backend: VaultBackend,
        *,
        validator: Validator,
        ledger: VersionLedger,
        reads: Reads,
        listeners: Listeners,
        coherence: Coherence,
        events: EventSink | None,
        instance_id: str,
    ) -> None:
        self.backend = backend
        self.validator = validator
        self.ledger = ledger
        self.reads = reads
        self.listeners = listeners
        self.coherence = coherence
        self.events = events
        self.instance_id = instance_id
        self.cas_conflicts = 0  # a plain int, read by the metrics collector at scrape time

    async def set(
        self,
        path: str,
        data: Mapping[str, Any],
        version: int,
        actor: str,
        *,
        rotation: bool = False,
    ) -> Secret:
        """Write `data` as the next version if the current version is `version` (CAS).

        With `rotation`, the write is announced as `secret.rotated` from `version`.
        """
        validate_path(path)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidRequest("version must be an integer >= 0", path=path)
        violations = self.validator.validate(path, data)
        if violations:
            raise InvalidSecret(violations, path=path)
        try:
            secret = await self.backend.write(path, data, version)
        except VersionConflict:
            self.cas_conflicts += 1
            raise
        newest = self.ledger.advance(path, secret.version)
        self.reads.cache_latest(secret)
        if rotation:
            self.announce_rotation(path, secret.version, version, actor)
        else:
            self.announce(path, secret.version, actor)
        if newest and self.listeners.hear(path, secret.version):
            # If a newer version's event came first, listeners heard of that one instead.
            self.listeners.notify(path, secret.data)
        return secret

    async def rollback(self, path: str, to_version: int, version: int, actor: str) -> Secret:
        """Write version `to_version`'s data as the next version if the current is `version`."""
        validate_path(path)
        if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
            raise InvalidRequest("to_version must be a positive integer", path=path)
        # Straight from Vault: a pinned copy may outlive a deletion made outside the service.
        old = await self.backend.read(path, to_version)
        return await self.set(path, old.data, version, actor)

    async def delete(
        self, path: str, versions: Iterable[int] | None, actor: str
    ) -> tuple[int, ...]:
        """Soft-delete `versions` of `path` (its current version when None); return them."""
        validate_path(path)
        wanted = None if versions is None else _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        # The current version is resolved here rather than by Vault's "delete latest", so the
        # event names the exact version even if a write lands meanwhile.
        targets = (meta.current_version,) if wanted is None else _existing(meta, wanted)
        await self.backend.delete_versions(path, targets)
        self.record_lifecycle(SecretDeleted, path, meta.current_version, targets, actor)
        return targets

    async def undelete(self, path: str, versions: Iterable[int], actor: str) -> tuple[int, ...]:
        """Restore soft-deleted `versions`; return them. NotFound for a destroyed one."""
        validate_path(path)
        wanted = _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        targets = _existing(meta, wanted, restorable=True)
        await self.backend.undelete_versions(path, targets)
        self.record_lifecycle(SecretUndeleted, path, meta.current_version, targets, actor)
        return targets

    async def destroy(self, path: str, versions: Iterable[int], actor: str) -> tuple[int, ...]:
        """Remove the data of `versions` for good; return them."""
        validate_path(path)
        wanted = _version_list(path, versions)
        meta = await self.backend.read_metadata(path)
        targets = _existing(meta, wanted)
        await self.backend.destroy_versions(path, targets)
        self.record_lifecycle(SecretDestroyed, path, meta.current_version, targets, actor)
        return targets

    def announce(self, path: str, version: int, actor: str) -> None:
        """Publish the creation (version 1) or update of `path` to `version`."""
        if self.events is None:
            return
        kind = SecretCreated if version == 1 else SecretUpdated
        self.events.publish(
            kind(
                event_id=uuid.uuid4().hex,
                path=path,
                version=version,
                actor=actor,
                instance_id=self.instance_id,
                time=_now(),
            )
        )

    def announce_rotation(self, path: str, version: int, previous: int, actor: str) -> None:
        """Publish that a rotation replaced `previous` with `version`."""
        if self.events is None:
            return
        self.events.publish(
            SecretRotated(
                event_id=uuid.uuid4().hex,
                path=path,
                version=version,
                previous_version=previous,
                actor=actor,
                instance_id=self.instance_id,
                time=_now(),
            )
        )

    def record_lifecycle(
        self,
        kind: type[SecretDeleted | SecretUndeleted | SecretDestroyed],
        path: str,
        current: int,
        versions: tuple[int, ...],
        actor: str,
    ) -> None:
        """Apply here, then publish, a lifecycle change Vault has made."""
        event = kind(
            event_id=uuid.uuid4().hex,
            path=path,
            version=current,
            versions=versions,
            actor=actor,
            instance_id=self.instance_id,
            time=_now(),
        )
        self.coherence.apply_confirmed_lifecycle(event)
        if self.events is not None:
            self.events.publish(event)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _version_list(path: str, versions: Iterable[int]) -> tuple[int, ...]:
    """`versions` checked (1 to 100 positive integers), sorted and without duplicates."""
    if isinstance(versions, str | bytes):
        raise InvalidRequest("versions must be a list of positive integers", path=path)
    checked = tuple(versions)
    for version in checked:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequest("versions must be positive integers", path=path)
    if not 1 <= len(checked) <= MAX_VERSIONS_PER_REQUEST:
        raise InvalidRequest(
            f"give 1 to {MAX_VERSIONS_PER_REQUEST} versions, not {len(checked)}", path=path
        )
    return tuple(sorted(set(checked)))


def _existing(
    meta: SecretMetadata, versions: tuple[int, ...], *, restorable: bool = False
) -> tuple[int, ...]:
    """`versions`, each known to `meta`, else NotFound (with `restorable`: not destroyed)."""
    path = meta.path
    for version in versions:
        info = meta.version(version)
        if info is None:
            raise NotFound(f"no version {version}", path=path)
        if restorable and info.destroyed:
            raise NotFound(f"version {version} is destroyed: it cannot be undeleted", path=path)
    return versions

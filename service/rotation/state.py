"""The rotation state of a path, kept in Vault beside the secret and only ever written with CAS:
the one record every instance agrees on, and what a crashed run is resumed from.

One KV v2 document per rotated path, at ``.secrets-service/rotation/<path>`` in the service's
mount (a folder no role can be granted, `schemas.paths.RESERVED_FOLDER`). Writing it with CAS on
its own version is the lock: of two instances that read the same version, one write succeeds.
While a run is under way the document holds the values it generated (`Run.pending`), so that
whoever resumes the run applies the same ones; they live in Vault like any version, and the
document's older versions are destroyed once the run ends.
"""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.errors import NotFound, VersionConflict
from schemas.paths import RESERVED_FOLDER
from service.vault.protocol import VaultBackend

__all__ = ["STATES", "STATE_FOLDER", "STEPS", "Run", "RotationState", "StateConflict", "StateStore"]

STATE_FOLDER = f"{RESERVED_FOLDER}/rotation"

STATES = ("idle", "running", "failed", "stalled")
"""`idle`: nothing under way, the last cycle (if any) succeeded. `running`: a run holds the path.
`failed`: the last cycle failed; the schedule tries again after a backoff. `stalled`: the last
`stall_after` cycles failed; the schedule stops trying until a rotation on request succeeds."""

STEPS = ("claimed", "generated", "applied", "written")
"""How far a run got; each is recorded before the next step starts. `applied` is reached only
by generators with an outside system (postgres) once it holds the new login and a login with it
worked; `written`: the new version is in Vault."""


class Run(msgspec.Struct, kw_only=True):
    """A rotation under way: who holds it until when, from which version, and how far it got."""

    id: str
    owner: str  # the instance id holding the lease
    lease_until: float  # epoch seconds; past it, any instance may take the run over
    base_version: int  # the version the rotation started from (its CAS)
    step: str = "claimed"
    trigger: str = "schedule"  # schedule | request
    actor: str = "rotation"
    pending: dict[str, Any] | None = None  # the generated fields: values, never logged
    written_version: int | None = None

    def __repr__(self) -> str:
        pending = None if self.pending is None else sorted(self.pending)
        return (
            f"Run(id={self.id!r}, owner={self.owner!r}, step={self.step!r}, "
            f"base_version={self.base_version}, pending_fields={pending!r})"
        )


class RotationState(msgspec.Struct, kw_only=True):
    state: str = "idle"
    failures: int = 0  # failed cycles in a row
    last_error: str | None = None  # a ROTATION_ERRORS code
    last_rotated: str | None = None  # RFC 3339 UTC
    last_version: int | None = None
    retry_after: float | None = None  # epoch seconds: no scheduled cycle before
    run: Run | None = None


_decode = msgspec.convert
_encode = msgspec.to_builtins


class StateConflict(Exception):
    """Another instance wrote the state document since it was read."""


class StateStore:
    """Reads and CAS-writes rotation state documents through the service's Vault backend."""

    def __init__(self, backend: VaultBackend) -> None:
        self.backend = backend

    @staticmethod
    def doc_path(path: str) -> str:
        return f"{STATE_FOLDER}/{path}"

    async def load(self, path: str) -> tuple[RotationState, int]:
        """The state of `path` and its document's version (0: no document yet, all defaults).

        A document that does not decode (written by hand, or by a later release) reads as the
        defaults at its version, so the next CAS write replaces it.
        """
        try:
            doc = await self.backend.read(self.doc_path(path))
        except NotFound:
            return RotationState(), 0
        try:
            state = _decode(dict(doc.data), RotationState)
        except msgspec.ValidationError:
            state = RotationState()
        return state, doc.version

    async def save(self, path: str, state: RotationState, cas: int) -> int:
        """Write `state` if the document is still at version `cas`; its new version.

        StateConflict if another instance wrote it first.
        """
        try:
            doc = await self.backend.write(self.doc_path(path), _encode(state), cas)
        except VersionConflict:
            raise StateConflict(path) from None
        return doc.version

    async def forget_history(self, path: str, keep: int) -> None:
        """Destroy the document's versions before `keep`: some held a run's generated values."""
        doc = self.doc_path(path)
        try:
            meta = await self.backend.read_metadata(doc)
        except NotFound:
            return
        old = [v.version for v in meta.versions if v.version < keep and not v.destroyed]
        if old:
            await self.backend.destroy_versions(doc, old)

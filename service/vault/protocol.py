"""The seam between the manager and Vault: `VaultBackend` (KV v2 as the manager needs it, errors
from schemas.errors only) and `CallObserver`; HvacBackend and the tests' FakeVault follow it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from schemas.api import SecretMetadata
from schemas.secret import Secret

__all__ = ["CallObserver", "VaultBackend"]

CallObserver = Callable[[str, float, "str | None"], None]
"""Told of each Vault call: op, seconds, and None or the error (timeout, denied, unavailable)."""


class VaultBackend(Protocol):
    """What the manager needs from a KV v2 store. Errors are schemas.errors, nothing else."""

    async def read(self, path: str, version: int | None = None) -> Secret: ...

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        """Write `data` as the next version if the current one is `cas` (0: must not exist)."""
        ...

    async def current_version(self, path: str) -> int:
        """The metadata's current_version; 0 when the path has never been written."""
        ...

    async def read_metadata(self, path: str) -> SecretMetadata:
        """The version history of `path`; NotFound when it has none."""
        ...

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys right under `prefix` (``""``: the top), folders ending in '/'; NotFound if
        there are none."""
        ...

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        """Soft-delete `versions`: unreadable until undeleted. Unknown versions are ignored."""
        ...

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        """Restore soft-deleted `versions`. Destroyed or unknown versions are ignored."""
        ...

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        """Remove the data of `versions` for good. Unknown versions are ignored."""
        ...

    async def ping(self) -> None:
        """Return if Vault answers and accepts our token; raise BackendUnavailable otherwise."""
        ...

    async def aclose(self) -> None: ...

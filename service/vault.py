"""The Vault (or OpenBao) KV v2 backend: hvac calls in worker threads, errors mapped once.

`VaultBackend` is the seam the manager depends on; `HvacBackend` is the real one. No hvac or
requests type leaves this module: every failure becomes one of service.errors.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import anyio
import hvac
import hvac.exceptions as hvac_errors
import requests
from anyio import to_thread

from schemas.api import SecretMetadata, VersionMetadata
from service.errors import (
    NotFound,
    SecretsError,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from service.secret import Secret, SecretData

__all__ = ["CallObserver", "HvacBackend", "VaultBackend", "metadata_from_vault"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")

CallObserver = Callable[[str, float, "str | None"], None]
"""Told of each Vault call: op, seconds, and None or the error (timeout, denied, unavailable)."""


class VaultBackend(Protocol):
    """What the manager needs from a KV v2 store. Errors are service.errors, nothing else."""

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


class HvacBackend:
    """KV v2 through hvac. hvac is synchronous, so each call runs in a bounded thread pool."""

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        mount: str = "secret",
        timeout: float = 5.0,
        concurrency: int = 32,
        observer: CallObserver | None = None,
    ) -> None:
        self.observer = observer
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        self._client = hvac.Client(url=addr, token=token, timeout=timeout, session=session)
        self._session = session
        self._role_id = role_id
        self._secret_id = secret_id
        self._mount = mount
        self._timeout = timeout
        self._limiter = anyio.CapacityLimiter(concurrency)
        # run_sync's own; `_limiter` is taken first, to look at the clock before a thread starts.
        self._workers = anyio.CapacityLimiter(concurrency)
        self._kv = self._client.secrets.kv.v2

    async def login(self) -> None:
        """With AppRole credentials, log in (again); with a token, nothing to do."""
        if self._role_id and self._secret_id:
            await self._call("login", "", self._approle_login)

    def _approle_login(self) -> None:
        self._client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id)

    async def read(self, path: str, version: int | None = None) -> Secret:
        def call() -> Any:
            return self._kv.read_secret_version(
                path, version=version, mount_point=self._mount, raise_on_deleted_version=True
            )

        response = await self._call("read", path, call)
        body = response["data"]
        meta = body["metadata"]
        return Secret(
            path=path,
            version=int(meta["version"]),
            data=SecretData(body["data"] or {}),
            created_time=str(meta["created_time"]),
        )

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        def call() -> Any:
            return self._kv.create_or_update_secret(
                path, secret=dict(data), cas=cas, mount_point=self._mount
            )

        try:
            response = await self._call("write", path, call)
        except _CasMismatch:
            current = await self.current_version(path)
            raise VersionConflict(
                f"the current version is {current}, not {cas}", path=path, current_version=current
            ) from None
        meta = response["data"]
        return Secret(
            path=path,
            version=int(meta["version"]),
            data=SecretData(data),
            created_time=str(meta["created_time"]),
        )

    async def current_version(self, path: str) -> int:
        def call() -> Any:
            return self._kv.read_secret_metadata(path, mount_point=self._mount)

        try:
            response = await self._call("metadata", path, call)
        except NotFound:
            return 0
        return int(response["data"]["current_version"])

    async def read_metadata(self, path: str) -> SecretMetadata:
        def call() -> Any:
            return self._kv.read_secret_metadata(path, mount_point=self._mount)

        return metadata_from_vault(path, (await self._call("metadata", path, call))["data"])

    async def list_keys(self, prefix: str) -> list[str]:
        def call() -> Any:
            return self._kv.list_secrets(prefix, mount_point=self._mount)

        try:
            response = await self._call("list", prefix, call)
        except NotFound:
            raise NotFound("nothing under this prefix", path=prefix) from None
        return [str(key) for key in response["data"]["keys"]]

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> Any:
            return self._kv.delete_secret_versions(
                path, versions=list(versions), mount_point=self._mount
            )

        await self._call("delete", path, call)

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> Any:
            return self._kv.undelete_secret_versions(
                path, versions=list(versions), mount_point=self._mount
            )

        await self._call("undelete", path, call)

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> Any:
            return self._kv.destroy_secret_versions(
                path, versions=list(versions), mount_point=self._mount
            )

        await self._call("destroy", path, call)

    async def ping(self) -> None:
        await self._call("ping", "", self._client.auth.token.lookup_self)

    async def aclose(self) -> None:
        self._session.close()

    async def _call(self, op: str, path: str, fn: Callable[[], T]) -> T:
        try:
            return await self._run(op, path, fn)
        except VaultAccessDenied:
            if not (self._role_id and self._secret_id) or op == "login":
                raise
        # The AppRole token expired or was revoked: log in again once, then retry.
        await self.login()
        return await self._run(op, path, fn)

    async def _run(self, op: str, path: str, fn: Callable[[], T]) -> T:
        """Run one hvac call in a worker thread, with a deadline, and map its errors."""
        started = time.perf_counter()
        error: str | None = None
        budget = self._timeout * 2 + 1
        # A call started later than this would outlive its caller's deadline, as a thread
        # abandoned in the middle of a Vault request.
        start_by = time.monotonic() + budget - self._timeout
        try:
            # The deadline also covers waiting for a free worker while Vault hangs.
            with anyio.fail_after(budget):
                async with self._limiter:
                    if time.monotonic() > start_by:
                        # Waited too long for a slot: Vault is hanging. Starting anyway would
                        # hand each slot, freed by an abandoned call, to the next late caller:
                        # one more abandoned thread (and Vault request) per queued request.
                        raise TimeoutError
                    return await to_thread.run_sync(
                        functools.partial(_mapped, op, path, fn),
                        limiter=self._workers,
                        abandon_on_cancel=True,
                    )
        except TimeoutError:
            error = "timeout"
            log.error("vault call timed out", extra={"op": op, "path": path})
            raise VaultUnavailable("the secrets backend timed out", path=path) from None
        except VaultAccessDenied:
            error = "denied"
            raise
        except VaultUnavailable:
            error = "unavailable"
            raise
        finally:
            if self.observer is not None:
                self.observer(op, time.perf_counter() - started, error)


def metadata_from_vault(
    path: str, data: Mapping[str, Any], now: datetime | None = None
) -> SecretMetadata:
    """A KV v2 metadata answer's ``data`` as a SecretMetadata, versions oldest first."""
    moment = now or datetime.now(UTC)
    versions = []
    for number, entry in sorted(data.get("versions", {}).items(), key=lambda kv: int(kv[0])):
        deletion_time = str(entry.get("deletion_time") or "") or None
        versions.append(
            VersionMetadata(
                version=int(number),
                created_time=str(entry["created_time"]),
                deletion_time=deletion_time,
                deleted=deletion_time is not None and _not_after(deletion_time, moment),
                destroyed=bool(entry.get("destroyed", False)),
            )
        )
    return SecretMetadata(
        path=path,
        current_version=int(data["current_version"]),
        created_time=str(data["created_time"]),
        updated_time=str(data["updated_time"]),
        versions=tuple(versions),
    )


def _not_after(timestamp: str, moment: datetime) -> bool:
    # A deletion time in the future is one scheduled by delete_version_after: not deleted yet.
    try:
        return datetime.fromisoformat(timestamp) <= moment
    except ValueError:
        return True  # unparseable: take Vault's word that it is deleted


def _mapped(op: str, path: str, fn: Callable[[], T]) -> T:
    """The one place hvac and requests errors become service errors."""
    try:
        return fn()
    except hvac_errors.InvalidPath:
        raise NotFound("no secret at this path", path=path) from None
    except hvac_errors.InvalidRequest as exc:
        if "check-and-set" in str(exc):
            raise _CasMismatch() from None
        log.error("vault rejected a request", extra={"op": op, "path": path})
        raise VaultUnavailable("the secrets backend rejected the request", path=path) from None
    except (hvac_errors.Forbidden, hvac_errors.Unauthorized):
        log.error(
            "vault refused the service's token: check SECRETS_VAULT_TOKEN and its policy "
            "(it needs read, create, update on <mount>/data/*, read and list on "
            "<mount>/metadata/*, update on <mount>/delete/*, <mount>/undelete/* and "
            "<mount>/destroy/*)",
            extra={"op": op, "path": path},
        )
        raise VaultAccessDenied("the secrets backend is unavailable", path=path) from None
    except (requests.exceptions.RequestException, hvac_errors.VaultError) as exc:
        log.error(
            "vault unavailable", extra={"op": op, "path": path, "error_type": type(exc).__name__}
        )
        raise VaultUnavailable("the secrets backend is unavailable", path=path) from None


class _CasMismatch(SecretsError):
    """Internal: the CAS check failed; `write` reads the current version and raises 409."""

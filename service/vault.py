"""The Vault (or OpenBao) KV v2 backend: hvac calls in worker threads, errors mapped once.

`VaultBackend` is the seam the manager depends on; `HvacBackend` is the real one. No hvac or
requests type leaves this module: every failure becomes one of service.errors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

import anyio
import hvac
import hvac.exceptions as hvac_errors
import requests
from anyio import to_thread

from service.errors import (
    NotFound,
    SecretsError,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from service.secret import Secret, SecretData

__all__ = ["HvacBackend", "VaultBackend"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")


class VaultBackend(Protocol):
    """What the manager needs from a KV v2 store. Errors are service.errors, nothing else."""

    async def read(self, path: str, version: int | None = None) -> Secret: ...

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        """Write `data` as the next version if the current one is `cas` (0: must not exist)."""
        ...

    async def current_version(self, path: str) -> int:
        """The metadata's current_version; 0 when the path has never been written."""
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
    ) -> None:
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
        try:
            # The deadline also covers waiting for a free worker while Vault hangs.
            with anyio.fail_after(self._timeout * 2 + 1):
                return await to_thread.run_sync(
                    functools.partial(_mapped, op, path, fn),
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
        except TimeoutError:
            log.error("vault call timed out", extra={"op": op, "path": path})
            raise VaultUnavailable("the secrets backend timed out", path=path) from None


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
            "(it needs read, create, update on <mount>/data/* and read on <mount>/metadata/*)",
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

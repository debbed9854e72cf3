"""The Vault (or OpenBao) KV v2 backend: aiohttp on the event loop for the calls on a request's
path, hvac in worker threads for the rest.

`VaultBackend` is the seam the manager depends on; `HvacBackend` is the real one. A secret's
read, its check-and-set write and its metadata go over one `aiohttp.ClientSession` (keep-alive
HTTP/1.1, a bounded pool, interim 1xx answers skipped, proxies from the environment); logins,
listings and the lifecycle calls go through hvac, which is synchronous, in a bounded thread pool.
Every answer is checked against the shape its call expects (msgspec Structs). No hvac, requests,
aiohttp or HTTP type leaves this module: every failure becomes one of schemas.errors, mapped in
one place (`_mapped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import anyio
import hvac
import hvac.exceptions as hvac_errors
import msgspec
import requests
from aiohttp.helpers import get_env_proxy_for_url
from anyio import to_thread
from yarl import URL

from schemas.api import SecretMetadata, VersionMetadata, VersionNumber
from schemas.errors import (
    ConfigError,
    NotFound,
    SecretsError,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from schemas.secret import Secret, SecretData

__all__ = ["MAX_ANSWER", "CallObserver", "HvacBackend", "VaultBackend", "metadata_from_vault"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")

CallObserver = Callable[[str, float, "str | None"], None]
"""Told of each Vault call: op, seconds, and None or the error (timeout, denied, unavailable)."""

MAX_ANSWER = 1024 * 1024
"""Bytes: the largest answer read from Vault; a longer one is refused (503), not buffered."""


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


# -- the answers expected, as Vault's KV v2 and auth APIs give them ----------------------------


class _VersionStamp(msgspec.Struct):
    version: VersionNumber
    created_time: str


class _ReadData(msgspec.Struct):
    data: dict[str, Any] | None  # null when the version was deleted (Vault then says 404)
    metadata: _VersionStamp


class _ReadAnswer(msgspec.Struct):
    data: _ReadData


class _WriteAnswer(msgspec.Struct):
    data: _VersionStamp


class _VersionEntry(msgspec.Struct):
    created_time: str
    deletion_time: str = ""
    destroyed: bool = False


class _Metadata(msgspec.Struct):
    current_version: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    created_time: str
    updated_time: str
    versions: dict[VersionNumber, _VersionEntry] = {}


class _MetadataAnswer(msgspec.Struct):
    data: _Metadata


class _Keys(msgspec.Struct):
    keys: list[str]


class _ListAnswer(msgspec.Struct):
    data: _Keys


class _Auth(msgspec.Struct):
    client_token: Annotated[str, msgspec.Meta(min_length=1)]
    lease_duration: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: never expires


class _LoginAnswer(msgspec.Struct):
    auth: _Auth


class _LookupAnswer(msgspec.Struct):
    data: dict[str, Any]


class _ErrorAnswer(msgspec.Struct):
    errors: list[str] = []


_read_answer = msgspec.json.Decoder(_ReadAnswer)
_write_answer = msgspec.json.Decoder(_WriteAnswer)
_metadata_answer = msgspec.json.Decoder(_MetadataAnswer)
_error_answer = msgspec.json.Decoder(_ErrorAnswer)
_encode = msgspec.json.Encoder().encode


class HvacBackend:
    """KV v2: reads, CAS writes and metadata over aiohttp, the rest through hvac in a bounded
    thread pool. One token (hvac's, replaced by an AppRole login when it is gone) serves both.

    `relogin_interval`: with AppRole, the least time between two checks of a refused token
    (and so between two logins after the first); concurrent callers share the one check.
    """

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
        relogin_interval: float = 10.0,
        max_answer: int = MAX_ANSWER,
    ) -> None:
        self.observer = observer
        addr = addr.rstrip("/")
        # The CA bundle requests would use, named once for both clients so they cannot differ.
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or requests.utils.DEFAULT_CA_BUNDLE_PATH
        self._tls: ssl.SSLContext | None = None
        if addr.startswith("https://"):
            try:
                self._tls = ssl.create_default_context(cafile=ca_bundle)
            except (OSError, ssl.SSLError):
                raise ConfigError("REQUESTS_CA_BUNDLE", "not a readable PEM CA bundle") from None
        session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        # No redirects: a standby's (or a proxy's) 307 would carry the token to another host.
        self._client = hvac.Client(
            url=addr,
            token=token,
            timeout=timeout,
            session=session,
            verify=ca_bundle,
            allow_redirects=False,
        )
        self._requests = session
        self._approle = (role_id, secret_id) if role_id and secret_id else None
        self._mount = mount
        self._timeout = timeout
        self._concurrency = concurrency
        self._max_answer = max_answer
        # The proxy the environment names for Vault (HTTPS_PROXY or HTTP_PROXY, unless NO_PROXY
        # covers it), as requests (hvac) and aiohttp's trust_env read it: read once here, not
        # per request as trust_env does (two thread hops and a ~/.netrc read every call).
        self._proxy: URL | None = None
        self._proxy_auth: aiohttp.BasicAuth | None = None
        with contextlib.suppress(LookupError):
            self._proxy, self._proxy_auth = get_env_proxy_for_url(URL(addr))
        self._data_url = f"{addr}/v1/{quote(mount)}/data/"
        self._metadata_url = f"{addr}/v1/{quote(mount)}/metadata/"
        self._limiter = anyio.CapacityLimiter(concurrency)
        # run_sync's own; `_limiter` is taken first, to look at the clock before a thread starts.
        self._workers = anyio.CapacityLimiter(concurrency)
        self._kv = self._client.secrets.kv.v2
        self._http: aiohttp.ClientSession | None = None  # made on the running loop, when needed
        self._closed = False
        self._relogin_interval = relogin_interval
        self._relogin_lock = asyncio.Lock()
        self._next_token_check = 0.0  # monotonic
        self._token_expires = math.inf  # monotonic; the AppRole login's lease end

    async def login(self) -> None:
        """With AppRole credentials, log in (again); with a token, nothing to do."""
        if self._approle is None:
            return
        started = time.monotonic()
        lease = await self._call("login", "", self._threaded("login", "", self._approle_login))
        self._token_expires = started + lease if lease else math.inf

    def _approle_login(self) -> int:
        assert self._approle is not None
        role_id, secret_id = self._approle
        answer = self._client.auth.approle.login(
            role_id=role_id, secret_id=secret_id, use_token=False
        )
        auth = msgspec.convert(answer, _LoginAnswer).auth
        self._client.token = auth.client_token
        return auth.lease_duration

    async def read(self, path: str, version: int | None = None) -> Secret:
        url = self._data_url + quote(path)
        if version is not None:
            url += f"?version={int(version)}"

        def check(answer: _ReadAnswer) -> None:
            if version is not None and answer.data.metadata.version != version:
                raise _Malformed("another version than the one asked for")

        found = (await self._fetch("read", path, "GET", url, _read_answer, check=check)).data
        return Secret(
            path=path,
            version=found.metadata.version,
            data=SecretData(found.data or {}),
            created_time=found.metadata.created_time,
        )

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        payload = _encode({"options": {"cas": cas}, "data": dict(data)})  # SecretData too
        try:
            stamp = (
                await self._fetch(
                    "write", path, "POST", self._data_url + quote(path), _write_answer, payload
                )
            ).data
        except _CasMismatch:
            current = await self.current_version(path)
            raise VersionConflict(
                f"the current version is {current}, not {cas}", path=path, current_version=current
            ) from None
        return Secret(
            path=path, version=stamp.version, data=SecretData(data), created_time=stamp.created_time
        )

    async def current_version(self, path: str) -> int:
        try:
            return (await self._metadata(path)).current_version
        except NotFound:
            return 0

    async def read_metadata(self, path: str) -> SecretMetadata:
        return _secret_metadata(path, await self._metadata(path))

    async def _metadata(self, path: str) -> _Metadata:
        url = self._metadata_url + quote(path)
        return (await self._fetch("metadata", path, "GET", url, _metadata_answer)).data

    async def list_keys(self, prefix: str) -> list[str]:
        def call() -> list[str]:
            answer = self._kv.list_secrets(prefix, mount_point=self._mount)
            return msgspec.convert(answer, _ListAnswer).data.keys

        try:
            return await self._call("list", prefix, self._threaded("list", prefix, call))
        except NotFound:
            raise NotFound("nothing under this prefix", path=prefix) from None

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            _done(
                self._kv.delete_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("delete", path, self._threaded("delete", path, call))

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            _done(
                self._kv.undelete_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("undelete", path, self._threaded("undelete", path, call))

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            _done(
                self._kv.destroy_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("destroy", path, self._threaded("destroy", path, call))

    async def ping(self) -> None:
        await self._call("ping", "", self._threaded("ping", "", self._lookup_self))

    def _lookup_self(self) -> None:
        msgspec.convert(self._client.auth.token.lookup_self(), _LookupAnswer)

    async def aclose(self) -> None:
        self._closed = True
        http, self._http = self._http, None
        if http is not None:
            await http.close()
        self._requests.close()

    # -- HTTP on the event loop ----------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        http = self._http
        if http is None:
            if self._closed:
                raise VaultUnavailable("the secrets backend client is closed")
            limit = self._timeout
            http = self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._concurrency,
                    ssl=self._tls if self._tls is not None else True,
                    # Idle connections go well before Vault's own idle close (5 minutes), so a
                    # write, never sent twice, seldom meets a connection closed under it.
                    keepalive_timeout=15.0,
                ),
                timeout=aiohttp.ClientTimeout(total=limit, connect=limit, sock_read=limit),
                # Vault sends JSON as is; a compressed answer is refused, never inflated.
                auto_decompress=False,
                headers={"X-Vault-Request": "true", "Accept-Encoding": "identity"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return http

    async def _exchange(self, method: str, url: str, body: bytes | None) -> tuple[int, bytes]:
        """One request, its answer's status and whole body (at most `max_answer` bytes).

        aiohttp skips interim 1xx answers, never reuses a connection left with unread bytes,
        and sends a GET once more when its connection turns out closed before any answer (a
        kept-alive one the server closed meanwhile); never a POST: a write replayed after it
        landed would be refused by its own CAS check, and the caller told 409 for its success."""
        headers = {}
        token = self._client.token
        if token:
            headers["X-Vault-Token"] = token
        if body is not None:
            headers["Content-Type"] = "application/json"
        async with self._session().request(
            method,
            URL(url, encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,
            proxy=self._proxy,
            proxy_auth=self._proxy_auth,
        ) as response:
            length = response.content_length
            if length is not None:
                if length > self._max_answer:
                    raise _Malformed("answer too large")
                return response.status, await response.read()
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > self._max_answer:
                    raise _Malformed("answer too large")
                chunks.append(chunk)
            return response.status, b"".join(chunks)

    async def _fetch(
        self,
        op: str,
        path: str,
        method: str,
        url: str,
        decoder: msgspec.json.Decoder[T],
        body: bytes | None = None,
        *,
        check: Callable[[T], None] | None = None,
    ) -> T:
        """One call over aiohttp: the answer decoded as `decoder` expects, or a service error."""

        async def attempt() -> T:
            with _mapped(op, path):
                async with self._limiter:
                    status, payload = await self._exchange(method, url, body)
                if status != 200:  # 204, 3xx, 101: nothing this call expects either
                    raise _status_error(status, payload, method, url)
                answer = decoder.decode(payload)
                if check is not None:
                    check(answer)
                return answer

        return await self._call(op, path, attempt)

    # -- hvac in threads -----------------------------------------------------------------------

    def _threaded(self, op: str, path: str, fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
        """An hvac call as an attempt for `_call`: run in a worker thread."""

        async def attempt() -> T:
            # A call started later than this would outlive its caller's deadline, as a thread
            # abandoned in the middle of a Vault request.
            start_by = time.monotonic() + self._timeout + 1
            async with self._limiter:
                if time.monotonic() > start_by:
                    # Waited too long for a slot: Vault is hanging. Starting anyway would hand
                    # each slot, freed by an abandoned call, to the next late caller: one more
                    # abandoned thread (and Vault request) per queued request.
                    raise TimeoutError
                return await to_thread.run_sync(
                    functools.partial(_mapped_call, op, path, fn),
                    limiter=self._workers,
                    abandon_on_cancel=True,
                )

        return attempt

    # -- every call ----------------------------------------------------------------------------

    async def _call(self, op: str, path: str, attempt: Callable[[], Awaitable[T]]) -> T:
        refused = self._client.token
        try:
            return await self._observed(op, path, attempt)
        except VaultAccessDenied:
            if self._approle is None or op == "login" or not await self._replace_token(refused):
                raise
        return await self._observed(op, path, attempt)

    async def _replace_token(self, refused: str | None) -> bool:
        """After Vault refused the token `refused`: True when there is a new one to try.

        A 403 may be the policy's answer, not the token's end: log in again only when the token
        is past its lease or lookup-self refuses it too, and check at most once per
        `relogin_interval`, so that no caller can make the service mint AppRole tokens."""
        async with self._relogin_lock:  # concurrent callers wait for the one check
            if self._client.token != refused:
                return True  # replaced meanwhile
            now = time.monotonic()
            if now < self._next_token_check:
                return False
            self._next_token_check = now + self._relogin_interval
            if now < self._token_expires:
                try:
                    await self._observed("ping", "", self._threaded("ping", "", self._lookup_self))
                    return False  # the token is good: the policy refused
                except VaultAccessDenied:
                    pass  # revoked
            log.warning("the AppRole token is gone: logging in again")
            await self.login()
            return True

    async def _observed(self, op: str, path: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` under the call's deadline and tell the observer how it went."""
        started = time.perf_counter()
        error: str | None = None
        try:
            # The deadline also covers waiting for a free slot while Vault hangs.
            with anyio.fail_after(self._timeout * 2 + 1):
                return await attempt()
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
    """A KV v2 metadata answer's ``data`` as a SecretMetadata, versions oldest first.
    Raises msgspec.ValidationError when `data` is not shaped as Vault's."""
    return _secret_metadata(path, msgspec.convert(data, _Metadata, strict=False), now)


def _secret_metadata(path: str, meta: _Metadata, now: datetime | None = None) -> SecretMetadata:
    moment = now or datetime.now(UTC)
    versions = []
    for number, entry in sorted(meta.versions.items()):
        deletion_time = entry.deletion_time or None
        versions.append(
            VersionMetadata(
                version=number,
                created_time=entry.created_time,
                deletion_time=deletion_time,
                deleted=deletion_time is not None and _not_after(deletion_time, moment),
                destroyed=entry.destroyed,
            )
        )
    return SecretMetadata(
        path=path,
        current_version=meta.current_version,
        created_time=meta.created_time,
        updated_time=meta.updated_time,
        versions=tuple(versions),
    )


def _not_after(timestamp: str, moment: datetime) -> bool:
    # A deletion time in the future is one scheduled by delete_version_after: not deleted yet.
    try:
        return datetime.fromisoformat(timestamp) <= moment
    except ValueError:
        return True  # unparseable: take Vault's word that it is deleted


def _done(answer: Any) -> None:
    """An hvac lifecycle call's answer: 204 (or 200) is done; a 3xx or another 2xx is not."""
    status = 200 if isinstance(answer, dict) else getattr(answer, "status_code", None)
    if status not in (200, 204):
        raise _Malformed(f"HTTP {status}")


def _status_error(status: int, payload: bytes, method: str, url: str) -> hvac_errors.VaultError:
    """The hvac error for a status, so that `_mapped` maps both clients' answers alike."""
    try:
        errors: list[str] | None = _error_answer.decode(payload).errors
    except msgspec.DecodeError:
        errors = None
    return hvac_errors.VaultError.from_status(
        status, f"HTTP {status}", errors=errors, method=method, url=url
    )


def _mapped_call(op: str, path: str, fn: Callable[[], T]) -> T:
    with _mapped(op, path):
        return fn()


@contextlib.contextmanager
def _mapped(op: str, path: str) -> Iterator[None]:
    """The one place hvac, requests, aiohttp and HTTP errors become service errors."""
    try:
        yield
    except TimeoutError:
        raise  # the caller's deadline, or aiohttp's: reported as a timeout by `_observed`
    except hvac_errors.InvalidPath:
        raise NotFound("no secret at this path", path=path) from None
    except hvac_errors.InvalidRequest as exc:
        if op == "write" and "check-and-set" in str(exc):
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
    except (
        requests.exceptions.RequestException,
        hvac_errors.VaultError,  # any other status: 204, 3xx, 412, 429, 5xx
        aiohttp.ClientError,  # refused, reset, closed midway, not HTTP, TLS, proxy
        OSError,  # ConnectionError and ssl.SSLError among them
        UnicodeError,  # a token that is not ASCII
        msgspec.DecodeError,  # not JSON, or not the shape the call expects (ValidationError)
        _Malformed,
    ) as exc:
        log.error(
            "vault unavailable", extra={"op": op, "path": path, "error_type": type(exc).__name__}
        )
        raise VaultUnavailable("the secrets backend is unavailable", path=path) from None


class _CasMismatch(SecretsError):
    """Internal: the CAS check failed; `write` reads the current version and raises 409."""


class _Malformed(Exception):
    """Internal: an answer this call cannot take (too large, another version, a 3xx)."""

"""The real VaultBackend: `HvacBackend`, a secret's read, CAS write and metadata over aiohttp on
the event loop (the hot path), the rest through hvac in worker threads, and the AppRole login."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import anyio
import hvac
import msgspec
import requests
from aiohttp.helpers import get_env_proxy_for_url
from anyio import to_thread
from yarl import URL

from schemas.api import SecretMetadata
from schemas.errors import (
    ConfigError,
    NotFound,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from schemas.secret import Secret, SecretData
from service.vault.answers import (
    KvMetadata,
    ListAnswer,
    LoginAnswer,
    LookupAnswer,
    ReadAnswer,
    metadata_answer,
    read_answer,
    secret_metadata,
    write_answer,
)
from service.vault.errors import (
    CasMismatch,
    Malformed,
    check_done,
    mapped,
    mapped_call,
    status_error,
)
from service.vault.protocol import CallObserver

__all__ = ["MAX_ANSWER", "HvacBackend"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")

MAX_ANSWER = 1024 * 1024
"""Bytes: the largest answer read from Vault; a longer one is refused (503), not buffered."""

_encode = msgspec.json.Encoder().encode


class HvacBackend:
    """KV v2: reads, CAS writes and metadata over aiohttp, the rest through hvac in a bounded
    thread pool. One token (hvac's, replaced by an AppRole login when it is gone) serves both.

    The aiohttp side is one `aiohttp.ClientSession` (keep-alive HTTP/1.1, a bounded pool,
    interim 1xx answers skipped, proxies from the environment); hvac, which is synchronous,
    serves logins, listings and the lifecycle calls. Every answer is checked against the shape
    its call expects (`service.vault.answers`), and every failure becomes one of schemas.errors
    in `service.vault.errors.mapped`: no hvac, requests, aiohttp or HTTP type leaves the class.

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
        auth = msgspec.convert(answer, LoginAnswer).auth
        self._client.token = auth.client_token
        return auth.lease_duration

    async def read(self, path: str, version: int | None = None) -> Secret:
        url = self._data_url + quote(path)
        if version is not None:
            url += f"?version={int(version)}"

        def check(answer: ReadAnswer) -> None:
            if version is not None and answer.data.metadata.version != version:
                raise Malformed("another version than the one asked for")

        found = (await self._fetch("read", path, "GET", url, read_answer, check=check)).data
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
                    "write", path, "POST", self._data_url + quote(path), write_answer, payload
                )
            ).data
        except CasMismatch:
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
        return secret_metadata(path, await self._metadata(path))

    async def _metadata(self, path: str) -> KvMetadata:
        url = self._metadata_url + quote(path)
        return (await self._fetch("metadata", path, "GET", url, metadata_answer)).data

    async def list_keys(self, prefix: str) -> list[str]:
        def call() -> list[str]:
            answer = self._kv.list_secrets(prefix, mount_point=self._mount)
            return msgspec.convert(answer, ListAnswer).data.keys

        try:
            return await self._call("list", prefix, self._threaded("list", prefix, call))
        except NotFound:
            raise NotFound("nothing under this prefix", path=prefix) from None

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            check_done(
                self._kv.delete_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("delete", path, self._threaded("delete", path, call))

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            check_done(
                self._kv.undelete_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("undelete", path, self._threaded("undelete", path, call))

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        def call() -> None:
            check_done(
                self._kv.destroy_secret_versions(
                    path, versions=list(versions), mount_point=self._mount
                )
            )

        await self._call("destroy", path, self._threaded("destroy", path, call))

    async def ping(self) -> None:
        await self._call("ping", "", self._threaded("ping", "", self._lookup_self))

    def _lookup_self(self) -> None:
        msgspec.convert(self._client.auth.token.lookup_self(), LookupAnswer)

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
                    raise Malformed("answer too large")
                return response.status, await response.read()
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > self._max_answer:
                    raise Malformed("answer too large")
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
            with mapped(op, path):
                async with self._limiter:
                    status, payload = await self._exchange(method, url, body)
                if status != 200:  # 204, 3xx, 101: nothing this call expects either
                    raise status_error(status, payload, method, url)
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
                    functools.partial(mapped_call, op, path, fn),
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

"""The real VaultBackend: `HvacBackend`, a secret's read, CAS write and metadata over aiohttp on
the event loop (the hot path), the rest through hvac in worker threads, and the token's calls
(login, renew-self, lookup-self) that service.vault.identity drives."""

from __future__ import annotations

import logging
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
    TokenLookupAnswer,
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
    status_error,
)
from service.vault.identity import Grant, LoginMethod, VaultIdentity, login_method
from service.vault.nodes import Node, NodeRing, hvac_node_failure, retry_on_next
from service.vault.protocol import CallObserver

__all__ = ["MAX_ANSWER", "HvacBackend"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")

MAX_ANSWER = 1024 * 1024
"""Bytes: the largest answer read from Vault; a longer one is refused (503), not buffered."""

_encode = msgspec.json.Encoder().encode


class HvacBackend:
    """KV v2: reads, CAS writes and metadata over aiohttp, the rest through hvac in a bounded
    thread pool. One token serves both: `identity` (service.vault.identity) obtains it with
    `login`, keeps it alive while `keep_token` runs and replaces it when Vault refuses it.

    The aiohttp side is one `aiohttp.ClientSession` (keep-alive HTTP/1.1, a bounded pool,
    interim 1xx answers skipped, proxies from the environment); hvac, which is synchronous,
    serves logins, listings and the lifecycle calls. Every answer is checked against the shape
    its call expects (`service.vault.answers`), and every failure becomes one of schemas.errors
    in `service.vault.errors.mapped`: no hvac, requests, aiohttp or HTTP type leaves the class.

    `addr`: one address, or the nodes of an HA cluster (a sequence, or comma-separated). Both
    clients use one node at a time and move on to the next when it fails a call, as
    `service.vault.nodes.retry_on_next` allows: a read at once, a CAS write only when it was
    surely not applied (else 503: the caller reads the version and decides).

    `auth`: how to log in (token, AppRole or JWT); without it, AppRole when `role_id` and
    `secret_id` are given, else `token`. `relogin_interval`: with a login method, the least
    time between two checks of a refused token (and so between two logins a request causes);
    concurrent callers share the one check.
    """

    def __init__(
        self,
        addr: str | Sequence[str],
        *,
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        auth: LoginMethod | None = None,
        mount: str = "secret",
        timeout: float = 5.0,
        concurrency: int = 32,
        observer: CallObserver | None = None,
        relogin_interval: float = 10.0,
        max_answer: int = MAX_ANSWER,
    ) -> None:
        self.observer = observer
        # Several addresses: the nodes of one HA cluster; a call moves on when one fails.
        self._ring = NodeRing(
            [a.strip() for a in (addr.split(",") if isinstance(addr, str) else addr) if a.strip()]
        )
        addr = self._ring.current.addr
        # The CA bundle requests would use, named once for both clients so they cannot differ.
        ca_bundle = os.environ.get("REQUESTS_CA_BUNDLE") or requests.utils.DEFAULT_CA_BUNDLE_PATH
        self._tls: ssl.SSLContext | None = None
        if any(node.addr.startswith("https://") for node in self._ring.nodes):
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
        self._mount = mount
        self._timeout = timeout
        self._concurrency = concurrency
        self._max_answer = max_answer
        # After a node's `/v1/` (`Node.api`, where each node's proxy is read from the
        # environment as requests and aiohttp's trust_env would).
        self._data_url = f"{quote(mount)}/data/"
        self._metadata_url = f"{quote(mount)}/metadata/"
        self._limiter = anyio.CapacityLimiter(concurrency)
        # run_sync's own; `_limiter` is taken first, to look at the clock before a thread starts.
        self._workers = anyio.CapacityLimiter(concurrency)
        self._kv = self._client.secrets.kv.v2
        self._http: aiohttp.ClientSession | None = None  # made on the running loop, when needed
        self._closed = False
        method = auth or login_method(token=token, role_id=role_id, secret_id=secret_id)
        self.identity = VaultIdentity(method, _TokenCalls(self), relogin_interval=relogin_interval)

    async def login(self) -> None:
        """Log in with a login method (raises when Vault refuses); a given token is put to use
        as it is (`keep_token` learns its lease)."""
        await self.identity.start()

    async def keep_token(self) -> None:
        """Renew the token, or log in again, before it expires; until cancelled."""
        await self.identity.run()

    @property
    def node_switches(self) -> int:
        """How many times calls moved on from a failed Vault node to the next one."""
        return self._ring.switches

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

    async def _send(
        self, method: str, url: str, body: bytes | None, *, idempotent: bool
    ) -> tuple[int, bytes]:
        """`_exchange` with the node in use, then with the next ones as far as `retry_on_next`
        allows (`idempotent`: the call does the same when sent twice): the last node's answer,
        or its failure."""
        node = self._ring.current
        tries_left = len(self._ring) - 1
        while True:
            try:
                status, payload = await self._exchange(method, node, url, body)
            except (aiohttp.ClientError, OSError) as exc:
                if not tries_left or not retry_on_next(None, b"", exc, idempotent=idempotent):
                    raise
            else:
                if (
                    status == 200
                    or not tries_left
                    or not retry_on_next(status, payload, None, idempotent=idempotent)
                ):
                    return status, payload
            node = self._move_on(node)
            tries_left -= 1

    def _move_on(self, failed: Node) -> Node:
        node = self._ring.move_on(failed)
        self._client.url = node.addr  # hvac follows: the same node for every call
        return node

    async def _exchange(
        self, method: str, node: Node, url: str, body: bytes | None
    ) -> tuple[int, bytes]:
        """One request to `node` (`url` after its `/v1/`), its answer's status and whole body
        (at most `max_answer` bytes).

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
            URL(node.api + url, encoded=True),
            data=body,
            headers=headers,
            allow_redirects=False,
            proxy=node.proxy,
            proxy_auth=node.proxy_auth,
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
                    status, payload = await self._send(method, url, body, idempotent=op != "write")
                if status != 200:  # 204, 3xx, 101: nothing this call expects either
                    raise status_error(status, payload, method, url)
                answer = decoder.decode(payload)
                if check is not None:
                    check(answer)
                return answer

        return await self._call(op, path, attempt)

    # -- hvac in threads -----------------------------------------------------------------------

    def _threaded(self, op: str, path: str, fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
        """An hvac call as an attempt for `_call`: run in a worker thread, on the node in use,
        then on the next ones while it fails there (every hvac call does the same when sent
        twice: listings, token calls, version deletes)."""

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
                node = self._ring.current
                tries_left = len(self._ring) - 1
                with mapped(op, path):
                    while True:
                        try:
                            return await to_thread.run_sync(
                                fn, limiter=self._workers, abandon_on_cancel=True
                            )
                        except Exception as exc:
                            if not tries_left or not hvac_node_failure(exc):
                                raise
                        node = self._move_on(node)
                        tries_left -= 1

        return attempt

    # -- every call ----------------------------------------------------------------------------

    async def _call(self, op: str, path: str, attempt: Callable[[], Awaitable[T]]) -> T:
        refused = self._client.token
        try:
            return await self._observed(op, path, attempt)
        except VaultAccessDenied:
            if not await self.identity.replace(refused):
                raise
        return await self._observed(op, path, attempt)

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


class _TokenCalls:
    """Vault's token endpoints through the backend's hvac client, in its worker threads, each
    call timed and observed; what `VaultIdentity` drives (service.vault.identity.AuthCalls)."""

    def __init__(self, backend: HvacBackend) -> None:
        self._backend = backend

    def use(self, token: str | None) -> None:
        self._backend._client.token = token

    async def log_in(self, mount: str, credentials: Mapping[str, str]) -> Grant:
        url = f"/v1/auth/{quote(mount)}/login"

        def call() -> Grant:
            answer = self._backend._client.adapter.post(url, json=dict(credentials))
            auth = msgspec.convert(answer, LoginAnswer).auth
            return Grant(auth.client_token, auth.lease_duration, auth.renewable)

        return await self._run("login", call)

    async def renew_self(self) -> Grant:
        def call() -> Grant:
            auth = msgspec.convert(self._backend._client.auth.token.renew_self(), LoginAnswer).auth
            return Grant(auth.client_token, auth.lease_duration, auth.renewable)

        return await self._run("renew", call)

    async def lookup_self(self) -> Grant:
        def call() -> Grant:
            answer = self._backend._client.auth.token.lookup_self()
            info = msgspec.convert(answer, TokenLookupAnswer).data
            return Grant("", info.ttl, info.renewable)  # "": the token in use

        return await self._run("ping", call)

    async def _run(self, op: str, fn: Callable[[], T]) -> T:
        backend = self._backend
        # Not through `_call`: a refused token here is the identity's to handle, not to replace.
        return await backend._observed(op, "", backend._threaded(op, "", fn))

"""`AsyncSecretsClient`: the asyncio client of the service's HTTP API, as httpx has `AsyncClient`
beside `Client`; its cache of latest versions is kept fresh by one watch stream read in a task.

The same calls, checks, errors and cache rules as `SecretsClient` (secrets_client/client.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Self

import httpx

from events.listener import Change
from schemas.secret import Secret
from secrets_client.api import (
    DEFAULT_URL,
    Call,
    authorization,
    decode_secret,
    get_call,
    json_body,
    set_call,
)
from secrets_client.base import ClientBase
from secrets_client.cache import REREADS, ClientCache
from secrets_client.errors import (
    ClientError,
    aread_refusal,
    error_from_response,
    error_from_transport,
)
from secrets_client.stream import (
    MAX_DELAY,
    Attempt,
    Backoff,
    OnConnect,
    StreamReset,
    WatchSession,
)

__all__ = ["AsyncSecretsClient"]

log = logging.getLogger("secrets.client")

AsyncToken = str | Callable[[], str] | Callable[[], Awaitable[str]]


class AsyncSecretsClient(ClientBase[Awaitable[Any]]):
    """`async with AsyncSecretsClient(url, token=...) as client: await client.get("app/db")`.

    `token` is a bearer token, or a callable returning one or an awaitable of one, called for
    each request and each watch connection. Everything else is as for `SecretsClient`; the
    watch stream runs as a task of the loop of the first cached `get`, until `aclose`.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: AsyncToken,
        timeout: float = 10.0,
        cache: bool = True,
        cache_ttl: float = 300.0,
        fallback_ttl: float = 5.0,
        max_entries: int = 10_000,
        stream_timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            url,
            token=token,
            timeout=timeout,
            cache=cache,
            cache_ttl=cache_ttl,
            fallback_ttl=fallback_ttl,
            max_entries=max_entries,
            clock=clock,
        )
        self._http, self._streams = self._http_clients(httpx.AsyncClient, transport, stream_timeout)
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the watch stream (and any `watch()` iterator) and close the connections."""
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
        await self._streams.aclose()
        await self._http.aclose()

    # -- reads and writes ----------------------------------------------------------------

    async def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (from the cache when fresh), or version `version`."""
        cache = self._cache
        if version is not None or cache is None:
            return decode_secret((await self._exchange(get_call(path, version))).content)
        secret: Secret | None = cache.fresh(path)
        if secret is not None:
            return secret
        call = get_call(path, None)
        if self._watcher is None and not self._closed:
            self._watcher = asyncio.get_running_loop().create_task(
                self._keep_fresh(cache), name="secrets-client-watch"
            )
        for _ in range(REREADS):
            fetch = cache.begin(path)
            secret = None
            try:
                secret = decode_secret((await self._exchange(call)).content)
            finally:
                current = cache.finish(fetch, secret)
            if current:
                break
        assert secret is not None
        return secret

    async def set(self, path: str, data: Mapping[str, Any], *, version: int) -> int:
        """Write `data` if the current version is `version` (0: the path must not exist yet);
        the new version. A stale `version` raises ClientError `version_conflict` (409), whose
        `current_version` says what to retry with."""
        body = await self._send(set_call(path, data, version))
        new_version: int = body["version"]
        return new_version

    def watch(
        self, prefix: str = "", *, after: int | None = None, on_connect: OnConnect | None = None
    ) -> AsyncGenerator[Change, None]:
        """The changes at or below `prefix` that you may read, as `SecretsClient.watch` gives
        them: `async for change in client.watch("app"): ...` (an async generator: leave it
        with `contextlib.aclosing` to close its connection at once)."""
        session = WatchSession(prefix, after=after)  # the prefix checked now
        return self._changes(session, on_connect)

    async def _changes(
        self, session: WatchSession, on_connect: OnConnect | None
    ) -> AsyncGenerator[Change, None]:
        backoff = Backoff(persistent=False)
        async for item in self._follow(session, backoff, on_connect=on_connect):
            if isinstance(item, Change):
                yield item
            else:
                log.warning(
                    "watch: events lost, going on from the oldest kept",
                    extra={"reason": item.reason, "first_sequence": item.first_sequence},
                )

    # -- the API's plumbing --------------------------------------------------------------

    async def _send(self, call: Call) -> Any:
        try:
            response = await self._exchange(call)
        except ClientError:
            self._refused(call)
            raise
        return self._answered(call, json_body(response.content))

    async def _exchange(self, call: Call) -> httpx.Response:
        headers = call.headers
        if self._provider is not None:
            headers = {**(headers or {}), "Authorization": await self._authorization()}
        try:
            response = await self._http.request(
                call.method, call.url, params=call.params, json=call.json, headers=headers
            )
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.url, self.timeout) from None
        if not response.is_success:
            raise error_from_response(response)
        return response

    async def _authorization(self) -> str:
        assert self._provider is not None
        try:
            token = self._provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise self._provider_error(exc) from exc
        return authorization(token)

    # -- the watch stream ----------------------------------------------------------------

    async def _keep_fresh(self, cache: ClientCache) -> None:
        """The watch task: every event the caller may read evicts its path, until aclose."""
        while not self._closed:
            try:
                async for item in self._follow(self._session, Backoff(persistent=True), cache):
                    cache.apply(item)
            except Exception:
                cache.stream_down()
                log.exception("watch task failed; starting again")
                await asyncio.sleep(MAX_DELAY)

    async def _follow(
        self,
        session: WatchSession,
        backoff: Backoff,
        cache: ClientCache | None = None,
        on_connect: OnConnect | None = None,
    ) -> AsyncIterator[Change | StreamReset]:
        """The items of one connection after another, until the client closes; `cache`, if
        given, is told when the stream is up and down."""
        while not self._closed:
            attempt = Attempt(session, backoff, cache, on_connect)
            try:
                headers = attempt.headers
                if self._provider is not None:
                    headers["Authorization"] = await self._authorization()
                async with self._streams.stream("GET", session.url, headers=headers) as response:
                    if response.status_code != 200:
                        raise await aread_refusal(response)
                    attempt.open(response.headers.get("Content-Type"))
                    async for chunk in response.aiter_bytes():
                        for item in attempt.feed(chunk):
                            yield item
                        if attempt.ended is not None:
                            break
            except ClientError as exc:
                attempt.failure = exc
            except httpx.TransportError as exc:
                attempt.failure = error_from_transport(exc, self.url, self.timeout)
            except RuntimeError:
                if self._closed:
                    return  # closed under a request being made
                raise
            finally:
                attempt.close()
            if self._closed:
                return
            await asyncio.sleep(attempt.delay())  # raised instead, by a watch() giving up

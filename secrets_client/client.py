"""`SecretsClient`: the blocking client of the service's HTTP API, whose reads of latest versions
are cached and kept fresh by one watch stream, read in a daemon thread.

Paths and change ids are checked before a request is made (a `:` or `..` never turns into
another request); a refusal or an unreachable service raises `ClientError` with the API's `error`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self

import httpx

from events.listener import Change
from schemas.secret import Secret
from secrets_client.api import (
    DEFAULT_URL,
    Call,
    authorization,
    change_url,
    decode_secret,
    get_call,
    json_body,
    secret_url,
    set_call,
)
from secrets_client.base import ClientBase
from secrets_client.cache import REREADS, ClientCache
from secrets_client.errors import (
    ClientError,
    error_from_response,
    error_from_transport,
    read_refusal,
)
from secrets_client.stream import (
    MAX_DELAY,
    Attempt,
    Backoff,
    OnConnect,
    StreamReset,
    WatchSession,
)

__all__ = ["DEFAULT_URL", "ClientError", "SecretsClient", "change_url", "secret_url"]

log = logging.getLogger("secrets.client")

Token = str | Callable[[], str]


class SecretsClient(ClientBase[Any]):
    """`with SecretsClient(url, token=...) as client: client.get("app/db")`.

    `token` is a bearer token, or a callable returning one, called for each request and each
    watch connection (so a refreshed OIDC token is used as soon as it is returned; the watch
    thread calls it too). `get(path)` of the latest version is served from the cache while the
    entry is younger than `cache_ttl` and the watch stream is up, or than `fallback_ttl` while it
    is down; the stream starts with the first such read, and stops on `close`. `cache=False`
    makes every read a request, with no stream. `stream_timeout` is how long a silent stream is
    trusted (the service sends a comment at least every 15 s). `transport` replaces the network
    (an `httpx.MockTransport` in tests); `clock` the monotonic clock.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: Token,
        timeout: float = 10.0,
        cache: bool = True,
        cache_ttl: float = 300.0,
        fallback_ttl: float = 5.0,
        max_entries: int = 10_000,
        stream_timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
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
        self._http, self._streams = self._http_clients(httpx.Client, transport, stream_timeout)
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._live: set[httpx.Response] = set()  # open streams, cut short by `close`
        self._live_lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watch stream (and any `watch()` iterator) and close the connections."""
        self._closed.set()
        with self._live_lock:
            live = list(self._live)
        for response in live:
            _cut(response)
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=self.timeout)
        self._http.close()
        self._streams.close()

    # -- reads and writes ----------------------------------------------------------------

    def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (from the cache when fresh), or version `version`."""
        cache = self._cache
        if version is not None or cache is None:
            return decode_secret(self._exchange(get_call(path, version)).content)
        secret: Secret | None = cache.fresh(path)
        if secret is not None:
            return secret
        call = get_call(path, None)
        if self._watcher is None:
            self._start_watching()
        for _ in range(REREADS):
            fetch = cache.begin(path)
            secret = None
            try:
                secret = decode_secret(self._exchange(call).content)
            finally:
                current = cache.finish(fetch, secret)
            if current:
                break  # else older than an event said: once more (at most REREADS times)
        assert secret is not None
        return secret

    def set(self, path: str, data: Mapping[str, Any], *, version: int) -> int:
        """Write `data` if the current version is `version` (0: the path must not exist yet);
        the new version. A stale `version` raises ClientError `version_conflict` (409), whose
        `current_version` says what to retry with."""
        body = self._send(set_call(path, data, version))
        new_version: int = body["version"]
        return new_version

    def watch(
        self, prefix: str = "", *, after: int | None = None, on_connect: OnConnect | None = None
    ) -> Generator[Change, None, None]:
        """The changes at or below `prefix` that you may read, from now on (or from the one
        after stream sequence `after`), each with its `sequence`; resumed after a lost
        connection without a gap, until the client is closed or the loop is left.

        The first connection's failure raises ClientError, as does a later refusal that
        another attempt cannot change (400, 403, or a 401 the token provider does not cure).
        `on_connect(after)` is called each time a connection has begun, with the sequence it
        resumes after (None: from now on): changes made from then on will be delivered.
        """
        session = WatchSession(prefix, after=after)  # the prefix checked now, not at first next()
        return self._changes(session, on_connect)

    def _changes(
        self, session: WatchSession, on_connect: OnConnect | None
    ) -> Generator[Change, None, None]:
        for item in self._follow(session, Backoff(persistent=False), on_connect=on_connect):
            if isinstance(item, Change):
                yield item
            else:
                log.warning(
                    "watch: events lost, going on from the oldest kept",
                    extra={"reason": item.reason, "first_sequence": item.first_sequence},
                )

    # -- the API's plumbing --------------------------------------------------------------

    def _send(self, call: Call) -> Any:
        try:
            response = self._exchange(call)
        except ClientError:
            self._refused(call)
            raise
        return self._answered(call, json_body(response.content))

    def _exchange(self, call: Call) -> httpx.Response:
        headers = call.headers
        if self._provider is not None:
            headers = {**(headers or {}), "Authorization": self._authorization()}
        try:
            response = self._http.request(
                call.method, call.url, params=call.params, json=call.json, headers=headers
            )
        except httpx.TransportError as exc:
            raise error_from_transport(exc, self.url, self.timeout) from None
        if not response.is_success:
            raise error_from_response(response)
        return response

    def _authorization(self) -> str:
        assert self._provider is not None
        try:
            token = self._provider()
        except Exception as exc:
            raise self._provider_error(exc) from exc
        return authorization(token)

    # -- the watch stream ----------------------------------------------------------------

    def _start_watching(self) -> None:
        with self._start_lock:
            if self._watcher is not None or self._closed.is_set():
                return
            self._watcher = threading.Thread(
                target=self._keep_fresh, name="secrets-client-watch", daemon=True
            )
            self._watcher.start()

    def _keep_fresh(self) -> None:
        """The watch thread: every event the caller may read evicts its path, until close."""
        cache = self._cache
        assert cache is not None
        while not self._closed.is_set():
            try:
                for item in self._follow(self._session, Backoff(persistent=True), cache):
                    cache.apply(item)
            except Exception:
                if self._closed.is_set():
                    break  # the connections closed under a request being made
                cache.stream_down()
                log.exception("watch thread failed; starting again")
                self._closed.wait(MAX_DELAY)

    def _follow(
        self,
        session: WatchSession,
        backoff: Backoff,
        cache: ClientCache | None = None,
        on_connect: OnConnect | None = None,
    ) -> Iterator[Change | StreamReset]:
        """The items of one connection after another, until the client closes; `cache`, if
        given, is told when the stream is up and down."""
        while not self._closed.is_set():
            attempt = Attempt(session, backoff, cache, on_connect)
            try:
                headers = attempt.headers
                if self._provider is not None:
                    headers["Authorization"] = self._authorization()
                with self._streams.stream("GET", session.url, headers=headers) as response:
                    if response.status_code != 200:
                        raise read_refusal(response)
                    attempt.open(response.headers.get("Content-Type"))
                    with self._holding(response):
                        for chunk in response.iter_bytes():
                            yield from attempt.feed(chunk)
                            if attempt.ended is not None:
                                break
            except ClientError as exc:
                attempt.failure = exc
            except httpx.TransportError as exc:
                attempt.failure = error_from_transport(exc, self.url, self.timeout)
            except RuntimeError:
                if self._closed.is_set():
                    return  # closed between the check above and the request
                raise
            finally:
                attempt.close()
            if self._closed.is_set():
                return
            self._closed.wait(attempt.delay())  # raised instead, by a watch() giving up

    @contextmanager
    def _holding(self, response: httpx.Response) -> Iterator[None]:
        with self._live_lock:
            self._live.add(response)
        try:
            yield
        finally:
            with self._live_lock:
                self._live.discard(response)


def _cut(response: httpx.Response) -> None:
    """Wake the thread reading `response`: shut its socket down (closing it from another thread
    would leave the read blocked)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

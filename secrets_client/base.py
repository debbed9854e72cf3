"""What `SecretsClient` and `AsyncSecretsClient` share besides the API's calls: the token (a string
or a provider), the cache and the session of its watch stream, and what an application reads of
them (`stats`, `stream_connected`, `stream_sequence`). The I/O is each client's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx

from secrets_client.api import ApiMethods, Call, authorization, changed_path
from secrets_client.cache import CacheStats, ClientCache
from secrets_client.errors import ClientError
from secrets_client.stream import WatchSession

__all__ = ["ClientBase"]

R = TypeVar("R")
H = TypeVar("H")


class ClientBase(ApiMethods[R]):
    def __init__(
        self,
        url: str,
        *,
        token: object,
        timeout: float,
        cache: bool,
        cache_ttl: float,
        fallback_ttl: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._headers = {"Accept": "application/json"}
        self._provider: Callable[[], Any] | None = None
        if isinstance(token, str):
            self._headers["Authorization"] = authorization(token)
        elif callable(token):
            self._provider = token
        else:
            raise TypeError("token is a string, or a callable returning one")
        self._cache = (
            ClientCache(
                ttl=cache_ttl, fallback_ttl=fallback_ttl, max_entries=max_entries, clock=clock
            )
            if cache
            else None
        )
        self._session = WatchSession("")  # the cache's watch: everything the caller may read

    def _http_clients(
        self, factory: Callable[..., H], transport: object, stream_timeout: float
    ) -> tuple[H, H]:
        """The httpx client of the API's calls, and that of the watch streams (whose reads may
        wait `stream_timeout` seconds)."""
        static = {k: v for k, v in self._headers.items() if k == "Authorization"}
        try:
            calls = factory(
                base_url=self.url, timeout=self.timeout, headers=self._headers, transport=transport
            )
            streams = factory(
                base_url=self.url,
                timeout=httpx.Timeout(self.timeout, read=stream_timeout),
                headers=static,
                transport=transport,
            )
        except httpx.InvalidURL:
            raise ClientError("invalid_url", "the service URL is not a valid http(s) URL") from None
        return calls, streams

    @property
    def stream_connected(self) -> bool:
        """True while the cache's watch stream delivers events."""
        return self._cache is not None and self._cache.connected

    @property
    def stream_sequence(self) -> int | None:
        """The cache's watch stream resumes after this stream sequence (Last-Event-ID): its last
        event's; None before any."""
        return self._session.last_sequence

    @property
    def stats(self) -> CacheStats:
        """The cache's counters: hits, misses, evictions, reconnects, entries."""
        if self._cache is None:
            return CacheStats(0, 0, 0, 0, 0)
        return self._cache.stats()

    def _answered(self, call: Call, body: Any) -> Any:
        """`body`, once the path `call` may have changed is evicted."""
        path = changed_path(call, body)
        if path is not None and self._cache is not None:
            # The version a write answers with is the path's current one since (or older).
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, int) or isinstance(version, bool):
                version = 0
            self._cache.evict(path, version)
        return body

    def _refused(self, call: Call) -> None:
        """`call` failed: its path may have changed all the same (a 409 says it moved on)."""
        if call.changes not in (None, "*") and self._cache is not None:
            self._cache.evict(call.changes)

    def _provider_error(self, exc: Exception) -> ClientError:
        # The class only: the provider's own message may quote a credential.
        return ClientError("invalid_token", f"the token provider raised {type(exc).__name__}")

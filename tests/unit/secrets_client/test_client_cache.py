"""Both clients' caches against a fake service on a loopback port (fake_service.py): hits, eviction
by the watch stream, reset, the fallback bound while the stream is down, the token provider, and
reconnection with Last-Event-ID. Each test runs for `SecretsClient` and `AsyncSecretsClient`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any

import pytest

from events.listener import Change
from schemas.secret import Secret
from secrets_client import AsyncSecretsClient, CacheStats, ClientError, SecretsClient
from tests.unit.secrets_client.fake_service import FakeService, wait_until

CANARY = "canary-7f3a19-only-in-data"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Either:
    """One client, blocking or async, behind the same awaitable calls (a blocking call runs in
    a thread, as an application with an event loop would make it)."""

    def __init__(self, kind: str, url: str, **options: Any) -> None:
        self.kind = kind
        self.blocking = SecretsClient(url, **options) if kind == "blocking" else None
        self.aio = AsyncSecretsClient(url, **options) if kind == "async" else None

    @property
    def client(self) -> SecretsClient | AsyncSecretsClient:
        client = self.blocking or self.aio
        assert client is not None
        return client

    @property
    def stats(self) -> CacheStats:
        return self.client.stats

    @property
    def stream_connected(self) -> bool:
        return self.client.stream_connected

    async def get(self, path: str, version: int | None = None) -> Secret:
        if self.blocking is not None:
            return await asyncio.to_thread(self.blocking.get, path, version)
        assert self.aio is not None
        return await self.aio.get(path, version)

    async def set(self, path: str, data: dict[str, Any], *, version: int) -> int:
        if self.blocking is not None:
            blocking = self.blocking
            return await asyncio.to_thread(lambda: blocking.set(path, data, version=version))
        assert self.aio is not None
        return await self.aio.set(path, data, version=version)

    async def changes(
        self, prefix: str, count: int, connected: Callable[[int | None], None], **options: Any
    ) -> list[Change]:
        """The first `count` changes of `watch(prefix)`."""
        if self.blocking is not None:
            blocking = self.blocking

            def collect() -> list[Change]:
                found = []
                watch = blocking.watch(prefix, on_connect=connected, **options)
                assert isinstance(watch, Iterator)
                for change in watch:
                    found.append(change)
                    if len(found) == count:
                        break
                return found

            return await asyncio.to_thread(collect)
        assert self.aio is not None
        found = []
        async with aclosing(self.aio.watch(prefix, on_connect=connected, **options)) as watch:
            async for change in watch:
                found.append(change)
                if len(found) == count:
                    break
        return found

    async def close(self) -> None:
        if self.blocking is not None:
            await asyncio.to_thread(self.blocking.close)
        if self.aio is not None:
            await self.aio.aclose()


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(params=["blocking", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
async def make(service: FakeService, kind: str) -> AsyncIterator[Callable[..., Either]]:
    made: list[Either] = []

    def make(**options: Any) -> Either:
        client = Either(kind, service.url, **{"token": "t0ken", **options})
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            await client.close()


async def watched(make: Callable[..., Either], service: FakeService, **options: Any) -> Either:
    """A client with app/db (version 1) cached and its watch stream up."""
    service.write("app/db", {"k": "v1"})
    client = make(**options)
    await cached_and_watching(client, service, "app/db")
    return client


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    await asyncio.to_thread(wait_until, condition, timeout)


async def cached_and_watching(client: Either, service: FakeService, path: str) -> Secret:
    """Read `path` until it is cached with the stream up (the stream's start forgets what was
    read before it: a change then may never be told)."""
    await client.get(path)
    await until(lambda: client.stream_connected and service.live() == 1)
    return await client.get(path)


# -- the cache ------------------------------------------------------------------------------


async def test_a_second_read_is_served_from_the_cache_without_a_request(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"password": CANARY})
    client = make()
    secret = await cached_and_watching(client, service, "app/db")
    reads = len(service.reads)
    again = await client.get("app/db")
    assert again is secret and dict(again.data) == {"password": CANARY}
    assert len(service.reads) == reads
    assert client.stats.hits >= 1
    assert CANARY not in repr(again)


async def test_a_pinned_version_is_never_cached(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v"})
    client = make()
    for _ in range(2):
        await client.get("app/db", version=1)
    assert service.reads == ["app/db", "app/db"]
    assert client.stats == CacheStats(0, 0, 0, 0, 0)  # nor is a watch stream started


async def test_an_event_for_the_path_evicts_it_and_the_next_read_gets_the_new_version(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v1"})
    service.write("app/other", {"k": "o"})  # before the stream: no event will evict it
    client = make()
    await cached_and_watching(client, service, "app/db")
    await client.get("app/other")
    evictions = client.stats.evictions
    service.write("app/db", {"k": "v2"})  # as another instance: only the event tells
    await until(lambda: client.stats.evictions == evictions + 1)
    assert (await client.get("app/db")).version == 2
    reads = len(service.reads)
    await client.get("app/other")
    assert len(service.reads) == reads  # another path's entry stays


async def test_a_read_that_an_event_overtook_is_read_again_and_never_cached_stale(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = await watched(make, service)
    evictions = client.stats.evictions
    service.stale_reads = 2  # the instance answering lags the stream by two reads
    service.write("app/db", {"k": "v2"})
    await until(lambda: client.stats.evictions == evictions + 1)
    reads = len(service.reads)
    secret = await client.get("app/db")
    assert (secret.version, len(service.reads)) == (2, reads + 3)
    assert (await client.get("app/db")) is secret  # the new version, cached


async def test_a_reset_event_forgets_the_whole_cache(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = await watched(make, service)
    service.send(b'event: reset\ndata: {"reason": "history_gone", "first_sequence": 9}\n\n')
    await until(lambda: client.stats.entries == 0)
    reads = len(service.reads)
    await client.get("app/db")
    assert len(service.reads) == reads + 1


async def test_a_write_through_the_client_evicts_its_path_at_once(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = await watched(make, service)
    service.streams[0].prefix = "nothing"  # its event never arrives: the write itself evicts
    assert await client.set("app/db", {"k": "v2"}, version=1) == 2
    assert (await client.get("app/db")).version == 2


async def test_a_stale_set_raises_version_conflict_carrying_the_current_version(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v1"})
    service.write("app/db", {"k": "v2"})
    client = make()
    with pytest.raises(ClientError) as raised:
        await client.set("app/db", {"k": CANARY}, version=1)
    error = raised.value
    assert (error.error, error.status, error.current_version) == ("version_conflict", 409, 2)
    assert CANARY not in str(error) and CANARY not in repr(error.body)


async def test_while_the_stream_is_down_the_fallback_bound_applies_at_once(
    make: Callable[..., Either], service: FakeService
) -> None:
    clock = Clock()
    client = await watched(make, service, clock=clock, cache_ttl=300.0, fallback_ttl=5.0)
    clock.now += 60  # older than the fallback bound, younger than the TTL
    reads = len(service.reads)
    await client.get("app/db")
    assert len(service.reads) == reads  # the stream is up: still fresh
    service.watch_status = 503
    service.cut()
    await until(lambda: not client.stream_connected)
    await client.get("app/db")
    assert len(service.reads) == reads + 1  # re-read: the stream may have missed a change
    await client.get("app/db")
    assert len(service.reads) == reads + 1  # and this read is young: cached again


async def test_a_reconnect_resumes_with_last_event_id_so_the_cache_survives_it(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v1"})
    service.write("app/other", {"k": "o"})  # before the stream: no event will evict it
    client = make()
    await cached_and_watching(client, service, "app/db")
    await client.get("app/other")
    service.write("app/seen", {"k": "s"})  # sequence 3: the resume point
    service.watch_status = 503
    service.cut()  # after sequence 3 is sent: the client reads it before the connection's end
    await until(lambda: not client.stream_connected)
    service.write("app/db", {"k": "v2"})  # sequence 4, while the stream is down
    service.watch_status = None
    await until(lambda: client.stream_connected and client.stats.reconnects == 1)
    assert service.watch_headers[-1]["Last-Event-ID"] == "3"
    await until(lambda: client.stats.entries == 1)  # the missed change, replayed, evicted
    reads = len(service.reads)
    assert (await client.get("app/db")).version == 2
    await client.get("app/other")
    assert len(service.reads) == reads + 1  # app/other survived the reconnect


# -- the token provider ---------------------------------------------------------------------


async def test_the_token_provider_is_asked_for_each_request_and_each_connection(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v"})
    issued = iter(f"token-{n}" for n in range(1000))
    calls: list[str] = []

    def provider() -> str:
        calls.append(token := next(issued))
        return token

    client = make(token=provider)
    await cached_and_watching(client, service, "app/db")
    await client.get("app/db", version=1)
    assert len(service.tokens) >= 3  # two reads and a watch connection at least
    assert set(service.tokens) <= set(calls)
    assert len(set(service.tokens)) == len(service.tokens)  # each sent a token of its own


async def test_an_async_token_provider_is_awaited(service: FakeService) -> None:
    service.write("app/db", {"k": "v"})

    async def provider() -> str:
        await asyncio.sleep(0)
        return "async-token"

    async with AsyncSecretsClient(service.url, token=provider) as client:
        await client.get("app/db", version=1)
    assert service.tokens == ["async-token"]


async def test_a_401_on_reconnect_is_cured_by_the_providers_next_token(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v"})
    current = {"token": "first"}
    client = make(token=lambda: current["token"])
    await cached_and_watching(client, service, "app/db")
    service.refused_tokens.add("first")  # it expired
    used = len(service.tokens)
    service.cut()
    await until(lambda: len(service.tokens) >= used + 2)  # refused, asked again, refused
    assert not client.stream_connected
    current["token"] = "second"  # the identity provider's refresh
    await until(lambda: client.stream_connected and client.stats.reconnects == 1)
    assert service.watch_headers[-1]["Authorization"] == "Bearer second"


async def test_a_token_provider_that_fails_raises_invalid_token_for_a_read(
    make: Callable[..., Either], service: FakeService
) -> None:
    def provider() -> str:
        raise RuntimeError(f"vault said {CANARY}")

    client = make(token=provider)
    with pytest.raises(ClientError) as raised:
        await client.get("app/db", version=1)
    assert raised.value.error == "invalid_token"
    assert CANARY not in str(raised.value)


# -- watch() --------------------------------------------------------------------------------


async def test_watch_yields_the_prefixes_changes_typed_and_resumes_across_a_cut(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = make(cache=False)
    connections: list[int | None] = []
    up = threading.Event()

    def connected(after: int | None) -> None:
        connections.append(after)
        up.set()

    collecting = asyncio.ensure_future(client.changes("app", 3, connected))
    await until(up.is_set)
    service.write("app/a", {"k": "1"})
    service.write("other/x", {"k": "1"})  # not below the prefix
    service.watch_status = 503
    service.cut()
    service.write("app/b", {"k": "1"})  # while the stream is down
    service.watch_status = None
    service.write("app/a", {"k": "2"})
    changes = await asyncio.wait_for(collecting, 20)
    assert [(c.type, c.path, c.version, c.sequence) for c in changes] == [
        ("secret.created", "app/a", 1, 1),
        ("secret.created", "app/b", 1, 3),
        ("secret.updated", "app/a", 2, 4),
    ]
    assert connections[0] is None and connections[-1] == 1
    assert "Last-Event-ID" not in service.watch_headers[0]


async def test_watch_raises_the_first_connections_refusal(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.watch_status = 403
    client = make(cache=False)
    with pytest.raises(ClientError) as raised:
        await client.changes("app", 1, lambda after: None)
    assert (raised.value.status, raised.value.error) == (403, "refused")


async def test_watch_refuses_a_bad_prefix_before_any_request(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = make(cache=False)
    with pytest.raises(ClientError) as raised:
        client.client.watch("app/../x")
    assert raised.value.error == "invalid_path"
    assert service.watch_headers == []


# -- a hostile or silent stream --------------------------------------------------------------


async def test_a_line_over_a_mebibyte_drops_the_connection_and_the_cache_reconnects(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = await watched(make, service)
    service.send(b"data: " + b"x" * (1 << 20) + b"x")
    await until(lambda: client.stats.reconnects == 1 and client.stream_connected)


async def test_a_silent_stream_is_given_up_after_stream_timeout(
    make: Callable[..., Either], service: FakeService
) -> None:
    service.write("app/db", {"k": "v"})
    client = make(stream_timeout=0.3)  # the fake sends no keep-alive
    await cached_and_watching(client, service, "app/db")
    await until(lambda: client.stats.reconnects >= 1)


async def test_closing_the_client_stops_its_watch(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = await watched(make, service)
    await client.close()
    await until(lambda: service.live() == 0)
    if client.blocking is not None:
        watcher = client.blocking._watcher
        assert watcher is not None and not watcher.is_alive()
    else:
        assert client.aio is not None and client.aio._watcher is None
    assert not client.stream_connected


async def test_closing_the_client_ends_a_watch_in_progress(
    make: Callable[..., Either], service: FakeService
) -> None:
    client = make(cache=False)
    up = threading.Event()
    collecting = asyncio.ensure_future(client.changes("app", 1, lambda after: up.set()))
    await until(up.is_set)
    await client.close()
    assert await asyncio.wait_for(collecting, 10) == []

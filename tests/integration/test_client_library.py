"""The client library against the real stack (OpenBao, NATS, two service instances, tokens from an
issuer the test controls): a cached read evicted by a write through the other instance, the canary
never on the watch stream, a refreshed token keeping the stream going past expiry, and the cache
correct across a restart of the instance it watches, the fallback bound in force while it is down.
Without a service: tests/unit/secrets_client/."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
from joserfc.jwk import RSAKey

from devstack import NatsEndpoint, OpenBaoEndpoint, free_port
from events.listener import Change
from secrets_client import AsyncSecretsClient, ClientError, SecretsClient
from service.settings import Settings
from tests.support import (
    READER_WRITER_POLICY as POLICY,
)
from tests.support import (
    RunningService,
    eventually,
    running_service,
    service_settings,
    write_policy,
)
from tests.tokens import LocalIssuer, sign

AUDIENCE = "secrets-service"
CANARY = "canary-c1f2-never-on-the-stream"
EVICTION_DEADLINE = 5.0  # seconds from a write's answer to the eviction; measured in ms


class Issuer:
    def __init__(self, local: LocalIssuer, key: RSAKey) -> None:
        self.url = local.url
        self.key = key

    def token(self, roles: list[str], *, lifetime: float = 300, sub: str = "app") -> str:
        now = time.time()
        claims = {"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "nbf": now}
        return sign({**claims, "exp": now + lifetime, "roles": roles}, self.key)

    def reader(self) -> str:
        return self.token(["app-reader"])


class Instances:
    """A, the instance the clients read from and watch, and B, through which others write."""

    def __init__(self, a: RunningService, b: RunningService, issuer: Issuer) -> None:
        self.a = a
        self.b = b
        self.issuer = issuer

    async def write_through_b(self, path: str, data: dict[str, Any]) -> int:
        headers = {"Authorization": f"Bearer {self.issuer.token(['writer'], sub='writer')}"}
        async with httpx.AsyncClient(base_url=self.b.url, headers=headers, timeout=10) as http:
            current = await http.get(f"/secrets/{path}")
            version = current.json()["version"] if current.status_code == 200 else 0
            answer = await http.patch(f"/secrets/{path}", json={"data": data, "version": version})
        assert answer.status_code == 200, answer.text
        new: int = answer.json()["version"]
        return new


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def issuer() -> Iterator[Issuer]:
    key = RSAKey.generate_key(2048, parameters={"kid": "client-library"})
    with LocalIssuer([key.as_dict(private=False)]) as local:
        yield Issuer(local, key)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_policy(tmp_path_factory.mktemp("client-library"), POLICY)


def settings_for(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, issuer: Issuer, policy: Path, port: int
) -> Settings:
    oidc = SimpleNamespace(issuer=issuer.url, audience=AUDIENCE)
    return service_settings(
        openbao, nats, oidc, policy, port=str(port), audit_sink="none", watch_heartbeat="1"
    )


@pytest.fixture(scope="module")
async def instances(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, issuer: Issuer, policy: Path
) -> AsyncIterator[Instances]:
    a_settings = settings_for(openbao, nats, issuer, policy, free_port())
    b_settings = settings_for(openbao, nats, issuer, policy, free_port())
    async with running_service(a_settings) as a, running_service(b_settings) as b:
        yield Instances(a, b, issuer)


def fresh() -> str:
    return f"app/lib-{uuid.uuid4().hex[:10]}/db"


async def watching(connected: Callable[[], bool]) -> None:
    await eventually(connected, timeout=10)


# -- eviction by a write elsewhere ------------------------------------------------------------


async def test_a_cached_async_read_is_evicted_by_a_write_through_another_instance(
    instances: Instances,
) -> None:
    path = fresh()
    await instances.write_through_b(path, {"password": "v1"})
    async with AsyncSecretsClient(instances.a.url, token=instances.issuer.reader) as client:
        await client.get(path)
        await watching(lambda: client.stream_connected)
        first = await client.get(path)
        hits = client.stats.hits
        assert (await client.get(path)) is first and client.stats.hits == hits + 1
        evictions = client.stats.evictions
        await instances.write_through_b(path, {"password": "v2"})
        await eventually(lambda: client.stats.evictions > evictions, timeout=EVICTION_DEADLINE)
        again = await client.get(path)
    assert (first.version, again.version) == (1, 2)
    assert dict(again.data) == {"password": "v2"}


async def test_a_cached_blocking_read_is_evicted_by_a_write_through_another_instance(
    instances: Instances,
) -> None:
    path = fresh()
    await instances.write_through_b(path, {"password": "v1"})
    client = SecretsClient(instances.a.url, token=instances.issuer.reader)
    try:
        await asyncio.to_thread(client.get, path)
        await watching(lambda: client.stream_connected)
        first = await asyncio.to_thread(client.get, path)
        evictions = client.stats.evictions
        await instances.write_through_b(path, {"password": "v2"})
        await eventually(lambda: client.stats.evictions > evictions, timeout=EVICTION_DEADLINE)
        again = await asyncio.to_thread(client.get, path)
    finally:
        await asyncio.to_thread(client.close)
    assert (first.version, again.version) == (1, 2)


# -- the stream never carries a value -----------------------------------------------------------


class _Tee(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, sink: bytearray) -> None:
        self.inner = inner
        self.sink = sink

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.sink += chunk
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingTransport(httpx.AsyncHTTPTransport):
    """Keeps every byte of every watch stream's body (reads are left alone: they hold values)."""

    def __init__(self) -> None:
        super().__init__()
        self.streamed = bytearray()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if not request.url.path.endswith(":watch"):
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Tee(response.stream, self.streamed),
            extensions=response.extensions,
        )


async def test_the_canary_never_appears_on_the_watch_stream(instances: Instances) -> None:
    path = fresh()
    folder = path.rsplit("/", 1)[0]
    transport = RecordingTransport()
    changes: list[Change] = []
    async with AsyncSecretsClient(
        instances.a.url, token=instances.issuer.reader, transport=transport
    ) as client:
        up = asyncio.Event()
        async with aclosing(client.watch(folder, on_connect=lambda after: up.set())) as watch:

            async def collect() -> None:
                async for change in watch:
                    changes.append(change)
                    if len(changes) == 2:
                        return

            collecting = asyncio.ensure_future(collect())
            await asyncio.wait_for(up.wait(), 10)
            await instances.write_through_b(path, {"password": CANARY})
            assert (await client.get(path)).data["password"] == CANARY  # the value is readable
            await instances.write_through_b(path, {"password": CANARY + "-2"})
            await asyncio.wait_for(collecting, 10)
    assert [(c.type, c.path, c.version) for c in changes] == [
        ("secret.created", path, 1),
        ("secret.updated", path, 2),
    ]
    assert changes[0].sequence < changes[1].sequence
    assert all(CANARY not in msgspec.json.encode(c.event).decode() for c in changes)
    assert path.encode() in transport.streamed and CANARY.encode() not in transport.streamed


# -- tokens -----------------------------------------------------------------------------------


async def test_a_token_provider_keeps_the_stream_going_past_each_tokens_expiry(
    instances: Instances,
) -> None:
    issued: list[str] = []

    def provider() -> str:
        issued.append(instances.issuer.token(["app-reader"], lifetime=2))
        return issued[-1]

    path = fresh()
    await instances.write_through_b(path, {"k": "v1"})
    async with AsyncSecretsClient(instances.a.url, token=provider) as client:
        await client.get(path)
        await watching(lambda: client.stream_connected)
        # The service ends the stream at the token's expiry; the client connects again at once
        # with the provider's next token, resuming after the last event.
        await eventually(lambda: client.stats.reconnects >= 2, timeout=15)
        await watching(lambda: client.stream_connected)
        await client.get(path)
        evictions = client.stats.evictions
        await instances.write_through_b(path, {"k": "v2"})
        await eventually(lambda: client.stats.evictions > evictions, timeout=EVICTION_DEADLINE)
        assert (await client.get(path)).version == 2
    assert len(set(issued)) == len(issued) >= 3


async def test_a_watch_with_an_expired_token_and_nothing_to_refresh_it_raises_401(
    instances: Instances,
) -> None:
    expired = instances.issuer.token(["app-reader"], lifetime=-60)
    async with AsyncSecretsClient(instances.a.url, token=expired) as client:
        with pytest.raises(ClientError) as raised:
            async with aclosing(client.watch()) as watch:
                async for _ in watch:
                    pass
    assert (raised.value.status, raised.value.error) == (401, "unauthenticated")


# -- a restart of the instance the client watches -----------------------------------------------


async def test_the_cache_stays_correct_across_a_restart_with_the_fallback_bound_while_down(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    issuer: Issuer,
    policy: Path,
    instances: Instances,
) -> None:
    settings = settings_for(openbao, nats, issuer, policy, free_port())
    changed, unchanged = fresh(), fresh()
    await instances.write_through_b(changed, {"k": "v1"})
    await instances.write_through_b(unchanged, {"k": "u1"})
    clock = Clock()
    client = AsyncSecretsClient(
        f"http://127.0.0.1:{settings.port}",
        token=issuer.reader,
        clock=clock,
        fallback_ttl=5.0,
        timeout=2.0,
    )
    try:
        async with running_service(settings):
            await client.get(changed)
            await watching(lambda: client.stream_connected)
            await client.get(changed)
            await client.get(unchanged)
            # A change the client's stream delivers, so that it has a point to resume after.
            await instances.write_through_b(fresh(), {"k": "x"})
            await eventually(lambda: client.stream_sequence is not None, timeout=EVICTION_DEADLINE)
        # The instance is gone: the stream is marked down at once, and the fallback bound
        # rules. Meanwhile a change goes through B.
        assert not client.stream_connected
        await instances.write_through_b(changed, {"k": "v2"})
        clock.now += 4.0  # within the fallback bound: the cached versions are served
        assert (await client.get(changed)).version == 1
        clock.now += 1.5  # past it: the client asks the service, which is not there
        with pytest.raises(ClientError) as raised:
            await client.get(changed)
        assert raised.value.error == "unreachable"
        hits = client.stats.hits
        async with running_service(settings):
            # Reconnected with Last-Event-ID: the change made while down is replayed and
            # evicts the path; the unchanged path's entry survives (the TTL bound again).
            await eventually(lambda: client.stream_connected, timeout=15)
            await eventually(lambda: client.stats.entries == 1, timeout=EVICTION_DEADLINE)
            assert (await client.get(changed)).version == 2
            assert (await client.get(unchanged)).version == 1
            assert client.stats.hits == hits + 1  # the unchanged one, from the cache
            assert client.stats.reconnects >= 1
    finally:
        await client.aclose()

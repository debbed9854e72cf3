"""`SecretsClient` against the real stack (OpenBao, NATS, OIDC tokens, the service): typed reads,
CAS writes, and refusals as `ClientError` carrying the API's error code.

The client is blocking and the service runs on this test's event loop, so every call goes
through a thread."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.secret import Secret
from secrets_client import ClientError, SecretsClient
from tests.support import running_service, service_settings, write_policy

T = TypeVar("T")
CANARY = "canary-5ecc1e-only-in-data"


class Clients:
    def __init__(self, url: str, tokens: dict[str, str]) -> None:
        self.url = url
        self.tokens = tokens

    async def call(self, who: str, use: Callable[[SecretsClient], T]) -> T:
        def run() -> T:
            with SecretsClient(self.url, token=self.tokens[who], timeout=10) as client:
                return use(client)

        return await asyncio.to_thread(run)


@pytest.fixture(scope="module")
async def clients(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Clients]:
    policy = write_policy(tmp_path_factory.mktemp("client"))  # the dev policy
    settings = service_settings(openbao, nats, oidc, policy, audit_sink="none")
    async with running_service(settings) as svc:
        yield Clients(svc.url, {who: oidc.mint(who) for who in ("reader", "writer")})


def fresh() -> str:
    return f"app/client-{uuid.uuid4().hex[:10]}/db"


async def test_set_then_get_returns_a_secret_whose_data_prints_redacted(clients: Clients) -> None:
    path = fresh()
    version = await clients.call("writer", lambda c: c.set(path, {"token": CANARY}, version=0))
    secret = await clients.call("reader", lambda c: c.get(path))
    assert isinstance(secret, Secret)
    assert (secret.path, secret.version, dict(secret.data)) == (path, version, {"token": CANARY})
    assert CANARY not in repr(secret) and CANARY not in str(secret.data)


async def test_a_stale_set_raises_conflict_with_the_current_version(clients: Clients) -> None:
    path = fresh()
    await clients.call("writer", lambda c: c.set(path, {"token": "one"}, version=0))
    await clients.call("writer", lambda c: c.set(path, {"token": "two"}, version=1))
    with pytest.raises(ClientError) as raised:
        await clients.call("writer", lambda c: c.set(path, {"token": CANARY}, version=1))
    error = raised.value
    assert (error.error, error.status) == ("version_conflict", 409)
    assert error.body["current_version"] == 2
    assert CANARY not in str(error) and CANARY not in repr(error.body)
    secret = await clients.call("reader", lambda c: c.get(path))
    assert dict(secret.data) == {"token": "two"}  # nothing stored was lost


async def test_each_refusal_raises_client_error_with_the_apis_code(clients: Clients) -> None:
    path = fresh()
    cases: list[tuple[str, Callable[[SecretsClient], Any], str, int]] = [
        ("reader", lambda c: c.get(fresh()), "not_found", 404),
        ("reader", lambda c: c.set(path, {"k": "v"}, version=0), "forbidden", 403),
        ("reader", lambda c: c.get("other/x"), "forbidden", 403),
        ("writer", lambda c: c.get(path, version=7), "not_found", 404),
    ]
    for who, use, code, status in cases:
        with pytest.raises(ClientError) as raised:
            await clients.call(who, use)
        assert (raised.value.error, raised.value.status) == (code, status), (who, code)

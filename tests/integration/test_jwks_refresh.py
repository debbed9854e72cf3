"""service.auth.oidc through the running service: a key the issuer withdraws stops working over
HTTP, cached reads included. The issuer is on a loopback port (aiohttp) and the test changes its
key set while the service runs. The scheduled refresh itself, against a fake issuer with a fake
clock: tests/unit/service/auth/test_oidc_refresh.py.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web
from joserfc.jwk import ECKey, Key, RSAKey

from devstack import NatsEndpoint, OpenBaoEndpoint
from tests import tokens
from tests.support import bearer, eventually, running_service, service_settings, write_policy
from tests.tokens import AUDIENCE, token

# Fixtures of tests/tokens.py, shared with the unit tests.
k1 = tokens.k1
k2 = tokens.k2


class KeyServer:
    """An OIDC issuer on a loopback port (aiohttp, in the test's loop) with a mutable key set."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys
        self.url = ""
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app, access_log=None)

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.url, "jwks_uri": self.url + "/jwks"})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [key.as_dict(private=False) for key in self.keys]})

    async def __aenter__(self) -> KeyServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def live_token(issuer: KeyServer, key: Key, **overrides: Any) -> str:
    now = time.time()
    values: dict[str, Any] = {"iss": issuer.url, "iat": now, "nbf": now, "exp": now + 300}
    return token(key, **{**values, "roles": ["admin"], **overrides})


class Live:
    def __init__(self, issuer: KeyServer, client: httpx.AsyncClient) -> None:
        self.issuer = issuer
        self.client = client


@pytest.fixture(scope="module")
async def live(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    tmp_path_factory: pytest.TempPathFactory,
    k1: RSAKey,
    k2: ECKey,
) -> AsyncIterator[Live]:
    policy: Path = write_policy(tmp_path_factory.mktemp("jwks-refresh"))
    async with KeyServer([k1, k2]) as issuer:
        oidc = SimpleNamespace(issuer=issuer.url, audience=AUDIENCE)
        settings = service_settings(openbao, nats, oidc, policy, oidc_jwks_refresh="0.5")
        async with (
            running_service(settings) as svc,
            httpx.AsyncClient(base_url=svc.url) as client,
        ):
            yield Live(issuer, client)


def refusal(response: httpx.Response) -> str:
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    return challenge.partition('error_description="')[2].partition('"')[0]


async def test_a_null_scope_is_refused_over_http(live: Live, k2: ECKey) -> None:
    response = await live.client.get(
        "/secrets/app/anything", headers=bearer(live_token(live.issuer, k2, scope=None))
    )
    assert refusal(response) == "invalid_claim"


async def test_a_key_the_issuer_withdraws_stops_working_over_http_cached_reads_included(
    live: Live, k1: RSAKey, k2: ECKey
) -> None:
    client, issuer = live.client, live.issuer
    path = f"/secrets/app/jwks-{secrets.token_hex(4)}"
    body = {"data": {"password": secrets.token_urlsafe(24)}, "version": 0}
    written = await client.patch(path, json=body, headers=bearer(live_token(issuer, k2)))
    assert written.status_code == 200, written.text

    forged_admin = live_token(issuer, k1)  # made with a key that leaked
    for _ in range(2):  # the second read comes from the verified-token and secret caches
        assert (await client.get(path, headers=bearer(forged_admin))).status_code == 200

    issuer.keys = [k2]

    async def refused() -> bool:
        return (await client.get(path, headers=bearer(forged_admin))).status_code == 401

    await eventually(refused, timeout=10)
    assert refusal(await client.get(path, headers=bearer(forged_admin))) == "unknown_key"
    fresh = live_token(issuer, k1, sub="fresh")
    assert refusal(await client.get(path, headers=bearer(fresh))) == "unknown_key"
    assert (await client.get(path, headers=bearer(live_token(issuer, k2)))).status_code == 200

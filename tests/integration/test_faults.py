"""Vault trouble seen through the API: unreachable, frozen or refusing our token; recovery."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from devstack import OpenBaoServer, free_port
from tests.support import LogCapture, bearer, running_service, service_settings, write_policy

VAULT_TIMEOUT = 1.0
# The service ends a Vault call by 2 x timeout + 1 s: up to timeout + 1 s waiting for a free
# worker, then the call's own timeout (`service.vault.backend`).
VAULT_DEADLINE = VAULT_TIMEOUT * 2 + 1
# Added to a bound for a loaded 2-core machine, where the service shares its loop with the test.
SLACK = 2.0
# `/readyz` re-checks Vault at most once a second (`service.http.resources.Readiness`).
READINESS_RECHECK = 1.0


class _Endpoint:
    def __init__(self, addr: str, root_token: str) -> None:
        self.addr = addr
        self.root_token = root_token


@pytest.fixture(scope="module")
def own_openbao() -> Iterator[OpenBaoServer]:
    """An OpenBao of this module's own, so freezing and stopping it disturbs no other test."""
    with OpenBaoServer() as server:  # started here, stopped at the end
        yield server


@pytest.fixture(scope="module")
async def faulty(
    own_openbao: OpenBaoServer, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    policy = write_policy(tmp_path_factory.mktemp("faults"))
    settings = service_settings(own_openbao, nats, oidc, policy, vault_timeout=str(VAULT_TIMEOUT))
    tokens = {who: oidc.mint(who) for who in ("reader", "writer")}
    async with running_service(settings) as svc:
        yield svc.url, tokens


async def test_frozen_vault_gives_503_within_the_timeout_then_recovers(
    faulty: tuple[str, dict[str, str]], own_openbao: OpenBaoServer
) -> None:
    url, tokens = faulty
    path = f"app/f-{uuid.uuid4().hex[:8]}/db"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (
            await client.patch(
                f"/secrets/{path}",
                json={"data": {"k": "v"}, "version": 0},
                headers=bearer(tokens["writer"]),
            )
        ).status_code == 200
        own_openbao.pause()
        try:
            started = time.monotonic()
            uncached = await client.get(
                f"/secrets/{path}", params={"version": "1"}, headers=bearer(tokens["reader"])
            )
            elapsed = time.monotonic() - started
            write = await client.patch(
                f"/secrets/{path}",
                json={"data": {"k": "w"}, "version": 1},
                headers=bearer(tokens["writer"]),
            )
            ready = await client.get("/readyz")
            # A cached read is still served while Vault is frozen (within the staleness bound).
            cached = await client.get(f"/secrets/{path}", headers=bearer(tokens["reader"]))
        finally:
            own_openbao.resume()
        assert uncached.status_code == 503
        assert uncached.json()["error"] == "backend_unavailable"
        assert elapsed < VAULT_DEADLINE + SLACK
        assert write.status_code == 503
        assert ready.status_code == 503 and ready.json()["checks"]["vault"] is False
        assert cached.status_code == 200 and cached.json()["version"] == 1
        # Resumed: ready again once readiness is re-checked.
        deadline = time.monotonic() + READINESS_RECHECK + VAULT_DEADLINE + SLACK
        while (await client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "not ready again after Vault resumed"
            await asyncio.sleep(0.1)


async def test_unreachable_vault_gives_503_and_not_ready(
    nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    dead = _Endpoint(f"http://127.0.0.1:{free_port()}", "whatever")
    policy = write_policy(tmp_path_factory.mktemp("dead"))
    settings = service_settings(dead, nats, oidc, policy, vault_timeout=str(VAULT_TIMEOUT))
    async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
        r = await client.get("/secrets/app/db", headers=bearer(oidc.mint("reader")))
        assert r.status_code == 503
        assert r.json() == {
            "error": "backend_unavailable",
            "detail": "the secrets backend is unavailable",
        }
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"vault": False, "nats": True}


async def test_vault_refusing_our_token_is_503_with_a_clear_log_line(
    openbao: Any, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    wrong = _Endpoint(openbao.addr, "not-a-valid-token")
    policy = write_policy(tmp_path_factory.mktemp("denied"))
    settings = service_settings(wrong, nats, oidc, policy)
    with LogCapture() as logs:
        async with running_service(settings) as svc, httpx.AsyncClient(base_url=svc.url) as client:
            r = await client.get("/secrets/app/db", headers=bearer(oidc.mint("reader")))
    assert r.status_code == 503
    assert r.json()["error"] == "backend_unavailable"
    assert "vault refused the service's token" in logs.text
    assert "not-a-valid-token" not in logs.text

"""secrets_client/client.py without a service: a path no route would accept is refused before any
request, and an address nobody listens on is `unreachable`. Against the real stack:
tests/integration/test_secrets_client.py."""

from __future__ import annotations

import asyncio

import pytest

from devstack import free_port
from secrets_client import ClientError, SecretsClient


async def test_an_invalid_path_is_refused_before_any_request() -> None:
    # Closed port: a request would fail as `unreachable`, so `invalid_path` proves none was made.
    def use() -> None:
        with SecretsClient(f"http://127.0.0.1:{free_port()}", token="t") as client:
            client.get("app/../db")

    with pytest.raises(ClientError) as raised:
        await asyncio.to_thread(use)
    assert (raised.value.error, raised.value.status) == ("invalid_path", 0)


async def test_an_unreachable_service_raises_unreachable_with_status_0() -> None:
    def use() -> None:
        with SecretsClient(f"http://127.0.0.1:{free_port()}", token="t", timeout=5) as client:
            client.get("app/db")

    with pytest.raises(ClientError) as raised:
        await asyncio.to_thread(use)
    assert (raised.value.error, raised.value.status) == ("unreachable", 0)

"""The HTTP watch stream (SSE) end to end: real OpenBao and NATS, a service with tokens from an
issuer the test controls (so that a token can expire within the test). RBAC filtering, prefixes,
`Last-Event-ID` resume (also across an instance restart), limits, token expiry, keep-alives, and
the canary never on a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from joserfc.jwk import RSAKey

from devstack import NatsEndpoint, OpenBaoEndpoint, free_port
from tests.support import (
    READER_WRITER_POLICY as POLICY,
)
from tests.support import (
    RunningService,
    eventually,
    running_service,
    service_settings,
    vault_write,
    write_policy,
)
from tests.tokens import LocalIssuer, sign

AUDIENCE = "secrets-service"
CANARY = "canary-watch-5e1d-never-streamed"


class Sse:
    """One open watch stream, read event by event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self, timeout: float = 10.0) -> dict[str, str]:
        """The next event or comment block: {"id", "event", "data"} or {"comment": ...}."""
        fields: dict[str, str] = {}
        while True:
            line = await asyncio.wait_for(self._lines.__anext__(), timeout)
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")

    async def event(self, timeout: float = 10.0) -> dict[str, str]:
        """The next event, comments and `retry` skipped."""
        while True:
            block = await self.next(timeout)
            if "event" in block:
                return block


class Stack:
    def __init__(self, svc: RunningService, key: RSAKey, issuer: str, policy: Path) -> None:
        self.svc = svc
        self.key = key
        self.issuer = issuer
        self.policy = policy
        self.client = httpx.AsyncClient(base_url=svc.url, timeout=30)

    def token(self, roles: list[str], *, lifetime: float = 300, sub: str = "reader") -> str:
        now = time.time()
        return sign(
            {
                "iss": self.issuer,
                "aud": AUDIENCE,
                "sub": sub,
                "iat": now,
                "nbf": now,
                "exp": now + lifetime,
                "roles": roles,
            },
            self.key,
        )

    async def write(self, path: str, data: dict[str, Any]) -> int:
        headers = {"Authorization": f"Bearer {self.token(['writer'], sub='writer')}"}
        current = await self.client.get(f"/secrets/{path}", headers=headers)
        version = current.json()["version"] if current.status_code == 200 else 0
        response = await self.client.patch(
            f"/secrets/{path}", json={"data": data, "version": version}, headers=headers
        )
        assert response.status_code == 200, response.text
        new: int = response.json()["version"]
        return new

    @contextlib.asynccontextmanager
    async def watch(
        self, prefix: str = "", token: str | None = None, last_id: str | None = None
    ) -> AsyncIterator[Sse]:
        target = f"/secrets/{prefix}:watch" if prefix else "/secrets:watch"
        headers = {"Authorization": f"Bearer {token or self.token(['app-reader'])}"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        async with self.client.stream("GET", target, headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield Sse(response)


@pytest.fixture(scope="module")
def issuer() -> Iterator[tuple[LocalIssuer, RSAKey]]:
    key = RSAKey.generate_key(2048, parameters={"kid": "watch-key"})
    with LocalIssuer([key.as_dict(private=False)]) as local:
        yield local, key


def settings_for(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, issuer: LocalIssuer, policy: Path, port: int
) -> Any:
    oidc = SimpleNamespace(issuer=issuer.url, audience=AUDIENCE)
    return service_settings(
        openbao,
        nats,
        oidc,
        policy,
        port=str(port),
        watch_heartbeat="0.5",
        watch_max_per_caller="3",
    )


@pytest.fixture(scope="module")
async def stack(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    issuer: tuple[LocalIssuer, RSAKey],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    local, key = issuer
    policy = write_policy(tmp_path_factory.mktemp("watch"), POLICY)
    settings = settings_for(openbao, nats, local, policy, free_port())
    async with running_service(settings) as svc:
        s = Stack(svc, key, local.url, policy)
        try:
            yield s
        finally:
            await s.client.aclose()


def fresh(prefix: str = "app") -> str:
    return f"{prefix}/w-{uuid.uuid4().hex[:8]}"


async def test_a_stream_carries_only_changes_the_caller_may_read_and_no_value(
    stack: Stack,
) -> None:
    mine, hidden = fresh("app"), fresh("other")
    async with stack.watch() as sse:
        await stack.write(hidden, {"password": CANARY})
        await stack.write(mine, {"password": CANARY})
        event = await sse.event()
        assert event["event"] == "secret.created"
        data = json.loads(event["data"])
        assert data["path"] == mine and data["version"] == 1
        assert int(event["id"]) > 0
        assert CANARY not in event["data"]


async def test_a_prefix_stream_carries_only_paths_at_or_below_it(stack: Stack) -> None:
    folder = fresh("app")
    async with stack.watch(folder) as sse:
        await stack.write(fresh("app"), {"v": "1"})
        await stack.write(f"{folder}/db", {"v": "1"})
        event = await sse.event()
        assert json.loads(event["data"])["path"] == f"{folder}/db"


async def test_nothing_readable_below_the_prefix_is_403_and_a_bad_id_is_400(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.token(['app-reader'])}"}
    assert (await stack.client.get("/secrets/other:watch", headers=headers)).status_code == 403
    bad = await stack.client.get("/secrets:watch", headers={**headers, "Last-Event-ID": "12; DROP"})
    assert bad.status_code == 400
    assert (await stack.client.get("/secrets:watch")).status_code == 401


async def test_last_event_id_resumes_without_a_gap_or_a_repeat(stack: Stack) -> None:
    path = fresh()
    async with stack.watch() as sse:
        await stack.write(path, {"v": "1"})
        first = await sse.event()
    await stack.write(path, {"v": "2"})
    await stack.write(path, {"v": "3"})
    async with stack.watch(last_id=first["id"]) as sse:
        versions = [json.loads((await sse.event())["data"])["version"] for _ in range(2)]
        await stack.write(path, {"v": "4"})
        versions.append(json.loads((await sse.event())["data"])["version"])
    assert versions == [2, 3, 4]


async def test_a_resume_older_than_the_stream_keeps_says_reset(stack: Stack) -> None:
    async with stack.watch(last_id="999999999") as sse:
        reset = await sse.event()
    assert reset["event"] == "reset"
    assert json.loads(reset["data"])["reason"] == "history_gone"


async def test_keep_alive_comments_flow_on_an_idle_stream(stack: Stack) -> None:
    async with stack.watch(fresh()) as sse:
        comments: list[str] = []
        while len(comments) < 2:
            block = await sse.next(timeout=5)
            if "comment" in block:
                comments.append(block["comment"])
    assert comments == ["keep-alive", "keep-alive"]


async def test_the_stream_ends_when_the_token_expires(stack: Stack) -> None:
    token = stack.token(["app-reader"], lifetime=2)
    started = time.monotonic()
    async with stack.watch(token=token) as sse:
        end = await sse.event(timeout=10)
    assert end["event"] == "end" and json.loads(end["data"]) == {"reason": "token_expired"}
    assert time.monotonic() - started < 8


async def test_streams_per_caller_are_bounded(stack: Stack) -> None:
    token = stack.token(["app-reader"], sub="greedy")
    headers = {"Authorization": f"Bearer {token}"}
    async with stack.watch(token=token), stack.watch(token=token), stack.watch(token=token):
        refused = await stack.client.get("/secrets:watch", headers=headers)
        assert refused.status_code == 429
        assert refused.json()["error"] == "too_many_streams"
        assert refused.headers["retry-after"] == "1"
    feed = stack.svc.state.watch_feed
    await eventually(lambda: not any(w.caller == "greedy" for w in feed.watches))


async def test_a_stream_resumes_across_an_instance_restart(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    issuer: tuple[LocalIssuer, RSAKey],
    stack: Stack,
) -> None:
    local, key = issuer
    port = free_port()
    path = fresh()
    settings = settings_for(openbao, nats, local, stack.policy, port)
    async with running_service(settings) as svc:
        other = Stack(svc, key, local.url, stack.policy)
        async with other.watch() as sse:
            await stack.write(path, {"v": "1"})
            last = await sse.event()
        await other.client.aclose()
    # While it is down, changes go on through another instance.
    await stack.write(path, {"v": "2"})
    vault_write(openbao, f"{path}-direct", {"v": "x"})  # not through a service: no event
    async with running_service(settings) as svc:
        again = Stack(svc, key, local.url, stack.policy)
        try:
            async with again.watch(last_id=last["id"]) as sse:
                event = await sse.event()
                assert json.loads(event["data"])["version"] == 2
                assert int(event["id"]) > int(last["id"])
        finally:
            await again.client.aclose()

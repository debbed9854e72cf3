"""Watch streams through a NATS node stop: two instances, each on its own node of a three-node
cluster. When A's node stops, A ends its streams (`end: unavailable`, so clients apply their
fallback bound at once); once A is connected again (to another node, or to its own restarted),
a stream resumed with `Last-Event-ID` gets every change made through B meanwhile, no gap."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx

from devstack import NatsServer, OidcIssuer, OpenBaoEndpoint
from tests.support import bearer, cluster_services, eventually, write_policy


async def next_event(lines: Any, timeout: float = 15.0) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        line = await asyncio.wait_for(lines.__anext__(), timeout)
        if line == "" and "event" in fields:
            return fields
        if line == "" or line.startswith(":"):
            fields = {} if line == "" else fields
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


async def test_a_node_stop_ends_the_stream_and_a_resume_misses_nothing(
    openbao: OpenBaoEndpoint,
    oidc: OidcIssuer,
    nats_cluster: list[NatsServer],
    tmp_path: Any,
) -> None:
    policy = write_policy(tmp_path)  # the dev policy: the reader reads app/**
    reader, writer = oidc.mint("reader"), oidc.mint("writer")
    path = f"app/wc-{uuid.uuid4().hex[:8]}"
    async with (
        asyncio.timeout(120),
        cluster_services(
            openbao, oidc, nats_cluster[:2], policy, "wcl", watch_heartbeat="1"
        ) as services,
    ):
        a, b = services
        async with httpx.AsyncClient(timeout=30) as client:

            async def write(version: int) -> None:
                response = await client.patch(
                    f"{b.url}/secrets/{path}",
                    json={"data": {"v": str(version)}, "version": version - 1},
                    headers=bearer(writer),
                )
                assert response.status_code == 200, response.text

            async with client.stream(
                "GET", f"{a.url}/secrets:watch", headers=bearer(reader)
            ) as response:
                lines = response.aiter_lines()
                await write(1)
                first = await next_event(lines)
                assert json.loads(first["data"])["version"] == 1
                await asyncio.to_thread(nats_cluster[0]._stop_process)
                end = await next_event(lines)
            assert end["event"] == "end" and json.loads(end["data"]) == {"reason": "unavailable"}
            await asyncio.to_thread(nats_cluster[0].start)

            async def ready() -> bool:
                return bool(a.state.watch_feed.ready)

            await eventually(ready, timeout=30, interval=0.2)
            # The client is away; changes go on through B. (Each is written once JetStream has
            # its quorum again: a publish during the election could be late or lost, which the
            # poller makes up for on the instances, not on a stream.)
            published = b.state.bus.published
            await write(2)
            await write(3)
            await eventually(lambda: b.state.bus.published >= published + 2, timeout=30)
            headers = {**bearer(reader), "Last-Event-ID": first["id"]}
            async with client.stream("GET", f"{a.url}/secrets:watch", headers=headers) as again:
                lines = again.aiter_lines()
                replayed = {json.loads((await next_event(lines))["data"])["version"] for _ in "ab"}
                await write(4)
                live = json.loads((await next_event(lines))["data"])["version"]
    assert (replayed, live) == ({2, 3}, 4)

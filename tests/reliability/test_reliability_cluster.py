"""Three instances over a three-node NATS cluster, one OpenBao: many writers on one counter
(no update lost), and a NATS node SIGKILLed and restarted under reads (the staleness bound holds).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from devstack import NatsServer
from events.bus import EventBus
from service.core.manager import SecretsManager
from tests.support import (
    bearer,
    cluster_services,
    record_figures,
    write_policy,
)

FALLBACK_TTL = 1.0
# Added to a bound for a loaded 2-core machine, where three instances share the test's loop.
SLACK = 1.0
# How long an event may take to arrive here before a test fails: a deadline, not a latency
# figure (`make bench` measures propagation: bench/results/latest.json, "propagation").
EVENT_DEADLINE = 5.0
# NATS up, reads on B are only as stale as an event's way there; were events not evicting, a
# read would be as stale as the phase is long (the cache TTL, 300 s, is far longer). A phase
# several times the bound tells the two apart.
STEADY_SECONDS = 3.0


@dataclass
class Instance:
    name: str
    url: str
    node: NatsServer
    manager: SecretsManager
    bus: EventBus


@pytest.fixture(scope="module")
async def instances(
    openbao: Any,
    oidc: Any,
    nats_cluster: list[NatsServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[list[Instance]]:
    policy = write_policy(tmp_path_factory.mktemp("reliability-cluster"))
    async with cluster_services(
        openbao,
        oidc,
        nats_cluster,
        policy,
        "rel",
        cache_fallback_ttl=str(FALLBACK_TTL),
        log_level="WARNING",
    ) as services:
        yield [
            Instance(n, svc.url, node, svc.app.state.manager, svc.app.state.bus)
            for n, svc, node in zip("ABC", services, nats_cluster, strict=True)
        ]


# -- concurrent writers ------------------------------------------------------------------------


@dataclass
class Tally:
    acked: list[tuple[int, int, str]] = field(default_factory=list)  # (version, count, writer)
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)


async def _increment_until(
    client: httpx.AsyncClient,
    url: str,
    path: str,
    token: str,
    name: str,
    until: float,
    tally: Tally,
) -> None:
    """Read, add one, CAS-write; on 409 read again. Every other answer is an error."""
    while time.monotonic() < until:
        got = await client.get(f"{url}/secrets/{path}", headers=bearer(token))
        if got.status_code != 200:
            tally.errors.append(f"GET {got.status_code} {got.text[:100]}")
            continue
        body = got.json()
        count = body["data"]["count"] + 1
        put = await client.patch(
            f"{url}/secrets/{path}",
            json={"data": {"count": count}, "version": body["version"]},
            headers=bearer(token),
        )
        if put.status_code == 200:
            tally.acked.append((put.json()["version"], count, name))
        elif put.status_code == 409:
            tally.conflicts += 1
        else:
            tally.errors.append(f"PATCH {put.status_code} {put.text[:100]}")


@pytest.mark.parametrize(
    ("writers", "seconds"),
    [
        pytest.param(16, 5.0, id="16-writers-5s"),
        pytest.param(24, 30.0, id="24-writers-30s", marks=pytest.mark.slow),
    ],
)
async def test_concurrent_cas_increments_over_three_instances_lose_no_update(
    instances: list[Instance], openbao: Any, oidc: Any, writers: int, seconds: float
) -> None:
    path = f"app/counter-{uuid.uuid4().hex[:8]}"
    token = oidc.mint("writer")
    vault_headers = {"X-Vault-Token": openbao.root_token}
    async with httpx.AsyncClient(base_url=openbao.addr, headers=vault_headers) as vault:
        # Every version kept (KV v2 keeps 10 by default), so every one can be checked below.
        r = await vault.post(f"/v1/secret/metadata/{path}", json={"max_versions": 100_000})
        assert r.status_code in (200, 204), r.text
    first = await instances[0].manager.set(path, {"count": 0}, 0)
    assert first.version == 1
    tally = Tally()
    limits = httpx.Limits(max_connections=writers)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        until = time.monotonic() + seconds
        started = time.monotonic()
        await asyncio.gather(
            *(
                _increment_until(client, instances[w % 3].url, path, token, f"w{w}", until, tally)
                for w in range(writers)
            )
        )
        elapsed = time.monotonic() - started

    assert tally.errors == []
    successes = len(tally.acked)
    assert successes > writers  # enough contention to mean something
    versions = sorted(version for version, _, _ in tally.acked)
    # Contiguous and each acknowledged once: version N+1 is the N-th increment.
    assert versions == list(range(2, successes + 2))
    assert all(count == version - 1 for version, count, _ in tally.acked)
    async with httpx.AsyncClient(base_url=openbao.addr, headers=vault_headers) as vault:
        meta = (await vault.get(f"/v1/secret/metadata/{path}")).json()["data"]
        assert meta["current_version"] == successes + 1
        assert sorted(map(int, meta["versions"])) == list(range(1, successes + 2))
        for version in range(1, successes + 2):
            stored = await vault.get(f"/v1/secret/data/{path}", params={"version": version})
            assert stored.json()["data"]["data"] == {"count": version - 1}, version
    # Every instance converges on the final value.
    async with httpx.AsyncClient(timeout=10) as client:
        for inst in instances:
            deadline = time.monotonic() + EVENT_DEADLINE
            while True:
                got = await client.get(f"{inst.url}/secrets/{path}", headers=bearer(token))
                if got.json()["data"] == {"count": successes}:
                    break
                assert time.monotonic() < deadline, (inst.name, got.json())
                await asyncio.sleep(0.02)
    per_writer = {name for _, _, name in tally.acked}
    record_figures(
        "concurrent_writers",
        writers=writers,
        instances=3,
        seconds=round(elapsed, 1),
        successful_writes=successes,
        writes_per_second=round(successes / elapsed, 1),
        conflicts_retried=tally.conflicts,
        writers_with_a_success=len(per_writer),
    )


# -- a NATS node killed ------------------------------------------------------------------------


async def test_a_nats_node_sigkilled_and_restarted_keeps_the_staleness_bound(
    instances: list[Instance],
) -> None:
    a, b, _ = instances
    path = f"app/staleness-{uuid.uuid4().hex[:8]}"
    await a.manager.set(path, {"v": 1}, 0)
    acked: list[tuple[float, int]] = [(time.monotonic(), 1)]  # (acknowledged at, version)
    reads: list[tuple[float, int]] = []  # (started at, version returned)
    running = True

    async def write_on_a() -> None:
        version = 1
        while running:
            version = (await a.manager.set(path, {"v": version + 1}, version)).version
            acked.append((time.monotonic(), version))
            await asyncio.sleep(0.03)

    async def read_on_b() -> None:
        while running:
            started = time.monotonic()
            reads.append((started, (await b.manager.get(path)).version))
            await asyncio.sleep(0.005)

    disconnects = b.bus.disconnects
    tasks = [asyncio.get_running_loop().create_task(f()) for f in (write_on_a, read_on_b)]
    try:
        await asyncio.sleep(STEADY_SECONDS)
        killed = time.monotonic()
        process = b.node.process
        assert process is not None
        process.kill()  # SIGKILL: no goodbye to the clients, no JetStream step-down
        # Waits, off the loop the instances share, so that reads and writes go on meanwhile.
        await asyncio.to_thread(process.wait)
        await asyncio.sleep(3.0)
        assert b.bus.disconnects > disconnects, "B never noticed its node died"
        restarted = time.monotonic()
        await asyncio.to_thread(b.node.start)  # same ports and JetStream store
        await asyncio.sleep(3.0)
    finally:
        running = False
        await asyncio.gather(*tasks)
    ended = time.monotonic()

    def staleness(started: float, version: int) -> float:
        """How long before `started` a newer version than `version` had been acknowledged."""
        newer = [at for at, v in acked if v > version and at < started]
        return started - min(newer) if newer else 0.0

    def worst(start: float, end: float) -> float:
        return max((staleness(t, v) for t, v in reads if start <= t < end), default=0.0)

    steady_before, while_down, after_restart = (
        worst(0, killed),
        worst(killed, restarted),
        worst(restarted, ended),
    )
    # NATS up: events evict, so no read is stale for as long as the steady phase lasted.
    assert steady_before < STEADY_SECONDS / 3
    # Node down: B reconnects to another node; meanwhile the fallback TTL bounds what it serves.
    assert while_down < FALLBACK_TTL + SLACK
    assert after_restart < FALLBACK_TTL + SLACK
    assert len(reads) > 300 and len(acked) > 100
    record_figures(
        "nats_node_sigkill",
        reads=len(reads),
        writes=len(acked),
        worst_staleness_before_seconds=round(steady_before, 3),
        worst_staleness_node_down_seconds=round(while_down, 3),
        worst_staleness_after_restart_seconds=round(after_restart, 3),
        fallback_ttl_seconds=FALLBACK_TTL,
    )

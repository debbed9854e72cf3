"""The cluster's one version poller with real processes: three services over a three-node NATS
cluster, the poller SIGKILLed again and again. Each time another takes over once the dead one's
lease lapses, and a write made straight to Vault afterwards is announced once and read fresh
everywhere; meanwhile Vault sees one metadata read per cached path per interval."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import NatsServer, ServiceProcess
from service.core.poller import lease_ttl
from tests.integration.test_poller import direct_events
from tests.support import (
    bearer,
    eventually,
    metric_value,
    record_figures,
    service_environ,
    vault_write,
    write_policy,
)

pytestmark = pytest.mark.slow

INTERVAL = 1.0
PATHS = 30
KILLS = 3
DEADLINE = 30.0  # seconds any awaited state may take: a bound for a loaded 2-core machine


class Deployment:
    """Service processes of one deployment (their own NATS prefix), one per NATS node."""

    def __init__(self, openbao: Any, oidc: Any, nodes: list[NatsServer], directory: Path) -> None:
        self.openbao, self.oidc, self.nodes, self.directory = openbao, oidc, nodes, directory
        self.prefix = "rpoll" + secrets.token_hex(4)
        self.policy = write_policy(directory)
        self.processes: list[ServiceProcess] = []
        self.started = 0

    def start(self) -> ServiceProcess:
        node = self.nodes[self.started % len(self.nodes)]
        self.started += 1
        environ = service_environ(
            self.openbao, node.url, self.oidc, self.policy, log_level="WARNING",
            nats_prefix=self.prefix, nats_replicas="3", vault_poll_interval=str(INTERVAL),
            instance_id=f"{self.prefix}-{self.started}",
        )  # fmt: skip
        svc = ServiceProcess(environ, log_path=self.directory / f"service-{self.started}.log")
        svc.start()
        self.processes.append(svc)
        return svc

    def stop(self) -> None:
        for svc in self.processes:
            svc.stop()


async def metrics(client: httpx.AsyncClient, svc: ServiceProcess) -> str:
    return (await client.get(f"{svc.url}/metrics")).text


async def leaders(client: httpx.AsyncClient, deployment: Deployment) -> list[ServiceProcess]:
    found = []
    for svc in deployment.processes:
        if metric_value(await metrics(client, svc), "secrets_poller_leader") == 1:
            found.append(svc)
    return found


async def metadata_reads(client: httpx.AsyncClient, deployment: Deployment) -> float:
    total = 0.0
    for svc in deployment.processes:
        text = await metrics(client, svc)
        total += metric_value(text, "secrets_vault_request_seconds_count", op="metadata")
    return total


async def more_rounds(client: httpx.AsyncClient, deployment: Deployment, rounds: int) -> None:
    """Return once the leader ran `rounds` more version checks."""
    (leader,) = await leaders(client, deployment)
    start = metric_value(await metrics(client, leader), "secrets_poller_rounds_total")

    async def done() -> bool:
        now = metric_value(await metrics(client, leader), "secrets_poller_rounds_total")
        return now >= start + rounds

    await eventually(done, timeout=DEADLINE, interval=0.1)


async def cache(
    client: httpx.AsyncClient, svc: ServiceProcess, paths: list[str], token: str
) -> None:
    for path in paths:
        answer = await client.get(f"{svc.url}/secrets/{path}", headers=bearer(token))
        assert answer.status_code == 200, answer.text


@pytest.fixture
def deployment(
    openbao: Any, oidc: Any, nats_cluster: list[NatsServer], tmp_path: Path
) -> Iterator[Deployment]:
    made = Deployment(openbao, oidc, nats_cluster, tmp_path)
    try:
        yield made
    finally:
        made.stop()


async def test_the_poller_killed_again_and_again_is_replaced_and_direct_writes_are_announced_once(
    deployment: Deployment, oidc: Any, openbao: Any
) -> None:
    token = oidc.mint("reader")
    folder = uuid.uuid4().hex[:8]
    paths = [f"app/rpoll-{folder}/p{i}" for i in range(PATHS)]
    for path in paths:
        vault_write(openbao, path, {"v": "0"})
    for _ in range(3):
        await asyncio.to_thread(deployment.start)
    takeovers: list[float] = []
    async with httpx.AsyncClient(timeout=10.0) as client:
        for svc in deployment.processes:
            await cache(client, svc, paths, token)

        async def one_leader() -> bool:
            return len(await leaders(client, deployment)) == 1

        await eventually(one_leader, timeout=DEADLINE)
        # Vault's load: one metadata read per path and interval, not one per instance.
        before, started = await metadata_reads(client, deployment), time.monotonic()
        await asyncio.sleep(10 * INTERVAL)  # a measuring window, not a wait for a state
        reads = await metadata_reads(client, deployment) - before
        per_interval = reads / ((time.monotonic() - started) / INTERVAL)
        assert per_interval <= PATHS * 1.3, per_interval
        for kill in range(1, KILLS + 1):
            (dead,) = await leaders(client, deployment)
            killed = time.monotonic()
            dead.kill()
            deployment.processes.remove(dead)
            dead.stop()
            await eventually(one_leader, timeout=DEADLINE)
            takeovers.append(time.monotonic() - killed)
            target = paths[kill]
            async with direct_events(deployment.nodes[0].url, deployment.prefix) as heard:
                vault_write(openbao, target, {"v": str(kill)})

                async def everyone_fresh(target: str = target, kill: int = kill) -> bool:
                    for svc in deployment.processes:
                        answer = await client.get(
                            f"{svc.url}/secrets/{target}", headers=bearer(token)
                        )
                        if answer.json()["data"]["v"] != str(kill):
                            return False
                    return True

                await eventually(everyone_fresh, timeout=DEADLINE, interval=0.2)
                await eventually(lambda: len(heard) >= 1, timeout=DEADLINE)
                await more_rounds(client, deployment, 3)  # that could repeat it, had they
            assert [(e.path, e.version) for e in heard] == [(target, 2)], heard
            replacement = await asyncio.to_thread(deployment.start)
            await cache(client, replacement, paths, token)
    record_figures(
        "poller_kill",
        interval=INTERVAL,
        lease_ttl=lease_ttl(INTERVAL),
        reads_per_interval_3_instances=per_interval,
        takeover_after_sigkill_s=takeovers,
    )
    # The lease lapses 3 intervals after the dead one's last refresh (each interval), and the
    # next step of another (each interval) takes it: under about 4 intervals, plus slack.
    assert max(takeovers) <= lease_ttl(INTERVAL) + 2 * INTERVAL + 5.0, takeovers

"""One out-of-band poller per cluster, against a real nats-server (JetStream key-value lease and
interest buckets) and a real OpenBao: Vault's metadata load is one read per cached path per
interval whatever the number of instances, a write made straight to Vault is announced once,
and when the poller stops or loses NATS another instance takes over."""

from __future__ import annotations

import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats as nats_client
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.events import event_decoder
from service.core.poller import ClusterPoller, Mode, lease_ttl
from tests.support import (
    RunningService,
    eventually,
    metric_value,
    record_figures,
    running_service,
    service_settings,
    vault_write,
    write_policy,
)

INTERVAL = 0.5
PATHS = 30
DEADLINE = 15.0  # seconds any awaited state may take on a loaded 2-core machine


class Cluster:
    """Instances of one deployment (their own NATS prefix), each stoppable on its own."""

    def __init__(
        self, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, policy: Path
    ):
        self.openbao, self.nats, self.oidc, self.policy = openbao, nats, oidc, policy
        self.prefix = "poll" + secrets.token_hex(4)
        self.services: list[RunningService] = []
        self._stacks: dict[int, contextlib.AsyncExitStack] = {}

    async def start(self, name: str) -> RunningService:
        settings = service_settings(
            self.openbao, self.nats, self.oidc, self.policy,
            instance_id=f"{self.prefix}-{name}", nats_prefix=self.prefix,
            vault_poll_interval=str(INTERVAL),
        )  # fmt: skip
        stack = contextlib.AsyncExitStack()
        svc = await stack.enter_async_context(running_service(settings))
        self._stacks[id(svc)] = stack
        self.services.append(svc)
        return svc

    async def stop(self, svc: RunningService) -> None:
        self.services.remove(svc)
        await self._stacks.pop(id(svc)).aclose()

    async def aclose(self) -> None:
        for svc in list(self.services):
            await self.stop(svc)


def poller(svc: RunningService) -> ClusterPoller:
    found: ClusterPoller = svc.state.poller
    return found


def leaders(cluster: Cluster) -> list[RunningService]:
    return [svc for svc in cluster.services if poller(svc).leader]


async def settled(cluster: Cluster) -> RunningService:
    """Wait for one leader that has read the interest bucket, every other instance a follower
    whose interest is recorded; return the leader."""

    def ready() -> bool:
        modes = [poller(svc).current_mode() for svc in cluster.services]
        lead = leaders(cluster)
        return (
            len(lead) == 1
            and poller(lead[0]).union.ready
            and modes.count(Mode.FOLLOWER) == len(cluster.services) - 1
        )

    await eventually(ready, timeout=DEADLINE)
    return leaders(cluster)[0]


async def metadata_reads(cluster: Cluster) -> float:
    """Vault metadata calls the instances made, from their /metrics (the Vault call observer)."""
    total = 0.0
    async with httpx.AsyncClient() as client:
        for svc in cluster.services:
            text = (await client.get(f"{svc.url}/metrics")).text
            total += metric_value(text, "secrets_vault_request_seconds_count", op="metadata")
    return total


async def cache_paths(cluster: Cluster, paths: list[str]) -> None:
    for path in paths:
        vault_write(cluster.openbao, path, {"v": "1"})
    for svc in cluster.services:
        for path in paths:
            await svc.state.manager.get(path)


async def reads_per_interval(cluster: Cluster, rounds: int = 6) -> float:
    """Metadata reads per poll interval, over `rounds` rounds of whoever checks."""
    checking = [
        poller(s) for s in cluster.services if poller(s).current_mode() is not Mode.FOLLOWER
    ]
    start_rounds = sum(p.rounds for p in checking)
    before, started = await metadata_reads(cluster), time.monotonic()
    await eventually(
        lambda: sum(p.rounds for p in checking) >= start_rounds + rounds * len(checking),
        timeout=DEADLINE + rounds * INTERVAL * 4,
    )
    reads, elapsed = await metadata_reads(cluster) - before, time.monotonic() - started
    return reads / (elapsed / INTERVAL)


@pytest.fixture
async def cluster(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> AsyncIterator[Cluster]:
    made = Cluster(openbao, nats, oidc, write_policy(tmp_path))
    try:
        yield made
    finally:
        await made.aclose()


@contextlib.asynccontextmanager
async def direct_events(url: str, prefix: str) -> AsyncIterator[list[Any]]:
    """The `vault-direct` change events published under `prefix`, as they come."""
    heard: list[Any] = []

    async def collect(msg: Any) -> None:
        with contextlib.suppress(msgspec.DecodeError):
            event = event_decoder.decode(msg.data)
            if event.actor == "vault-direct":
                heard.append(event)

    nc = await nats_client.connect(url)
    try:
        await nc.subscribe(f"{prefix}.changed.>", cb=collect)
        await nc.flush()
        yield heard
    finally:
        await nc.close()


def not_stale(svc: RunningService, path: str, version: int) -> bool:
    """The instance caches nothing of `path` older than `version`."""
    cached = svc.state.manager.cached_document(path)
    return cached is None or cached[0].version >= version


async def three_caching(cluster: Cluster) -> tuple[list[str], RunningService]:
    """Instances A, B and C caching three fresh paths, settled; the paths and the leader."""
    for name in "ABC":
        await cluster.start(name)
    paths = fresh_paths(3)
    await cache_paths(cluster, paths)
    return paths, await settled(cluster)


def fresh_paths(count: int) -> list[str]:
    folder = uuid.uuid4().hex[:8]
    return [f"app/poll-{folder}/p{i}" for i in range(count)]


@pytest.mark.parametrize("instances", [1, 3])
async def test_instances_caching_the_same_paths_read_each_once_an_interval_however_many(
    cluster: Cluster, instances: int
) -> None:
    for name in "ABC"[:instances]:
        await cluster.start(name)
    paths = fresh_paths(PATHS)
    await cache_paths(cluster, paths)
    await settled(cluster)
    await eventually(
        lambda: any(poller(s).watcher.last_round_paths >= PATHS for s in cluster.services),
        timeout=DEADLINE,
    )
    per_interval = await reads_per_interval(cluster)
    async with httpx.AsyncClient() as client:
        gauges = [
            metric_value((await client.get(f"{svc.url}/metrics")).text, "secrets_poller_leader")
            for svc in cluster.services
        ]
    assert sorted(gauges) == [0.0] * (instances - 1) + [1.0]
    record_figures(
        "poller_reads_per_interval", instances=instances, paths=PATHS, reads=per_interval
    )
    # One read per path and interval (a little less: a round's own duration stretches the
    # period); every instance polling its own would make 90.
    assert PATHS * 0.5 <= per_interval <= PATHS * 1.3, per_interval


async def test_a_write_straight_to_vault_is_announced_once_and_every_instance_drops_it(
    cluster: Cluster,
) -> None:
    paths, lead = await three_caching(cluster)
    target = paths[1]
    async with direct_events(cluster.nats.url, cluster.prefix) as heard:
        vault_write(cluster.openbao, target, {"v": "2"})
        await eventually(
            lambda: all(not_stale(svc, target, 2) for svc in cluster.services), timeout=DEADLINE
        )
        await eventually(lambda: len(heard) >= 1, timeout=DEADLINE)
        # Three more rounds: the followers' interest still says version 1 for a while.
        rounds = poller(lead).rounds
        await eventually(lambda: poller(lead).rounds >= rounds + 3, timeout=DEADLINE)
    assert [(e.path, e.version) for e in heard] == [(target, 2)]
    for svc in cluster.services:
        assert (await svc.state.manager.get(target)).data["v"] == "2"


async def test_when_the_poller_stops_another_takes_over_and_still_finds_direct_writes(
    cluster: Cluster,
) -> None:
    paths, first = await three_caching(cluster)
    started = time.monotonic()
    await cluster.stop(first)  # gives the lease up: taken at the next step
    second = await settled(cluster)
    handover = time.monotonic() - started
    # Cut the second off NATS without a word: its lease lapses after its TTL.
    cut = time.monotonic()
    await second.state.bus.nc.close()
    await eventually(lambda: any(poller(s).leader for s in cluster.services if s is not second),
                     timeout=DEADLINE)  # fmt: skip
    takeover = time.monotonic() - cut
    record_figures("poller_takeover", interval=INTERVAL, lease_ttl=lease_ttl(INTERVAL),
                   handover_s=handover, takeover_after_loss_s=takeover)  # fmt: skip
    assert poller(second).current_mode() is Mode.LOCAL, "without NATS it polls its own paths"
    third = next(s for s in cluster.services if poller(s).leader)
    await cluster.stop(second)
    await settled(cluster)
    async with direct_events(cluster.nats.url, cluster.prefix) as heard:
        vault_write(cluster.openbao, paths[0], {"v": "2"})
        await eventually(lambda: [(e.path, e.version) for e in heard] == [(paths[0], 2)],
                         timeout=DEADLINE)  # fmt: skip
        await eventually(lambda: not_stale(third, paths[0], 2), timeout=DEADLINE)

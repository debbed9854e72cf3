"""The service over a real three-node OpenBao Raft cluster: concurrent CAS writers while the leader
is SIGKILLed (once here, three times in `make reliability`). Every write acknowledged is in Vault
with the data written, writes resume after the election, and reads move on to a live node."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from devstack import OpenBaoCluster
from schemas.errors import VaultUnavailable
from service.vault.backend import HvacBackend
from tests import support
from tests.support import (
    RunningService,
    Tls,
    bearer,
    eventually,
    record_figures,
    running_service,
    service_settings,
    write_policy,
)

# Fixtures of tests/support.py: a trustme CA and a certificate for 127.0.0.1 signed by it.
ca = support.ca
tls = support.tls
no_proxy_settings = support.no_proxy_settings

# Bounds, not figures: an election here takes 3 to 5 s (performance_multiplier 1), so a failing
# test means something is wrong, not a slow machine. Figures: record_figures, `make reliability`.
ELECTION_DEADLINE = 45.0
SETTLE = 1.5  # seconds of writes before each kill and after each recovery


@dataclass(frozen=True)
class ClusterEndpoint:
    """Every node as the service's SECRETS_VAULT_ADDR (what service_settings reads)."""

    addr: str
    root_token: str


@pytest.fixture(scope="module")
async def service(
    openbao_raft: OpenBaoCluster, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RunningService]:
    policy = write_policy(tmp_path_factory.mktemp("vault-ha"))
    endpoint = ClusterEndpoint(openbao_raft.vault_addr, openbao_raft.root_token)
    settings = service_settings(
        endpoint, nats, oidc, policy, instance_id="ha", log_level="ERROR", vault_timeout="3"
    )
    async with running_service(settings) as svc:
        yield svc


@dataclass
class Writer:
    """One task's counter path: each write is the next `n`, CAS on the version it last saw."""

    path: str
    version: int = 0
    n: int = 0
    acked: dict[int, int] = field(default_factory=dict)  # version -> n written
    # (sent, acknowledged) monotonic times of each acknowledged write
    acked_at: list[tuple[float, float]] = field(default_factory=list)
    unavailable: int = 0  # 503 answers (the write's fate unknown, or no leader yet)
    landed_unacked: int = 0  # writes answered 503 that Vault turned out to hold (found by 409)
    errors: list[str] = field(default_factory=list)

    async def run(
        self, client: httpx.AsyncClient, url: str, token: str, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            body = {"data": {"path": self.path, "n": self.n + 1}, "version": self.version}
            sent = time.monotonic()
            try:
                r = await client.patch(
                    f"{url}/secrets/{self.path}", json=body, headers=bearer(token)
                )
            except httpx.HTTPError as exc:
                self.errors.append(f"{type(exc).__name__}")
                continue
            if r.status_code == 200:
                self.n += 1
                self.version = r.json()["version"]
                self.acked[self.version] = self.n
                self.acked_at.append((sent, time.monotonic()))
            elif r.status_code == 409:
                # Only this task writes here: a conflict means an earlier write answered 503
                # did land. Carry on from Vault's version (its data is checked below too).
                self.version = r.json()["current_version"]
                self.landed_unacked += 1
            elif r.status_code == 503:
                self.unavailable += 1
                await asyncio.sleep(0.05)
            else:
                self.errors.append(f"{r.status_code} {r.text[:120]}")


@dataclass
class ReadProbe:
    """Uncached reads through a backend of its own over every node: the longest time between
    two successful reads, and how many failed."""

    failures: int = 0
    successes: int = 0
    longest_gap: float = 0.0

    async def run(self, backend: HvacBackend, path: str, stop: asyncio.Event) -> None:
        last = time.monotonic()
        while not stop.is_set():
            try:
                await backend.read(path)
            except VaultUnavailable:
                self.failures += 1
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now
            self.successes += 1
            await asyncio.sleep(0.01)


async def _prepare(cluster: OpenBaoCluster, paths: list[str]) -> None:
    """Keep every version of each path (KV v2 keeps 10), so every acknowledged one is checked."""
    headers = {"X-Vault-Token": cluster.root_token}
    leader = await asyncio.to_thread(cluster.leader)
    async with httpx.AsyncClient(base_url=cluster.addrs[leader], headers=headers) as v:
        for path in paths:
            r = await v.post(f"/v1/secret/metadata/{path}", json={"max_versions": 100_000})
            assert r.status_code in (200, 204), r.text


async def _check_every_acknowledged_write(cluster: OpenBaoCluster, writers: list[Writer]) -> None:
    headers = {"X-Vault-Token": cluster.root_token}
    leader = await asyncio.to_thread(cluster.leader)
    async with httpx.AsyncClient(base_url=cluster.addrs[leader], headers=headers) as vault:
        for w in writers:
            meta = (await vault.get(f"/v1/secret/metadata/{w.path}")).json()["data"]
            # Beyond: a last write answered 503 as the run stopped may have landed.
            assert meta["current_version"] >= w.version
            for version, n in w.acked.items():
                r = await vault.get(f"/v1/secret/data/{w.path}", params={"version": version})
                assert r.status_code == 200, (w.path, version, r.text)
                assert r.json()["data"]["data"] == {"path": w.path, "n": n}, (w.path, version)


@pytest.mark.parametrize(
    ("writers", "kills"),
    [
        pytest.param(6, 1, id="6-writers-1-kill"),
        pytest.param(12, 3, id="12-writers-3-kills", marks=pytest.mark.slow),
    ],
)
async def test_cas_writers_lose_no_acknowledged_write_when_the_leader_is_sigkilled(
    openbao_raft: OpenBaoCluster, service: RunningService, oidc: Any, writers: int, kills: int
) -> None:
    cluster = openbao_raft
    run = uuid.uuid4().hex[:8]
    tasks = [Writer(f"app/ha-{run}/w{i}") for i in range(writers)]
    probe_path = f"app/ha-{run}/probe"
    await _prepare(cluster, [w.path for w in tasks])
    token = oidc.mint("writer")
    stop = asyncio.Event()
    probe = ReadProbe()
    recoveries: list[float] = []  # seconds from SIGKILL to the first write acknowledged after
    killed_at = 0.0
    reads = HvacBackend(cluster.vault_addr, token=cluster.root_token, timeout=3.0)
    async with httpx.AsyncClient(
        timeout=30, limits=httpx.Limits(max_connections=writers)
    ) as client:
        await reads.write(probe_path, {"probe": "1"}, cas=0)
        running = [asyncio.create_task(w.run(client, service.url, token, stop)) for w in tasks] + [
            asyncio.create_task(probe.run(reads, probe_path, stop))
        ]
        try:
            for _ in range(kills):
                await eventually(lambda: sum(len(w.acked) for w in tasks) >= writers, 10)
                await asyncio.sleep(SETTLE)
                leader = await asyncio.to_thread(cluster.leader)
                await asyncio.to_thread(cluster.kill, leader)  # returns once it is reaped
                killed_at = time.monotonic()

                def resumed(since: float = killed_at) -> bool:
                    return any(sent > since for w in tasks for sent, _ in w.acked_at)

                await eventually(resumed, ELECTION_DEADLINE, interval=0.02)
                first = min(ack for w in tasks for sent, ack in w.acked_at if sent > killed_at)
                recoveries.append(first - killed_at)
                # Back to three voters before the next kill: with two, a kill leaves no quorum.
                await asyncio.to_thread(cluster.start_node, leader)
                await asyncio.to_thread(cluster.wait_healthy)
            await asyncio.sleep(SETTLE)
        finally:
            stop.set()
            await asyncio.gather(*running)
            await reads.aclose()
            for node in cluster.nodes:  # healthy for the next test, whatever happened
                if not node.running:
                    await asyncio.to_thread(cluster.start_node, node.index)
            await asyncio.to_thread(cluster.wait_healthy)

    assert [e for w in tasks for e in w.errors] == []
    for w in tasks:
        assert any(sent > killed_at for sent, _ in w.acked_at), f"{w.path}: none after the kill"
    await _check_every_acknowledged_write(cluster, tasks)
    assert probe.successes > 0
    record_figures(
        "vault_leader_sigkill",
        writers=writers,
        kills=kills,
        acknowledged_writes=sum(len(w.acked) for w in tasks),
        answered_503=sum(w.unavailable for w in tasks),
        landed_after_503=sum(w.landed_unacked for w in tasks),
        seconds_to_first_write_after_kill=[round(s, 2) for s in recoveries],
        uncached_read_failures=probe.failures,
        longest_read_gap_seconds=round(probe.longest_gap, 2),
    )


@pytest.mark.slow  # make stack's test (test_production_stack.py) runs a TLS cluster too
async def test_a_tls_cluster_serves_https_on_every_node_and_the_backend_moves_on_over_it(
    tls: Tls, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", str(tls.ca))  # what both clients trust
    cluster = OpenBaoCluster(3, tls_cert=tls.cert, tls_key=tls.key, tls_ca=tls.ca)
    await asyncio.to_thread(cluster.start)  # the followers joined trusting the CA
    try:
        assert all(addr.startswith("https://127.0.0.1:") for addr in cluster.addrs)
        backend = HvacBackend(cluster.vault_addr, token=cluster.root_token, timeout=3.0)
        try:
            await backend.write("app/tls", {"over": "https"}, cas=0)
            await asyncio.to_thread(cluster.kill, 0)  # the node in use (the leader, as a rule)

            async def served() -> bool:
                try:
                    return (await backend.read("app/tls")).data.reveal() == {"over": "https"}
                except VaultUnavailable:
                    return False  # no active node yet

            await eventually(served, ELECTION_DEADLINE, interval=0.1)
            assert await backend.list_keys("app") == ["tls"]  # hvac too, on the next node
            assert backend.node_switches >= 1
        finally:
            await backend.aclose()
    finally:
        await asyncio.to_thread(cluster.stop)

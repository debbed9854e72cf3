"""Faults with real servers and the service as a real process: Vault stopped, frozen, and the
service itself SIGKILLed in the middle of writes.

Each test that stops or freezes OpenBao uses an OpenBao of its own. A dev-mode OpenBao keeps its
data in memory, so "OpenBao comes back" is a new server on the same port with the same root
token and *no data*: the scenario checks what survives that (the service recovers without a
restart; new writes succeed; cached entries follow Vault once the version check sees them gone)
rather than pretending the old data came back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import OpenBaoServer, ServiceProcess
from tests.support import bearer, record_figures, service_environ, write_policy

VAULT_TIMEOUT = 1.0
# The service ends a Vault call by 2 x timeout + 1 s: up to timeout + 1 s waiting for a free
# worker, then the call's own timeout (`service.vault.backend`, README "503 within ...").
VAULT_DEADLINE = VAULT_TIMEOUT * 2 + 1
# What a bound in this file adds for a loaded 2-core machine: the service's event loop, the
# test's client and up to 80 requests at once all wait for a core (`make reliability` measured
# 503s at most 0.1 s past the deadline on a quiet one).
SLACK = 2.0
# A request needing Vault while it hangs is answered 503 by then.
REQUEST_BOUND = VAULT_DEADLINE + SLACK
# Any request that waited on a Vault call took at least the call's timeout: one answered
# sooner did not wait on Vault.
NO_VAULT_WAIT = VAULT_TIMEOUT
# `/readyz` re-checks Vault at most once a second (`service.http.resources.Readiness`).
READINESS_RECHECK = 1.0
VERSIONS_PER_PATH = 5


@pytest.fixture
def own_openbao() -> Iterator[OpenBaoServer]:
    with OpenBaoServer() as server:  # started here, stopped at the end
        yield server


@pytest.fixture
def tokens(oidc: Any) -> dict[str, str]:
    return {who: oidc.mint(who) for who in ("reader", "writer", "admin")}


def _process(
    openbao: Any, nats: Any, oidc: Any, directory: Path, **overrides: str
) -> ServiceProcess:
    environ = service_environ(
        openbao, nats, oidc, write_policy(directory), log_level="WARNING", **overrides
    )
    return ServiceProcess(environ, log_path=directory / "service.log")


@contextlib.asynccontextmanager
async def serving(svc: ServiceProcess) -> AsyncIterator[ServiceProcess]:
    """`with svc:` off the event loop: starting waits for /healthz, stopping for the exit."""
    await asyncio.to_thread(svc.start)
    try:
        yield svc
    finally:
        await asyncio.to_thread(svc.stop)


@dataclass
class Outcome:
    kind: str
    started: float
    status: int  # 0: no HTTP answer (connection refused or reset)
    seconds: float


@dataclass
class Traffic:
    """Requests of each kind, one after another per kind, recorded until stopped."""

    client: httpx.AsyncClient
    tokens: dict[str, str]
    cached_path: str
    outcomes: list[Outcome] = field(default_factory=list)
    running: bool = True

    async def _loop(self, kind: str) -> None:
        n = 0
        while self.running:
            n += 1
            started = time.monotonic()
            try:
                response = await self._request(kind, n)
                status = response.status_code
            except httpx.TransportError:
                status = 0
            self.outcomes.append(Outcome(kind, started, status, time.monotonic() - started))
            await asyncio.sleep(0.02)

    def _request(self, kind: str, n: int) -> Coroutine[Any, Any, httpx.Response]:
        if kind == "cached_read":
            return self.client.get(
                f"/secrets/{self.cached_path}", headers=bearer(self.tokens["reader"])
            )
        if kind == "uncached_read":
            return self.client.get(
                f"/secrets/app/uncached-{uuid.uuid4().hex[:8]}",
                headers=bearer(self.tokens["reader"]),
            )
        if kind == "write":
            return self.client.patch(
                f"/secrets/app/w-{uuid.uuid4().hex[:8]}",
                json={"data": {"n": n}, "version": 0},
                headers=bearer(self.tokens["writer"]),
            )
        return self.client.get("/readyz")

    async def run(self) -> None:
        kinds = ("cached_read", "uncached_read", "write", "readyz")
        await asyncio.gather(*(self._loop(kind) for kind in kinds))

    def between(self, kind: str, start: float, end: float) -> list[Outcome]:
        """Requests of `kind` that started and ended within [start, end)."""
        return [
            o
            for o in self.outcomes
            if o.kind == kind and start <= o.started and o.started + o.seconds < end
        ]


async def _until(
    predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float:
    """Seconds until `await predicate()` held; AssertionError past `timeout`."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def test_openbao_stopped_mid_traffic_gives_503_serves_the_cache_and_recovers_by_itself(
    own_openbao: OpenBaoServer, nats: Any, oidc: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    svc = _process(
        own_openbao,
        nats,
        oidc,
        tmp_path,
        vault_timeout=str(VAULT_TIMEOUT),
        vault_poll_interval="1",
    )
    async with serving(svc):
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            cached = f"app/cached-{uuid.uuid4().hex[:8]}"
            created = await client.patch(
                f"/secrets/{cached}",
                json={"data": {"v": "kept"}, "version": 0},
                headers=bearer(tokens["writer"]),
            )
            assert created.status_code == 200
            traffic = Traffic(client, tokens, cached)
            runner = asyncio.get_running_loop().create_task(traffic.run())
            try:
                await asyncio.sleep(1.0)
                stopped = time.monotonic()
                await asyncio.to_thread(own_openbao.stop)
                await asyncio.sleep(4.0)
                restarted = time.monotonic()
                # Same port and root token, empty (dev mode is in memory).
                await asyncio.to_thread(own_openbao.start)
                back = time.monotonic()

                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                ready_after = await _until(ready, timeout=10)

                async def writes_again() -> bool:
                    response = await client.patch(
                        f"/secrets/app/after-{uuid.uuid4().hex[:8]}",
                        json={"data": {"v": "new"}, "version": 0},
                        headers=bearer(tokens["writer"]),
                    )
                    return response.status_code == 200

                writes_after = await _until(writes_again, timeout=10)

                async def cache_follows_vault() -> bool:
                    response = await client.get(
                        f"/secrets/{cached}", headers=bearer(tokens["reader"])
                    )
                    return response.status_code == 404

                # The new OpenBao has no such secret: the version check (1 s) drops the entry.
                followed_after = await _until(cache_follows_vault, timeout=10)
                await asyncio.sleep(0.5)
            finally:
                traffic.running = False
                await runner

    before = [o for o in traffic.outcomes if o.started + o.seconds < stopped]
    assert before and all(o.status == 200 for o in before if o.kind != "uncached_read")
    assert all(o.status == 404 for o in before if o.kind == "uncached_read")
    # While OpenBao is down, once readiness has been re-checked since the stop:
    down = (stopped + READINESS_RECHECK + SLACK, restarted)
    cached_reads = traffic.between("cached_read", *down)
    assert cached_reads and all(o.status == 200 for o in cached_reads)
    for kind in ("uncached_read", "write", "readyz"):
        seen = traffic.between(kind, *down)
        assert seen and {o.status for o in seen} == {503}, (kind, seen)
        assert max(o.seconds for o in seen) < REQUEST_BOUND, kind
    # Nothing but 200, 404 and 503 at any time; no request went unanswered.
    assert {o.status for o in traffic.outcomes} <= {200, 404, 503}
    record_figures(
        "openbao_stopped",
        outage_seconds=round(restarted - stopped, 2),
        requests=len(traffic.outcomes),
        cached_reads_during_outage=len(cached_reads),
        max_503_seconds=round(max(o.seconds for o in traffic.outcomes if o.status == 503), 3),
        ready_after_restart_seconds=round(back - restarted + ready_after, 2),
        first_write_after_ready_seconds=round(writes_after, 2),
        cache_followed_vault_seconds=round(followed_after, 2),
    )


async def test_openbao_frozen_under_load_gives_503_in_time_and_no_pool_runs_dry(
    own_openbao: OpenBaoServer, nats: Any, oidc: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    concurrency = 4  # a small pool, so the freeze would exhaust it if anything leaked
    svc = _process(
        own_openbao,
        nats,
        oidc,
        tmp_path,
        vault_timeout=str(VAULT_TIMEOUT),
        vault_concurrency=str(concurrency),
        vault_poll_interval="0",
    )
    async with serving(svc):
        async with httpx.AsyncClient(
            base_url=svc.url, timeout=30, limits=httpx.Limits(max_connections=200)
        ) as client:
            cached = f"app/frozen-{uuid.uuid4().hex[:8]}"
            assert (
                await client.patch(
                    f"/secrets/{cached}",
                    json={"data": {"v": "1"}, "version": 0},
                    headers=bearer(tokens["writer"]),
                )
            ).status_code == 200
            assert (
                await client.get(f"/secrets/{cached}", headers=bearer(tokens["reader"]))
            ).status_code == 200
            threads_before = svc.threads()

            async def timed(kind: str, i: int) -> Outcome:
                started = time.monotonic()
                if kind == "cached":
                    r = await client.get(f"/secrets/{cached}", headers=bearer(tokens["reader"]))
                elif kind == "uncached":
                    r = await client.get(
                        f"/secrets/app/frozen-miss-{i}-{uuid.uuid4().hex[:6]}",
                        headers=bearer(tokens["reader"]),
                    )
                elif kind == "write":
                    r = await client.patch(
                        f"/secrets/app/frozen-w-{uuid.uuid4().hex[:8]}",
                        json={"data": {"i": i}, "version": 0},
                        headers=bearer(tokens["writer"]),
                    )
                else:
                    r = await client.get("/healthz")
                return Outcome(kind, started, r.status_code, time.monotonic() - started)

            def burst() -> list[Any]:
                kinds = ["uncached"] * 24 + ["write"] * 24 + ["cached"] * 24 + ["healthz"] * 8
                return [timed(kind, i) for i, kind in enumerate(kinds)]

            own_openbao.pause()
            try:
                sampler = asyncio.get_running_loop().create_task(_sample(svc, own_openbao.port))
                frozen = await asyncio.gather(*burst())
                await asyncio.sleep(0.5)  # calls abandoned at their deadline would still run
                sampler.cancel()
                threads_during, vault_connections = await sampler
            finally:
                own_openbao.resume()
            thawed = await asyncio.gather(*burst())
            threads_after = svc.threads()

    by_kind = {k: [o for o in frozen if o.kind == k] for k in ("uncached", "write", "cached")}
    for kind in ("uncached", "write"):
        assert {o.status for o in by_kind[kind]} == {503}, kind
        assert max(o.seconds for o in by_kind[kind]) < REQUEST_BOUND, kind
    # What needs no Vault call never waits for it: the event loop and the cache stay free.
    assert {o.status for o in by_kind["cached"]} == {200}
    assert max(o.seconds for o in by_kind["cached"]) < NO_VAULT_WAIT
    healthz = [o for o in frozen if o.kind == "healthz"]
    assert all(o.status == 200 and o.seconds < NO_VAULT_WAIT for o in healthz)
    # After the thaw every request succeeds: no worker or connection was left stuck (a request
    # queued behind a stuck one would have met its deadline, a 503).
    assert all(o.status in (200, 404) for o in thawed), [o for o in thawed if o.status >= 500]
    assert max(o.seconds for o in thawed) < VAULT_DEADLINE
    # The pools bound what waits on a hanging Vault: no thread or connection per request. Reads
    # and writes use the event loop's pool, LIST calls (listings, the rotation scheduler's scan)
    # hvac's: each holds at most `concurrency` connections.
    assert vault_connections <= 2 * concurrency
    assert threads_during <= threads_before + concurrency
    record_figures(
        "openbao_frozen",
        requests_during_freeze=len(frozen),
        max_503_seconds=round(max(o.seconds for o in frozen if o.status == 503), 3),
        median_503_seconds=round(
            statistics.median(o.seconds for o in frozen if o.status == 503), 3
        ),
        max_cached_read_seconds=round(max(o.seconds for o in by_kind["cached"]), 4),
        max_seconds_after_thaw=round(max(o.seconds for o in thawed), 3),
        threads_before_during_after=(threads_before, threads_during, threads_after),
        most_vault_connections=vault_connections,
    )


async def _sample(svc: ServiceProcess, vault_port: int) -> tuple[int, int]:
    """The most threads, and open connections to Vault, seen in the service until cancelled."""
    threads = connections = 0
    try:
        while True:
            threads = max(threads, svc.threads())
            connections = max(connections, _connections_to(svc.pid, vault_port))
            await asyncio.sleep(0.02)
    except asyncio.CancelledError:
        return threads, connections


def _connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process `pid` to 127.0.0.1:`port` (Linux /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].rpartition(":")[2], 16)
        if fields[9] in inodes and remote_port == port and fields[3] == "01":  # ESTABLISHED
            count += 1
    return count


async def test_every_write_acknowledged_before_a_sigkill_is_in_vault(
    openbao: Any, nats: Any, oidc: Any, tokens: dict[str, str], tmp_path: Path
) -> None:
    svc = _process(openbao, nats, oidc, tmp_path)
    writers = 8
    acked: list[tuple[str, int, dict[str, Any]]] = []
    unanswered: list[tuple[str, int, dict[str, Any]]] = []
    run = uuid.uuid4().hex[:8]
    async with serving(svc):
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:

            async def writer(w: int) -> None:
                # Five versions a path: KV v2 keeps the last 10, and every one is checked.
                path, version = "", VERSIONS_PER_PATH
                for n in itertools.count():
                    if version == VERSIONS_PER_PATH:
                        path, version = f"app/sigkill-{run}/w{w}/p{n}", 0
                    data = {"writer": w, "seq": version + 1, "marker": uuid.uuid4().hex}
                    try:
                        response = await client.patch(
                            f"/secrets/{path}",
                            json={"data": data, "version": version},
                            headers=bearer(tokens["writer"]),
                        )
                    except httpx.TransportError:
                        unanswered.append((path, version + 1, data))
                        return
                    assert response.status_code == 200, response.text
                    version = response.json()["version"]
                    acked.append((path, version, data))

            tasks = [asyncio.get_running_loop().create_task(writer(w)) for w in range(writers)]
            await asyncio.sleep(2.0)
            await asyncio.to_thread(svc.kill)
            killed_at_acks = len(acked)
            await asyncio.wait_for(asyncio.gather(*tasks), 15)

    assert killed_at_acks >= 50, "too few writes before the kill to mean anything"
    landed_unacked = 0
    async with httpx.AsyncClient(
        base_url=openbao.addr, headers={"X-Vault-Token": openbao.root_token}
    ) as vault:
        for path, version, data in acked:
            stored = await vault.get(f"/v1/secret/data/{path}", params={"version": version})
            assert stored.status_code == 200, (path, version)
            assert stored.json()["data"]["data"] == data, (path, version)
        for path, version, data in unanswered:
            stored = await vault.get(f"/v1/secret/data/{path}", params={"version": version})
            # Not acknowledged: it may or may not have landed, but never as anything else.
            if stored.status_code == 200:
                assert stored.json()["data"]["data"] == data
                landed_unacked += 1
    # A new process over the same Vault serves the newest of each writer's versions.
    (tmp_path / "again").mkdir()
    restarted = _process(openbao, nats, oidc, tmp_path / "again")
    newest = {path: version for path, version, _ in acked}
    async with serving(restarted):
        async with httpx.AsyncClient(base_url=restarted.url, timeout=10) as client:
            for path, version in newest.items():
                got = await client.get(f"/secrets/{path}", headers=bearer(tokens["reader"]))
                assert got.json()["version"] >= version
    record_figures(
        "instance_sigkill",
        writers=writers,
        acknowledged_writes=len(acked),
        in_flight_at_kill=len(unanswered),
        in_flight_that_landed=landed_unacked,
    )

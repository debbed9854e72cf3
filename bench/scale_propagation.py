"""The scale bench's propagation part: a write acknowledged on instance A to its eviction on every
other instance, with 3 and with 6 instances in all, on bench/run.py's three-node NATS cluster.

bench/run.py's propagation A -> B, generalised: A (here) writes through the real OpenBao; each
other instance is a separate process (bench/run.py's `_peer`: a SecretsManager on its own EventBus
connection) on NATS node k mod 3, reporting the time its cache applied each version (and its
listener's call). Per write: each instance's ack -> eviction, and the time until the LAST of them
evicted (median, p99, max); a write whose eviction an instance did not report within 2 s is lost.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

from events.bus import EventBus  # noqa: E402
from service.core.manager import SecretsManager  # noqa: E402
from service.vault.backend import HvacBackend  # noqa: E402

WAIT_S = 2.0  # an eviction not reported by then is counted lost


async def _start_peers(
    stack_: bench.Stack, path: str, peers: int, replicas: int
) -> list[asyncio.subprocess.Process]:
    started = []
    for k in range(1, peers + 1):
        started.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                bench.__file__,
                "_peer",
                stack_.bao.addr,
                stack_.service_token,
                stack_.nats[k % len(stack_.nats)].url,
                path,
                str(replicas),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
            )
        )
    for peer in started:
        assert peer.stdout is not None
        if (await asyncio.wait_for(peer.stdout.readline(), 30)).strip() != b"ready":
            raise bench.BenchError("a propagation peer did not start")
    return started


async def _eviction(peer: asyncio.subprocess.Process, version: int, acked: int) -> float | None:
    """ms from `acked` until `peer` evicted `version`; None if it did not say so in time."""
    assert peer.stdout is not None
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            line = await asyncio.wait_for(peer.stdout.readline(), deadline - time.monotonic())
        except TimeoutError:
            return None
        seen, evict_ns, _listener_ns = (int(x) for x in line.split())
        if seen == version:
            return (evict_ns - acked) / 1e6
        if seen > version:
            raise bench.BenchError(f"a peer reported version {seen} before {version}")
        # An older version's late listener line: skip it.


async def bench_instances(stack_: bench.Stack, instances: int, writes: int) -> dict[str, Any]:
    """A writes `writes` times; `instances - 1` peers report their evictions."""
    replicas = 3  # as the service instances of the stack (SECRETS_NATS_REPLICAS)
    path = f"app/bench/scale-{secrets.token_hex(4)}"
    peers = await _start_peers(stack_, path, instances - 1, replicas)
    backend = HvacBackend(stack_.bao.addr, token=stack_.service_token)
    bus = EventBus([stack_.nats[0].url], "secrets", instance_id="scale-A", replicas=replicas)
    a = SecretsManager(backend, events=bus, instance_id="scale-A")
    await bus.connect(a)
    per_peer: list[list[float]] = [[] for _ in peers]
    last: list[float] = []
    lost = 0
    try:
        version = 0
        for _ in range(writes):
            secret = await a.set(path, bench.secret_data(), version)
            acked = time.monotonic_ns()
            version = secret.version
            seen = await asyncio.gather(*(_eviction(p, version, acked) for p in peers))
            for times, ms in zip(per_peer, seen, strict=True):
                if ms is not None:
                    times.append(ms)
            if any(ms is None for ms in seen):
                lost += 1
            else:
                last.append(max(ms for ms in seen if ms is not None))
    finally:
        await bus.aclose()
        await backend.aclose()
        for peer in peers:
            if peer.returncode is None:
                peer.terminate()
        for peer in peers:
            await peer.wait()
    if not last or not all(per_peer):
        raise bench.BenchError(f"no write reached all {instances} instances, or one never heard")
    return {
        "instances": instances,
        "writes": writes,
        "ack_to_last_eviction": bench.summary_ms(last),
        "per_instance": [
            {"nats_node": k % len(stack_.nats), **bench.summary_ms(times)}
            for k, times in enumerate(per_peer, start=1)
        ],
        "median_of_instance_p99_ms": round(
            statistics.median(bench.pct(t, 0.99) for t in per_peer), 3
        ),
        "lost": lost,
    }


def bench_propagation(stack_: bench.Stack, counts: list[int], writes: int) -> dict[str, Any]:
    import uvloop

    out = {}
    for instances in counts:
        print(f"scale: propagation to {instances - 1} other instances ...", file=sys.stderr)
        out[str(instances)] = uvloop.run(bench_instances(stack_, instances, writes))
        last = out[str(instances)]["ack_to_last_eviction"]
        print(f"  {instances} instances: last eviction p50 {last['p50_ms']:.2f} ms, "
              f"p99 {last['p99_ms']:.2f} ms, lost {out[str(instances)]['lost']}",
              file=sys.stderr)  # fmt: skip
    return out

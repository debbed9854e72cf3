"""The scale bench's in-process part: `SecretsManager` with N cached entries (10k, 100k, 1M) over a
generated Vault, its cache-hit time, throughput and memory per entry, in a fresh process per N.

    .venv/bin/python bench/scale_memory.py 100000     # prints one JSON object

The cache is filled through the manager's own read path (`get`: a miss, a backend read, the
document encoded once and cached) over `GeneratedVault`, an in-memory backend at the manager's
`VaultBackend` seam that answers every read with a fresh ~200-byte secret and holds nothing
itself: a million writes to OpenBao and a million reads through it would take longer than the
whole rest of `make bench` (bench/scale_http.py measures the rate). Figures:

- fill: entries per second through `get` (every one a miss);
- memory: RSS growth of the process per entry, and tracemalloc's count per entry (a second fill
  with tracing on, up to --traced-max entries: tracing doubles the fill time);
- hits: `get` and `cached_document` (the HTTP fast path's call) on paths drawn at random over the
  whole cache, per call in batches of 1,000 (median, p99 of the batches; calls per second of one
  coroutine), and timed one by one (median, p99; the timer's ~60 ns included); `get` on one
  path over and over, as bench/run.py measures it, for reference;
- a full `gc.collect()` with the cache alive: the pause a generation-2 collection makes;
- one out-of-band version round (`check_versions`, SECRETS_VAULT_POLL_INTERVAL's work) over every
  cached path with a backend that answers at once, up to --round-max entries: the CPU floor of a
  per-instance poller.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas.api import SecretMetadata, VersionMetadata  # noqa: E402
from schemas.secret import Secret, SecretData  # noqa: E402
from service.core.manager import SecretsManager  # noqa: E402

CREATED = "2026-11-30T12:00:00.000000Z"
BATCH = 1000  # calls per timed batch
DRAWS = 200_000  # random paths drawn once, cycled through by the hit loops
TTL = 3600.0  # longer than any fill and its measurements: no entry ages out meanwhile


def path_of(n: int) -> str:
    """The n-th cached path: the same in process and over HTTP (bench/scale_http.py)."""
    return f"app/svc-{n:07d}/db"


class GeneratedVault:
    """A `VaultBackend` that answers every read with a fresh ~200-byte secret at version 1 and
    holds nothing: the memory measured is the cache's alone. Writes are not needed here.

    The data is decoded from JSON, as HvacBackend's is, so its keys are strings of their own.
    """

    def __init__(self, seed: int = 15) -> None:
        self._random = random.Random(seed)

    def _data(self) -> dict[str, Any]:
        password = self._random.getrandbits(320).to_bytes(40).hex()
        loaded: dict[str, Any] = json.loads(
            json.dumps({"username": "svc-bench", "password": password})
        )
        return loaded

    async def read(self, path: str, version: int | None = None) -> Secret:
        return Secret(path, 1, SecretData(self._data()), CREATED)

    async def write(self, path: str, data: Mapping[str, Any], cas: int) -> Secret:
        raise NotImplementedError("the scale bench only reads")

    async def current_version(self, path: str) -> int:
        return 1

    async def read_metadata(self, path: str) -> SecretMetadata:
        return SecretMetadata(path, 1, CREATED, CREATED, (VersionMetadata(1, CREATED),))

    async def list_keys(self, prefix: str) -> list[str]:
        return []

    async def delete_versions(self, path: str, versions: Sequence[int]) -> None:
        return None

    async def undelete_versions(self, path: str, versions: Sequence[int]) -> None:
        return None

    async def destroy_versions(self, path: str, versions: Sequence[int]) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def fill(manager: SecretsManager, entries: int) -> float:
    """Read `entries` paths through `manager.get` (each a miss): the seconds it took."""
    get = manager.get
    started = time.perf_counter()
    for n in range(entries):
        await get(path_of(n))
    elapsed = time.perf_counter() - started
    if len(manager.cache) != entries:
        raise RuntimeError(f"{len(manager.cache)} entries cached, {entries} read")
    return elapsed


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _batches(per_call: list[float]) -> dict[str, float]:
    median = statistics.median(per_call)
    return {
        "median_us": round(median, 3),
        "p99_us": round(pct(per_call, 0.99), 3),
        "calls_per_s": round(1e6 / median),
    }


def _single(times_us: list[float]) -> dict[str, float]:
    return {
        "median_us": round(statistics.median(times_us), 3),
        "p99_us": round(pct(times_us, 0.99), 3),
        "max_us": round(max(times_us), 1),
    }


async def hits(manager: SecretsManager, entries: int, calls: int) -> dict[str, Any]:
    """Cache hits: random paths over the whole cache (batched and one by one), one path."""
    rng = random.Random(entries)
    # New string objects, as a request's path is; each hashed once, on its first lookup.
    drawn = [path_of(rng.randrange(entries)) for _ in range(min(DRAWS, calls))]
    get, cached = manager.get, manager.cached_document
    hits_before = manager.cache.hits

    async def batched_get(paths: list[str]) -> list[float]:
        out = []
        for start in range(0, calls - BATCH + 1, BATCH):
            chunk = [paths[(start + k) % len(paths)] for k in range(BATCH)]
            began = time.perf_counter_ns()
            for path in chunk:
                await get(path)
            out.append((time.perf_counter_ns() - began) / BATCH / 1000)
        return out

    random_get = await batched_get(drawn)
    one_path = await batched_get([drawn[0]])
    random_doc = []
    for start in range(0, calls - BATCH + 1, BATCH):
        chunk = [drawn[(start + k) % len(drawn)] for k in range(BATCH)]
        began = time.perf_counter_ns()
        for path in chunk:
            cached(path)
        random_doc.append((time.perf_counter_ns() - began) / BATCH / 1000)
    single = []
    for k in range(calls):
        path = drawn[k % len(drawn)]
        began = time.perf_counter_ns()
        await get(path)
        single.append((time.perf_counter_ns() - began) / 1000)
    counted = manager.cache.hits - hits_before
    expected = len(random_get) * BATCH * 2 + len(random_doc) * BATCH + calls
    if counted != expected or len(manager.cache) != entries:
        raise RuntimeError(f"{counted} hits counted for {expected} calls: not all were hits")
    return {
        "get_random": _batches(random_get),
        "get_random_single": _single(single),
        "cached_document_random": _batches(random_doc),
        "get_one_path": _batches(one_path),
        "calls": calls,
        "distinct_paths_drawn": len(set(drawn)),
    }


async def measure(entries: int, calls: int, traced_max: int, round_max: int) -> dict[str, Any]:
    big = entries + 1
    warm = SecretsManager(
        GeneratedVault(), cache_max_entries=big, cache_ttl=TTL
    )  # imports, interned strings
    await fill(warm, min(entries, 1000))
    del warm
    gc.collect()
    began = time.perf_counter()
    gc.collect()  # the baseline: the modules' objects, no cache
    empty_gc_ms = (time.perf_counter() - began) * 1000
    before = rss_bytes()
    manager = SecretsManager(GeneratedVault(), cache_max_entries=big, cache_ttl=TTL)
    full_before = gc.get_stats()[2]["collections"]
    fill_s = await fill(manager, entries)
    full_during_fill = gc.get_stats()[2]["collections"] - full_before
    gc.collect()
    rss = (rss_bytes() - before) / entries
    result: dict[str, Any] = {
        "entries": entries,
        "fill_per_s": round(entries / fill_s),
        "fill_s": round(fill_s, 2),
        "rss_bytes_per_entry": round(rss, 1),
        "rss_growth_mb": round(rss * entries / 1e6, 1),
    }
    result["hits"] = await hits(manager, entries, calls)
    # A full collection walks every tracked object, the cache's included: a pause of the loop.
    began = time.perf_counter()
    gc.collect()
    result["gc_full_collect_ms"] = round((time.perf_counter() - began) * 1000, 1)
    result["gc_full_collect_empty_ms"] = round(empty_gc_ms, 1)
    result["gc_full_collections_during_fill"] = full_during_fill  # automatic ones
    if entries <= round_max:
        began, cpu = time.perf_counter(), time.process_time()
        found = await manager.check_versions()
        result["version_round"] = {
            "s": round(time.perf_counter() - began, 3),
            "cpu_s": round(time.process_time() - cpu, 3),
            "us_per_path": round((time.perf_counter() - began) / entries * 1e6, 2),
            "changes_found": len(found),
        }
    del manager
    gc.collect()
    if entries <= traced_max:
        tracemalloc.start()
        first = tracemalloc.get_traced_memory()[0]
        traced = SecretsManager(GeneratedVault(), cache_max_entries=big, cache_ttl=TTL)
        await fill(traced, entries)
        gc.collect()
        result["tracemalloc_bytes_per_entry"] = round(
            (tracemalloc.get_traced_memory()[0] - first) / entries, 1
        )
        tracemalloc.stop()
        assert len(traced.cache) == entries  # alive until measured
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", type=int)
    parser.add_argument("--calls", type=int, default=200_000, help="timed hits of each kind")
    parser.add_argument("--traced-max", type=int, default=100_000, help="tracemalloc up to")
    parser.add_argument("--round-max", type=int, default=100_000, help="version round up to")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(measure(args.entries, args.calls, args.traced_max, args.round_max))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

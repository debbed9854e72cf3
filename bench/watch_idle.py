"""Idle watch streams for bench/watch_bench.py: what 1,000 of them, open on one instance, cost
it in RSS and in cached-read throughput (wrk, with and without them, in alternating rounds).

The streams are held by another process (this file, `_hold`): one httpx.AsyncClient with 1,000
streaming responses of one caller, reading the keep-alive comments and nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import run as bench  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

__all__ = ["bench_idle_streams"]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise bench.BenchError(f"no VmRSS for process {pid}")


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the service's samples `name` matching `labels` (GET /metrics)."""
    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise bench.BenchError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Holder:
    """Another process holding `n` idle watch streams open on `url` (this file, `_hold`)."""

    def __init__(self, url: str, token: str, n: int, workdir: Path) -> None:
        self.err = (workdir / "holder.err").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_hold", url, str(n)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
            env={**os.environ, "WATCH_BENCH_TOKEN": token},
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().decode().strip()
        if line != f"open {n}":
            self.close()
            raise bench.BenchError(f"the stream holder said {line!r} (see {self.err.name})")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.err.close()


async def _hold(url: str, token: str, n: int) -> None:
    """Open `n` watch streams, say `open n`, read them (keep-alives only) until stdin closes."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    timeout = httpx.Timeout(30.0, read=None)
    headers = {"Authorization": f"Bearer {token}"}
    opened = 0
    all_open = asyncio.Event()
    failed: list[str] = []
    gate = asyncio.Semaphore(50)  # opening: not all at once

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal opened
        async with gate:
            request = http.build_request("GET", "/secrets:watch", headers=headers)
            response = await http.send(request, stream=True)
        try:
            if response.status_code != 200:
                failed.append(f"{response.status_code} {(await response.aread())[:200]!r}")
                all_open.set()
                return
            opened += 1
            if opened == n:
                all_open.set()
            async for _ in response.aiter_raw():
                pass
        finally:
            await response.aclose()

    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=timeout, trust_env=False
    ) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(n)]
        await all_open.wait()
        print(f"failed: {failed[0]}" if failed else f"open {opened}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes stdin
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def bench_idle_streams(
    wrk: str,
    service: bench.Child,
    token: str,
    workdir: Path,
    *,
    streams: int,
    rounds: int,
    duration: int,
    warmup: int,
    threads: int,
    connections: int,
) -> dict[str, Any]:
    """RSS of `service` before and after `streams` idle streams open, and cached-read throughput
    with and without them, `rounds` pairs in alternating order."""
    script = workdir / "watch-reads.lua"
    script.write_text(bench.WRK_SCRIPT)
    target = bench.Target(
        "service_cached", service.url, "/secrets/app/bench/s",
        {"Authorization": f"Bearer {token}"}, {"service": service.pid},
    )  # fmt: skip
    wrk_args = argparse.Namespace(threads=threads, connections=connections)
    base = metric(service.url, "secrets_watch_streams")
    print(f"watch: idle streams, {rounds} x wrk {duration:g} s with and without ...",
          file=sys.stderr)  # fmt: skip
    bench.run_wrk(wrk, target, script, wrk_args, warmup)  # warm: caches, pools, threads
    rss_without = rss_bytes(service.pid)
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    memory: list[dict[str, float]] = []
    open_s: list[float] = []
    for r in range(rounds):
        for state in ("without", "with") if r % 2 == 0 else ("with", "without"):
            if state == "without":
                runs[state].append(bench.run_wrk(wrk, target, script, wrk_args, duration))
                continue
            before = rss_bytes(service.pid)
            started = time.monotonic()
            holder = Holder(service.url, token, streams, workdir)
            try:
                open_s.append(time.monotonic() - started)
                wait_for(
                    lambda: metric(service.url, "secrets_watch_streams") >= base + streams,
                    f"{streams} streams on the instance",
                )
                opened = rss_bytes(service.pid)
                runs[state].append(bench.run_wrk(wrk, target, script, wrk_args, duration))
                after_reads = rss_bytes(service.pid)
            finally:
                holder.close()
            wait_for(
                lambda: metric(service.url, "secrets_watch_streams") <= base,
                "the streams to close",
            )
            memory.append(
                {
                    "rss_before_mb": round(before / 1e6, 1),
                    "rss_open_mb": round(opened / 1e6, 1),
                    "rss_after_reads_mb": round(after_reads / 1e6, 1),
                    "growth_mb": round((max(opened, after_reads) - before) / 1e6, 1),
                }
            )
        print(
            f"  round {r + 1}: without {runs['without'][-1]['requests_per_s']:,.0f} req/s, "
            f"with {runs['with'][-1]['requests_per_s']:,.0f} req/s, "
            f"RSS +{memory[-1]['growth_mb']} MB",
            file=sys.stderr,
        )
    ratios = [w["requests_per_s"] / o["requests_per_s"] for w, o in zip(runs["with"],
              runs["without"], strict=True)]  # fmt: skip

    def reads(name: str) -> dict[str, Any]:
        return {
            "requests_per_s": round(statistics.median(x["requests_per_s"] for x in runs[name]), 1),
            "p50_ms": round(statistics.median(x["p50_ms"] for x in runs[name]), 3),
            "p99_ms": round(statistics.median(x["p99_ms"] for x in runs[name]), 3),
            "service_cpu_percent": round(
                statistics.median(x["cpu_percent_of_one_core"]["service"] for x in runs[name]), 1
            ),
            "rounds": [x["requests_per_s"] for x in runs[name]],
        }

    return {
        "streams": streams,
        "rss_without_mb": round(rss_without / 1e6, 1),
        # The first opening is the dearest: later ones reuse what the last streams freed.
        "rss_growth_mb": max(m["growth_mb"] for m in memory),
        "memory_rounds": memory,
        "open_seconds_median": round(statistics.median(open_s), 2),
        "reads_without": reads("without"),
        "reads_with": reads("with"),
        "throughput_with_over_without": round(statistics.median(ratios), 3),
        "wrk": {"threads": threads, "connections": connections, "duration_s": duration},
        "note": f"{streams} streams of one caller (GET /secrets:watch, idle: keep-alive "
        "comments only) held by another process on one httpx.AsyncClient; RSS of the service "
        "process from /proc (growth: the largest over the rounds of the RSS after opening, or "
        "after the reads with them, minus the RSS just before opening); reads: wrk on the "
        "seeded cached paths, a pair of rounds with and without the streams in alternating "
        "order; the ratio is the median of each pair's",
    }


if __name__ == "__main__":
    # `_hold URL N`, the token in WATCH_BENCH_TOKEN (not on a command line): see Holder.
    if sys.argv[1:2] != ["_hold"]:
        sys.exit("usage: watch_idle.py _hold URL N (run by bench/watch_bench.py)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_hold(sys.argv[2], os.environ["WATCH_BENCH_TOKEN"], int(sys.argv[3])))

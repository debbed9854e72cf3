"""Issue 14's speed and freshness, side by side in one run against real servers: the client
library's cached `get` beside the HTTP round trip, a write on instance B reaching the cache of a
client watching instance A, and what 1,000 idle watch streams cost one instance.

Reuses bench/run.py's stack (OpenBao, three NATS nodes, the OIDC issuer) and starts two service
instances of the default configuration, A and B, on different NATS nodes (A admits 1,000+ streams
per caller). Measures:

- cached `get` (here): `AsyncSecretsClient` and `SecretsClient` (blocking) connected to A, their
  watch streams up, calls timed one by one (median, p99; the timer's own ~60 ns included) and in
  batches of 1,000 (the mean per call); the clients' hit counters prove every timed call a hit.
  Beside them, the same path over HTTP (`GET /secrets/{path}`, httpx keep-alive, async and
  blocking), same instance, same run;
- freshness (bench/watch_freshness.py): PATCH on B -> eviction in each client's cache, 1,000
  writes each, with a plain SSE reader of A's stream as the reference;
- idle streams (bench/watch_idle.py): A's RSS before and after 1,000 idle streams open, and
  cached-read throughput (wrk) with and without them, rounds in alternating order.

    .venv/bin/python bench/watch_bench.py            # writes bench/results/watch.json
    .venv/bin/python bench/watch_bench.py --quick    # a smoke test: prints, writes nothing
"""

# Where the time goes on a write's way to a client's cache: the notes at the top of
# bench/watch_freshness.py. A cached `get` is a dict lookup and a clock check (0.2-0.4 µs here,
# against ~1.3 µs for the in-process `SecretsManager.get`, which checks more); the HTTP round trip
# is 0.5 ms with httpx.Client and 1 ms with httpx.AsyncClient (anyio's overhead), the same read.
# 1,000 idle streams cost A ~35 KB each (RSS) and no measurable read throughput.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import run as bench  # noqa: E402
from watch_freshness import bench_freshness, until  # noqa: E402
from watch_idle import bench_idle_streams  # noqa: E402

from secrets_client import AsyncSecretsClient, SecretsClient  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "watch.json"
READ_PATH = "app/bench/s0000"  # seeded by bench.stack()
BATCH = 1000  # calls per timed batch of cached gets


def summary_us(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "median_us": round(statistics.median(values), 3),
        "p99_us": round(bench.pct(values, 0.99), 3),
        "max_us": round(max(values), 3),
    }


# -- cached get ------------------------------------------------------------------------------------


def _timer_overhead_ns() -> float:
    samples = []
    for _ in range(10_000):
        started = time.perf_counter_ns()
        samples.append(time.perf_counter_ns() - started)
    return float(statistics.median(samples))


def _figures(single: list[float], batches: list[float], hits: int) -> dict[str, Any]:
    if hits != len(single) + len(batches) * BATCH:
        raise bench.BenchError(f"{hits} cache hits for {len(single)} + {len(batches)} x {BATCH}")
    return {
        **summary_us(single),
        "batch_mean_us": round(statistics.median(batches), 3),
        "hits_counted": hits,
    }


async def _async_get(url: str, token: str, calls: int) -> dict[str, Any]:
    async with AsyncSecretsClient(url, token=token) as client:
        await client.get(READ_PATH)  # the one miss (it starts the watch stream)
        deadline = time.monotonic() + 30
        while not client.stream_connected:
            if time.monotonic() > deadline:
                raise bench.BenchError("the async client's watch stream did not come up")
            await asyncio.sleep(0.01)
        await client.get(READ_PATH)  # cached from here on (a new stream may have cleared it)
        get, hits = client.get, client.stats.hits
        single: list[float] = []
        for _ in range(calls):
            started = time.perf_counter_ns()
            await get(READ_PATH)
            single.append((time.perf_counter_ns() - started) / 1000)
        batches: list[float] = []
        for _ in range(max(1, calls // BATCH)):
            started = time.perf_counter_ns()
            for _ in range(BATCH):
                await get(READ_PATH)
            batches.append((time.perf_counter_ns() - started) / BATCH / 1000)
        return _figures(single, batches, client.stats.hits - hits)


def _blocking_get(url: str, token: str, calls: int) -> dict[str, Any]:
    with SecretsClient(url, token=token) as client:
        client.get(READ_PATH)
        until(lambda: client.stream_connected, "the blocking client's watch stream")
        client.get(READ_PATH)
        get, hits = client.get, client.stats.hits
        single: list[float] = []
        for _ in range(calls):
            started = time.perf_counter_ns()
            get(READ_PATH)
            single.append((time.perf_counter_ns() - started) / 1000)
        batches: list[float] = []
        for _ in range(max(1, calls // BATCH)):
            started = time.perf_counter_ns()
            for _ in range(BATCH):
                get(READ_PATH)
            batches.append((time.perf_counter_ns() - started) / BATCH / 1000)
        return _figures(single, batches, client.stats.hits - hits)


async def _http_async(url: str, token: str, calls: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    times: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, trust_env=False) as http:
        for n in range(calls + 50):  # the first 50: warm-up
            started = time.perf_counter_ns()
            response = await http.get(f"/secrets/{READ_PATH}")
            if response.status_code != 200:
                raise bench.BenchError(f"GET answered {response.status_code}")
            if n >= 50:
                times.append((time.perf_counter_ns() - started) / 1000)
    return summary_us(times)


def _http_blocking(url: str, token: str, calls: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {token}"}
    times: list[float] = []
    with httpx.Client(base_url=url, headers=headers, trust_env=False) as http:
        for n in range(calls + 50):
            started = time.perf_counter_ns()
            response = http.get(f"/secrets/{READ_PATH}")
            if response.status_code != 200:
                raise bench.BenchError(f"GET answered {response.status_code}")
            if n >= 50:
                times.append((time.perf_counter_ns() - started) / 1000)
    return summary_us(times)


def bench_get(url: str, token: str, calls: int, round_trips: int) -> dict[str, Any]:
    """Cached gets of both clients and the HTTP round trips of the same path, against `url`."""
    print(f"watch: cached get x {calls}, HTTP GET x {round_trips} ...", file=sys.stderr)
    result: dict[str, Any] = {
        "async_client": asyncio.run(_async_get(url, token, calls)),
        "blocking_client": _blocking_get(url, token, calls),
        "http_async": asyncio.run(_http_async(url, token, round_trips)),
        "http_blocking": _http_blocking(url, token, round_trips),
        "timer_overhead_ns": _timer_overhead_ns(),
    }
    for client, http in (("async_client", "http_async"), ("blocking_client", "http_blocking")):
        result[client]["http_over_cached_median"] = round(
            result[http]["median_us"] / result[client]["median_us"], 1
        )
    print(
        "  "
        + ", ".join(f"{k} {result[k]['median_us']:,.2f} µs / p99 {result[k]['p99_us']:,.2f} µs"
                    for k in ("async_client", "blocking_client", "http_async", "http_blocking")),
        file=sys.stderr,
    )  # fmt: skip
    result["note"] = (
        "median, p99, max: calls timed one by one (perf_counter_ns twice: timer_overhead_ns "
        f"included); batch_mean_us: the median over batches of {BATCH} calls of the mean time "
        "per call (no timer in the loop); hits_counted: the client's own hit counter over all "
        "timed calls. http_*: GET /secrets/{path} over one keep-alive httpx connection to the "
        "same instance, its cache warm"
    )
    return result


# -- the whole -------------------------------------------------------------------------------------


@contextlib.contextmanager
def instances(stack_: bench.Stack, workdir: Path, streams: int) -> Iterator[list[bench.Child]]:
    """A and B, on NATS nodes 0 and 1; A admits `streams` (and a few) streams of one caller."""
    started: list[bench.Child] = []
    try:
        for name, node, extra in (
            ("watch-a", 0, {"SECRETS_WATCH_MAX_PER_CALLER": str(streams + 16)}),
            ("watch-b", 1, {}),
        ):
            env = {**stack_.environ, "SECRETS_NATS_URL": stack_.nats[node].url, **extra}
            started.append(bench.start_service(name, workdir, env))
        yield started
    finally:
        for child in started:
            child.stop()


def bench_watch(
    stack_: bench.Stack,
    workdir: Path,
    wrk: str,
    *,
    get_calls: int = 200_000,
    round_trips: int = 2000,
    writes: int = 1000,
    streams: int = 1000,
    rounds: int = 5,
    duration: int = 5,
    warmup: int = 3,
    threads: int = 2,
    connections: int = 32,
    py_spy: Path | None = None,
) -> dict[str, Any]:
    """Every figure of the watch bench, against `stack_`; `py_spy`: see bench_freshness."""
    with instances(stack_, workdir, streams) as (a, b):
        get = bench_get(a.url, stack_.reader, get_calls, round_trips)
        freshness = bench_freshness(
            a, b, stack_.nats[0].url, stack_.reader, stack_.writer, writes, py_spy
        )
        idle = bench_idle_streams(
            wrk, a, stack_.reader, workdir, streams=streams, rounds=rounds, duration=duration,
            warmup=warmup, threads=threads, connections=connections,
        )  # fmt: skip
    return {"client_get": get, "freshness": freshness, "idle_streams": idle}


def _us(value: float) -> str:
    return f"{value:,.0f} µs" if value >= 100 else f"{value:.2f} µs"


def markdown_rows(watch: dict[str, Any]) -> list[str]:
    """bench/run.py's table rows (`| measure | p50 | p99 | max |`) for the watch figures."""
    get, fresh = watch["client_get"], watch["freshness"]
    rows = []
    for label, key in (
        ("`AsyncSecretsClient.get`, cached (watch stream up)", "async_client"),
        ("`SecretsClient.get` (blocking), cached", "blocking_client"),
        ("`GET /secrets/{path}`, httpx.AsyncClient keep-alive (same run)", "http_async"),
        ("`GET /secrets/{path}`, httpx.Client keep-alive", "http_blocking"),
    ):
        g = get[key]
        rows.append(
            f"| {label} | {_us(g['median_us'])} | {_us(g['p99_us'])} | {_us(g['max_us'])} |"
        )

    def ms(label: str, f: dict[str, Any]) -> str:
        return f"| {label} | {f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms | {f['max_ms']:.2f} ms |"

    a = fresh["async_client"]
    rows += [
        ms(f"write ack on B → eviction in `AsyncSecretsClient`'s cache on A ({a['count']} "
           "writes, 3-node NATS)", a),
        ms("the same writes' events at a plain SSE reader of A's stream (no client library)",
           a["raw_stream"]),
        ms("write ack on B → eviction in `SecretsClient`'s cache on A", fresh["blocking_client"]),
    ]  # fmt: skip
    return rows


def markdown_note(watch: dict[str, Any]) -> str:
    """bench/run.py's sentences on where a write's way to the client goes, and on idle
    watch streams."""
    idle, a = watch["idle_streams"], watch["freshness"]["async_client"]
    without, with_ = idle["reads_without"], idle["reads_with"]
    return (
        f"A write through B reaches the async client's cache on A in {a['p50_ms']:.2f} ms (p50): "
        f"its event is at a NATS subscriber on A's node after {a['nats_published']['p50_ms']:.2f}"
        f" ms (B publishes in the background as it answers), at a JetStream consumer there "
        f"(stored on 3 nodes) after {a['jetstream_consumer']['p50_ms']:.2f} ms, on A's watch "
        "stream after "
        f"{a['raw_stream']['p50_ms']:.2f} ms. {idle['streams']:,} idle watch streams on one "
        f"instance (held by another process): its RSS grows {idle['rss_growth_mb']:.1f} MB "
        f"(from {idle['rss_without_mb']:.0f} MB); cached reads {with_['requests_per_s']:,.0f} "
        f"req/s with them against {without['requests_per_s']:,.0f} without "
        f"({idle['throughput_with_over_without']:.2f}×, the median of {len(without['rounds'])} "
        "pairs of wrk rounds in alternating order). bench/watch_bench.py says more."
    )


def _run_quick_or_full(args: argparse.Namespace) -> dict[str, Any]:
    wrk = bench.ensure_wrk()
    return bench.in_stack("watch-bench-", lambda s, workdir: bench_watch(
        s, workdir, wrk, get_calls=args.get_calls, round_trips=args.round_trips,
        writes=args.writes, streams=args.streams, rounds=args.rounds,
        duration=args.duration, warmup=args.warmup, py_spy=args.py_spy,
    ))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = {  # full, quick
        "get_calls": (200_000, 20_000),
        "round_trips": (2000, 200),
        "writes": (1000, 100),
        "streams": (1000, 1000),
        "rounds": (5, 2),
        "duration": (5, 2),  # seconds of wrk (whole: wrk takes no fraction)
        "warmup": (3, 1),
    }
    for name, (full, quick) in defaults.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(full), help=f"{full} (quick: {quick})"
        )
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(bench.ROOT)}")
    parser.add_argument(
        "--py-spy", type=Path, help="py-spy's collapsed stacks of instance A, async freshness"
    )
    args = parser.parse_args()
    bench.fill_quick_or_full(args, defaults)
    return bench.run_alone(
        "watch_bench.py",
        lambda: _run_quick_or_full(args),
        args.out or (None if args.quick else OUT),
        summary=lambda figures: "\n".join(markdown_rows(figures)) + "\n\n" + markdown_note(figures),
    )


if __name__ == "__main__":
    sys.exit(main())

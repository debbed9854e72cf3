"""Issue 15's scale figures in one run: how the cost of a cached read, of a cached entry and of
a write's propagation grows with the cache, the instances and the policy.

Reuses bench/run.py's stack (OpenBao, three NATS nodes, the OIDC issuer). Measures:

- in process, at 10k, 100k and 1M cached entries (bench/scale_memory.py, a fresh process each):
  `SecretsManager.get` hit time (median, p99) and calls per second on paths drawn at random over
  the whole cache, memory per entry (RSS growth, tracemalloc up to 100k), the fill rate, and one
  out-of-band version round (up to 100k). The cache is filled through `get` over a generated
  Vault injected at the backend seam: 1M secrets through OpenBao is too slow for `make bench`;
- over HTTP (bench/scale_http.py): wrk against service processes caching 10k, 100k and 1M
  entries (the app over the same generated Vault), and against `secrets-service serve` over the
  real OpenBao at 10k, with the measured rates of filling OpenBao and the cache that way;
- eviction propagation with 3 and 6 instances (bench/scale_propagation.py): a write's
  acknowledgement on A to the eviction on the last of the others, and on each (median, p99);
- policy check time at 10, 1,000 and 10,000 globs: bench/policy_bench.py's `bench_policy`
  (another part's module; the run says so if it is not there).

    .venv/bin/python bench/scale_bench.py            # writes bench/results/scale.json
    .venv/bin/python bench/scale_bench.py --quick    # a smoke test: prints, writes nothing
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402
from scale_http import bench_http  # noqa: E402
from scale_propagation import bench_propagation  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "scale.json"
HERE = Path(__file__).resolve().parent


def bench_inprocess(sizes: list[int], calls: int) -> dict[str, Any]:
    out = {}
    for entries in sizes:
        print(f"scale: in process, {entries:,} cached entries ...", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, str(HERE / "scale_memory.py"), str(entries), "--calls", str(calls)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise bench.BenchError(f"scale_memory.py {entries} failed: {done.stderr[-2000:]}")
        figures: dict[str, Any] = json.loads(done.stdout)
        hit = figures["hits"]["get_random"]
        print(f"  get hit {hit['median_us']:.2f} µs (p99 {hit['p99_us']:.2f}), "
              f"{figures['rss_bytes_per_entry']:.0f} B/entry RSS", file=sys.stderr)  # fmt: skip
        out[str(entries)] = figures
    return out


# -- policy: bench/policy_bench.py (part D of issue 15, the "policy" helper's module) -------------


def bench_policy(quick: bool) -> dict[str, Any]:
    """bench/policy_bench.py's check times at 10, 1,000 and 10,000 globs (compiled beside the
    linear check it replaced); a note instead if that module or its function is not there."""
    if not (HERE / "policy_bench.py").exists():
        return {"missing": "bench/policy_bench.py is not there: no policy figures"}
    measure = getattr(importlib.import_module("policy_bench"), "bench_policy", None)
    if measure is None:
        return {"missing": "bench/policy_bench.py has no bench_policy(): no policy figures"}
    print("scale: policy checks ...", file=sys.stderr)
    figures: dict[str, Any] = measure(checks=2_000 if quick else 20_000)
    return figures


# -- the whole -----------------------------------------------------------------------------------


def bench_scale(
    stack_: bench.Stack,
    workdir: Path,
    wrk: str,
    *,
    sizes: list[int],
    real: list[int],
    calls: int = 200_000,
    rounds: int = 3,
    duration: int = 5,
    warmup: int = 2,
    threads: int = 2,
    connections: int = 32,
    instances: list[int] | None = None,
    writes: int = 300,
    quick: bool = False,
) -> dict[str, Any]:
    """Every figure of the scale bench, against `stack_`; `quick`: policy_bench's smoke size."""
    started = time.monotonic()
    load = os.getloadavg()[0]
    result: dict[str, Any] = {
        "inprocess": bench_inprocess(sizes, calls),
        "http": bench_http(
            stack_,
            workdir,
            wrk,
            sizes=sizes,
            real=real,
            rounds=rounds,
            duration=duration,
            warmup=warmup,
            threads=threads,
            connections=connections,
        ),
        "propagation": bench_propagation(stack_, instances or [3, 6], writes),
        "policy": bench_policy(quick),
    }
    result["seconds"] = round(time.monotonic() - started)
    result["load_average"] = {"start": load, "end": os.getloadavg()[0]}
    return result


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def markdown_rows(scale: dict[str, Any]) -> list[str]:
    """bench/run.py's scale table: one row per cache size, then propagation and policy rows."""
    rows = [
        "| cached entries | in-process `get` hit p50 / p99 | hits/s, one coroutine | RSS per "
        "entry | HTTP cached read req/s | p50 / p99 ms | service RSS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    http = scale["http"]
    for key, figures in scale["inprocess"].items():
        hit = figures["hits"]["get_random"]
        served = http.get(f"generated_{key}")
        wire = (
            f"{served['requests_per_s']:,.0f} | {served['p50_ms']:.2f} / {served['p99_ms']:.2f} |"
            f" {served['fill']['rss_after_mb']:,.0f} MB"
            if served
            else "– | – | –"
        )
        rows.append(
            f"| {size_label(int(key))} | {hit['median_us']:.2f} / {hit['p99_us']:.2f} µs | "
            f"{hit['calls_per_s']:,} | {figures['rss_bytes_per_entry']:.0f} B | {wire} |"
        )
    for name, served in http.items():
        if name.startswith("real_"):
            rows.append(
                f"| {size_label(served['entries'])}, `serve` over OpenBao | | | | "
                f"{served['requests_per_s']:,.0f} | {served['p50_ms']:.2f} / "
                f"{served['p99_ms']:.2f} | {served['fill']['rss_after_mb']:,.0f} MB |"
            )
    rows += ["", "| propagation | p50 | p99 | max | lost |", "|---|---:|---:|---:|---:|"]
    for count, p in scale["propagation"].items():
        last = p["ack_to_last_eviction"]
        rows.append(
            f"| write ack on A → eviction on the last of {int(count) - 1} other instances "
            f"({p['writes']} writes) | {last['p50_ms']:.2f} ms | {last['p99_ms']:.2f} ms | "
            f"{last['max_ms']:.2f} ms | {p['lost']} |"
        )
    if "missing" not in scale["policy"]:
        policy_rows = importlib.import_module("policy_bench").markdown_rows(scale["policy"])
        rows += ["", "| policy check | p50 | p99 | max |", "|---|---:|---:|---:|", *policy_rows]
    return rows


def markdown_note(scale: dict[str, Any]) -> str:
    """Sentences under the scale table: how the figures were made, the fill rates, policy."""
    real = [v for k, v in scale["http"].items() if k.startswith("real_")]
    biggest = max(scale["inprocess"].values(), key=lambda f: f["entries"])
    note = (
        "Scale (bench/scale_bench.py): each cache filled through `SecretsManager.get` over a "
        "generated Vault at the backend seam (in process: a fresh process per size; over HTTP: "
        "the service's app in its own process, wrk paths drawn at random over every entry), "
        f"{biggest['fill_per_s']:,} entries/s. "
    )
    if real:
        r = real[0]["fill"]
        note += (
            f"Through the real OpenBao: {r['openbao_writes_per_s']:,} writes/s and "
            f"{r['uncached_reads_per_s']:,} uncached service reads/s ({r['clients']} clients), "
            f"so about {r['est_1m_fill_min']:.0f} minutes for 1M. "
        )
    note += (
        f"At {size_label(biggest['entries'])} entries a full `gc.collect()` takes "
        f"{biggest['gc_full_collect_ms']:,.0f} ms ({biggest['gc_full_collect_empty_ms']:,.0f} ms "
        "with the cache empty), a pause of the event loop (Python ran "
        f"{biggest.get('gc_full_collections_during_fill', '?')} on its own during the fill); the "
        "slowest of its one-by-one hits "
        f"took {biggest['hits']['get_random_single']['max_us'] / 1000:,.1f} ms. "
    )
    for count, p in scale["propagation"].items():
        note += (
            f"With {count} instances, each other instance's own eviction p99: "
            + ", ".join(f"{i['p99_ms']:.2f}" for i in p["per_instance"])
            + " ms. "
        )
    rounds = [f"{size_label(int(k))} {v['version_round']['s']:.1f} s" for k, v in
              scale["inprocess"].items() if "version_round" in v]  # fmt: skip
    if rounds:
        note += (
            "One per-instance out-of-band version round over every cached path, Vault "
            f"answering at once: {', '.join(rounds)} (off in the HTTP runs). "
        )
    policy = scale["policy"]
    if "missing" in policy:
        note += f"Policy check time: not measured ({policy['missing']})."
    else:
        note += importlib.import_module("policy_bench").markdown_note(policy)
    return note


def _run_quick_or_full(args: argparse.Namespace) -> dict[str, Any]:
    wrk = bench.ensure_wrk()
    return bench.in_stack("scale-bench-", lambda s, workdir: bench_scale(
        s, workdir, wrk, sizes=args.sizes, real=args.real, calls=args.calls,
        rounds=args.rounds, duration=args.duration, warmup=args.warmup,
        instances=args.instances, writes=args.writes, quick=args.quick,
    ))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults: dict[str, tuple[Any, Any]] = {  # full, quick
        "sizes": ([10_000, 100_000, 1_000_000], [10_000, 100_000]),
        "real": ([10_000], [2_000]),
        "calls": (200_000, 20_000),
        "rounds": (3, 1),
        "duration": (5, 2),  # seconds of wrk (whole: wrk takes no fraction)
        "warmup": (2, 1),
        "instances": ([3, 6], [3, 6]),
        "writes": (300, 50),
    }
    for name, (full, quick) in defaults.items():
        many = isinstance(full, list)
        parser.add_argument(
            "--" + name, type=int, nargs="+" if many else None, help=f"{full} (quick: {quick})"
        )
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(bench.ROOT)}")
    args = parser.parse_args()
    bench.fill_quick_or_full(args, defaults)
    return bench.run_alone(
        "scale_bench.py",
        lambda: _run_quick_or_full(args),
        args.out or (None if args.quick else OUT),
        summary=lambda figures: "\n".join(markdown_rows(figures)) + "\n\n" + markdown_note(figures),
    )


if __name__ == "__main__":
    sys.exit(main())

"""Issue 15's workers and the server underneath, side by side in one run against real servers:

- (a) cached-read throughput of `secrets-service serve` with SECRETS_WORKERS=2 against 1 (wrk
  -t2 -c32 as in bench/run.py, rounds in rotating order, medians, and the median of each round's
  ratio, the two measured within a minute);
- (b) beyond saturation: wrk -c1000 (`--timeout 2s`: a request over 2 s counts as a timeout)
  against 1 and 2 workers, then against 2 workers whose SECRETS_LIMIT_CONCURRENCY is below the
  load, where the excess must get 503 at once (counted), never a hang (timeouts counted);
- (c) with granian importable (`--granian`): the same app on granian (1 worker, `--interface
  asgi`, bench/granian_app.py) beside the 1-worker service on uvicorn with the service's protocol,
  in the same read rounds.

Reuses bench/run.py's stack (OpenBao, three NATS nodes, the OIDC issuer, 64 seeded secrets).

    .venv/bin/python bench/workers_bench.py             # writes bench/results/workers.json
    .venv/bin/python bench/workers_bench.py --quick     # a smoke test: prints, writes nothing
    PYTHONPATH=/tmp/granian-pkgs .venv/bin/python bench/workers_bench.py --granian
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

from devstack import free_port  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "workers.json"
OVERLOAD_CONNECTIONS = 1000
OVERLOAD_TIMEOUT_S = 2
OVERLOAD_LIMIT = 200  # SECRETS_LIMIT_CONCURRENCY per worker in the 503 run: 2 x 200 < 1000


GOALS = {
    "workers_two_over_one": ("cached read throughput, 2 workers / 1 (same run)", ">=", 1.6),
    "overload_p99_ms": ("wrk -c1000 against 2 workers: p99 (ms)", "<=", 100.0),
    "overload_over_2s": ("wrk -c1000 against 2 workers: requests over 2 s", "<=", 0.0),
    "overload_limited_over_2s": (
        "wrk -c1000 past SECRETS_LIMIT_CONCURRENCY (2 workers): requests over 2 s",
        "<=",
        0.0,
    ),
}


def goal_figures(result: Mapping[str, Any]) -> dict[str, float]:
    """The figures GOALS judges, from bench_workers' result (bench/run.py's goals())."""
    loaded = result["overload"]
    return {
        "workers_two_over_one": result["two_over_one_workers"],
        "overload_p99_ms": loaded["two_workers"]["p99_ms"],
        "overload_over_2s": loaded["two_workers"]["timeouts_over_2s"],
        "overload_limited_over_2s": loaded["two_workers_limited"]["timeouts_over_2s"],
    }


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return sorted(int(pid) for pid in children.split())


def start_workers(
    name: str, workdir: Path, environ: Mapping[str, str], workers: int
) -> tuple[bench.Child, dict[str, int]]:
    """A `serve` of `workers` workers, once every worker listens; and the pids that serve."""
    child = bench.start_service(name, workdir, {**environ, "SECRETS_WORKERS": str(workers)})
    if workers == 1:
        return child, {"service": child.pid}
    deadline = time.monotonic() + 60
    log = workdir / f"{name}.err"
    while log.read_text().count('"worker ready"') < workers:
        if time.monotonic() > deadline:
            child.stop()
            raise bench.BenchError(f"{name}: not all {workers} workers ready")
        time.sleep(0.1)
    return child, {f"w{k}": pid for k, pid in enumerate(worker_pids(child.pid))}


def start_granian(workdir: Path, environ: Mapping[str, str]) -> bench.Child:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETS_")}
    env.update(environ)
    env.update({"SECRETS_PORT": str(port), "SECRETS_INSTANCE_ID": "granian"})
    paths = [str(bench.ROOT / "bench"), str(bench.ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    argv = [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1", "--loop", "uvloop", "--no-ws",
        "--log-level", "warning", "granian_app:app",
    ]  # fmt: skip
    process, files = bench.spawn("granian", argv, workdir, env)
    child = bench.Child("granian", f"http://127.0.0.1:{port}", process, files)
    child.wait_ready("/readyz")
    return child


@contextmanager
def services(
    stack_: bench.Stack, workdir: Path, *, granian: bool
) -> Iterator[dict[str, tuple[bench.Child, dict[str, int]]]]:
    started: dict[str, tuple[bench.Child, dict[str, int]]] = {}
    try:
        started["one_worker"] = start_workers("one-worker", workdir, stack_.environ, 1)
        started["two_workers"] = start_workers("two-workers", workdir, stack_.environ, 2)
        limited = {**stack_.environ, "SECRETS_LIMIT_CONCURRENCY": str(OVERLOAD_LIMIT)}
        started["two_workers_limited"] = start_workers("two-limited", workdir, limited, 2)
        if granian:
            child = start_granian(workdir, stack_.environ)
            # granian's main process supervises; its worker (a child) serves.
            started["granian"] = (child, {"service": worker_pids(child.pid)[0]})
        yield started
    finally:
        for child, _ in started.values():
            child.stop()


def overload(wrk: str, target: bench.Target, script: Path, duration: int) -> dict[str, Any]:
    """wrk -c1000: latency tail, requests past 2 s (timeouts), answers that were not 2xx."""
    argv = [
        wrk, "-t2", f"-c{OVERLOAD_CONNECTIONS}", f"-d{duration}s",
        "--timeout", f"{OVERLOAD_TIMEOUT_S}s", "-s", str(script),
    ]  # fmt: skip
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv += [target.url, "--", target.prefix, str(bench.SECRETS_READ)]
    cpu_before = sum(bench.cpu_seconds(pid) for pid in target.pids.values())
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    cpu = sum(bench.cpu_seconds(pid) for pid in target.pids.values()) - cpu_before
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRKJSON ")]
    if done.returncode != 0 or not lines:
        raise bench.BenchError(f"wrk -c1000 against {target.name} failed: {done.stderr}")
    raw = json.loads(lines[-1].removeprefix("WRKJSON "))
    return {
        # CPU the serving processes spent per request: what the machine's other load leaves
        # alone, unlike req/s (the machine is shared).
        "server_cpu_us_per_request": round(cpu * 1e6 / max(1, raw["requests"]), 1),
        "requests_per_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "non_2xx": raw["status_errors"],  # 503 from the concurrency limit: nothing else fails
        "timeouts_over_2s": raw["timeouts"],
        "socket_errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"],
    }


def bench_workers(
    stack_: bench.Stack, workdir: Path, wrk: str, args: argparse.Namespace
) -> dict[str, Any]:
    granian = getattr(args, "granian", False)  # bench/run.py runs it without granian
    overload_duration = getattr(args, "overload_duration", 15)
    with services(stack_, workdir, granian=granian) as started:
        bearer = {"Authorization": f"Bearer {stack_.reader}"}
        prefix = "/secrets/app/bench/s"
        targets = [
            bench.Target(name, child.url, prefix, bearer, pids)
            for name, (child, pids) in started.items()
            if name != "two_workers_limited"
        ]
        print("reads: 1 worker, 2 workers" + (", granian" if granian else ""), file=sys.stderr)
        reads = bench.bench_reads(wrk, targets, workdir, args)
        script = workdir / "reads.lua"
        loaded = {}
        for name in ("one_worker", "two_workers", "two_workers_limited"):
            child, pids = started[name]
            target = bench.Target(name, child.url, prefix, bearer, pids)
            print(f"wrk -c{OVERLOAD_CONNECTIONS} against {name} ...", file=sys.stderr)
            loaded[name] = overload(wrk, target, script, overload_duration)
            print(f"  {loaded[name]}", file=sys.stderr)
    out: dict[str, Any] = {
        "http_reads": reads,
        "two_over_one_workers": round(bench.paired_ratio(reads, "two_workers", "one_worker"), 2),
        "server_cpu_us_per_request": {
            name: round(cpu_us_per_request(r), 1) for name, r in reads.items()
        },
        "overload": loaded | {"limit_concurrency_per_worker": OVERLOAD_LIMIT},
    }
    if granian:
        out["granian_over_uvicorn"] = round(bench.paired_ratio(reads, "granian", "one_worker"), 2)
    return out


def cpu_us_per_request(reads: Mapping[str, Any]) -> float:
    """Median over rounds of the serving processes' CPU per request (µs)."""
    per_round = [
        sum(v for k, v in run["cpu_percent_of_one_core"].items() if k != "wrk")
        * 1e4
        / run["requests_per_s"]
        for run in reads["rounds"]
    ]
    return float(statistics.median(per_round))


def markdown_rows(result: Mapping[str, Any]) -> list[str]:
    reads = result["http_reads"]
    rows = [
        "| cached read, wrk -t2 -c32 | req/s | p50 ms | p99 ms | server CPU (% of a core) | "
        "server CPU µs / request |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in reads.items():
        cpu = r["cpu_percent_of_one_core"]
        server = " + ".join(f"{cpu[k]:.0f}" for k in cpu if k != "wrk")
        rows.append(
            f"| {name} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{server} | {cpu_us_per_request(r):.0f} |"
        )
    rows += [
        "",
        f"2 workers / 1 (median of per-round ratios): {result['two_over_one_workers']}x"
        + (
            f"; granian / uvicorn: {result['granian_over_uvicorn']}x"
            if "granian_over_uvicorn" in result
            else ""
        ),
        "",
        f"| wrk -t2 -c{OVERLOAD_CONNECTIONS} --timeout {OVERLOAD_TIMEOUT_S}s | req/s | p50 ms | "
        "p99 ms | max ms | over 2 s | non-2xx (503) | socket errors | server CPU µs / request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["overload"].items():
        if not isinstance(r, dict):
            continue
        rows.append(
            f"| {name} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['max_ms']:.0f} | {r['timeouts_over_2s']} | {r['non_2xx']} | "
            f"{r['socket_errors']} | {r['server_cpu_us_per_request']:.0f} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = {  # full, quick
        "rounds": (5, 2),
        "duration": (10, 3),
        "warmup": (3, 1),
        "overload_duration": (15, 5),
    }
    for name, (full, quick) in defaults.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), type=type(full), help=f"{full} (quick: {quick})"
        )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--granian", action="store_true", help="also the app on granian")
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(bench.ROOT)}")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    bench.fill_quick_or_full(args, defaults)
    if args.granian and importlib.util.find_spec("granian") is None:
        print("--granian: granian is not importable (pip install granian)", file=sys.stderr)
        return 2
    wrk = bench.ensure_wrk()

    def measure() -> dict[str, Any]:
        workdir = Path(tempfile.mkdtemp(prefix="secrets-workers-bench-"))
        try:
            with bench.stack(workdir) as s:
                return bench_workers(s, workdir, wrk, args)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)

    return bench.run_alone(
        "workers_bench.py",
        measure,
        args.out or (None if args.quick else OUT),
        context={
            "wrk": {
                "threads": args.threads,
                "connections": args.connections,
                "duration_s": args.duration,
                "rounds": args.rounds,
            }
        },
        summary=lambda figures: "\n".join(markdown_rows(figures)),
    )


if __name__ == "__main__":
    sys.exit(main())

"""The scale bench's HTTP part: cached reads with wrk against service processes whose caches hold
10k, 100k and 1M entries, and what filling a cache through a real OpenBao costs.

Targets (each a separate process of the default configuration: JWT check, policy, audit to
stdout, metrics and the request log line on; SECRETS_CACHE_MAX_ENTRIES raised to hold them all):

- `real_<N>`: `secrets-service serve` on the stack's OpenBao, N tiny secrets written there first
  (concurrent CAS-less writes, rate measured) and read once through the service (uncached HTTP
  reads, rate measured) to fill its cache: 10k by default, as 1M would take many minutes;
- `generated_<N>`: the same app (`create_app`, `server_config`: what `serve` runs) with a
  `GeneratedVault` injected at the backend seam (bench/scale_memory.py), its cache filled in the
  process through `SecretsManager.get` before it answers: 10k, 100k, 1M.

Every target gets the same wrk runs (threads, connections, duration), rounds in rotating order;
each wrk thread cycles over 20,000 requests for paths drawn at random over the N cached. The
servers' own cache counters prove every request a hit. SECRETS_VAULT_POLL_INTERVAL is 0 on all
(a per-instance version round reads the metadata of every cached path: bench/scale_memory.py
times one) and SECRETS_CACHE_TTL 3600 (no entry ages out between fill and measure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import run as bench  # noqa: E402
from scale_memory import GeneratedVault, fill, path_of, rss_bytes  # noqa: E402

from devstack import free_port  # noqa: E402

PER_THREAD = 20_000  # requests each wrk thread builds once and cycles over
WRITERS = 32  # concurrent clients filling OpenBao and the real service's cache
SCALE_ENV = {"SECRETS_VAULT_POLL_INTERVAL": "0", "SECRETS_CACHE_TTL": "3600"}

# setup() numbers the threads so that each draws its own paths; done() is bench/run.py's.
WRK_HEAD = """
local requests, i, threads = {}, 0, 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
function init(args)
  math.randomseed(id * 7919 + %(entries)d)
  for k = 1, %(per_thread)d do
    local n = math.random(0, %(entries)d - 1)
    requests[k] = wrk.format("GET", string.format("/secrets/app/svc-%%07d/db", n))
  end
end
function request()
  i = i %% #requests + 1
  return requests[i]
end
"""


def wrk_script(entries: int) -> str:
    """The Lua script for a cache of `entries` (bench/run.py's module is complete by now)."""
    done = "function done" + bench.WRK_SCRIPT.split("function done", 1)[1]
    return WRK_HEAD % {"entries": entries, "per_thread": PER_THREAD} + done


assert path_of(12) == "app/svc-0000012/db"  # the script's format


# -- the generated-backend server (a child process) ----------------------------------------------


async def _serve(entries: int, ready: Path) -> None:
    """The service's app over a GeneratedVault; its cache filled, `ready` gets the figures."""
    from service.http.app import create_app
    from service.http.serving import Server, server_config
    from service.obs.logs import configure_logging
    from service.settings import Settings

    settings = Settings.from_environ(os.environ)
    configure_logging(settings.log_level)
    app = create_app(settings, backend=GeneratedVault())
    server = Server(server_config(app, settings))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving
            raise SystemExit(f"the server stopped: {app.state.startup_error!r}")
        await asyncio.sleep(0.05)
    gc.collect()
    before = rss_bytes()
    fill_s = await fill(app.state.manager, entries)
    gc.collect()
    figures = {
        "entries": len(app.state.manager.cache),
        "fill_s": round(fill_s, 2),
        "fill_per_s": round(entries / fill_s),
        "rss_before_mb": round(before / 1e6, 1),
        "rss_after_mb": round(rss_bytes() / 1e6, 1),
        "rss_bytes_per_entry": round((rss_bytes() - before) / entries, 1),
    }
    ready.write_text(json.dumps(figures))
    await serving


def _wait_for(ready: Path, child: bench.Child, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not ready.exists() or not ready.read_text():
        if child.process.poll() is not None:
            raise bench.BenchError(f"{child.name} exited with {child.process.returncode}")
        if time.monotonic() > deadline:
            raise bench.BenchError(f"{child.name} did not fill its cache in {timeout:.0f} s")
        time.sleep(0.2)
    figures: dict[str, Any] = json.loads(ready.read_text())
    return figures


def start_generated(stack_: bench.Stack, workdir: Path, entries: int) -> tuple[bench.Child, Any]:
    name = f"generated_{entries}"
    ready = workdir / f"{name}.ready"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECRETS_", "BAO_", "VAULT_"))}
    env |= stack_.environ | SCALE_ENV
    env |= {"SECRETS_CACHE_MAX_ENTRIES": str(entries + 1000), "SECRETS_INSTANCE_ID": name}
    port = free_port()
    env["SECRETS_PORT"] = str(port)
    argv = [sys.executable, __file__, "_serve", str(entries), str(ready)]
    process, files = bench.spawn(name, argv, workdir, env)
    child = bench.Child(name, f"http://127.0.0.1:{port}", process, files)
    try:
        return child, _wait_for(ready, child, timeout=60 + entries / 2000)
    except BaseException:
        child.stop()
        raise


# -- a real service over OpenBao -------------------------------------------------------------------


async def _concurrently(calls: int, call: Any) -> float:
    """`call(n)` for n in range(calls), WRITERS at a time: the seconds it took."""
    queue = iter(range(calls))

    async def worker() -> None:
        for n in queue:
            await call(n)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(WRITERS)))
    return time.perf_counter() - started


async def _write_openbao(addr: str, token: str, entries: int) -> float:
    headers = {"X-Vault-Token": token}
    async with aiohttp.ClientSession(addr, headers=headers) as http:

        async def write(n: int) -> None:
            body = {"data": {"username": "svc-bench", "password": os.urandom(40).hex()}}
            async with http.post(f"/v1/secret/data/{path_of(n)}", json=body) as response:
                if response.status != 200:
                    raise bench.BenchError(f"OpenBao write answered {response.status}")

        return await _concurrently(entries, write)


async def _read_through(url: str, token: str, entries: int) -> float:
    async with aiohttp.ClientSession(url, headers={"Authorization": f"Bearer {token}"}) as http:

        async def read(n: int) -> None:
            async with http.get(f"/secrets/{path_of(n)}") as response:
                await response.read()
                if response.status != 200:
                    raise bench.BenchError(f"service read answered {response.status}")

        return await _concurrently(entries, read)


def start_real(stack_: bench.Stack, workdir: Path, entries: int) -> tuple[bench.Child, Any]:
    """OpenBao gets `entries` secrets, a `secrets-service serve` reads each once."""
    wrote = asyncio.run(_write_openbao(stack_.bao.addr, stack_.bao.root_token, entries))
    name = f"real_{entries}"
    env = stack_.environ | SCALE_ENV | {"SECRETS_CACHE_MAX_ENTRIES": str(entries + 1000)}
    child = bench.start_service(name, workdir, env)
    try:
        rss_before = _rss_of(child.pid)
        read = asyncio.run(_read_through(child.url, stack_.reader, entries))
        metrics = _cache_metrics(child.url)
        if metrics["entries"] < entries:
            raise bench.BenchError(f"{name} caches {metrics['entries']:.0f} of {entries}")
        rss_after = _rss_of(child.pid)
    except BaseException:
        child.stop()
        raise
    return child, {
        "entries": entries,
        "openbao_writes_per_s": round(entries / wrote),
        "uncached_reads_per_s": round(entries / read),
        "fill_s": round(wrote + read, 2),
        "est_1m_fill_min": round((1e6 / (entries / wrote) + 1e6 / (entries / read)) / 60, 1),
        "rss_before_mb": round(rss_before / 1e6, 1),
        "rss_after_mb": round(rss_after / 1e6, 1),
        "rss_bytes_per_entry": round((rss_after - rss_before) / entries, 1),
        "clients": WRITERS,
    }


def _rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise bench.BenchError(f"no VmRSS for {pid}")


def _cache_metrics(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10, trust_env=False).text
    wanted = {
        "secrets_cache_entries": "entries",
        "secrets_cache_hits_total": "hits",
        "secrets_cache_misses_total": "misses",
    }
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[wanted[name]] = float(value)
    return found


# -- wrk -----------------------------------------------------------------------------------------


@dataclass
class Served:
    child: bench.Child
    entries: int
    fill: dict[str, Any]


@contextlib.contextmanager
def targets(
    stack_: bench.Stack, workdir: Path, sizes: list[int], real: list[int]
) -> Iterator[dict[str, Served]]:
    started: dict[str, Served] = {}
    try:
        for entries in real:
            print(f"scale: OpenBao and a service with {entries:,} entries ...", file=sys.stderr)
            child, figures = start_real(stack_, workdir, entries)
            started[child.name] = Served(child, entries, figures)
        for entries in sizes:
            print(f"scale: a service over a generated Vault, {entries:,} entries ...",
                  file=sys.stderr)  # fmt: skip
            child, figures = start_generated(stack_, workdir, entries)
            started[child.name] = Served(child, entries, figures)
        yield started
    finally:
        for served in started.values():
            served.child.stop()


def bench_http(
    stack_: bench.Stack,
    workdir: Path,
    wrk: str,
    *,
    sizes: list[int],
    real: list[int],
    rounds: int,
    duration: int,
    warmup: int,
    threads: int,
    connections: int,
) -> dict[str, Any]:
    args = argparse.Namespace(threads=threads, connections=connections)
    bearer = {"Authorization": f"Bearer {stack_.reader}"}
    out: dict[str, Any] = {}
    with targets(stack_, workdir, sizes, real) as served:
        scripts, wrk_targets = {}, []
        for name, s in served.items():
            scripts[name] = workdir / f"{name}.lua"
            scripts[name].write_text(wrk_script(s.entries))
            wrk_targets.append(
                bench.Target(name, s.child.url, "", bearer, {"service": s.child.pid})
            )
        before = {name: _cache_metrics(s.child.url) for name, s in served.items()}
        for target in wrk_targets:
            bench.run_wrk(wrk, target, scripts[target.name], args, warmup)
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in wrk_targets}
        for r in range(rounds):
            order = wrk_targets[r % len(wrk_targets) :] + wrk_targets[: r % len(wrk_targets)]
            for target in order:
                result = bench.run_wrk(wrk, target, scripts[target.name], args, duration)
                runs[target.name].append(result)
                print(f"  scale round {r + 1} {target.name:18} "
                      f"{result['requests_per_s']:9.0f} req/s  p50 {result['p50_ms']:6.2f} ms"
                      f"  p99 {result['p99_ms']:6.2f} ms", file=sys.stderr)  # fmt: skip
        for name, s in served.items():
            after = _cache_metrics(s.child.url)
            if after["misses"] != before[name]["misses"] or after["entries"] < s.entries:
                raise bench.BenchError(f"{name}: a wrk read missed the cache ({before}, {after})")
            out[name] = {
                "entries": s.entries,
                **{
                    key: round(statistics.median(run[key] for run in runs[name]), 3)
                    for key in ("requests_per_s", "p50_ms", "p99_ms", "max_ms")
                },
                "server_cpu_percent": round(
                    statistics.median(
                        run["cpu_percent_of_one_core"]["service"] for run in runs[name]
                    ),
                    1,
                ),
                "hits_counted": int(after["hits"] - before[name]["hits"]),
                "fill": s.fill,
                "rounds": [run["requests_per_s"] for run in runs[name]],
            }
    return out


def main() -> int:
    if sys.argv[1:2] == ["_serve"]:
        import uvloop

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_serve(int(sys.argv[2]), Path(sys.argv[3])))
        return 0
    print("run bench/scale_bench.py (this module is its HTTP part)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

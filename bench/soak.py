"""`make soak`: minutes of mixed traffic at 80% of the measured maximum; nothing may degrade.

Starts OpenBao, nats-server, OpenBao as the OIDC issuer and one `secrets-service serve` process
(default configuration: audit to a file, metrics, JSON logs at WARNING). Then, from this
process, over keep-alive HTTP/1.1 connections:

1. calibration: closed loop (each connection sends its next request when the previous one
   answered) for `--calibrate` seconds: the maximum throughput of this machine and generator;
2. soak: open loop at `--load` (0.8) of that rate for `--minutes`, the same mix: 90% reads of
   100 cached secrets, 10% CAS writes (each connection updates its own secret, so a write
   never conflicts). Every `--sample` seconds the service's RSS, open file descriptors and
   threads are read from /proc.

Pass: no 5xx and no unanswered request, RSS at the end within 10% of the baseline (the first
sample after `--warmup` seconds of soak), open file descriptors flat after it (within 4).
Results: bench/results/soak.json; the exit code is 1 when a criterion fails (2 when the run
itself failed).

    make soak          # or: .venv/bin/python bench/soak.py [--minutes 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import (  # noqa: E402
    DEV_POLICY_TOML,
    NatsServer,
    OpenBaoServer,
    ServiceProcess,
    configure_oidc,
    free_port,
)

READ_PATHS = 100
WRITE_SHARE = 0.10
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 4
"""Open descriptors may rise this much from the first third of the soak to the last (medians).

A leak grows with the requests served; a connection pool grows to the peak of concurrent Vault
calls (at most SECRETS_VAULT_CONCURRENCY) and stays, which can happen late in a run: so the
trend is checked, not the spread of single samples."""


@dataclass
class Window:
    """Answers seen since the last sample."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unanswered: int = 0

    def take(self) -> Window:
        taken = Window(self.statuses, self.latencies, self.unanswered)
        self.statuses, self.latencies, self.unanswered = Counter(), [], 0
        return taken


class Connection:
    """One keep-alive HTTP/1.1 connection; requests are prebuilt bytes."""

    def __init__(self, host: str, port: int, token: str, index: int) -> None:
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n".encode()
        self.write_path = f"soak/w{index}"
        self.version = 0
        self.writes = 0
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()

    def _request(self, rng: random.Random) -> tuple[bytes, bool]:
        if rng.random() < WRITE_SHARE:
            self.writes += 1
            body = json.dumps(
                {"data": {"n": self.writes, "note": "soak-" + "x" * 64}, "version": self.version}
            ).encode()
            head = (
                f"PATCH /secrets/{self.write_path} HTTP/1.1\r\nHost: soak\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            ).encode()
            return head + self.auth + b"\r\n" + body, True
        path = f"soak/r{rng.randrange(READ_PATHS)}"
        return (
            f"GET /secrets/{path} HTTP/1.1\r\nHost: soak\r\n".encode() + self.auth + b"\r\n",
            False,
        )

    async def send(self, rng: random.Random, window: Window) -> None:
        request, is_write = self._request(rng)
        started = time.perf_counter()
        try:
            if self.reader is None or self.writer is None:
                await self.open()
            assert self.reader is not None and self.writer is not None
            self.writer.write(request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            body = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            window.unanswered += 1
            await self.close()
            self.reader = self.writer = None
            return
        window.latencies.append(time.perf_counter() - started)
        window.statuses[status] += 1
        if is_write and status == 200:
            self.version = json.loads(body)["version"]


async def closed_loop(conns: list[Connection], seconds: float, window: Window) -> None:
    until = time.monotonic() + seconds

    async def run(conn: Connection, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            await conn.send(rng, window)

    await asyncio.gather(*(run(c, i) for i, c in enumerate(conns)))


async def open_loop(
    conns: list[Connection], rate: float, seconds: float, window: Window, on_tick: Any
) -> None:
    """`rate` requests a second in total, spread evenly over the connections, for `seconds`."""
    started = time.monotonic()
    until = started + seconds
    interval = len(conns) / rate

    async def run(conn: Connection, seed: int) -> None:
        rng = random.Random(seed)
        due = started + rng.random() * interval
        while due < until:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await conn.send(rng, window)
            due += interval

    ticker = asyncio.get_running_loop().create_task(on_tick())
    try:
        await asyncio.gather(*(run(c, 1000 + i) for i, c in enumerate(conns)))
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def summarize(window: Window, seconds: float) -> dict[str, Any]:
    answered = sum(window.statuses.values())
    return {
        "requests": answered,
        "per_second": round(answered / seconds, 1),
        "statuses": {str(k): v for k, v in sorted(window.statuses.items())},
        "unanswered": window.unanswered,
        "p50_ms": round(pct(window.latencies, 0.50) * 1000, 2),
        "p99_ms": round(pct(window.latencies, 0.99) * 1000, 2),
    }


async def soak(args: argparse.Namespace, svc: ServiceProcess, token: str) -> dict[str, Any]:
    host, port = "127.0.0.1", svc.port
    conns = [Connection(host, port, token, i) for i in range(args.connections)]
    for conn in conns:
        await conn.open()
    window = Window()
    # Warm-up: caches, verified-token cache, worker threads, connection pools.
    await closed_loop(conns, 3.0, window)
    window.take()
    started = time.monotonic()
    await closed_loop(conns, args.calibrate, window)
    calibration = summarize(window.take(), time.monotonic() - started)
    max_rate = calibration["per_second"]
    rate = max_rate * args.load
    print(f"calibration: {max_rate} req/s at most; soaking at {rate:.0f} req/s", flush=True)

    samples: list[dict[str, Any]] = []
    totals = Window()
    soak_started = time.monotonic()

    async def on_tick() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(args.sample)
            now = time.monotonic()
            taken = window.take()
            totals.statuses.update(taken.statuses)
            totals.latencies.extend(taken.latencies)
            totals.unanswered += taken.unanswered
            sample = {
                "t": round(now - soak_started, 1),
                "rss_mb": round(svc.rss_bytes() / 2**20, 2),
                "fds": svc.open_fds(),
                "threads": svc.threads(),
                **summarize(taken, now - last),
            }
            last = now
            samples.append(sample)
            print(
                f"t={sample['t']:>6}s rss={sample['rss_mb']} MB fds={sample['fds']} "
                f"threads={sample['threads']} {sample['per_second']} req/s "
                f"p99={sample['p99_ms']} ms statuses={sample['statuses']} "
                f"unanswered={sample['unanswered']}",
                flush=True,
            )

    await open_loop(conns, rate, args.minutes * 60, window, on_tick)
    taken = window.take()
    totals.statuses.update(taken.statuses)
    totals.latencies.extend(taken.latencies)
    totals.unanswered += taken.unanswered
    for conn in conns:
        await conn.close()
    soaked = time.monotonic() - soak_started
    return {
        "calibration": calibration,
        "target_per_second": round(rate, 1),
        "soak": summarize(totals, soaked),
        "samples": samples,
    }


def verdict(result: dict[str, Any], warmup: float) -> dict[str, Any]:
    samples = result["samples"]
    soak = result["soak"]
    server_errors = sum(v for k, v in soak["statuses"].items() if k.startswith("5"))
    # The baseline is taken once the process has settled at the soak rate (allocator arenas,
    # worker threads, histograms): growth after it is what would go on growing.
    settled = [s for s in samples if s["t"] >= warmup] or samples
    first, last = settled[0], samples[-1]
    rss_growth = (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"]
    fds = [s["fds"] for s in settled]
    third = max(1, len(fds) // 3)
    checks = {
        "no_5xx": server_errors == 0,
        "every_request_answered": soak["unanswered"] == 0,
        "only_200": set(soak["statuses"]) == {"200"},
        "rss_growth_under_10_percent": rss_growth < RSS_GROWTH_LIMIT,
        "fds_flat": statistics.median(fds[-third:]) - statistics.median(fds[:third]) <= FD_SLACK,
        "achieved_the_target_rate": soak["per_second"] >= 0.95 * result["target_per_second"],
    }
    return {
        "server_errors": server_errors,
        "baseline_at_seconds": first["t"],
        "rss_first_sample_mb": samples[0]["rss_mb"],
        "rss_baseline_mb": first["rss_mb"],
        "rss_last_mb": last["rss_mb"],
        "rss_max_mb": max(s["rss_mb"] for s in samples),
        "rss_growth_percent": round(rss_growth * 100, 2),
        "fds_min_max": [min(fds), max(fds)],
        "threads_min_max": [min(s["threads"] for s in samples), max(s["threads"] for s in samples)],
        "checks": checks,
        "passed": all(checks.values()),
    }


async def seed(base: str, token: str, index_count: int) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        headers = {"Authorization": f"Bearer {token}"}
        for i in range(index_count):
            r = await client.patch(
                f"/secrets/soak/r{i}",
                json={
                    "data": {"user": f"u{i}", "secret": f"{i:04d}-Soak-Value-7f3c9e"},
                    "version": 0,
                },
                headers=headers,
            )
            r.raise_for_status()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured maximum")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--calibrate", type=float, default=15.0, help="seconds")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of soak before the RSS baseline"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="secrets-soak-"))
    try:
        with contextlib.ExitStack() as stack:
            bao = stack.enter_context(OpenBaoServer(log_path=workdir / "openbao.log"))
            nats = stack.enter_context(NatsServer(log_path=workdir / "nats.log"))
            oidc = configure_oidc(bao.addr, bao.root_token, ttl="2h")
            policy = workdir / "policy.toml"
            policy.write_text(DEV_POLICY_TOML)
            environ = {
                "SECRETS_VAULT_ADDR": bao.addr,
                "SECRETS_VAULT_TOKEN": bao.root_token,
                "SECRETS_NATS_URL": nats.url,
                "SECRETS_OIDC_ISSUER": oidc.issuer,
                "SECRETS_OIDC_AUDIENCE": oidc.audience,
                "SECRETS_POLICY_FILE": str(policy),
                "SECRETS_PORT": str(free_port()),
                "SECRETS_LOG_LEVEL": "WARNING",
                "SECRETS_AUDIT_SINK": f"file:{workdir / 'audit.log'}",
            }
            svc = stack.enter_context(ServiceProcess(environ, log_path=workdir / "service.log"))
            token = oidc.mint("admin")
            asyncio.run(seed(svc.url, token, READ_PATHS))
            result = asyncio.run(soak(args, svc, token))
            audit_bytes = (workdir / "audit.log").stat().st_size
    except Exception as exc:  # noqa: BLE001 - report and exit 2, servers already stopped
        print(f"soak failed to run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    outcome = verdict(result, args.warmup)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "parameters": {
            "minutes": args.minutes,
            "warmup_seconds": args.warmup,
            "load": args.load,
            "connections": args.connections,
            "write_share": WRITE_SHARE,
            "read_paths": READ_PATHS,
        },
        "audit_log_mb": round(audit_bytes / 2**20, 1),
        **result,
        "verdict": outcome,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in outcome.items()}, indent=2))
    print(f"results in {args.out}")
    if not outcome["passed"]:
        print("SOAK FAILED: " + ", ".join(k for k, ok in outcome["checks"].items() if not ok))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

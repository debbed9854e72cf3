"""Per-request cost of the service itself on a cached read (issue: audit, metrics, logging).

Starts a real OpenBao, nats-server and OpenBao's OIDC issuer, builds the app with
`create_app`, runs its lifespan, then calls the ASGI app directly (no socket, no HTTP parser)
with `GET /secrets/app/bench` and a reader's token: every call is a token-cache hit and a secret
cache hit, so what is timed is middleware (request id, audit record, metrics, log line), auth,
policy, the manager's cache and the response. The log line is formatted and written to
/dev/null at INFO, as in production.

Run it against two trees to compare, e.g. the commit before a change:

    .venv/bin/python bench/request_bench.py --label after
    git archive HEAD | tar -x -C /tmp/before && cp bench/request_bench.py /tmp/before/bench/
    .venv/bin/python /tmp/before/bench/request_bench.py --label before

Then, with `--confirms N` (default 2000), it times the fail-closed confirmation of a write's
audit record (`AuditLog.confirm`: the line sink, and JetStream with its acknowledgement) on its
own, N times in a row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from devstack import (  # noqa: E402
    DEV_POLICY_TOML,
    NatsServer,
    OpenBaoServer,
    configure_oidc,
)
from service import create_app  # noqa: E402
from service.obs.logs import configure_logging  # noqa: E402
from service.settings import Settings  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(calls: int, confirms: int, environ: dict[str, str]) -> dict[str, float]:
    app = create_app(Settings.from_environ(environ))
    token = environ["BENCH_TOKEN"]
    async with app.router.lifespan_context(app) as state:
        assert state is not None  # the app's lifespan yields its resources
        scope_base: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/secrets/app/bench",
            "raw_path": b"/secrets/app/bench",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8080),
        }
        statuses: list[int] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        async def one() -> None:
            await app({**scope_base, "state": dict(state or {})}, receive, send)
            # A served request waits on its socket; here the loop gets the same one turn, so
            # background tasks (the audit writer) run as they would under uvicorn.
            await asyncio.sleep(0)

        for _ in range(500):  # warm: token cache, secret cache, label children
            await one()
        assert set(statuses) == {200}, set(statuses)
        per_call: list[float] = []
        each: list[float] = []  # every request on its own: the writer's turns show in the tail
        batch = 100
        # CPU time as well as wall time: on a shared machine the wall clock also counts the
        # time this process waited for a core.
        cpu_started = time.process_time_ns()
        clock = time.perf_counter_ns
        for _ in range(calls // batch):
            started = clock()
            for _ in range(batch):
                before = clock()
                await one()
                each.append((clock() - before) / 1000)
            per_call.append((clock() - started) / batch / 1000)
        cpu_per_call = (time.process_time_ns() - cpu_started) / (calls // batch * batch) / 1000
        assert set(statuses) == {200}
        confirmed = await time_confirms(state["audit"], confirms) if confirms else {}
        await asyncio.sleep(0.2)  # let the audit writer drain before the lifespan ends
        audit_dropped = state["audit"].dropped
    return {
        "audit_dropped": audit_dropped,
        "us_per_request_median": round(statistics.median(per_call), 2),
        "cpu_us_per_request": round(cpu_per_call, 2),
        "us_per_request_p10": round(pct(per_call, 0.10), 2),
        "us_per_request_p90": round(pct(per_call, 0.90), 2),
        "batches": len(per_call),
        "batch_size": batch,
        "us_single_request_median": round(statistics.median(each), 2),
        "us_single_request_p99": round(pct(each, 0.99), 2),
        **confirmed,
    }


async def time_confirms(audit: Any, count: int) -> dict[str, float]:
    """`AuditLog.confirm` of a write's record, `count` times: what a PATCH waits for."""
    times: list[float] = []
    cpu_started = time.process_time_ns()
    for n in range(count):
        record = audit.record(
            request_id=f"confirm-{n}", op="write", method="PATCH", path="app/bench", version=n,
            allowed=True, outcome="ok", status=200, reason=None, sub="writer", client_id="cli",
            source="127.0.0.1",
        )  # fmt: skip
        started = time.perf_counter_ns()
        assert await audit.confirm(record)
        times.append((time.perf_counter_ns() - started) / 1000)
        await asyncio.sleep(0)
    cpu = (time.process_time_ns() - cpu_started) / count / 1000
    return {
        "confirm_us_median": round(statistics.median(times), 2),
        "confirm_us_p99": round(pct(times, 0.99), 2),
        "confirm_cpu_us": round(cpu, 2),  # the JetStream acknowledgements' handling included
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--confirms", type=int, default=2_000)
    parser.add_argument("--label", default="current tree")
    parser.add_argument("--audit-sink", default=None, help="SECRETS_AUDIT_SINK (default: a file)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--uncached", action="store_true", help="SECRETS_CACHE_TTL=0: every read asks Vault"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="request-bench-"))
    policy = workdir / "policy.toml"
    policy.write_text(DEV_POLICY_TOML)
    with OpenBaoServer() as bao, NatsServer(store_dir=workdir / "js") as nats:
        oidc = configure_oidc(bao.addr, bao.root_token)
        httpx.post(
            f"{bao.addr}/v1/secret/data/app/bench",
            json={"data": {"username": "app", "password": "bench-Xq7!kP2#vR9"}},
            headers={"X-Vault-Token": bao.root_token},
        ).raise_for_status()
        environ = {
            "SECRETS_VAULT_ADDR": bao.addr,
            "SECRETS_VAULT_TOKEN": bao.root_token,
            "SECRETS_NATS_URL": nats.url,
            "SECRETS_OIDC_ISSUER": oidc.issuer,
            "SECRETS_OIDC_AUDIENCE": oidc.audience,
            "SECRETS_POLICY_FILE": str(policy),
            "SECRETS_AUDIT_SINK": args.audit_sink or f"file:{workdir / 'audit.log'}",
            "SECRETS_VAULT_POLL_INTERVAL": "0",
            "SECRETS_CACHE_TTL": "0" if args.uncached else "300",
            "BENCH_TOKEN": oidc.mint("reader"),
        }
        with open(os.devnull, "w") as devnull:
            configure_logging("INFO", devnull)
            result = asyncio.run(run(args.calls, args.confirms, environ))
            logging.getLogger().handlers.clear()
    audit = workdir / "audit.log"
    audit_lines = len(audit.read_bytes().splitlines()) if audit.exists() else None
    shutil.rmtree(workdir, ignore_errors=True)
    out = {
        "label": args.label,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "audit_sink": environ["SECRETS_AUDIT_SINK"].replace(str(workdir), "<tmp>"),
        "audit_lines": audit_lines,
        "uncached": args.uncached,
        **result,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

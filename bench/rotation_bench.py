"""The cost of a rotation: `POST /secrets/{path}:rotate` over HTTP against a real service process,
for the password and the postgres (single-user) generators, beside a PATCH of the same path.

Reuses bench/run.py's stack (OpenBao, three NATS nodes, the OIDC issuer) and adds PostgreSQL 16
(devstack.PostgresServer). One service instance, default configuration, with two on-request
rules: `bench/pw/*` password and `bench/pg/*` postgres. For each, one client on a keep-alive
connection times N rotations interleaved with N PATCH writes of the same path (each writing the
data the rotation left, read back untimed), so the ratio rotate/write is measured side by side
on this shared machine. Then, with nothing else running, a few rotations alone give the Vault
calls (the service's own `secrets_vault_request_seconds_count`) and CPU time per rotation, and
the parts of a postgres rotation are timed in process (SCRAM verifier, login, ALTER ROLE).

    .venv/bin/python bench/rotation_bench.py            # writes bench/results/rotation.json
    .venv/bin/python bench/rotation_bench.py --quick    # a smoke test: prints, writes nothing
    .venv/bin/python bench/rotation_bench.py --py-spy /tmp/pg.txt   # profile the postgres ones
"""

# Where the time goes (bench/results/rotation.json; py-spy --gil on the service over 100 postgres
# rotations; `perf record` on a PostgreSQL backend running ALTER ROLE):
# - password, ~18 ms: 11 Vault calls one after another (5 CAS writes: the claim, `generated`, the
#   version, `written`, idle; 2 reads, 3 metadata, 1 destroy of the state's history) take ~16 ms
#   of it; the service spends ~7.5 ms of CPU. A PATCH is 1 Vault call (~2 ms): fewer state
#   writes, not CPU, is what would make a rotation cheaper.
# - postgres single-user, ~42 ms: 12 Vault calls (one more state write, `applied`) ~19 ms; two
#   SCRAM logins (as the role with its old password, then proving the new one) ~6.3 ms each: a
#   fresh backend, and the client's PBKDF2 (4096 iterations, ~1.7 ms like the service's own
#   verifier); ALTER ROLE ~6.6 ms, nearly all CPU in PostgreSQL: given a verifier, it still checks
#   that it is not the empty password's (user.c: plain_crypt_verify(role, secret, "")), a PBKDF2
#   of 4096 iterations on its own SHA-256 (SHA256_Transform: 86% of the backend's samples; the
#   pgserver build links no OpenSSL). In the service's Python, the Vault client (aiohttp writes)
#   is half the samples, asyncpg's connects 15%, the event bus 11%; PBKDF2 in hashlib lets the GIL
#   go, so it is not among them.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg  # noqa: E402
import run as bench  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from devstack import PostgresServer  # noqa: E402
from service.rotation.scram import scram_verifier  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "rotation.json"
GENERATORS = ("password", "postgres")
PATHS = {"password": "bench/pw/s", "postgres": "bench/pg/db"}
# The stack's `writer` token carries the role app-writer: here it may also rotate.
POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-writer]
read = ["bench/**"]
write = ["bench/**"]
rotate = ["bench/**"]

[[rotation.rules]]
paths = ["bench/pw/*"]
generator = "password"

[[rotation.rules]]
paths = ["bench/pg/*"]
generator = "postgres"
"""


def summary(values: Sequence[float]) -> dict[str, float]:
    return {**bench.summary_ms(values), "mean_ms": round(statistics.fmean(values), 3)}


def cpu_ms(pid: int) -> float:
    """CPU time of a process and of its reaped children (PostgreSQL's backends), in ms."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) * 1000 / os.sysconf("SC_CLK_TCK")


class Client:
    """One client of the service on a keep-alive connection: the writer's token."""

    def __init__(self, url: str, token: str) -> None:
        self.conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(self, method: str, target: str, body: Any = None) -> tuple[float, Any]:
        """(milliseconds, the JSON answer); BenchError unless 200."""
        payload = None if body is None else json.dumps(body)
        started = time.perf_counter()
        self.conn.request(method, target, body=payload, headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise bench.BenchError(f"{method} {target} answered {response.status}: {raw[:300]!r}")
        return elapsed, json.loads(raw) if raw.startswith(b"{") else raw.decode()

    def rotate(self, path: str) -> tuple[float, int]:
        ms, body = self.call("POST", f"/secrets/{path}:rotate")
        if body["version"] != body["previous_version"] + 1:
            raise bench.BenchError(f"rotation of {path} answered {body}")
        return ms, int(body["version"])

    def rewrite(self, path: str, version: int) -> float:
        """PATCH the path with the data it holds (read untimed): a write that keeps the
        credential live, of the same size and fields as the rotation's."""
        _, secret = self.call("GET", f"/secrets/{path}")
        ms, body = self.call(
            "PATCH", f"/secrets/{path}", {"data": secret["data"], "version": version}
        )
        if body["version"] != version + 1:
            raise bench.BenchError(f"PATCH of {path} answered {body}")
        return ms

    def close(self) -> None:
        self.conn.close()


def side_by_side(client: Client, path: str, calls: int, warmup: int) -> dict[str, Any]:
    """`calls` rotations and `calls` PATCH writes of `path`, alternating."""
    rotate: list[float] = []
    write: list[float] = []
    for n in range(warmup + calls):
        ms_rotate, version = client.rotate(path)
        ms_write = client.rewrite(path, version)
        if n >= warmup:
            rotate.append(ms_rotate)
            write.append(ms_write)
    r, w = summary(rotate), summary(write)
    return {
        "rotate": r,
        "write": w,
        "rotate_over_write_p50": round(r["p50_ms"] / w["p50_ms"], 2),
        # Each pair ran within milliseconds: the median of their ratios cancels slow spells.
        "rotate_over_write_paired_median": round(
            statistics.median(a / b for a, b in zip(rotate, write, strict=True)), 2
        ),
    }


def vault_account(client: Client) -> dict[str, float]:
    """The service's Vault calls so far by op, and `seconds` spent in them all (its
    secrets_vault_request_seconds histogram)."""
    _, text = client.call("GET", "/metrics")
    account: dict[str, float] = {"seconds": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "secrets_vault_request_seconds_count":
                account[sample.labels["op"]] = sample.value
            elif sample.name == "secrets_vault_request_seconds_sum":
                account["seconds"] += sample.value
    return account


class _ScanInWindow(Exception):
    pass


def per_unit(before: Mapping[str, float], after: Mapping[str, float], n: int) -> dict[str, Any]:
    """Vault calls by op and ms in Vault per unit of work between two accounts. The schedule's
    scan (every 30 s: LIST calls and state reads) is not the work's: _ScanInWindow if it ran."""
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v > before.get(k, 0.0)}
    if "list" in delta:
        raise _ScanInWindow()
    seconds = delta.pop("seconds", 0.0)
    calls = {op: round(count / n, 2) for op, count in delta.items()}
    return {
        "calls": calls | {"total": round(sum(delta.values()) / n, 2)},
        "ms": round(seconds * 1000 / n, 2),
    }


def alone(
    client: Client, path: str, calls: int, pids: Mapping[str, int], py_spy: Path | None
) -> dict[str, Any]:
    """`calls` rotations back to back, nothing else: wall time, Vault calls and the time in
    them, and CPU ms of each process, per rotation. A window the scan fell in is run again."""
    for _ in range(3):
        before, cpu_before = vault_account(client), {k: cpu_ms(p) for k, p in pids.items()}
        with profiled(pids["service"], py_spy):
            started = time.perf_counter()
            for _ in range(calls):
                client.rotate(path)
            elapsed = time.perf_counter() - started
        cpu = {k: round((cpu_ms(p) - cpu_before[k]) / calls, 2) for k, p in pids.items()}
        try:
            vault = per_unit(before, vault_account(client), calls)
        except _ScanInWindow:
            continue
        return {
            "rotations": calls,
            "ms_per_rotation": round(elapsed * 1000 / calls, 2),
            "vault_calls_per_rotation": vault["calls"],
            "vault_ms_per_rotation": vault["ms"],
            "cpu_ms_per_rotation": cpu,
        }
    raise bench.BenchError("the schedule's scan fell in every window")


def write_calls(client: Client, path: str, calls: int) -> dict[str, Any]:
    """Vault calls and ms in Vault per PATCH of `path` (its current data again)."""
    for _ in range(3):
        _, secret = client.call("GET", f"/secrets/{path}")
        version, data = secret["version"], secret["data"]
        before = vault_account(client)
        for _ in range(calls):
            _, body = client.call("PATCH", f"/secrets/{path}", {"data": data, "version": version})
            version = body["version"]
        try:
            return per_unit(before, vault_account(client), calls)
        except _ScanInWindow:
            continue
    raise bench.BenchError("the schedule's scan fell in every window")


@contextlib.contextmanager
def profiled(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy sampling `pid` meanwhile, collapsed stacks to `out` (nothing if `out` is None);
    only samples holding the GIL: the service's Python CPU, not its waits."""
    if out is None:
        yield
        return
    argv = [str(bench.BIN / "py-spy"), "record", "--pid", str(pid), "--rate", "1000", "--gil"]
    spy = subprocess.Popen([*argv, "--format", "raw", "--output", str(out), "--nonblocking"])
    time.sleep(1.0)  # attached and sampling
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


async def _parts(login: Mapping[str, Any], samples: int) -> dict[str, Any]:
    """In process, what a single-user postgres rotation does besides Vault calls (see
    PostgresRotator): one SCRAM verifier, two SCRAM logins (sslmode prefer: an SSLRequest
    first, which this server without TLS declines), ALTER ROLE."""
    verifier: list[float] = []
    for _ in range(samples):
        started = time.perf_counter()
        scram_verifier(login["password"])
        verifier.append((time.perf_counter() - started) * 1000)
    logins: dict[str, list[float]] = {"prefer": [], "disable": []}
    alter: list[float] = []
    for _ in range(samples):
        for mode, times in logins.items():
            started = time.perf_counter()
            conn = await asyncpg.connect(
                host=login["host"], port=login["port"], user=login["username"],
                password=login["password"], database=login["dbname"],
                ssl="prefer" if mode == "prefer" else False,
            )  # fmt: skip
            times.append((time.perf_counter() - started) * 1000)
            try:
                if mode == "prefer":
                    # The same verifier again: the password does not change.
                    statement = (
                        f"ALTER ROLE CURRENT_USER PASSWORD '{scram_verifier(login['password'])}'"
                    )
                    started = time.perf_counter()
                    await conn.execute(statement)
                    alter.append((time.perf_counter() - started) * 1000)
            finally:
                await conn.close()
    return {
        "samples": samples,
        "scram_verifier_ms_p50": round(statistics.median(verifier), 3),
        "scram_login_ms_p50": round(statistics.median(logins["prefer"]), 3),
        "scram_login_without_ssl_request_ms_p50": round(statistics.median(logins["disable"]), 3),
        "alter_role_ms_p50": round(statistics.median(alter), 3),
    }


def bench_rotation(
    stack_: bench.Stack,
    workdir: Path,
    *,
    password_calls: int = 200,
    postgres_calls: int = 100,
    alone_calls: int = 20,
    py_spy: Path | None = None,
) -> dict[str, Any]:
    """Every figure of the rotation bench, against `stack_` plus a PostgreSQL of its own."""
    policy = workdir / "rotation-policy.toml"
    policy.write_text(POLICY)
    with PostgresServer(log_path=workdir / "postgres.log") as pg, contextlib.ExitStack() as stop:
        role, password = "bench_app", "pw-" + os.urandom(18).hex()
        pg.create_login(role, password)
        login = pg.secret(role, password)
        service = bench.start_service(
            "rotation", workdir, {**stack_.environ, "SECRETS_POLICY_FILE": str(policy)}
        )
        stop.callback(service.stop)
        client = Client(service.url, stack_.writer)
        stop.callback(client.close)
        client.call(
            "PATCH", f"/secrets/{PATHS['password']}", {"data": bench.secret_data(), "version": 0}
        )
        client.call("PATCH", f"/secrets/{PATHS['postgres']}", {"data": login, "version": 0})
        calls = {"password": password_calls, "postgres": postgres_calls}
        assert stack_.bao.process is not None and pg.process is not None
        pids = {
            "service": service.pid,
            "openbao": stack_.bao.process.pid,
            "postgres": pg.process.pid,
        }
        result: dict[str, Any] = {}
        for generator in GENERATORS:
            print(f"rotation: {generator} x {calls[generator]} ...", file=sys.stderr)
            path = PATHS[generator]
            result[generator] = side_by_side(client, path, calls[generator], warmup=5)
            spy = py_spy if generator == "postgres" else None
            result[generator]["alone"] = alone(client, path, alone_calls, pids, spy)
        result["patch_alone"] = write_calls(client, PATHS["password"], alone_calls)
        _, current = client.call("GET", f"/secrets/{PATHS['postgres']}")
        result["postgres"]["parts"] = asyncio.run(_parts(current["data"], alone_calls))
        result["postgres_version"] = pg.sql("SHOW server_version")
    result["note"] = (
        "one client, keep-alive. rotate/write: rotations and PATCH writes of the same path in "
        "turn (a PATCH writes the data the rotation left, read back untimed); p99 of 100 calls is "
        "their largest. alone: rotations back to back, nothing else; Vault calls and the time in "
        "them from the service's secrets_vault_request_seconds; CPU of each process (postgres: "
        "with its backends, from its children's account). patch_alone: the same for PATCH "
        "writes. parts: in process, what a postgres rotation does besides Vault calls"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--password", type=int, help="password rotations (200; quick: 20)")
    parser.add_argument("--postgres", type=int, help="postgres rotations (100; quick: 10)")
    parser.add_argument("--alone", type=int, help="rotations for calls and CPU (20; quick: 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    parser.add_argument("--py-spy", type=Path, help="py-spy's collapsed stacks (postgres, alone)")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(bench.ROOT)}")
    args = parser.parse_args()
    bench.fill_quick_or_full(args, {"password": (200, 20), "postgres": (100, 10), "alone": (20, 5)})
    return bench.run_alone(
        "rotation_bench.py",
        lambda: bench.in_stack(
            "rotation-bench-",
            lambda s, workdir: bench_rotation(
                s,
                workdir,
                password_calls=args.password,
                postgres_calls=args.postgres,
                alone_calls=args.alone,
                py_spy=args.py_spy,
            ),
        ),
        args.out or (None if args.quick else OUT),
    )


def markdown_rows(rotation: Mapping[str, Any]) -> list[str]:
    """bench/run.py's table rows (`| measure | p50 | p99 | max |`) for the rotation figures."""
    labels = {
        "password": "service `:rotate`, password generator ({n}, in turn with PATCH)",
        "postgres": "service `:rotate`, postgres single-user ({n}): ALTER ROLE, login proven",
    }
    rows = []
    for generator in GENERATORS:
        r = rotation[generator]["rotate"]
        rows.append(
            f"| {labels[generator].format(n=r['count'])} | {r['p50_ms']:.2f} ms | "
            f"{r['p99_ms']:.2f} ms | {r['max_ms']:.2f} ms |"
        )
    return rows


def markdown_note(rotation: Mapping[str, Any]) -> str:
    """bench/run.py's sentence on the rotate/write ratio and the Vault calls per rotation."""
    pw, pg = rotation["password"], rotation["postgres"]

    def versus(part: Mapping[str, Any]) -> str:
        return (
            f"{part['rotate']['p50_ms']:.2f} ms against {part['write']['p50_ms']:.2f} ms for the "
            f"PATCH ({part['rotate_over_write_p50']:.1f}×)"
        )

    def calls(part: Mapping[str, Any]) -> str:
        return f"{part['alone']['vault_calls_per_rotation']['total']:g}"

    return (
        "Rotation (one client; `:rotate` and a PATCH of the same path in turn): p50 "
        f"{versus(pw)} with the password generator, {versus(pg)} with postgres. A rotation "
        f"makes {calls(pw)} Vault calls one after another, {calls(pg)} with postgres (a PATCH "
        f"{rotation['patch_alone']['calls']['total']:g}); bench/rotation_bench.py says where the "
        "time goes."
    )


if __name__ == "__main__":
    sys.exit(main())

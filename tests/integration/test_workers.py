"""SECRETS_WORKERS=2 on the real stack: `secrets-service serve` supervises two workers sharing
the port (SO_REUSEPORT), each a whole instance kept coherent through NATS, each with its own
/metrics port (SECRETS_METRICS_PORT + k).

The supervisor alone, with stand-in workers: tests/unit/service/test_workers.py."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, ServiceProcess
from devstack.processes import free_port
from tests import support
from tests.support import (
    Tls,
    bearer,
    eventually,
    metric_value,
    service_environ,
    write_policy,
)

WORKERS = 2
DEADLINE = 60.0

ca = support.ca
tls = support.tls


def metrics_base() -> int:
    """A port p with p + 1 also free: worker k serves /metrics on p + k."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def service(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> Iterator[ServiceProcess]:
    environ = service_environ(
        openbao,
        nats,
        oidc,
        write_policy(tmp_path),
        workers=str(WORKERS),
        metrics_port=str(metrics_base()),
        instance_id="node",
        # Events of this test only: other tests' writes would move the counters read here,
        # and no version check announcing what it finds: the writes' own events alone.
        nats_prefix="workers" + secrets.token_hex(4),
        vault_poll_interval="0",
    )
    with ServiceProcess(environ, log_path=tmp_path / "service.log") as svc:
        yield svc


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text()
    return sorted(int(pid) for pid in children.split())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def log_records(svc: ServiceProcess) -> list[dict[str, object]]:
    assert svc.log_path is not None
    records = []
    for line in svc.log_path.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "message" in record:
                records.append(record)
    return records


def worker_metrics(svc: ServiceProcess, index: int) -> str:
    port = int(svc.environ["SECRETS_METRICS_PORT"]) + index
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


async def all_workers_ready(svc: ServiceProcess) -> None:
    def ready() -> bool:
        return sum(r["message"] == "worker ready" for r in log_records(svc)) >= WORKERS

    await eventually(ready, timeout=DEADLINE)


def fresh_get(svc: ServiceProcess, path: str, token: str) -> httpx.Response:
    """A GET on a connection of its own: the kernel picks the worker anew."""
    return httpx.get(f"{svc.url}/secrets/{path}", headers=bearer(token), timeout=10)


def reads_served(text: str) -> float:
    return metric_value(text, "secrets_operations_total", op="read", outcome="ok")


async def test_both_workers_answer_each_with_its_own_instance_id(
    service: ServiceProcess, oidc: OidcIssuer
) -> None:
    await all_workers_ready(service)
    ids = {r["instance_id"] for r in log_records(service) if r["message"] == "service ready"}
    assert ids == {"node-w0", "node-w1"}
    writer, reader = oidc.mint("writer"), oidc.mint("reader")
    path = f"app/workers/{secrets.token_hex(4)}"
    written = httpx.patch(
        f"{service.url}/secrets/{path}",
        json={"data": {"k": "v"}, "version": 0},
        headers=bearer(writer),
        timeout=10,
    )
    assert written.status_code == 200
    for _ in range(40):  # 40 connections: all on one worker would be a 1 in 2^39 chance
        assert fresh_get(service, path, reader).status_code == 200
    served = [reads_served(worker_metrics(service, k)) for k in range(WORKERS)]
    assert all(n > 0 for n in served) and sum(served) == 40, served


async def test_a_write_through_one_worker_is_read_fresh_through_every_worker(
    service: ServiceProcess, oidc: OidcIssuer
) -> None:
    await all_workers_ready(service)
    writer, reader = oidc.mint("writer"), oidc.mint("reader")
    path = f"app/workers/{secrets.token_hex(4)}"
    for version in range(1, 16):
        for _ in range(4):  # warm both workers' caches with the version before
            before = fresh_get(service, path, reader)
            assert before.status_code == (404 if version == 1 else 200)
            if version > 1:
                assert before.json()["version"] == version - 1
        written = httpx.patch(
            f"{service.url}/secrets/{path}",
            json={"data": {"n": str(version)}, "version": version - 1},
            headers=bearer(writer),
            timeout=10,
        )
        assert written.status_code == 200, written.text

        def heard(v: int = version) -> bool:
            # Each worker counts every change event it takes off the bus, its own included.
            return all(
                metric_value(worker_metrics(service, k), "secrets_events_received_total") >= v
                for k in range(WORKERS)
            )

        await eventually(heard, timeout=DEADLINE)
        for _ in range(6):
            after = fresh_get(service, path, reader)
            assert after.json()["version"] == version and after.json()["data"] == {
                "n": str(version)
            }


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    service: ServiceProcess, oidc: OidcIssuer
) -> None:
    await all_workers_ready(service)
    workers = worker_pids(service.pid)
    assert len(workers) == WORKERS
    reader = oidc.mint("reader")
    async with httpx.AsyncClient(base_url=service.url, timeout=DEADLINE) as client:

        async def watch() -> int:
            lines = 0
            async with client.stream("GET", "/secrets/app:watch", headers=bearer(reader)) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    lines += 1
            return lines

        streams = [asyncio.create_task(watch()) for _ in range(4)]
        await asyncio.sleep(0.5)  # let the streams open before the signal
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        # Every stream ends (the workers end them as they drain) rather than hanging.
        await asyncio.wait_for(asyncio.gather(*streams), DEADLINE)
        code = await asyncio.to_thread(service.process.wait, DEADLINE)
    assert code == 0
    await eventually(lambda: not any(alive(pid) for pid in workers), timeout=DEADLINE)
    assert "supervisor stopped" in {r["message"] for r in log_records(service)}


async def test_a_killed_worker_is_started_again_and_serves(
    service: ServiceProcess, oidc: OidcIssuer
) -> None:
    await all_workers_ready(service)
    first = worker_pids(service.pid)
    os.kill(first[0], signal.SIGKILL)

    def replaced() -> bool:
        now = worker_pids(service.pid)
        return len(now) == WORKERS and first[0] not in now and first[1] in now

    await eventually(replaced, timeout=DEADLINE)
    await eventually(
        lambda: sum(r["message"] == "worker ready" for r in log_records(service)) == WORKERS + 1,
        timeout=DEADLINE,
    )
    reader = oidc.mint("reader")
    for _ in range(20):
        assert fresh_get(service, "app/none-here", reader).status_code == 404
    restarts = [r for r in log_records(service) if r["message"] == "worker exited: restarting"]
    assert len(restarts) == 1 and restarts[0]["exit"] == "SIGKILL"


def test_a_port_held_by_another_process_stops_serve_with_exit_code_2(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    environ = service_environ(openbao, nats, oidc, write_policy(tmp_path), workers="2")
    with socket.socket() as holder:  # no SO_REUSEPORT: the workers cannot share its port
        holder.bind(("127.0.0.1", int(environ["SECRETS_PORT"])))
        holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "service", "serve"],
            env={**os.environ, **environ},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "configuration error: SECRETS_PORT" in done.stderr


async def test_sighup_makes_every_worker_reload_the_policy(
    service: ServiceProcess, oidc: OidcIssuer
) -> None:
    await all_workers_ready(service)
    workers = worker_pids(service.pid)
    policy = Path(service.environ["SECRETS_POLICY_FILE"])
    good = policy.read_text()
    policy.write_text("[roles.broken\n")  # not TOML

    def failed_everywhere() -> bool:
        return all(
            metric_value(worker_metrics(service, k), "secrets_policy_reload_failures_total") == 1
            for k in range(WORKERS)
        )

    assert service.process is not None
    service.process.send_signal(signal.SIGHUP)
    await eventually(failed_everywhere, timeout=DEADLINE)
    reader = oidc.mint("reader")
    assert fresh_get(service, "app/none-here", reader).status_code == 404, "the policy is kept"
    policy.write_text(good)
    service.process.send_signal(signal.SIGHUP)

    def loaded_everywhere() -> bool:
        return all(
            metric_value(worker_metrics(service, k), "secrets_policy_last_reload_successful") == 1
            for k in range(WORKERS)
        )

    await eventually(loaded_everywhere, timeout=DEADLINE)
    assert worker_pids(service.pid) == workers, "no worker was restarted"


async def test_every_worker_serves_https_when_the_tls_settings_are_given(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path, tls: Tls
) -> None:
    environ = service_environ(
        openbao,
        nats,
        oidc,
        write_policy(tmp_path),
        workers=str(WORKERS),
        metrics_port=str(metrics_base()),
        tls_cert=str(tls.cert),
        tls_key=str(tls.key),
    )
    log = tmp_path / "service.log"
    with ServiceProcess(environ, log_path=log, tls_ca=tls.ca) as svc:
        await all_workers_ready(svc)
        reader = oidc.mint("reader")
        for _ in range(20):  # new connections: both workers, each over TLS
            answer = httpx.get(
                f"{svc.url}/secrets/app/none-here",
                headers=bearer(reader),
                verify=tls.client_context(),
                timeout=10,
            )
            assert answer.status_code == 404
        served = [
            metric_value(worker_metrics(svc, k), "secrets_operations_total", op="read",
                         outcome="not_found")
            for k in range(WORKERS)
        ]  # fmt: skip
        assert all(n > 0 for n in served), served


def test_past_every_worker_s_concurrency_limit_a_request_gets_503_at_once(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    environ = service_environ(
        openbao, nats, oidc, write_policy(tmp_path), workers=str(WORKERS), limit_concurrency="3"
    )
    with ServiceProcess(environ, log_path=tmp_path / "service.log") as svc:
        # 30 idle connections: each worker holds its 3 (all on one would be a 1 in 10^6 chance).
        held = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(30)]
        try:
            deadline = time.monotonic() + DEADLINE
            while True:  # once the workers have accepted them; a hang would time out
                answer = httpx.get(f"{svc.url}/healthz", timeout=5)
                if answer.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer.status_code == 503
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + DEADLINE
        while httpx.get(f"{svc.url}/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the workers did not recover"
            time.sleep(0.05)

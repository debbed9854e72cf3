"""SIGHUP to the real `secrets-service serve` re-reads SECRETS_POLICY_FILE: a reader gains and
loses access at once (cached reads included); a broken file keeps the policy in force, logs one
error line and moves the metric; SIGTERM still stops the process afterwards.

The reload itself, with fakes: tests/unit/service/http/test_policy_reload.py."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from devstack import DEV_POLICY_TOML, NatsEndpoint, OidcIssuer, OpenBaoEndpoint, ServiceProcess
from tests.support import bearer, metric_value, service_environ, write_policy

BILLING_READER = DEV_POLICY_TOML.replace(
    '[roles.app-reader]\nread = ["app/**"]', '[roles.app-reader]\nread = ["billing/**"]'
)


def eventually(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def reload_failures(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return metric_value(text, "secrets_policy_reload_failures_total")


def log_records(log: Path) -> list[dict[str, object]]:
    records = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def test_sighup_reloads_the_policy_and_a_broken_file_keeps_it(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    policy_file = write_policy(tmp_path)
    log = tmp_path / "service.log"
    environ = service_environ(openbao, nats, oidc, policy_file)
    admin, reader = bearer(oidc.mint("admin")), bearer(oidc.mint("reader"))
    with (
        ServiceProcess(environ, log_path=log) as svc,
        httpx.Client(base_url=svc.url, timeout=10, trust_env=False) as client,
    ):
        process = svc.process
        assert process is not None
        for path in ("app/reload", "billing/reload"):
            body = {"data": {"k": "v"}, "version": 0}
            assert client.patch(f"/secrets/{path}", json=body, headers=admin).status_code == 200
        for _ in range(2):  # the second from the cache (the fast path checks the policy too)
            assert client.get("/secrets/app/reload", headers=reader).status_code == 200
        assert client.get("/secrets/billing/reload", headers=reader).status_code == 403
        loaded = metric_value(
            client.get("/metrics").text, "secrets_policy_loaded_timestamp_seconds"
        )
        assert loaded > 0

        policy_file.write_text(BILLING_READER)
        process.send_signal(signal.SIGHUP)

        eventually(
            lambda: client.get("/secrets/billing/reload", headers=reader).status_code == 200,
            "the reader may read billing/ after the reload",
        )
        assert client.get("/secrets/app/reload", headers=reader).status_code == 403
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "secrets_policy_loaded_timestamp_seconds") >= loaded
        assert metric_value(metrics, "secrets_policy_last_reload_successful") == 1
        assert reload_failures(client) == 0

        policy_file.write_text('[roles.app-reader]\nread = ["billing/../app"]\n')
        process.send_signal(signal.SIGHUP)

        eventually(lambda: reload_failures(client) == 1, "the failed reload counted")
        assert client.get("/secrets/billing/reload", headers=reader).status_code == 200
        assert client.get("/secrets/app/reload", headers=reader).status_code == 403
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "secrets_policy_last_reload_successful") == 0
        records = log_records(log)
        (ok, failed) = [r for r in records if str(r.get("message")).startswith("policy reload")]
        assert ok["level"] == "INFO" and ok["message"] == "policy reloaded"
        assert [r for r in records if r["level"] == "ERROR"] == [failed]
        assert failed["policy_file"] == str(policy_file)
        assert "roles.app-reader.read[0]" in str(failed["problem"])

        # uvicorn's own SIGTERM handler still stops it: it shuts down, then re-raises the
        # signal under the default handler (so the exit status may say SIGTERM).
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)

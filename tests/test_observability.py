"""Metrics, request log lines, audit records and fail-closed auditing, against real servers."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats as nats_py
import pytest
from prometheus_client.parser import text_string_to_metric_families

from events.bus import AUDIT_STREAM, EventBus
from schemas.audit import AuditRecord, audit_decoder
from service.audit import AUDIT_OPS
from service.auth import REASONS
from service.devstack import DEV_POLICY_TOML, free_port
from service.metrics import OPS, OUTCOMES, VAULT_ERRORS, VAULT_OPS
from service.validation import RULES
from tests.fakes import eventually
from tests.support import (
    LogCapture,
    bearer,
    metric_value,
    running_service,
    service_settings,
    write_policy,
)

pytestmark = pytest.mark.integration

POLICY = (
    DEV_POLICY_TOML
    + """
[[validation.rules]]
paths = ["app/strict/**"]
required = ["password"]
allowed = ["username", "password"]
min_entropy = 60
[validation.rules.fields.password]
type = "string"
min_length = 12
"""
)

STRONG = "Zq8#vT2!mL9$wR4p"


class Svc:
    def __init__(self, url: str, tokens: dict[str, str], logs: LogCapture, audit_file: Path):
        self.url = url
        self.tokens = tokens
        self.logs = logs
        self.audit_file = audit_file
        self.client = httpx.AsyncClient(base_url=url, timeout=10)

    async def get(
        self, path: str, who: str = "reader", headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.get(
            f"/secrets/{path}", headers={**bearer(self.tokens[who]), **(headers or {})}
        )

    async def patch(
        self, path: str, data: dict[str, Any], version: int, who: str = "writer", **headers: str
    ) -> httpx.Response:
        return await self.client.patch(
            f"/secrets/{path}",
            json={"data": data, "version": version},
            headers={**bearer(self.tokens[who]), **headers},
        )

    async def metrics(self) -> str:
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        return response.text

    def audit_records(self) -> list[AuditRecord]:
        if not self.audit_file.exists():
            return []
        return [audit_decoder.decode(line) for line in self.audit_file.read_bytes().splitlines()]

    def audit_of(self, request_id: str) -> list[AuditRecord]:
        return [r for r in self.audit_records() if r.request_id == request_id]


@pytest.fixture(scope="module")
async def svc(
    openbao: Any, nats: Any, oidc: Any, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Svc]:
    policy = write_policy(tmp_path_factory.mktemp("observability"), POLICY)
    settings = service_settings(openbao, nats, oidc, policy)
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    with LogCapture() as logs:
        async with running_service(settings) as running:
            s = Svc(running.url, tokens, logs, policy.parent / "audit.log")
            try:
                yield s
            finally:
                await s.client.aclose()


def fresh(prefix: str = "app") -> str:
    return f"{prefix}/o-{uuid.uuid4().hex[:10]}/db"


def vault_write(openbao: Any, path: str, data: dict[str, Any]) -> None:
    response = httpx.post(
        f"{openbao.addr}/v1/secret/data/{path}",
        json={"data": data},
        headers={"X-Vault-Token": openbao.root_token},
    )
    response.raise_for_status()


# -- metrics move with requests ------------------------------------------------------------------


async def test_reads_move_operation_cache_and_vault_series(svc: Svc, openbao: Any) -> None:
    path = fresh()
    vault_write(openbao, path, {"k": "v"})
    before = await svc.metrics()
    assert (await svc.get(path)).status_code == 200  # a miss: read from Vault
    assert (await svc.get(path)).status_code == 200  # a hit
    after = await svc.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("secrets_operations_total", op="read", outcome="ok") == 2
    assert delta("secrets_operation_seconds_count", op="read") == 2
    assert delta("secrets_cache_misses_total") == 1
    assert delta("secrets_cache_hits_total") == 1
    assert delta("secrets_vault_request_seconds_count", op="read") == 1
    assert metric_value(after, "secrets_cache_entries") >= 1


async def test_a_write_moves_vault_and_event_series_and_the_event_lag(svc: Svc) -> None:
    before = await svc.metrics()
    assert (await svc.patch(fresh(), {"k": "v"}, 0)).status_code == 200

    async def moved() -> bool:
        after = await svc.metrics()
        return all(
            metric_value(after, name) > metric_value(before, name)
            for name in (
                "secrets_events_published_total",
                "secrets_events_received_total",
                "secrets_event_lag_seconds_count",
            )
        )

    for _ in range(100):
        if await moved():
            break
        await _pause()
    else:
        raise AssertionError("event series did not move")
    after = await svc.metrics()
    assert metric_value(after, "secrets_vault_request_seconds_count", op="write") > metric_value(
        before, "secrets_vault_request_seconds_count", op="write"
    )
    assert metric_value(after, "secrets_operations_total", op="write", outcome="ok") == (
        metric_value(before, "secrets_operations_total", op="write", outcome="ok") + 1
    )


async def test_a_stale_write_counts_a_cas_conflict(svc: Svc) -> None:
    path = fresh()
    assert (await svc.patch(path, {"k": "v"}, 0)).status_code == 200
    before = metric_value(await svc.metrics(), "secrets_cas_conflicts_total")
    assert (await svc.patch(path, {"k": "w"}, 0)).status_code == 409
    after = await svc.metrics()
    assert metric_value(after, "secrets_cas_conflicts_total") == before + 1
    assert metric_value(after, "secrets_operations_total", op="write", outcome="conflict") >= 1


async def test_a_secret_breaking_policy_rules_is_422_listing_every_violation(svc: Svc) -> None:
    before = await svc.metrics()
    path = fresh("app/strict")
    response = await svc.patch(path, {"password": "aaaa", "note": "x", "username": ""}, 0)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_secret"
    assert sorted(body["violations"], key=lambda v: (v["field"], v["rule"])) == [
        {"field": "note", "rule": "allowed"},
        {"field": "password", "rule": "min_entropy"},
        {"field": "password", "rule": "min_length"},
        {"field": "username", "rule": "not_empty"},
    ]
    assert "aaaa" not in response.text
    after = await svc.metrics()
    for rule in ("allowed", "min_entropy", "min_length", "not_empty"):
        assert metric_value(after, "secrets_validation_failures_total", rule=rule) == (
            metric_value(before, "secrets_validation_failures_total", rule=rule) + 1
        )
    assert (await svc.patch(path, {"password": STRONG}, 0)).status_code == 200


async def test_authentication_failures_are_counted_by_reason(svc: Svc) -> None:
    before = metric_value(await svc.metrics(), "secrets_auth_failures_total", reason="malformed")
    await svc.client.get("/secrets/app/db", headers=bearer("not-a-jwt"))
    after = metric_value(await svc.metrics(), "secrets_auth_failures_total", reason="malformed")
    assert after == before + 1


async def test_every_label_value_comes_from_a_closed_set(svc: Svc) -> None:
    await svc.get(fresh("ops"))  # a 403
    await svc.get(fresh())  # a 404
    closed: dict[str, frozenset[str]] = {
        "outcome": OUTCOMES,
        "reason": REASONS,
        "rule": frozenset(RULES),
        "error": VAULT_ERRORS,
        "stage": frozenset({"publish", "decode"}),
        "sink": frozenset({"stdout", "file", "nats"}),
        "result": frozenset({"written", "failed"}),
    }
    seen = 0
    for family in text_string_to_metric_families(await svc.metrics()):
        if not family.name.startswith("secrets_"):
            continue
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                seen += 1
                if label == "op":
                    allowed = VAULT_OPS if "vault" in family.name else OPS
                    assert value in allowed, (family.name, value)
                else:
                    assert value in closed[label], (family.name, label, value)
    assert seen > 20


# -- the request log line --------------------------------------------------------------------------


async def test_each_request_logs_one_json_line_with_every_field(svc: Svc) -> None:
    request_id = f"log-{uuid.uuid4().hex[:8]}"
    path = fresh()
    response = await svc.patch(path, {"k": "v"}, 0, **{"X-Request-ID": request_id})
    assert response.headers["x-request-id"] == request_id
    lines = [json.loads(line) for line in svc.logs.lines() if request_id in line]
    request_lines = [line for line in lines if line["message"] == "request"]
    assert len(request_lines) == 1
    line = request_lines[0]
    for key in ("time", "level", "logger", "message", "request_id", "actor", "path", "op",
                "outcome", "status", "duration_ms", "version"):  # fmt: skip
        assert key in line, key
    assert (line["path"], line["op"], line["outcome"], line["status"], line["version"]) == (
        path, "write", "ok", 200, 1,
    )  # fmt: skip
    assert isinstance(line["duration_ms"], float)


# -- the audit trail -------------------------------------------------------------------------------


async def test_every_access_allowed_or_denied_gets_one_audit_record(svc: Svc, nats: Any) -> None:
    path = fresh()
    ids = {name: f"audit-{name}-{uuid.uuid4().hex[:6]}" for name in ("w", "r", "f", "u", "n")}
    await svc.patch(path, {"k": "v"}, 0, **{"X-Request-ID": ids["w"]})
    await svc.get(path, headers={"X-Request-ID": ids["r"]})
    await svc.get(fresh("ops"), headers={"X-Request-ID": ids["f"]})
    await svc.client.get(f"/secrets/{path}", headers={"X-Request-ID": ids["u"]})
    await svc.get(fresh(), headers={"X-Request-ID": ids["n"]})
    await eventually(lambda: all(len(svc.audit_of(i)) == 1 for i in ids.values()), timeout=5)
    (write,) = svc.audit_of(ids["w"])
    assert (write.op, write.path, write.version, write.allowed, write.outcome, write.status) == (
        "write", path, 1, True, "ok", 200,
    )  # fmt: skip
    assert write.sub and write.source == "127.0.0.1" and write.method == "PATCH"
    (read,) = svc.audit_of(ids["r"])
    assert (read.op, read.version, read.allowed) == ("read", 1, True)
    assert read.sub and read.sub != write.sub  # the reader, then the writer
    (forbidden,) = svc.audit_of(ids["f"])
    assert (forbidden.allowed, forbidden.outcome, forbidden.reason) == (
        False, "forbidden", "no_grant",
    )  # fmt: skip
    (unauthenticated,) = svc.audit_of(ids["u"])
    assert (unauthenticated.op, unauthenticated.path, unauthenticated.sub) == ("read", None, None)
    assert (unauthenticated.allowed, unauthenticated.reason) == (False, "missing_token")
    (missing,) = svc.audit_of(ids["n"])
    assert (missing.allowed, missing.outcome, missing.version) == (True, "not_found", None)
    assert all(r.op in AUDIT_OPS for r in svc.audit_records())

    # The same records are kept in JetStream, on <prefix>.audit.<op>.
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(AUDIT_STREAM)
        assert info.config.subjects == ["secrets.audit.>"]
        last = await js.get_last_msg(AUDIT_STREAM, "secrets.audit.write")
        assert audit_decoder.decode(last.data.splitlines()[-1]).op == "write"
    finally:
        await nc.close()


async def test_audit_records_are_counted_in_the_metrics(svc: Svc) -> None:
    await svc.get(fresh())
    text = await svc.metrics()
    assert metric_value(text, "secrets_audit_records_total", sink="file", result="written") > 0
    assert metric_value(text, "secrets_audit_records_total", sink="nats", result="written") > 0
    assert metric_value(text, "secrets_audit_healthy") == 1


# -- fail-closed -----------------------------------------------------------------------------------


class MuteAuditBus(EventBus):
    """The real bus, except that JetStream never acknowledges an audit record."""

    async def publish_audit(self, op: str, payload: bytes, *, acknowledged: bool = True) -> bool:
        return False


@pytest.mark.parametrize("mode", ["writes", "all"])
async def test_when_no_audit_sink_can_record_covered_requests_are_refused_with_503(
    openbao: Any, nats: Any, oidc: Any, tmp_path: Path, mode: str
) -> None:
    policy = write_policy(tmp_path)
    # /dev/full accepts the open and fails every write with ENOSPC.
    settings = service_settings(
        openbao, nats, oidc, policy, audit_sink="file:/dev/full", audit_fail_closed=mode
    )
    bus = MuteAuditBus(settings.nats_url, settings.nats_prefix, instance_id=settings.instance_id)
    path = fresh()
    vault_write(openbao, path, {"k": "v1"})
    writer, reader = oidc.mint("writer"), oidc.mint("reader")
    async with running_service(settings, bus=bus) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            # The first write is done by Vault, but its record cannot be kept: 503, as Vault does.
            first = await client.patch(
                f"/secrets/{path}", json={"data": {"k": "v2"}, "version": 1}, headers=bearer(writer)
            )
            assert first.status_code == 503
            assert first.json() == {
                "error": "backend_unavailable",
                "detail": "the audit log cannot record this request",
            }
            assert first.headers["x-request-id"]
            # Now the sinks are known to fail: the next write never reaches Vault.
            second = await client.patch(
                f"/secrets/{path}", json={"data": {"k": "v3"}, "version": 2}, headers=bearer(writer)
            )
            assert second.status_code == 503
            read = await client.get(f"/secrets/{path}", headers=bearer(reader))
            if mode == "writes":
                assert read.status_code == 200 and read.json()["version"] == 2
            else:
                assert read.status_code == 503
            text = (await client.get("/metrics")).text
            assert metric_value(text, "secrets_audit_healthy") == 0
            assert metric_value(text, "secrets_audit_refused_total") >= 2
            assert metric_value(text, "secrets_vault_request_seconds_count", op="write") == 1


# -- where /metrics is served --------------------------------------------------------------------


async def test_metrics_can_move_to_their_own_port(
    openbao: Any, nats: Any, oidc: Any, tmp_path: Path
) -> None:
    port = free_port()
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path), metrics_port=str(port))
    async with running_service(settings) as running:
        async with httpx.AsyncClient(timeout=10) as client:
            assert (await client.get(f"{running.url}/metrics")).status_code == 404
            own = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert own.status_code == 200
            assert "secrets_cache_hits_total" in own.text


async def test_metrics_can_require_a_role(
    openbao: Any, nats: Any, oidc: Any, tmp_path: Path
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path), metrics_role="admin")
    async with running_service(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            assert (await client.get("/metrics")).status_code == 401
            reader = await client.get("/metrics", headers=bearer(oidc.mint("reader")))
            assert reader.status_code == 403
            admin = await client.get("/metrics", headers=bearer(oidc.mint("admin")))
            assert admin.status_code == 200 and "secrets_operations_total" in admin.text


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.02)

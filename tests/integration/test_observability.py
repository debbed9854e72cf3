"""Metrics, request log lines, audit records and fail-closed auditing, against real servers."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import nats as nats_py
import pytest
from joserfc.jwk import RSAKey
from prometheus_client.parser import text_string_to_metric_families

from devstack import DEV_POLICY_TOML, NatsEndpoint, OidcIssuer, OpenBaoEndpoint, free_port
from events.bus import AUDIT_STREAM, EventBus
from events.bus import DROP_REASONS as EVENT_DROP_REASONS
from schemas.approvals import APPROVAL_EVENT_TYPES
from schemas.audit import OPS, OUTCOMES, AuditRecord, audit_decoder
from service.audit.log import DROP_REASONS
from service.auth.principal import REASONS
from service.core.validation import RULES
from service.obs.metrics import VAULT_ERRORS, VAULT_OPS
from service.rotation.coordinator import ATTEMPT_OUTCOMES, ROTATION_OUTCOMES
from tests.fakes import FakeVault
from tests.support import (
    LogCapture,
    bearer,
    eventually,
    metric_value,
    running_service,
    service_settings,
    vault_write,
    write_policy,
)
from tests.tokens import LocalIssuer, sign

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
        """The records of the requests that sent `X-Request-ID: request_id`."""
        return [r for r in self.audit_records() if r.client_request_id == request_id]


@pytest.fixture(scope="module")
async def svc(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
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


# -- metrics move with requests ------------------------------------------------------------------


async def test_reads_move_operation_cache_and_vault_series(
    svc: Svc, openbao: OpenBaoEndpoint
) -> None:
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
        "type": frozenset(APPROVAL_EVENT_TYPES),
    }
    dropped = {  # families whose `reason` is their own, not an authentication reason
        "secrets_audit_dropped": frozenset(DROP_REASONS),
        "secrets_events_dropped": frozenset(EVENT_DROP_REASONS),
    }
    own_outcomes = {  # families whose `outcome` is their own, not a request's
        "secrets_rotations": frozenset(ROTATION_OUTCOMES),
        "secrets_rotation_attempts": frozenset(ATTEMPT_OUTCOMES),
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
                elif family.name in own_outcomes:
                    assert label == "outcome" and value in own_outcomes[family.name], value
                elif family.name in dropped:
                    assert label == "reason" and value in dropped[family.name], value
                else:
                    assert value in closed[label], (family.name, label, value)
    assert seen > 20


# -- the request log line --------------------------------------------------------------------------


async def test_each_request_logs_one_json_line_with_every_field(svc: Svc) -> None:
    request_id = f"log-{uuid.uuid4().hex[:8]}"
    path = fresh()
    response = await svc.patch(path, {"k": "v"}, 0, **{"X-Request-ID": request_id})
    lines = [json.loads(line) for line in svc.logs.lines() if request_id in line]
    request_lines = [line for line in lines if line["message"] == "request"]
    assert len(request_lines) == 1
    line = request_lines[0]
    for key in ("time", "level", "logger", "message", "request_id", "client_request_id", "actor",
                "path", "op", "outcome", "status", "duration_ms", "version"):  # fmt: skip
        assert key in line, key
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["client_request_id"] == request_id
    assert (line["path"], line["op"], line["outcome"], line["status"], line["version"]) == (
        path, "write", "ok", 200, 1,
    )  # fmt: skip
    assert isinstance(line["duration_ms"], float)


async def test_a_caller_cannot_choose_the_request_id_its_requests_are_recorded_under(
    svc: Svc,
) -> None:
    path = fresh()
    victim = await svc.patch(path, {"k": "v"}, 0)
    victim_id = victim.headers["x-request-id"]
    # The attacker sends the victim's id on a write, a routed read (?version), two plain reads
    # (the second answered from the caches, before routing), a 403 and a 401.
    forged = {"X-Request-ID": victim_id}
    answers = [
        await svc.patch(path, {"k": "v2"}, 1, **forged),
        await svc.client.get(
            f"/secrets/{path}?version=1", headers={**bearer(svc.tokens["reader"]), **forged}
        ),
        await svc.get(path, headers=forged),
        await svc.get(path, headers=forged),
        await svc.get(fresh("ops"), headers=forged),
        await svc.client.get(f"/secrets/{path}", headers=forged),
    ]
    assert [a.status_code for a in answers] == [200, 200, 200, 200, 403, 401]
    given = [a.headers["x-request-id"] for a in answers]
    assert victim_id not in given and len(set(given)) == len(given)
    await eventually(lambda: len(svc.audit_of(victim_id)) == len(answers), timeout=5)
    # The victim's id names the victim's request alone; the attacker's are told apart from it.
    (recorded,) = [r for r in svc.audit_records() if r.request_id == victim_id]
    assert (recorded.op, recorded.version, recorded.client_request_id) == ("write", 1, None)
    assert sorted(r.request_id for r in svc.audit_of(victim_id)) == sorted(given)
    lines = [json.loads(line) for line in svc.logs.lines() if victim_id in line]
    request_lines = [line for line in lines if line["message"] == "request"]
    assert sorted(line["request_id"] for line in request_lines) == sorted([victim_id, *given])
    assert sum(line.get("client_request_id") == victim_id for line in request_lines) == 6


async def test_a_request_id_that_is_not_well_formed_is_not_recorded(svc: Svc) -> None:
    path = fresh()
    response = await svc.patch(path, {"k": "v"}, 0, **{"X-Request-ID": "has space"})
    assert len(response.headers["x-request-id"]) == 32
    await eventually(
        lambda: any(r.request_id == response.headers["x-request-id"] for r in svc.audit_records())
    )
    (record,) = [r for r in svc.audit_records() if r.request_id == response.headers["x-request-id"]]
    assert record.client_request_id is None


# -- the audit trail -------------------------------------------------------------------------------


async def test_every_access_allowed_or_denied_gets_one_audit_record(
    svc: Svc, nats: NatsEndpoint
) -> None:
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
    assert all(r.op in OPS for r in svc.audit_records())

    # The same records are kept in JetStream, on <prefix>.audit.<op>.
    nc = await nats_py.connect(nats.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(AUDIT_STREAM)
        assert info.config.subjects == ["secrets.audit.>"]
        last = await js.get_last_msg(AUDIT_STREAM, "secrets.audit.write")
        assert last.data is not None
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
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path, mode: str
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
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
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
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path), metrics_role="admin")
    async with running_service(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            assert (await client.get("/metrics")).status_code == 401
            reader = await client.get("/metrics", headers=bearer(oidc.mint("reader")))
            assert reader.status_code == 403
            admin = await client.get("/metrics", headers=bearer(oidc.mint("admin")))
            assert admin.status_code == 200 and "secrets_operations_total" in admin.text


async def test_with_a_metrics_role_a_token_whose_scopes_leave_out_metrics_is_refused(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, tmp_path: Path
) -> None:
    key = RSAKey.generate_key(2048, parameters={"kid": "metrics-1"})
    with LocalIssuer([key.as_dict(private=False)]) as issuer:
        oidc = SimpleNamespace(issuer=issuer.url, audience="secrets-service")
        settings = service_settings(
            openbao, nats, oidc, write_policy(tmp_path), metrics_role="monitoring"
        )

        def token(**claims: Any) -> dict[str, str]:
            now = time.time()
            base = {"iss": issuer.url, "aud": "secrets-service", "sub": "prometheus", "iat": now,
                    "exp": now + 300, "roles": ["monitoring"]}  # fmt: skip
            return dict(bearer(sign({**base, **claims}, key)))

        async with running_service(settings) as running:
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:

                async def status(headers: dict[str, str]) -> int:
                    return (await client.get("/metrics", headers=headers)).status_code

                # The attack: the role, in a token narrowed to reading secrets.
                assert await status(token(scope="secrets:read")) == 403
                assert await status(token(scp=["secrets:read", "openid"])) == 403
                # Scopes that include metrics, or no scope claim at all (not narrowed).
                assert await status(token(scope="secrets:read secrets:metrics")) == 200
                assert await status(token(scp=["secrets:metrics"])) == 200
                assert await status(token()) == 200
                # Scopes never widen: the scope without the role is still refused.
                assert await status(token(roles=["app-reader"], scope="secrets:metrics")) == 403


async def test_credentials_in_the_vault_address_never_reach_the_log(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    host = openbao.addr.removeprefix("http://")
    settings = service_settings(
        openbao, nats, oidc, write_policy(tmp_path),
        vault_addr=f"http://svc-user:vault-pass-canary@{host}",
    )  # fmt: skip
    with LogCapture() as logs:
        async with running_service(settings, backend=FakeVault()):
            pass
    (ready,) = [json.loads(line) for line in logs.lines() if '"service ready"' in line]
    assert ready["vault"] == f"http://***@{host}"
    assert "vault-pass-canary" not in logs.text and "svc-user" not in logs.text


class StalledAuditBus(EventBus):
    """The real bus, except that audit records written in the background never finish
    publishing (a NATS that stopped taking them): once `stalled` is set, the audit queue can
    only grow."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled = asyncio.Event()

    async def publish_audit(self, op: str, payload: bytes, *, acknowledged: bool = True) -> bool:
        if not acknowledged:
            self.stalled.set()
            await asyncio.Event().wait()  # until cancelled at shutdown
        return await super().publish_audit(op, payload, acknowledged=acknowledged)


async def test_a_flood_of_401s_cannot_make_audited_writes_refused(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path))
    bus = StalledAuditBus(settings.nats_url, settings.nats_prefix, instance_id=settings.instance_id)
    writer = bearer(oidc.mint("writer"))
    path = fresh()
    async with running_service(settings, bus=bus) as running:
        audit = running.state.audit
        audit.queue_size = 40  # 10,000 in production: the same flood, 250 times shorter
        try:
            async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
                assert (await client.get(f"/secrets/{path}")).status_code == 401
                await asyncio.wait_for(bus.stalled.wait(), 10)  # its record's batch hangs
                for _ in range(100):  # each record now stays queued
                    assert (await client.get(f"/secrets/{path}")).status_code == 401
                body = {"data": {"password": STRONG}, "version": 0}
                write = await client.patch(f"/secrets/{path}", json=body, headers=writer)
                assert write.status_code == 200, write.text
                text = (await client.get("/metrics")).text
        finally:
            audit.timeout = 0.2  # the stalled batch is given up at shutdown without waiting
    dropped = metric_value(text, "secrets_audit_dropped_total", reason="unauthenticated_flood")
    assert dropped == 100 - 40 // 4
    assert metric_value(text, "secrets_audit_dropped_total", reason="queue_full") == 0
    assert metric_value(text, "secrets_audit_healthy") == 1


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.02)

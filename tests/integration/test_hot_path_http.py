"""Cached reads answered before routing, against real servers: the same answer, audit record, log
line and metrics as a routed read, and the routes for anything the caches cannot decide."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import service.http.fast_path
from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.audit import AuditRecord, audit_decoder
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


class Svc:
    def __init__(self, url: str, tokens: dict[str, str], logs: LogCapture, audit: Path) -> None:
        self.client = httpx.AsyncClient(base_url=url, timeout=10)
        self.tokens = tokens
        self.logs = logs
        self.audit = audit

    async def get(self, path: str, who: str = "reader", **headers: str) -> httpx.Response:
        return await self.client.get(
            f"/secrets/{path}", headers={**bearer(self.tokens[who]), **headers}
        )

    async def create(self, path: str, data: dict[str, Any]) -> None:
        response = await self.client.patch(
            f"/secrets/{path}",
            json={"data": data, "version": 0},
            headers=bearer(self.tokens["writer"]),
        )
        assert response.status_code == 200

    def audit_of(self, request_id: str) -> list[AuditRecord]:
        """The records of the requests that sent `X-Request-ID: request_id`."""
        lines = self.audit.read_bytes().splitlines() if self.audit.exists() else []
        return [r for r in map(audit_decoder.decode, lines) if r.client_request_id == request_id]

    def log_of(self, request_id: str) -> dict[str, Any]:
        lines: list[dict[str, Any]] = [
            json.loads(line)
            for line in self.logs.lines()
            if request_id in line and json.loads(line)["message"] == "request"
        ]
        (line,) = lines
        return line


@pytest.fixture(scope="module")
async def svc(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Svc]:
    policy = write_policy(tmp_path_factory.mktemp("hot-path"))
    settings = service_settings(openbao, nats, oidc, policy)
    tokens = {who: oidc.mint(who) for who in ("reader", "writer")}
    with LogCapture() as logs:
        async with running_service(settings) as running:
            s = Svc(running.url, tokens, logs, policy.parent / "audit.log")
            try:
                yield s
            finally:
                await s.client.aclose()


@pytest.fixture
def fast_answers(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """How many requests the caches answered before routing."""
    answered = 0
    original = service.http.fast_path.cached_read

    def counting(*args: Any) -> Any:
        nonlocal answered
        answer = original(*args)
        answered += answer is not None
        return answer

    monkeypatch.setattr(service.http.fast_path, "cached_read", counting)
    return lambda: answered


def fresh() -> str:
    return f"app/hot-{uuid.uuid4().hex[:10]}/db"


def comparable(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    headers = [(k, v) for k, v in response.headers.items() if k not in ("date", "x-request-id")]
    return response.status_code, response.content, headers


async def test_a_cached_read_is_answered_byte_for_byte_as_the_routed_read(
    svc: Svc, openbao: OpenBaoEndpoint, fast_answers: Callable[[], int]
) -> None:
    path = fresh()
    vault_write(openbao, path, {"password": "Zq8#vT2!mL9$wR4p"})  # not cached: routed first
    routed = await svc.get(path)
    assert fast_answers() == 0
    cached = await svc.get(path)
    assert fast_answers() == 1
    assert comparable(cached) == comparable(routed)
    assert cached.headers["x-request-id"] != routed.headers["x-request-id"]


async def test_a_cached_read_leaves_the_audit_record_log_line_and_metrics_of_a_routed_one(
    svc: Svc, openbao: OpenBaoEndpoint, fast_answers: Callable[[], int]
) -> None:
    path = fresh()
    vault_write(openbao, path, {"password": "Zq8#vT2!mL9$wR4p"})
    before = (await svc.client.get("/metrics")).text
    ids = [f"hot-{n}-{uuid.uuid4().hex[:6]}" for n in range(2)]
    for request_id in ids:
        assert (await svc.get(path, **{"X-Request-ID": request_id})).status_code == 200
    assert fast_answers() == 1  # the second
    await eventually(lambda: all(len(svc.audit_of(i)) == 1 for i in ids), timeout=5)
    routed, cached = (svc.audit_of(i)[0] for i in ids)
    ignore = {"time", "request_id"}
    assert routed.client_request_id == ids[0] and cached.client_request_id == ids[1]
    ignore.add("client_request_id")
    assert {k: v for k, v in routed.__rich_repr__() if k not in ignore} == {
        k: v for k, v in cached.__rich_repr__() if k not in ignore
    }
    lines = [svc.log_of(i) for i in ids]
    for line in lines:
        for key in ("time", "request_id", "client_request_id", "duration_ms"):
            del line[key]
    assert lines[0] == lines[1]
    assert (lines[0]["op"], lines[0]["outcome"], lines[0]["version"]) == ("read", "ok", 1)
    after = (await svc.client.get("/metrics")).text
    for name, labels in [
        ("secrets_operations_total", {"op": "read", "outcome": "ok"}),
        ("secrets_operation_seconds_count", {"op": "read"}),
    ]:
        assert metric_value(after, name, **labels) - metric_value(before, name, **labels) == 2
    assert metric_value(after, "secrets_cache_hits_total") > metric_value(
        before, "secrets_cache_hits_total"
    )


@pytest.mark.parametrize(
    ("what", "who", "suffix", "status"),
    [
        ("no grant", "writer-of-other", "", 403),
        ("a missing path", "reader", "-missing", 404),
        ("an older version", "reader", "?version=1", 200),
        ("a custom method", "reader", ":versions", 200),
        ("no token", "nobody", "", 401),
    ],
)
async def test_what_the_caches_cannot_decide_goes_to_the_routes(
    svc: Svc,
    oidc: OidcIssuer,
    fast_answers: Callable[[], int],
    what: str,
    who: str,
    suffix: str,
    status: int,
) -> None:
    path = fresh()
    await svc.create(path, {"password": "Zq8#vT2!mL9$wR4p"})
    assert (await svc.get(path)).status_code == 200  # cached now, and the reader's token too
    assert (await svc.get(path)).status_code == 200
    answered = fast_answers()
    headers = {} if who == "nobody" else bearer(svc.tokens["reader"])
    target = path + suffix
    if who == "writer-of-other":
        target = "other/" + path
    response = await svc.client.get(f"/secrets/{target}", headers=headers)
    assert response.status_code == status, what
    assert fast_answers() == answered, what


async def test_with_every_op_fail_closed_a_cached_read_still_waits_for_its_audit_record(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path: Path,
    fast_answers: Callable[[], int],
) -> None:
    policy = write_policy(tmp_path)
    settings = service_settings(openbao, nats, oidc, policy, audit_fail_closed="all")
    audit = tmp_path / "audit.log"
    path = fresh()
    reader = oidc.mint("reader")
    async with running_service(settings) as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            writer = bearer(oidc.mint("writer"))
            body = {"data": {"password": "Zq8#vT2!mL9$wR4p"}, "version": 0}
            assert (await client.patch(f"/secrets/{path}", json=body, headers=writer)).is_success
            for n in range(3):
                request_id = f"held-{n}-{uuid.uuid4().hex[:6]}"
                headers = {**bearer(reader), "X-Request-ID": request_id}
                assert (await client.get(f"/secrets/{path}", headers=headers)).status_code == 200
                # Held until recorded: the record is there as soon as the answer is.
                assert request_id.encode() in audit.read_bytes()
    assert fast_answers() == 0

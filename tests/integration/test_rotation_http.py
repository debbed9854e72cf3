"""Rotation over HTTP, end to end: real OpenBao (the service holding the least-privilege dev token),
real NATS, real tokens from OpenBao's OIDC issuer; `:rotate`, `:rotation`, the permission, the
events a listener switches on, the audit trail and metrics, and no value anywhere it must not be."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.events import ChangeEvent, SecretRotated
from tests.support import (
    LeastPrivilege,
    LogCapture,
    RunningService,
    bearer,
    eventually,
    metric_value,
    running_service,
    service_settings,
    write_policy,
)

POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]

[roles.app-writer]
read = ["app/**"]
write = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
rotate = ["**"]

[validation.defaults]
min_entropy = 100

[[validation.rules]]
paths = ["app/strict/*"]
allowed = ["password", "user", "host"]
[validation.rules.fields.password]
min_length = 40
max_length = 40

[[rotation.rules]]
paths = ["app/strict/*"]
generator = "password"
length = 40

[[rotation.rules]]
paths = ["app/tok/*"]
generator = "token"
fields = ["token"]

[[rotation.rules]]
paths = ["app/*/db"]
generator = "password"
"""
CANARY = "Canary-Old-Value-7f3e9a1c-bb42-not-shown"
GENERATED: list[str] = []  # values rotations made, searched for where no value may be


class Stack:
    def __init__(self, svc: RunningService, tokens: dict[str, str], audit_file: Path) -> None:
        self.svc = svc
        self.tokens = tokens
        self.audit_file = audit_file
        self.client = httpx.AsyncClient(base_url=svc.url, timeout=10)
        self.events: list[ChangeEvent] = []
        svc.app.state.bus.on_received = self.events.append

    async def call(self, method: str, target: str, who: str = "admin", **kw: Any) -> httpx.Response:
        headers = {**bearer(self.tokens[who]), **kw.pop("headers", {})}
        return await self.client.request(method, f"/secrets/{target}", headers=headers, **kw)

    async def create(self, path: str, data: dict[str, Any]) -> None:
        response = await self.call("PATCH", path, json={"data": data, "version": 0})
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
async def stack(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("rotation")
    audit_file = directory / "audit.log"
    settings = service_settings(
        LeastPrivilege.of(openbao),  # the dev stack's own Vault policy, not the root token
        nats,
        oidc,
        write_policy(directory, POLICY),
        audit_sink=f"file:{audit_file}",
    )
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    with LogCapture() as logs:
        async with running_service(settings) as svc:
            s = Stack(svc, tokens, audit_file)
            try:
                yield s
            finally:
                await s.client.aclose()
    audit = audit_file.read_text()
    assert GENERATED, "the tests recorded no generated value to search for"
    for value in (CANARY, *GENERATED):
        assert value not in logs.text and value not in audit


def fresh(kind: str = "plain") -> str:
    return f"app/{kind}-{uuid.uuid4().hex[:8]}/db"


async def test_rotate_writes_a_new_version_carrying_the_other_fields(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY, "user": "svc", "port": 5432})
    response = await stack.call("POST", f"{path}:rotate")
    assert response.status_code == 200, response.text
    assert response.json() == {"path": path, "version": 2, "previous_version": 1}
    assert CANARY not in response.text
    secret = (await stack.call("GET", path, "reader")).json()
    assert secret["version"] == 2
    assert secret["data"]["user"] == "svc" and secret["data"]["port"] == 5432
    assert secret["data"]["password"] != CANARY and len(secret["data"]["password"]) == 32
    GENERATED.append(secret["data"]["password"])


async def test_a_listener_hears_secret_rotated_with_both_versions(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    assert (await stack.call("POST", f"{path}:rotate")).status_code == 200

    def rotated() -> list[SecretRotated]:
        return [e for e in stack.events if isinstance(e, SecretRotated) and e.path == path]

    await eventually(lambda: len(rotated()) == 1)
    event = rotated()[0]
    assert (event.version, event.previous_version) == (2, 1)
    new = (await stack.call("GET", path)).json()["data"]["password"]
    GENERATED.append(new)
    assert new not in msgspec.json.encode(event).decode()
    assert not any(e.path == path and e.version == 2 and e is not event for e in stack.events)


async def test_the_rotation_state_shows_the_last_rotation_and_no_schedule(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    before = (await stack.call("GET", f"{path}:rotation", "reader")).json()
    assert before == {
        "path": path,
        "state": "idle",
        "last_rotated": None,
        "next_rotation": None,
        "failures": 0,
        "last_error": None,
    }
    await stack.call("POST", f"{path}:rotate")
    after = (await stack.call("GET", f"{path}:rotation", "reader")).json()
    assert after["state"] == "idle" and after["last_rotated"].startswith("20")


async def test_a_stale_version_is_409_and_the_current_one_rotates(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    stale = await stack.call("POST", f"{path}:rotate", json={"version": 5})
    assert stale.status_code == 409
    assert stale.json()["error"] == "version_conflict" and stale.json()["current_version"] == 1
    ok = await stack.call("POST", f"{path}:rotate", json={"version": 1})
    assert ok.status_code == 200 and ok.json()["version"] == 2


async def test_rotating_needs_the_rotate_permission_and_a_rule(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    denied = await stack.call("POST", f"{path}:rotate", "writer")
    assert denied.status_code == 403 and denied.json()["error"] == "forbidden"
    unknown = await stack.call("POST", "nowhere/x:rotate", "writer")
    assert unknown.json() == denied.json() | {"detail": unknown.json()["detail"]}
    assert unknown.status_code == 403
    no_rule_path = f"app/norule-{uuid.uuid4().hex[:8]}"  # under no [[rotation.rules]] glob
    await stack.create(no_rule_path, {"password": CANARY})
    no_rule = await stack.call("POST", f"{no_rule_path}:rotate")
    assert no_rule.status_code == 422 and no_rule.json()["error"] == "no_rotation_rule"
    missing = await stack.call("POST", f"{fresh()}:rotate")
    assert missing.status_code == 404
    wrong_method = await stack.call("GET", f"{path}:rotate")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"


async def test_a_bad_body_is_400_and_changes_nothing(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    for body in (b"[1]", b'{"version": "1"}', b'{"version": 1, "extra": 2}', b"{"):
        response = await stack.call(
            "POST", f"{path}:rotate", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, body
    assert (await stack.call("GET", path)).json()["version"] == 1


async def test_generated_values_satisfy_the_paths_validation_rules(stack: Stack) -> None:
    path = f"app/strict/{uuid.uuid4().hex[:8]}"
    await stack.create(path, {"password": "A" + CANARY[:39], "user": "svc"})
    for _ in range(3):
        assert (await stack.call("POST", f"{path}:rotate")).status_code == 200
    secret = (await stack.call("GET", path)).json()
    assert secret["version"] == 4 and len(secret["data"]["password"]) == 40


async def test_a_token_rule_regenerates_only_its_field(stack: Stack) -> None:
    path = f"app/tok/{uuid.uuid4().hex[:8]}"
    await stack.create(path, {"token": CANARY, "scope": "ci"})
    assert (await stack.call("POST", f"{path}:rotate")).status_code == 200
    data = (await stack.call("GET", path)).json()["data"]
    assert data["scope"] == "ci" and data["token"] != CANARY and "=" not in data["token"]


async def test_the_services_own_folder_is_neither_readable_nor_listed(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    await stack.call("POST", f"{path}:rotate")
    state_doc = f".secrets-service/rotation/{path}"
    assert (await stack.call("GET", state_doc)).status_code == 403
    assert (await stack.call("GET", ".secrets-service:list")).status_code == 403
    top = (await stack.client.get("/secrets:list", headers=bearer(stack.tokens["admin"]))).json()
    assert not any(key.startswith(".secrets-service") for key in top["keys"])


async def test_every_attempt_is_audited_and_counted_without_a_value(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, {"password": CANARY})
    assert (await stack.call("POST", f"{path}:rotate")).status_code == 200

    def records() -> list[dict[str, Any]]:
        lines = stack.audit_file.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["path"] == path and r["op"] == "rotate"]

    await eventually(lambda: len(records()) == 2)  # the request, and the attempt it made
    assert {(r["method"], r["outcome"], r["version"]) for r in records()} == {("POST", "ok", 2)}
    assert CANARY not in stack.audit_file.read_text()
    text = (await stack.client.get("/metrics")).text
    assert metric_value(text, "secrets_rotations_total", outcome="ok") >= 1
    assert metric_value(text, "secrets_rotation_last_success_timestamp_seconds") > 0
    assert metric_value(text, "secrets_operations_total", op="rotate", outcome="ok") >= 1

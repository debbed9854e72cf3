"""Change requests end to end: three instances, each on its own node of a three-node NATS cluster,
one OpenBao, real tokens. A request made on one instance is approved on a second and applied on a
third; self-approval is refused; an approver counts once; a stale request never overwrites; every
covered change route answers 428 unless broken glass with a reason; requests expire; validation
runs again at apply; the proposed value is found nowhere but Vault."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import NatsServer, OidcIssuer, OpenBaoEndpoint
from schemas.approvals import approval_event_decoder
from service.auth.policy import Policy
from service.core.validation import Validator
from tests.support import (
    LogCapture,
    RunningService,
    bearer,
    cluster_services,
    eventually,
    write_policy,
)

PREFIX = "appr"
POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["prod/**", "quick/**"]
approve = ["prod/**", "quick/**"]

[roles.app-writer]
read = ["prod/**", "quick/**"]
write = ["prod/**", "quick/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
rotate = ["**"]
approve = ["**"]
bypass = ["prod/**"]

[[approvals.rules]]
paths = ["prod/**"]
required = 2
expires = "1h"

[[approvals.rules]]
paths = ["quick/**"]
required = 1
expires = "2s"

[[rotation.rules]]
paths = ["prod/**"]
"""
CANARY = "Canary-Proposed-9d2c71e0-never-anywhere-but-vault"


class Cluster:
    def __init__(
        self, services: list[RunningService], tokens: dict[str, str], audit: list[Path]
    ) -> None:
        self.services = services
        self.tokens = tokens
        self.audit = audit
        self.clients = [httpx.AsyncClient(base_url=s.url, timeout=15) for s in services]
        self.approval_payloads: list[bytes] = []

    async def call(
        self, method: str, target: str, who: str, *, on: int = 0, **kw: Any
    ) -> httpx.Response:
        headers = {**bearer(self.tokens[who]), **kw.pop("headers", {})}
        return await self.clients[on].request(method, target, headers=headers, **kw)

    async def create(self, path: str, data: dict[str, Any]) -> None:
        # Through the bypass: the path is under a rule, and this is the test's own set-up.
        response = await self.call(
            "PATCH",
            f"/secrets/{path}",
            "admin",
            json={"data": data, "version": 0},
            headers={"X-Bypass-Reason": "test set-up"},
        )
        assert response.status_code == 200, response.text

    async def propose(
        self, path: str, data: dict[str, Any], version: int, who: str = "writer", on: int = 0
    ) -> dict[str, Any]:
        body = {"data": data, "version": version, "reason": "rotate the key"}
        response = await self.call("POST", f"/secrets/{path}:propose", who, on=on, json=body)
        assert response.status_code == 201, response.text
        change: dict[str, Any] = response.json()
        return change

    def events(self, path: str) -> list[Any]:
        decoded = [approval_event_decoder.decode(p) for p in self.approval_payloads]
        return [e for e in decoded if e.path == path]


@pytest.fixture(scope="module")
async def cluster(
    openbao: OpenBaoEndpoint,
    oidc: OidcIssuer,
    nats_cluster: list[NatsServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Cluster]:
    directory = tmp_path_factory.mktemp("approvals")
    policy = write_policy(directory, POLICY)
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    with LogCapture() as logs:
        async with cluster_services(
            openbao,
            oidc,
            nats_cluster,
            policy,
            "appr",
            nats_prefix=PREFIX,
            approval_sweep_interval="0.3",
        ) as services:
            audit = [directory / "audit.log"]
            c = Cluster(services, tokens, audit)

            async def heard(msg: Any) -> None:
                c.approval_payloads.append(msg.data)

            await services[0].state.bus.nc.subscribe(f"{PREFIX}.approvals.>", cb=heard)
            try:
                yield c
            finally:
                for client in c.clients:
                    await client.aclose()
    # The proposed value went to Vault and nowhere else this module can see.
    assert CANARY not in logs.text
    assert all(CANARY.encode() not in p for p in c.approval_payloads)
    for file in audit:
        if file.exists():
            assert CANARY not in file.read_text()


def fresh(prefix: str = "prod") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:8]}/db"


async def test_a_request_made_on_one_instance_is_approved_on_others_and_applied_on_a_third(
    cluster: Cluster,
) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567", "user": "svc"})
    change = await cluster.propose(path, {"password": CANARY, "user": "svc"}, 1, on=0)
    assert (change["state"], change["required"], change["approvals"]) == ("pending", 2, [])
    assert change["base_version"] == 1 and change["fields"] == ["password"]
    assert CANARY not in json.dumps(change)
    target = f"/changes/{change['id']}"
    early = await cluster.call("POST", f"{target}:apply", "writer", on=2)
    assert early.status_code == 409 and early.json()["error"] == "change_conflict"
    first = await cluster.call("POST", f"{target}:approve", "reader", on=1)
    assert first.status_code == 200 and first.json()["state"] == "pending"
    second = await cluster.call("POST", f"{target}:approve", "admin", on=2)
    assert second.json()["state"] == "approved"
    assert len(second.json()["approvals"]) == 2
    applied = await cluster.call("POST", f"{target}:apply", "writer", on=2)
    assert applied.status_code == 200, applied.text
    assert (applied.json()["state"], applied.json()["applied_version"]) == ("applied", 2)
    secret = (await cluster.call("GET", f"/secrets/{path}", "reader", on=0)).json()
    assert secret["version"] == 2 and secret["data"]["password"] == CANARY
    again = await cluster.call("POST", f"{target}:approve", "reader", on=0)
    assert again.status_code == 409  # applied: final

    def flow() -> list[Any]:  # the set-up's own bypass left out
        return [e for e in cluster.events(path) if e.__struct_config__.tag != "change.bypassed"]

    await eventually(lambda: any(e.state == "applied" for e in flow()))
    assert [(e.__struct_config__.tag, e.approvals) for e in flow()] == [
        ("change.proposed", 0),
        ("change.approved", 1),
        ("change.approved", 2),
        ("change.applied", 2),
    ]
    assert flow()[-1].applied_version == 2 and flow()[-1].id == change["id"]


async def test_the_requester_never_approves_their_own_request(cluster: Cluster) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    change = await cluster.propose(path, {"password": CANARY}, 1, who="admin")
    own = await cluster.call("POST", f"/changes/{change['id']}:approve", "admin", on=1)
    assert own.status_code == 403 and own.json()["error"] == "self_approval"
    no_grant = await cluster.call("POST", f"/changes/{change['id']}:approve", "writer")
    assert no_grant.status_code == 403 and no_grant.json()["error"] == "forbidden"
    view = (await cluster.call("GET", f"/changes/{change['id']}", "reader")).json()
    assert view["approvals"] == [] and view["state"] == "pending"


async def test_an_approver_counts_once_however_often_they_approve(cluster: Cluster) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    change = await cluster.propose(path, {"password": CANARY}, 1)
    for on in (0, 1, 2):
        response = await cluster.call("POST", f"/changes/{change['id']}:approve", "reader", on=on)
        assert response.status_code == 200
        assert len(response.json()["approvals"]) == 1 and response.json()["state"] == "pending"
    await eventually(lambda: len(cluster.events(path)) >= 3)
    assert [e.__struct_config__.tag for e in cluster.events(path)] == [
        "change.bypassed",  # the set-up
        "change.proposed",
        "change.approved",
    ]


async def test_a_stale_request_is_refused_and_never_overwrites(cluster: Cluster) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    change = await cluster.propose(path, {"password": CANARY}, 1)
    for who in ("reader", "admin"):
        await cluster.call("POST", f"/changes/{change['id']}:approve", who)
    newer = await cluster.call(
        "PATCH",
        f"/secrets/{path}",
        "admin",
        json={"data": {"password": "Newer-by-break-glass-42"}, "version": 1},
        headers={"X-Bypass-Reason": "incident 4711"},
    )
    assert newer.status_code == 200
    applied = await cluster.call("POST", f"/changes/{change['id']}:apply", "writer", on=1)
    assert applied.status_code == 409
    assert applied.json()["error"] == "version_conflict" and applied.json()["current_version"] == 2
    view = (await cluster.call("GET", f"/changes/{change['id']}", "writer")).json()
    assert view["state"] == "stale"
    secret = (await cluster.call("GET", f"/secrets/{path}", "reader")).json()
    assert (secret["version"], secret["data"]["password"]) == (2, "Newer-by-break-glass-42")
    retry = await cluster.call("POST", f"/changes/{change['id']}:apply", "writer", on=2)
    assert retry.status_code == 409 and retry.json()["error"] == "change_conflict"


async def test_every_covered_change_route_answers_428_without_a_request(cluster: Cluster) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("PATCH", f"/secrets/{path}", {"json": {"data": {"password": CANARY}, "version": 1}}),
        ("DELETE", f"/secrets/{path}", {}),
        ("POST", f"/secrets/{path}:undelete", {"json": {"versions": [1]}}),
        ("POST", f"/secrets/{path}:destroy", {"json": {"versions": [1]}}),
        ("POST", f"/secrets/{path}:rollback", {"json": {"to_version": 1, "version": 1}}),
        ("POST", f"/secrets/{path}:rotate", {}),
    ]
    for method, target, kw in routes:
        response = await cluster.call(method, target, "admin", **kw)
        assert response.status_code == 428, (method, target, response.text)
        assert response.json()["error"] == "approval_required"
        # A reason without the bypass grant changes nothing.
        writer = await cluster.call(
            method, target, "writer", headers={"X-Bypass-Reason": "please"}, **kw
        )
        assert writer.status_code in (403, 428), (method, target, writer.text)
    secret = (await cluster.call("GET", f"/secrets/{path}", "reader")).json()
    assert secret["version"] == 1


async def test_break_glass_needs_the_grant_and_a_reason_and_is_audited_and_announced(
    cluster: Cluster,
) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    for bad in ("", "x" * 501):
        refused = await cluster.call(
            "POST", f"/secrets/{path}:rotate", "admin", headers={"X-Bypass-Reason": bad}
        )
        assert refused.status_code == 400, bad
    rotated = await cluster.call(
        "POST", f"/secrets/{path}:rotate", "admin", headers={"X-Bypass-Reason": "leaked key"}
    )
    assert rotated.status_code == 200, rotated.text

    def bypassed() -> list[Any]:
        return [e for e in cluster.events(path) if e.__struct_config__.tag == "change.bypassed"]

    await eventually(lambda: len(bypassed()) == 2)  # the set-up write, then the rotation
    assert [(e.op, e.applied_version) for e in bypassed()] == [("write", 1), ("rotate", 2)]
    records = [
        json.loads(line)
        for line in cluster.audit[0].read_text().splitlines()
        if path in line and '"bypass_reason"' in line
    ]
    reasons = {(r["op"], r["bypass_reason"]) for r in records if r["bypass_reason"]}
    assert ("rotate", "leaked key") in reasons and ("write", "test set-up") in reasons


async def test_a_request_past_its_time_expires_and_cannot_be_applied(cluster: Cluster) -> None:
    path = fresh("quick")
    change = await cluster.propose(path, {"password": CANARY}, 0)  # a path yet to be created
    approved = await cluster.call("POST", f"/changes/{change['id']}:approve", "reader", on=1)
    assert approved.json()["state"] == "approved"

    async def expired() -> bool:
        view = await cluster.call("GET", f"/changes/{change['id']}", "writer", on=2)
        return bool(view.json()["state"] == "expired")

    await eventually(expired, timeout=10, interval=0.2)
    late = await cluster.call("POST", f"/changes/{change['id']}:apply", "writer")
    assert late.status_code == 409 and late.json()["error"] == "change_conflict"
    assert (await cluster.call("GET", f"/secrets/{path}", "reader")).status_code == 404
    await eventually(lambda: any(e.state == "expired" for e in cluster.events(path)))
    assert sum(e.state == "expired" for e in cluster.events(path)) == 1  # one instance's CAS

    def expiry_records() -> list[dict[str, Any]]:
        lines = cluster.audit[0].read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("change_id") == change["id"]]

    await eventually(lambda: any(r["op"] == "expire" for r in expiry_records()))
    assert [r["method"] for r in expiry_records() if r["op"] == "expire"] == ["SCHEDULE"]


async def test_validation_runs_again_at_apply(cluster: Cluster) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567"})
    change = await cluster.propose(path, {"password": CANARY}, 1)
    for who in ("reader", "admin"):
        await cluster.call("POST", f"/changes/{change['id']}:approve", who)
    manager = cluster.services[1].state.manager
    lenient = manager.validator
    manager.validator = Validator.from_policy(
        Policy.from_toml("[validation.defaults]\nmax_length = 8\n").raw
    )
    try:
        refused = await cluster.call("POST", f"/changes/{change['id']}:apply", "writer", on=1)
    finally:
        manager.validator = lenient
    assert refused.status_code == 422 and refused.json()["error"] == "invalid_secret"
    assert CANARY not in refused.text
    view = (await cluster.call("GET", f"/changes/{change['id']}", "writer")).json()
    assert view["state"] == "approved"  # still applicable once the rules allow it
    assert (await cluster.call("GET", f"/secrets/{path}", "reader")).json()["version"] == 1


async def test_listings_show_changed_field_names_only_to_those_who_may_see_the_path(
    cluster: Cluster,
) -> None:
    path = fresh()
    await cluster.create(path, {"password": "Old-password-1234567", "user": "svc"})
    change = await cluster.propose(path, {"password": CANARY, "host": "db"}, 1)
    listed = await cluster.call("GET", "/changes", "reader", params={"path": path})
    assert listed.status_code == 200
    [view] = listed.json()["changes"]
    assert view["id"] == change["id"] and view["fields"] == ["host", "password", "user"]
    assert CANARY not in listed.text
    pending = await cluster.call("GET", "/changes", "writer", params={"state": "pending"})
    assert change["id"] in {c["id"] for c in pending.json()["changes"]}
    bad = await cluster.call("GET", "/changes", "writer", params={"state": "nonsense"})
    assert bad.status_code == 400
    unknown = await cluster.call("GET", f"/changes/{uuid.uuid4().hex}", "reader")
    assert unknown.status_code == 404
    assert (await cluster.call("GET", "/changes/not-an-id", "reader")).status_code == 404
    cancel = await cluster.call("POST", f"/changes/{change['id']}:cancel", "reader")
    assert cancel.status_code == 403  # only the requester
    cancelled = await cluster.call("POST", f"/changes/{change['id']}:cancel", "writer")
    assert cancelled.json()["state"] == "cancelled" and cancelled.json()["decided_by"]


async def test_a_wrong_method_is_a_json_405_naming_what_is_allowed(cluster: Cluster) -> None:
    some_id = uuid.uuid4().hex
    for method, target, allow in [
        ("POST", "/changes", "GET, HEAD"),
        ("DELETE", f"/changes/{some_id}", "GET, HEAD"),
        ("GET", f"/changes/{some_id}:approve", "POST"),
    ]:
        response = await cluster.call(method, target, "reader")
        assert response.status_code == 405, (method, target)
        assert response.headers["allow"] == allow
        assert response.json()["error"] == "method_not_allowed"
    unknown = await cluster.call("POST", f"/changes/{some_id}:merge", "reader")
    assert unknown.status_code == 404

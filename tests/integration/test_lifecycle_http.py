"""Version history and lifecycle over HTTP, end to end: real OpenBao (the service holding the
least-privilege dev token), real NATS, real tokens from OpenBao's OIDC issuer."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from schemas.events import ChangeEvent, SecretDeleted, SecretDestroyed, SecretUndeleted
from tests.support import (
    LeastPrivilege,
    RunningService,
    bearer,
    eventually,
    running_service,
    service_settings,
    write_policy,
)

POLL_INTERVAL = 0.3
POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/*/db", "lst/*/visible/**", "lst/*/leaf"]

[roles.app-writer]
read = ["app/**", "lst/**"]
write = ["app/**", "lst/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
"""


class Stack:
    def __init__(
        self, url: str, tokens: dict[str, str], svc: RunningService, audit_file: Path
    ) -> None:
        self.url = url
        self.tokens = tokens
        self.svc = svc
        self.audit_file = audit_file
        self.client = httpx.AsyncClient(base_url=url, timeout=10)
        self.events: list[ChangeEvent] = []
        svc.app.state.bus.on_received = self.events.append

    async def call(
        self, method: str, target: str, who: str = "writer", **kw: Any
    ) -> httpx.Response:
        return await self.client.request(
            method, f"/secrets/{target}", headers=bearer(self.tokens[who]), **kw
        )

    async def create(self, path: str, *values: str) -> None:
        for version, value in enumerate(values):
            body = {"data": {"password": value}, "version": version}
            response = await self.call("PATCH", path, "admin", json=body)
            assert response.status_code == 200, response.text

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_file.read_text().splitlines()]


@pytest.fixture(scope="module")
async def stack(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint,
    oidc: OidcIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("lifecycle")
    audit_file = directory / "audit.log"
    settings = service_settings(
        LeastPrivilege.of(openbao),  # the dev stack's own Vault policy, not the root token
        nats,
        oidc,
        write_policy(directory, POLICY),
        vault_poll_interval=str(POLL_INTERVAL),
        audit_sink=f"file:{audit_file}",
    )
    tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
    async with running_service(settings) as svc:
        s = Stack(svc.url, tokens, svc, audit_file)
        try:
            yield s
        finally:
            await s.client.aclose()


def subject(stack: Stack, who: str) -> str:
    payload = stack.tokens[who].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sub: str = claims["sub"]
    return sub


def fresh(prefix: str = "app") -> str:
    return f"{prefix}/l-{uuid.uuid4().hex[:10]}/db"


# -- versions ----------------------------------------------------------------------------------


async def test_versions_shows_each_version_with_its_times_and_state(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2", "v3")
    assert (await stack.call("DELETE", path, params={"versions": "2"})).status_code == 200
    assert (await stack.call("POST", f"{path}:destroy", "admin", json={"versions": [1]})).is_success
    response = await stack.call("GET", f"{path}:versions", "reader")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["path"] == path and body["current_version"] == 3
    assert body["created_time"] <= body["updated_time"]
    states = [(v["version"], v["deleted"], v["destroyed"]) for v in body["versions"]]
    assert states == [(1, False, True), (2, True, False), (3, False, False)]
    assert body["versions"][1]["deletion_time"].startswith("20")
    assert body["versions"][2]["deletion_time"] is None
    assert all(v["created_time"].startswith("20") for v in body["versions"])


async def test_versions_of_a_missing_path_is_404_and_outside_the_grants_403(
    stack: Stack,
) -> None:
    assert (await stack.call("GET", f"{fresh()}:versions", "reader")).status_code == 404
    outside = await stack.call("GET", f"{fresh('ops')}:versions", "reader")
    assert outside.status_code == 403 and outside.json()["error"] == "forbidden"


# -- delete and undelete -----------------------------------------------------------------------


async def test_deleting_the_current_version_makes_it_404_until_undeleted(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2")
    assert (await stack.call("GET", path, "reader")).json()["version"] == 2  # now cached
    deleted = await stack.call("DELETE", path)
    assert deleted.status_code == 200
    assert deleted.json() == {"path": path, "versions": [2]}
    missing = await stack.call("GET", path, "reader")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    old = await stack.call("GET", path, "reader", params={"version": "1"})
    assert old.json()["data"] == {"password": "v1"}
    restored = await stack.call("POST", f"{path}:undelete", json={"versions": [2]})
    assert restored.json() == {"path": path, "versions": [2]}
    assert (await stack.call("GET", path, "reader")).json()["data"] == {"password": "v2"}
    await eventually(
        lambda: (
            [type(e) for e in stack.events if e.path == path][-2:]
            == [SecretDeleted, SecretUndeleted]
        )
    )
    event = next(e for e in stack.events if isinstance(e, SecretDeleted) and e.path == path)
    assert (event.version, event.versions, event.actor) == (2, (2,), subject(stack, "writer"))


async def test_a_cached_pinned_version_is_not_served_once_deleted(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2", "v3")
    for _ in range(2):
        got = await stack.call("GET", path, "reader", params={"version": "1"})
        assert got.json()["data"] == {"password": "v1"}
    response = await stack.call("DELETE", path, params={"versions": "1,2"})
    assert response.json()["versions"] == [1, 2]
    for version in ("1", "2"):
        got = await stack.call("GET", path, "reader", params={"version": version})
        assert got.status_code == 404
    assert (await stack.call("GET", path, "reader")).json()["version"] == 3


@pytest.mark.parametrize("bad", ["", "0", "1,,2", "a", "1;2", "-1", ",".join(["1"] * 101)])
async def test_bad_versions_query_is_400(stack: Stack, bad: str) -> None:
    response = await stack.call("DELETE", fresh(), params={"versions": bad})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


async def test_deleting_an_unknown_version_or_path_is_404(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1")
    assert (await stack.call("DELETE", path, params={"versions": "1,5"})).status_code == 404
    assert (await stack.call("GET", path, "reader")).status_code == 200  # nothing deleted
    assert (await stack.call("DELETE", fresh())).status_code == 404


async def test_delete_and_undelete_need_write(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1")
    assert (await stack.call("DELETE", path, "reader")).status_code == 403
    undelete = await stack.call("POST", f"{path}:undelete", "reader", json={"versions": [1]})
    assert undelete.status_code == 403
    assert (await stack.call("GET", path, "reader")).status_code == 200


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[]", b'{"versions": []}', b'{"versions": [0]}', b'{"versions": ["1"]}',
     b'{"versions": [1], "extra": true}', b'{"version": 1}'],
)  # fmt: skip
async def test_undelete_and_destroy_with_a_bad_body_are_400(stack: Stack, body: bytes) -> None:
    for verb in ("undelete", "destroy"):
        response = await stack.call("POST", f"{fresh()}:{verb}", "admin", content=body)
        assert response.status_code == 400, (verb, body, response.text)
        assert response.json()["error"] == "invalid_request"
        assert "versions" in response.json()["detail"]


# -- destroy -----------------------------------------------------------------------------------


async def test_destroy_needs_the_destroy_permission_and_is_final(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2")
    refused = await stack.call("POST", f"{path}:destroy", "writer", json={"versions": [1]})
    assert refused.status_code == 403
    done = await stack.call("POST", f"{path}:destroy", "admin", json={"versions": [1, 2]})
    assert done.json() == {"path": path, "versions": [1, 2]}
    assert (await stack.call("GET", path, "reader", params={"version": "1"})).status_code == 404
    assert (await stack.call("GET", path, "reader")).status_code == 404
    undelete = await stack.call("POST", f"{path}:undelete", json={"versions": [2]})
    assert undelete.status_code == 404 and "destroyed" in undelete.json()["detail"]
    await eventually(
        lambda: any(isinstance(e, SecretDestroyed) and e.path == path for e in stack.events)
    )


# -- rollback ----------------------------------------------------------------------------------


async def test_rollback_writes_the_old_version_as_the_next_one_with_cas(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2", "v3")
    stale = await stack.call("POST", f"{path}:rollback", json={"to_version": 1, "version": 2})
    assert stale.status_code == 409 and stale.json()["current_version"] == 3
    done = await stack.call("POST", f"{path}:rollback", json={"to_version": 1, "version": 3})
    assert done.status_code == 200 and done.json() == {"path": path, "version": 4}
    current = (await stack.call("GET", path, "reader")).json()
    assert (current["version"], current["data"]) == (4, {"password": "v1"})


async def test_rolling_back_to_a_deleted_version_is_404_and_needs_write(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2")
    await stack.call("DELETE", path, params={"versions": "1"})
    body = {"to_version": 1, "version": 2}
    assert (await stack.call("POST", f"{path}:rollback", json=body)).status_code == 404
    assert (await stack.call("POST", f"{path}:rollback", "reader", json=body)).status_code == 403
    bad = await stack.call("POST", f"{path}:rollback", json={"to_version": 0, "version": 2})
    assert bad.status_code == 400 and "to_version" in bad.json()["detail"]


WRITE_ONLY_POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-writer]
write = ["wo/**"]

[roles.admin]
read = ["**"]
write = ["**"]
"""


async def test_rollback_without_read_is_403_and_never_tells_what_the_old_version_holds(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    path = f"wo/l-{uuid.uuid4().hex[:10]}/db"
    async with httpx.AsyncClient(base_url=openbao.addr, timeout=10) as vault:
        # Version 1 holds a common password (written straight to OpenBao, before any rule).
        headers = {"X-Vault-Token": openbao.root_token}
        written = await vault.post(
            f"/v1/secret/data/{path}", json={"data": {"password": "password"}}, headers=headers
        )
        assert written.status_code == 200
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path, WRITE_ONLY_POLICY))
    writer, admin = bearer(oidc.mint("writer")), bearer(oidc.mint("admin"))
    async with running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            body = {"data": {"password": "Zq8#vT2!mL9$wR4p"}, "version": 1}
            assert (await client.patch(f"/secrets/{path}", json=body, headers=writer)).is_success
            assert (await client.get(f"/secrets/{path}", headers=writer)).status_code == 403

            async def rollback(to_version: int, who: Mapping[str, str]) -> httpx.Response:
                return await client.post(
                    f"/secrets/{path}:rollback",
                    json={"to_version": to_version, "version": 2},
                    headers=who,
                )

            # The attack: a rollback to version 1 answered 422 naming the field and the rule
            # `common_password`, telling a caller who may not read what version 1 holds.
            to_common = await rollback(1, writer)
            assert to_common.status_code == 403, to_common.text
            assert "common_password" not in to_common.text
            # The same answer whatever the old version holds, or whether it exists.
            to_missing = await rollback(99, writer)
            assert (to_missing.status_code, to_missing.content) == (403, to_common.content)
            # A caller who may read and write still learns why the rollback is refused.
            allowed = await rollback(1, admin)
            assert allowed.status_code == 422
            assert allowed.json()["violations"] == [
                {"field": "password", "rule": "common_password"}
            ]
            current = await client.get(f"/secrets/{path}", headers=admin)
            assert current.json()["version"] == 2


# -- list --------------------------------------------------------------------------------------


async def test_list_shows_only_keys_at_or_above_a_readable_path(stack: Stack) -> None:
    base = f"lst/{uuid.uuid4().hex[:10]}"
    for key in ("visible/a", "visible/deeper/b", "hidden/c", "leaf", "other"):
        await stack.create(f"{base}/{key}", "x")
    writer = await stack.call("GET", f"{base}:list")
    assert writer.json() == {"prefix": base, "keys": ["hidden/", "leaf", "other", "visible/"]}
    reader = await stack.call("GET", f"{base}:list", "reader")
    assert reader.status_code == 200
    assert reader.json()["keys"] == ["leaf", "visible/"]
    below = await stack.call("GET", f"{base}/visible:list", "reader")
    assert below.json()["keys"] == ["a", "deeper/"]


async def test_listing_outside_the_grants_is_403_whether_or_not_the_prefix_exists(
    stack: Stack,
) -> None:
    base = f"lst/{uuid.uuid4().hex[:10]}"
    await stack.create(f"{base}/hidden/c", "x")
    existing = await stack.call("GET", f"{base}/hidden:list", "reader")
    missing = await stack.call("GET", f"{base}/nothing:list", "reader")
    assert existing.status_code == missing.status_code == 403
    assert existing.content == missing.content
    # A prefix the reader could read below, but holding nothing: 404.
    empty = await stack.call("GET", f"{base}/visible:list", "reader")
    assert empty.status_code == 404


async def test_listing_the_top_reveals_no_name_outside_the_grants(stack: Stack) -> None:
    secret_name = f"zz-{uuid.uuid4().hex[:10]}"
    await stack.create(f"{secret_name}/db", "x")
    await stack.create(fresh(), "x")
    reader = await stack.client.get("/secrets:list", headers=bearer(stack.tokens["reader"]))
    assert reader.status_code == 200
    assert reader.json()["prefix"] == ""
    assert set(reader.json()["keys"]) <= {"app/", "lst/"} and "app/" in reader.json()["keys"]
    admin = await stack.client.get("/secrets:list", headers=bearer(stack.tokens["admin"]))
    assert f"{secret_name}/" in admin.json()["keys"]


@pytest.mark.parametrize("prefix", ["app/", "app//x", "app/x y", "a:b", "app/dé"])
async def test_invalid_prefixes_are_400(stack: Stack, prefix: str) -> None:
    response = await stack.call("GET", f"{prefix}:list", "reader")
    assert response.status_code == 400


# -- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "allow"),
    [
        ("POST", "app/x/db:versions", "GET, HEAD"),
        ("GET", "app/x/db:undelete", "POST"),
        ("DELETE", "app/x/db:rollback", "POST"),
        ("PUT", "app/x/db", "DELETE, GET, HEAD, PATCH"),
        ("POST", "app/x/db", "DELETE, GET, HEAD, PATCH"),
    ],
)
async def test_a_wrong_http_method_is_405_json_with_allow(
    stack: Stack, method: str, target: str, allow: str
) -> None:
    response = await stack.call(method, target, "admin")
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["error"] == "method_not_allowed"


async def test_an_unknown_verb_is_404_and_head_reads_without_a_body(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1")
    unknown = await stack.call("GET", f"{path}:frobnicate", "reader")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    head = await stack.call("HEAD", path, "reader")
    assert head.status_code == 200 and head.content == b"" and head.headers["etag"] == '"1"'


async def test_openapi_describes_the_lifecycle_operations(stack: Stack) -> None:
    doc = (await stack.client.get("/openapi.json")).json()
    paths = doc["paths"]
    assert "delete" in paths["/secrets/{path}"]
    for route, method in [
        ("/secrets/{path}:versions", "get"),
        ("/secrets/{prefix}:list", "get"),
        ("/secrets:list", "get"),
        ("/secrets/{path}:undelete", "post"),
        ("/secrets/{path}:destroy", "post"),
        ("/secrets/{path}:rollback", "post"),
    ]:
        assert method in paths[route], route
    schemas = doc["components"]["schemas"]
    assert {"SecretMetadata", "VersionMetadata", "KeyList", "RollbackRequest"} <= set(schemas)
    assert schemas["RollbackRequest"]["required"] == ["to_version", "version"]


# -- outside the service, and the record -------------------------------------------------------


async def test_a_deletion_made_straight_in_openbao_is_caught_within_the_poll_interval(
    stack: Stack, openbao: OpenBaoEndpoint
) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2")
    assert (await stack.call("GET", path, "reader")).status_code == 200
    assert (await stack.call("GET", path, "reader", params={"version": "1"})).status_code == 200
    async with httpx.AsyncClient(base_url=openbao.addr, timeout=10) as vault:
        headers = {"X-Vault-Token": openbao.root_token}
        r = await vault.post(
            f"/v1/secret/delete/{path}", json={"versions": [1, 2]}, headers=headers
        )
        assert r.status_code == 204
    done = time.monotonic()
    while True:
        latest = await stack.call("GET", path, "reader")
        pinned = await stack.call("GET", path, "reader", params={"version": "1"})
        if latest.status_code == pinned.status_code == 404:
            break
        assert time.monotonic() - done < POLL_INTERVAL * 2 + 1.0
        await asyncio.sleep(0.02)
    await eventually(
        lambda: any(
            isinstance(e, SecretDeleted) and e.path == path and e.actor == "vault-direct"
            for e in stack.events
        )
    )


async def test_lifecycle_operations_are_audited_with_their_own_op(stack: Stack) -> None:
    path = fresh()
    await stack.create(path, "v1", "v2")
    await stack.call("GET", f"{path}:versions", "reader")
    await stack.call("DELETE", path)
    await stack.call("POST", f"{path}:undelete", json={"versions": [2]})
    await stack.call("POST", f"{path}:rollback", json={"to_version": 1, "version": 2})
    await stack.call("POST", f"{path}:destroy", "writer", json={"versions": [1]})
    await stack.call("POST", f"{path}:destroy", "admin", json={"versions": [1]})

    def ops() -> list[tuple[str, int]]:
        return [(r["op"], r["status"]) for r in stack.audit() if r.get("path") == path]

    expected = [
        ("versions", 200),
        ("delete", 200),
        ("undelete", 200),
        ("rollback", 200),
        ("destroy", 403),
        ("destroy", 200),
    ]
    # Reads are audited best effort and off the hot path: their records may come later.
    await eventually(lambda: sorted(op for op in ops() if op[0] != "write") == sorted(expected))

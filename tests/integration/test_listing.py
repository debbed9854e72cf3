"""`:list` reveals no folder name the caller could not read.

End to end (real OpenBao, each test on a KV v2 mount of its own, so the tree holds exactly what
the test wrote; real NATS; real tokens from OpenBao's OIDC issuer). The reader holds only
`read = ["**/config"]`: a glob that could match under every folder, so the policy alone decides
nothing and only what exists below a folder may. The walk itself, against the in-memory Vault:
tests/unit/service/core/test_listing.py.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import generate_latest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint
from service.core.listing import LIST_BUDGET
from tests.support import (
    RunningService,
    bearer,
    metric_value,
    running_service,
    service_settings,
    write_policy,
)

POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["**/config"]

[roles.app-writer]
read = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
"""


class Tree:
    """A service on a KV v2 mount of its own, and the personas' tokens."""

    def __init__(self, svc: RunningService, tokens: dict[str, str]) -> None:
        self.svc = svc
        self.tokens = tokens
        self.client = httpx.AsyncClient(base_url=svc.url, timeout=10)

    async def create(self, *paths: str) -> None:
        for path in paths:
            body = {"data": {"note": "x"}, "version": 0}
            response = await self.client.patch(
                f"/secrets/{path}", json=body, headers=bearer(self.tokens["admin"])
            )
            assert response.status_code == 200, response.text

    async def list(self, prefix: str, who: str = "reader") -> httpx.Response:
        target = f"/secrets/{prefix}:list" if prefix else "/secrets:list"
        return await self.client.get(target, headers=bearer(self.tokens[who]))

    def metric(self, name: str, **labels: str) -> float:
        text = generate_latest(self.svc.state.metrics.registry).decode()
        return metric_value(text, name, **labels)

    def vault_lists(self) -> float:
        """Vault LIST calls the service has made so far."""
        text = generate_latest(self.svc.state.metrics.registry).decode()
        return metric_value(text, "secrets_vault_request_seconds_count", op="list")


def same_answer(a: httpx.Response, b: httpx.Response) -> bool:
    """Byte for byte the same status, body and headers, the request id aside."""

    def headers(r: httpx.Response) -> list[tuple[str, str]]:
        return sorted((k, v) for k, v in r.headers.items() if k not in ("x-request-id", "date"))

    return (a.status_code, a.content, headers(a)) == (b.status_code, b.content, headers(b))


async def _fresh_mount(openbao: OpenBaoEndpoint) -> str:
    """A new KV v2 mount, ready for writes (a new mount takes a moment to accept them)."""
    mount = f"lst-{uuid.uuid4().hex[:10]}"
    headers = {"X-Vault-Token": openbao.root_token}
    async with httpx.AsyncClient(base_url=openbao.addr, headers=headers, timeout=10) as vault:
        created = await vault.post(
            f"/v1/sys/mounts/{mount}", json={"type": "kv", "options": {"version": "2"}}
        )
        assert created.status_code == 204, created.text
        deadline = time.monotonic() + 10
        while (await vault.post(f"/v1/{mount}/data/probe", json={"data": {}})).status_code != 200:
            assert time.monotonic() < deadline, "the new KV mount never accepted a write"
            await asyncio.sleep(0.05)
        gone = await vault.delete(f"/v1/{mount}/metadata/probe")
        assert gone.status_code == 204, gone.text
    return mount


async def _drop_mount(openbao: OpenBaoEndpoint, mount: str) -> None:
    headers = {"X-Vault-Token": openbao.root_token}
    async with httpx.AsyncClient(base_url=openbao.addr, headers=headers, timeout=10) as vault:
        await vault.delete(f"/v1/sys/mounts/{mount}")


@pytest.fixture
async def tree(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> AsyncIterator[Tree]:
    mount = await _fresh_mount(openbao)
    try:
        settings = service_settings(
            openbao, nats, oidc, write_policy(tmp_path, POLICY), vault_mount=mount
        )
        tokens = {who: oidc.mint(who) for who in ("reader", "writer", "admin")}
        async with running_service(settings) as svc:
            t = Tree(svc, tokens)
            try:
                yield t
            finally:
                await t.client.aclose()
    finally:
        await _drop_mount(openbao, mount)


# -- the attack --------------------------------------------------------------------------------


async def test_a_config_glob_reveals_no_folder_when_no_config_secret_exists(tree: Tree) -> None:
    await tree.create("customers/acme-merger-2027/notes", "payroll/2027/q1")
    missing = await tree.list("nonexistent")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    for prefix in ("", "customers", "customers/acme-merger-2027", "payroll", "payroll/2027"):
        answer = await tree.list(prefix)
        assert same_answer(answer, missing), (prefix, answer.status_code, answer.text)
    # The same tree, listed by an admin, is all there: the reader was shown none of it.
    assert (await tree.list("", "admin")).json()["keys"] == ["customers/", "payroll/"]


async def test_only_folders_holding_a_readable_existing_secret_are_listed(tree: Tree) -> None:
    await tree.create("customers/acme-merger-2027/notes", "payroll/2027/q1")
    await tree.create("customers/acme/config")
    top = await tree.list("")
    assert top.status_code == 200
    assert top.json() == {"prefix": "", "keys": ["customers/"]}
    customers = await tree.list("customers")
    assert customers.json() == {"prefix": "customers", "keys": ["acme/"]}
    assert (await tree.list("customers/acme")).json()["keys"] == ["config"]
    missing = await tree.list("nonexistent")
    for hidden in ("payroll", "customers/acme-merger-2027"):
        assert same_answer(await tree.list(hidden), missing), hidden


async def test_listing_where_no_glob_could_match_below_is_still_403_whether_or_not_it_exists(
    tree: Tree,
) -> None:
    await tree.create("customers/acme/config", "app/x/db")
    existing = await tree.list("customers", "writer")  # the writer reads only app/**
    missing = await tree.list("nothing", "writer")
    assert existing.status_code == 403 and existing.json()["error"] == "forbidden"
    assert same_answer(existing, missing)


async def test_a_glob_covering_a_folder_shows_it_from_the_prefix_listing_alone(
    tree: Tree,
) -> None:
    await tree.create("app/a/b/c/d", "app/e", "customers/acme/config")
    before = tree.vault_lists()
    top = await tree.list("", "writer")
    assert top.json() == {"prefix": "", "keys": ["app/"]}
    assert tree.vault_lists() - before == 1


async def test_a_secret_whose_every_version_is_deleted_still_counts_as_existing(
    tree: Tree,
) -> None:
    # The rule is "a key Vault lists": KV v2 keeps the metadata of a soft-deleted secret.
    await tree.create("customers/acme/config")
    deleted = await tree.client.delete(
        "/secrets/customers/acme/config", headers=bearer(tree.tokens["admin"])
    )
    assert deleted.status_code == 200
    assert (await tree.list("")).json()["keys"] == ["customers/"]
    assert (await tree.list("customers/acme")).json()["keys"] == ["config"]


async def test_a_folder_whose_readable_secret_lies_past_the_budget_is_hidden_and_flagged(
    tree: Tree,
) -> None:
    # `wide/` holds more folders than one request may list, and its only readable secret
    # under the last of them (Vault lists keys in order).
    await tree.create("tree/open/config")
    await asyncio.gather(*(tree.create(f"tree/wide/f{i:03d}/x") for i in range(72)))
    await tree.create("tree/wide/zzz/config")
    before = tree.vault_lists()
    truncated = tree.metric("secrets_listings_truncated_total")
    listed = await tree.list("tree")
    assert listed.status_code == 200
    assert listed.json() == {"prefix": "tree", "keys": ["open/"], "truncated": True}
    assert tree.vault_lists() - before <= LIST_BUDGET + 1
    assert tree.metric("secrets_listings_truncated_total") == truncated + 1
    # Asked where the budget reaches, the same secret is found.
    assert (await tree.list("tree/wide/zzz")).json()["keys"] == ["config"]

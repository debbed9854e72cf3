"""Deleted and destroyed versions across three instances on a three-node NATS cluster: no cache
on any instance serves one once its event is processed; an undelete is seen everywhere too."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devstack import NatsServer
from schemas.events import ChangeEvent, SecretDeleted, SecretDestroyed, SecretUndeleted
from schemas.secret import SecretData
from service.core.manager import SecretsManager
from tests.support import bearer, cluster_services, eventually, write_policy

POLICY = """\
[roles.app-reader]
read = ["app/**"]

[roles.app-writer]
read = ["app/**"]
write = ["app/**"]

[roles.admin]
read = ["**"]
write = ["**"]
destroy = ["**"]
"""


class Instance:
    def __init__(self, name: str, svc: Any) -> None:
        self.name = name
        self.url = svc.url
        self.manager: SecretsManager = svc.app.state.manager
        self.events: list[ChangeEvent] = []  # every event this instance's bus handled
        svc.app.state.bus.on_received = self.events.append

    def handled(self, kind: type[Any], path: str) -> bool:
        return any(isinstance(e, kind) and e.path == path for e in self.events)


@pytest.fixture(scope="module")
async def instances(
    openbao: Any,
    oidc: Any,
    nats_cluster: list[NatsServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[list[Instance]]:
    policy = write_policy(tmp_path_factory.mktemp("lifecycle-cluster"), POLICY)
    async with cluster_services(
        openbao,
        oidc,
        nats_cluster,
        policy,
        "life",
        vault_poll_interval="0",  # only events may evict here
        audit_sink="none",
    ) as services:
        yield [Instance(n, svc) for n, svc in zip("ABC", services, strict=True)]


@pytest.fixture(scope="module")
def tokens(oidc: Any) -> dict[str, str]:
    return {who: oidc.mint(who) for who in ("reader", "writer", "admin")}


# How long an event may take to arrive here before a test fails: a deadline for a loaded 2-core
# machine, not a latency figure (`make bench` measures propagation: bench/results/latest.json).
EVENT_DEADLINE = 5.0


def fresh() -> str:
    return f"app/lc-{uuid.uuid4().hex[:10]}/db"


async def status(
    client: httpx.AsyncClient, inst: Instance, path: str, token: str, **kw: Any
) -> int:
    response = await client.get(f"{inst.url}/secrets/{path}", headers=bearer(token), **kw)
    return response.status_code


async def test_a_version_deleted_through_a_is_served_by_no_cache_on_b_or_c(
    instances: list[Instance], tokens: dict[str, str]
) -> None:
    a, b, c = instances
    path = fresh()
    await a.manager.set(path, {"v": "1"}, 0)
    await a.manager.set(path, {"v": "2"}, 1)
    reader = tokens["reader"]
    async with httpx.AsyncClient(timeout=10) as client:
        for inst in (b, c):  # warm the latest and a pinned entry on B and C
            assert await status(client, inst, path, reader) == 200
            assert await status(client, inst, path, reader, params={"version": "1"}) == 200
        reads = [len(i.manager.cache) for i in (b, c)]
        assert all(n >= 2 for n in reads)

        deleted = await client.delete(
            f"{a.url}/secrets/{path}",
            params={"versions": "1,2"},
            headers=bearer(tokens["writer"]),
        )
        assert deleted.json()["versions"] == [1, 2]
        await eventually(
            lambda: b.handled(SecretDeleted, path) and c.handled(SecretDeleted, path),
            timeout=EVENT_DEADLINE,
        )
        for inst in (b, c):
            assert await status(client, inst, path, reader) == 404
            assert await status(client, inst, path, reader, params={"version": "1"}) == 404

        restored = await client.post(
            f"{c.url}/secrets/{path}:undelete",
            json={"versions": [2]},
            headers=bearer(tokens["writer"]),
        )
        assert restored.status_code == 200
        await eventually(
            lambda: a.handled(SecretUndeleted, path) and b.handled(SecretUndeleted, path),
            timeout=EVENT_DEADLINE,
        )
        for inst in instances:
            got = await client.get(f"{inst.url}/secrets/{path}", headers=bearer(reader))
            assert got.json()["data"] == {"v": "2"}
            assert await status(client, inst, path, reader, params={"version": "1"}) == 404


async def test_a_destroyed_version_is_dropped_from_every_cache(
    instances: list[Instance], tokens: dict[str, str]
) -> None:
    a, b, c = instances
    path = fresh()
    for version in range(3):
        await b.manager.set(path, {"v": str(version + 1)}, version)
    for inst in instances:
        assert (await inst.manager.get(path, 2)).data == {"v": "2"}
        assert (await inst.manager.get(path)).version == 3
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{b.url}/secrets/{path}:destroy",
            json={"versions": [2, 3]},
            headers=bearer(tokens["admin"]),
        )
        assert response.status_code == 200
        await eventually(
            lambda: a.handled(SecretDestroyed, path) and c.handled(SecretDestroyed, path),
            timeout=EVENT_DEADLINE,
        )
        for inst in instances:
            assert await status(client, inst, path, tokens["reader"]) == 404
            for destroyed in ("2", "3"):
                params = {"version": destroyed}
                assert await status(client, inst, path, tokens["reader"], params=params) == 404


async def test_listeners_on_other_instances_hear_a_delete_as_none_and_an_undelete_as_the_value(
    instances: list[Instance],
) -> None:
    a, b, c = instances
    path = fresh()
    await a.manager.set(path, {"v": "1"}, 0)
    await eventually(
        lambda: any(e.path == path for e in c.events), timeout=EVENT_DEADLINE
    )  # the creation is old news
    heard: list[dict[str, Any] | None] = []

    def listener(p: str, value: SecretData | None) -> None:
        if p == path:
            heard.append(None if value is None else value.reveal())

    c.manager.add_listener("lifecycle", listener)
    try:
        await b.manager.delete(path, actor="test")
        await eventually(lambda: heard == [None], timeout=EVENT_DEADLINE)
        await b.manager.undelete(path, [1], actor="test")
        await eventually(lambda: heard == [None, {"v": "1"}], timeout=EVENT_DEADLINE)
        await asyncio.sleep(0.2)
        assert heard == [None, {"v": "1"}]  # each change heard once
    finally:
        c.manager.remove_listener("lifecycle")

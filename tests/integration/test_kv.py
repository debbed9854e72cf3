"""events.kv against a real nats-server: buckets made and brought to another TTL, JetStream's
compare-and-set as `KvConflict`, values lapsing by the TTL, and a watch's values with their age."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator

import nats as nats_client
import pytest

from devstack import NatsEndpoint
from events.kv import KvConflict, KvEntry, NatsKv, ensure_bucket
from tests.support import eventually

TTL = 1.0


@pytest.fixture
async def js(nats: NatsEndpoint) -> AsyncIterator[object]:
    nc = await nats_client.connect(nats.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def bucket_name() -> str:
    return "TEST_KV_" + secrets.token_hex(4).upper()


async def test_a_bucket_is_made_once_and_brought_to_another_ttl_at_the_next_start(
    js: object,
) -> None:
    name = bucket_name()
    await ensure_bucket(js, name, ttl=TTL)
    await ensure_bucket(js, name, ttl=TTL)  # unchanged: nothing to do
    await ensure_bucket(js, name, ttl=2 * TTL)
    info = await js.stream_info(f"KV_{name}")  # type: ignore[attr-defined]
    assert info.config.max_age == 2 * TTL
    assert info.config.max_msgs_per_subject == 1


async def test_create_and_update_compare_and_set_and_a_value_lapses_after_the_ttl(
    js: object,
) -> None:
    kv = await ensure_bucket(js, bucket_name(), ttl=TTL)
    revision = await kv.create("secrets.lease", b"a")
    with pytest.raises(KvConflict):
        await kv.create("secrets.lease", b"b")
    with pytest.raises(KvConflict):
        await kv.update("secrets.lease", b"b", revision + 10)
    revision = await kv.update("secrets.lease", b"a", revision)

    async def taken() -> bool:
        with contextlib.suppress(KvConflict):
            await kv.create("secrets.lease", b"b")
            return True
        return False

    await eventually(taken, timeout=TTL * 10, interval=0.1)  # once the TTL removed it
    with pytest.raises(KvConflict):
        await kv.update("secrets.lease", b"a", revision)  # the old holder's revision is gone
    await kv.delete("secrets.lease")
    assert await kv.create("secrets.lease", b"c") > revision, "a deleted key may be created"


async def test_a_watch_gives_the_current_values_with_their_age_then_each_change(
    js: object,
) -> None:
    kv: NatsKv = await ensure_bucket(js, bucket_name(), ttl=60.0)
    await kv.put("secrets.i1.00", b"x")
    await kv.put("other.i1.00", b"not watched")
    await asyncio.sleep(0.2)  # so that the value has an age to report
    seen: list[KvEntry | None] = []

    async def follow() -> None:
        async with contextlib.aclosing(kv.watch("secrets.>")) as entries:
            async for entry in entries:
                seen.append(entry)

    watching = asyncio.get_running_loop().create_task(follow())
    try:
        await eventually(lambda: None in seen)
        first = seen[0]
        assert first is not None and first.key == "secrets.i1.00" and first.value == b"x"
        assert 0.1 < first.age < 30, first.age
        await kv.put("secrets.i1.01", b"y")
        await kv.delete("secrets.i1.00")
        await eventually(lambda: len(seen) == 4)
        later = [(e.key, e.value) for e in seen[2:] if e is not None]
        assert later == [("secrets.i1.01", b"y"), ("secrets.i1.00", None)]
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching

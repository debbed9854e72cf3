"""ChangeListener against a real nats-server: patterns, replay by sequence and time, resilience.

Each test gets its own subject prefix and stream, so tests neither see nor disturb each other.
Without a server: tests/unit/events/test_listener.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import nats as nats_client
import pytest
from nats.js import JetStreamContext

from devstack import NatsEndpoint, NatsServer
from events.bus import ensure_stream
from events.listener import Change, ChangeListener, UnknownChange
from events.subjects import changed_subject
from schemas.events import SecretCreated, SecretUpdated, event_encoder

TIMEOUT = 10.0
QUIET = 0.3  # how long "nothing more arrives" is watched


def updated(path: str, version: int = 1) -> SecretUpdated:
    return SecretUpdated(
        event_id=uuid4().hex,
        path=path,
        version=version,
        actor="tester",
        instance_id="test",
        time=datetime.now(UTC).isoformat(),
    )


@dataclass
class Stream:
    """A change stream of its own on the shared server, and a way to publish into it."""

    url: str
    prefix: str
    name: str
    js: JetStreamContext

    async def publish(self, path: str, version: int = 1) -> int:
        return await self.publish_raw(path, event_encoder.encode(updated(path, version)))

    async def publish_raw(self, path: str, data: bytes) -> int:
        ack = await self.js.publish(changed_subject(self.prefix, path), data, timeout=TIMEOUT)
        return ack.seq

    def listener(self, pattern: str = "**", **options: Any) -> ChangeListener:
        return ChangeListener(
            self.url,
            pattern,
            prefix=self.prefix,
            stream=self.name,
            connect_timeout=TIMEOUT,
            **options,
        )


@pytest.fixture
async def stream(nats: NatsEndpoint) -> AsyncIterator[Stream]:
    nc = await asyncio.wait_for(nats_client.connect(nats.url), TIMEOUT)
    js = nc.jetstream()
    uid = uuid4().hex[:10]
    prefix, name = f"t{uid}", f"CLIENT_TEST_{uid.upper()}"
    try:
        await asyncio.wait_for(ensure_stream(js, prefix, name=name), TIMEOUT)
        yield Stream(nats.url, prefix, name, js)
        await asyncio.wait_for(js.delete_stream(name), TIMEOUT)
    finally:
        await nc.close()


async def take(changes: ChangeListener, count: int) -> list[Change]:
    return [await asyncio.wait_for(anext(changes), TIMEOUT) for _ in range(count)]


async def assert_nothing_more(changes: ChangeListener) -> None:
    with pytest.raises(TimeoutError):
        extra = await asyncio.wait_for(anext(changes), QUIET)
        pytest.fail(f"unexpected change {extra!r}")


async def test_listener_receives_only_matching_changes_in_stream_order(stream: Stream) -> None:
    published = {}
    for path in ["app/a", "other/x", "app/b/c", "app", "app/d", "apps/e"]:
        published[path] = await stream.publish(path)

    async with stream.listener("app/**", start_sequence=1) as changes:
        got = await take(changes, 3)
        await assert_nothing_more(changes)

    assert [c.path for c in got] == ["app/a", "app/b/c", "app/d"]
    assert [c.sequence for c in got] == [published[c.path] for c in got]
    assert got[0].sequence < got[1].sequence < got[2].sequence
    assert all(c.type == "secret.updated" and c.version == 1 and c.known for c in got)
    assert changes.last_sequence == published["app/d"]


async def test_restart_from_next_sequence_gets_exactly_the_rest(stream: Stream) -> None:
    sequences = [await stream.publish(f"app/s{i}", version=i) for i in range(1, 6)]

    async with stream.listener("app/**", start_sequence=1) as changes:
        first = await take(changes, 3)
    saved = first[-1].sequence
    assert changes.last_sequence == saved

    sequences += [await stream.publish(f"app/s{i}", version=i) for i in range(6, 9)]  # away

    async with stream.listener("app/**", start_sequence=saved + 1) as changes:
        rest = await take(changes, 5)
        await assert_nothing_more(changes)

    assert [c.sequence for c in first + rest] == sequences
    assert [c.version for c in first + rest] == list(range(1, 9))


async def test_start_time_replays_from_that_time(stream: Stream) -> None:
    await stream.publish("app/before-1")
    await stream.publish("app/before-2")
    await asyncio.sleep(0.05)
    since = datetime.now(UTC)
    await asyncio.sleep(0.05)
    after = [await stream.publish("app/after-1"), await stream.publish("app/after-2")]

    async with stream.listener(start_time=since) as changes:
        assert changes.last_sequence == after[0] - 1
        got = await take(changes, 2)
        await assert_nothing_more(changes)

    assert [(c.path, c.sequence) for c in got] == [
        ("app/after-1", after[0]),
        ("app/after-2", after[1]),
    ]


async def test_start_time_in_the_future_waits_for_new_changes(stream: Stream) -> None:
    last = await stream.publish("app/old")
    async with stream.listener(start_time=datetime.now(UTC) + timedelta(hours=1)) as changes:
        assert changes.last_sequence == last
        await assert_nothing_more(changes)


async def test_default_start_delivers_only_new_changes(stream: Stream) -> None:
    await stream.publish("app/old-1")
    old = await stream.publish("app/old-2")

    async with stream.listener("app/**") as changes:
        assert changes.last_sequence == old  # already a resume point before any change
        new = await stream.publish("app/new")
        got = await take(changes, 1)
        await assert_nothing_more(changes)

    assert [(c.path, c.sequence) for c in got] == [("app/new", new)]


async def test_deliver_new_is_the_default_made_explicit(stream: Stream) -> None:
    await stream.publish("app/old")
    async with stream.listener(deliver_new=True) as changes:
        new = await stream.publish("app/new")
        assert [c.sequence for c in await take(changes, 1)] == [new]


async def test_undecodable_and_unknown_event_types_do_not_stop_iteration(stream: Stream) -> None:
    await stream.publish_raw("app/x", b"not json")
    await stream.publish_raw("app/x", b'{"type": "secret.updated", "path": "app/x"}')
    await stream.publish_raw("app/x", b'{"type": "secret.updated", "path": "\xff"}')  # bad UTF-8
    deleted = await stream.publish_raw(
        "app/y",
        b'{"type": "secret.expired", "path": "app/y", "version": 3, "event_id": "e1",'
        b' "actor": "a", "instance_id": "i", "time": "t", "reason": "a field added later"}',
    )
    created = SecretCreated(
        event_id="e2", path="app/z", version=1, actor="a", instance_id="i", time="t"
    )
    last = await stream.publish_raw("app/z", event_encoder.encode(created))

    async with stream.listener(start_sequence=1) as changes:
        got = await take(changes, 2)
        await assert_nothing_more(changes)

    assert changes.skipped == 3
    unknown, known = got
    assert isinstance(unknown.event, UnknownChange) and not unknown.known
    assert (unknown.type, unknown.path, unknown.version, unknown.sequence) == (
        "secret.expired",
        "app/y",
        3,
        deleted,
    )
    assert known.event == created and known.known
    assert (known.type, known.sequence) == ("secret.created", last)


async def test_an_event_whose_path_is_not_its_subjects_is_skipped_and_counted(
    stream: Stream,
) -> None:
    # Someone allowed to publish on app/other's subject claims a change to app/secret.
    forged = await stream.publish_raw("app/other", event_encoder.encode(updated("app/secret", 9)))
    real = await stream.publish("app/secret", 2)
    async with stream.listener("app/**", start_sequence=forged) as changes:
        (change,) = await take(changes, 1)
        await assert_nothing_more(changes)
    assert (change.path, change.version, change.sequence) == ("app/secret", 2, real)
    assert changes.skipped == 1


@pytest.mark.parametrize(
    ("pattern", "subject", "matching", "other"),
    [
        (
            "app/db-*/password",
            "app.*.password",
            ["app/db-main/password", "app/db-/password"],
            ["app/cache/password", "app/db-main/user", "app/db-main/password/old"],
        ),
        (
            "app/**/password",
            "app.>",
            ["app/password", "app/a/b/password"],
            ["app/a/user", "app/password/x", "other/password"],
        ),
        ("**/db", ">", ["db", "x/y/db"], ["x/dbx", "db/x"]),
    ],
)
async def test_pattern_nats_cannot_express_is_filtered_client_side(
    stream: Stream, pattern: str, subject: str, matching: list[str], other: list[str]
) -> None:
    for path in [*other, *matching]:
        await stream.publish(path)

    async with stream.listener(pattern, start_sequence=1) as changes:
        assert changes.subject == f"{stream.prefix}.changed.{subject}"
        got = await take(changes, len(matching))
        await assert_nothing_more(changes)

    assert [c.path for c in got] == matching


async def test_closing_from_another_task_ends_iteration(stream: Stream) -> None:
    listener = stream.listener(start_sequence=1)
    seen: list[str] = []

    async def consume() -> None:
        async for change in listener:
            seen.append(change.path)

    async with listener:
        task = asyncio.create_task(consume())
        await stream.publish("app/a")
        while not seen:
            await asyncio.wait_for(asyncio.sleep(0.01), TIMEOUT)
        await listener.aclose()
        await asyncio.wait_for(task, TIMEOUT)

    assert seen == ["app/a"]
    with pytest.raises(StopAsyncIteration):
        await anext(listener)


async def test_listeners_survive_a_nats_server_restart_without_loss_or_repeats(
    tmp_path: Path,
) -> None:
    server = NatsServer(store_dir=tmp_path / "js")
    await asyncio.to_thread(server.start)
    try:
        nc = await asyncio.wait_for(
            nats_client.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1),
            TIMEOUT,
        )
        js = nc.jetstream()

        async def publish(path: str) -> None:
            payload = event_encoder.encode(updated(path))
            await asyncio.wait_for(
                js.publish(changed_subject("r", path), payload, timeout=1.0), TIMEOUT
            )

        options: dict[str, Any] = {"prefix": "r", "heartbeat": 0.5, "connect_timeout": TIMEOUT}
        try:
            await asyncio.wait_for(ensure_stream(js, "r"), TIMEOUT)
            await publish("app/a")
            async with (
                ChangeListener(server.url, start_sequence=1, **options) as seen_one,
                ChangeListener(server.url, **options) as seen_none,
            ):
                assert [c.path for c in await take(seen_one, 1)] == ["app/a"]
                await asyncio.to_thread(server.restart)
                await publish("app/b")
                # Each ordered consumer is recreated after missed heartbeats; the one that had
                # seen nothing restarts from sequence 1, and the listener drops "app/a" again.
                for changes in (seen_one, seen_none):
                    got = await take(changes, 1)
                    assert [(c.path, c.sequence) for c in got] == [("app/b", 2)]
                    await assert_nothing_more(changes)
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_missing_stream_raises_connection_error(stream: Stream) -> None:
    listener = ChangeListener(stream.url, prefix=stream.prefix, stream="NO_SUCH_STREAM")
    with pytest.raises(ConnectionError, match="NO_SUCH_STREAM"):
        async with listener:
            pass

"""The watch feed and the SSE writer without a server: filtering, bounds, slow readers, the end
of a stream (token expiry, shutdown); the bus is a stand-in that never connects."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from schemas.events import SecretUpdated, event_encoder
from service.http.watch import _events
from service.watch.feed import TooManyStreams, WatchFeed


class Js:
    """What the writer asks JetStream for a new stream: the newest sequence."""

    async def stream_info(self, name: str) -> Any:
        return SimpleNamespace(state=SimpleNamespace(first_seq=1, last_seq=7))


class Bus:
    prefix = "secrets"
    instance_id = "here"
    js = Js()
    connected = True


def feed(**options: Any) -> WatchFeed:
    return WatchFeed(Bus(), **options)  # type: ignore[arg-type]


def frame(sequence: int, path: str = "app/db") -> tuple[tuple[int, str, bytes], str]:
    event = SecretUpdated(
        event_id=f"e{sequence}",
        path=path,
        version=sequence + 1,
        actor="a",
        instance_id="i",
        time="t",
    )
    return (sequence, "secret.updated", event_encoder.encode(event)), path


async def collect(body: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in body]


def test_a_stream_gets_only_paths_below_its_prefix_that_its_caller_may_read() -> None:
    hub = feed()
    watch = hub.open("bob", "app", lambda path: not path.endswith("secret"))
    for item, path in (frame(1, "app/db"), frame(2, "application/x"), frame(3, "app/secret")):
        watch.offer(item, path)
    watch.offer(*frame(4, "app"))
    assert [watch.queue.get_nowait()[0] for _ in range(watch.queue.qsize())] == [1, 4]


def test_streams_are_bounded_per_caller_and_per_instance() -> None:
    hub = feed(max_streams=3, max_per_caller=2)
    first = hub.open("bob", "", lambda path: True)
    hub.open("bob", "", lambda path: True)
    with pytest.raises(TooManyStreams):
        hub.open("bob", "", lambda path: True)
    hub.open("carol", "", lambda path: True)
    with pytest.raises(TooManyStreams):
        hub.open("dave", "", lambda path: True)
    hub.close(first)
    hub.open("bob", "", lambda path: True)  # a closed stream frees its place


async def test_a_slow_reader_is_cut_off_after_what_was_queued() -> None:
    hub = feed(queue_size=2)
    watch = hub.open("bob", "", lambda path: True)
    for sequence in range(1, 6):
        watch.offer(*frame(sequence))
    assert watch.overflowed.is_set()
    chunks = await collect(_events(hub, watch, None, time.time() + 60, heartbeat=10))
    assert chunks[:2] == [b"retry: 1000\n\n", b"id: 7\n\n"]  # a resume point at once
    assert [c.split(b"\n")[0] for c in chunks[2:4]] == [b"id: 1", b"id: 2"]
    assert chunks[-1] == b'event: end\ndata: {"reason":"overflow"}\n\n'
    assert not hub.watches and hub.overflows == 1


async def test_a_stream_ends_at_its_tokens_expiry() -> None:
    hub = feed()
    watch = hub.open("bob", "", lambda path: True)
    started = time.monotonic()
    chunks = await collect(_events(hub, watch, None, time.time() + 0.3, heartbeat=10))
    assert chunks[-1] == b'event: end\ndata: {"reason":"token_expired"}\n\n'
    assert time.monotonic() - started < 5


async def test_a_stopping_service_ends_every_stream() -> None:
    hub = feed()
    watch = hub.open("bob", "", lambda path: True)
    watch.offer(*frame(1))
    hub.stop_all()
    chunks = await collect(_events(hub, watch, None, time.time() + 60, heartbeat=10))
    assert chunks[2].startswith(b"id: 1\n")
    assert chunks[-1] == b'event: end\ndata: {"reason":"shutdown"}\n\n'
    assert not hub.watches


def test_a_frame_is_one_sse_event_with_the_sequence_as_its_id() -> None:
    from service.http.watch import _frame

    item, _ = frame(42)
    text = _frame(item).decode()
    lines = text.split("\n")
    assert lines[:2] == ["id: 42", "event: secret.updated"]
    assert lines[2].startswith("data: {") and text.endswith("\n\n") and "\n" not in lines[2][6:]


async def test_this_instance_applies_an_event_before_any_stream_hears_of_it() -> None:
    from tests.fakes import RecordingHandler

    handler = RecordingHandler()
    hub = WatchFeed(Bus(), coherence=handler)  # type: ignore[arg-type]
    seen: list[int] = []

    def may_read(path: str) -> bool:
        seen.append(len(handler.changes))  # what the cache knew when the stream was offered it
        return True

    hub.open("bob", "", may_read)
    item, _ = frame(3)
    msg = SimpleNamespace(
        data=item[2],
        subject="secrets.changed.app.db",
        metadata=SimpleNamespace(sequence=SimpleNamespace(stream=3)),
    )
    await hub._on_message(msg)
    assert handler.changes == [("app/db", 4)] and seen == [1]


class ReplayJs(Js):
    """A replay consumer on a replica still catching up: it says nothing is pending at each
    message, though the stream's leader reported a newer last sequence."""

    def __init__(self) -> None:
        self.subscribed_from = 0

    async def subscribe(self, subject: str, **options: Any) -> Any:
        self.subscribed_from = options["config"].opt_start_seq
        messages = [
            SimpleNamespace(
                data=frame(sequence)[0][2],
                subject="secrets.changed.app.db",
                metadata=SimpleNamespace(sequence=SimpleNamespace(stream=sequence), num_pending=0),
            )
            for sequence in range(self.subscribed_from, 8)
        ]

        class Sub:
            async def next_msg(self, timeout: float) -> Any:
                return messages.pop(0)

            async def unsubscribe(self) -> None:
                pass

        return Sub()


async def test_a_replay_goes_on_to_the_last_sequence_whatever_num_pending_says() -> None:
    bus = Bus()
    bus.js = ReplayJs()
    hub = WatchFeed(bus)  # type: ignore[arg-type]
    watch = hub.open("bob", "", lambda path: True)
    got = [item async for item in hub.replay(watch, 4)]
    assert [item[0] for item in got if isinstance(item, tuple)] == [5, 6, 7]
    assert watch.floor == 7

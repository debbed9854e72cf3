"""`WatchFeed`: the change stream (JetStream `SECRETS_EVENTS`) fanned out to the HTTP watch
streams of this instance, each filtered by its prefix and by what its caller may read.

One ordered push consumer per instance reads every new event, whatever the number of streams:
a thousand idle streams cost a thousand small queues, not a thousand consumers. A stream that
resumes (`Last-Event-ID`) first replays the stored events after that sequence with an ordered
consumer of its own, while live events queue behind; those it already replayed are skipped, so
nothing is missed and nothing comes twice. Each stream's queue is bounded: a reader too slow to
keep up is cut off (`overflow`) rather than buffered without limit, and resumes where it was.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.errors import Error as NatsError
from nats.js import api as js_api
from nats.js.errors import Error as JsError

from events.bus import CHANGE_STREAM, ChangeHandler, EventBus, check_event
from events.subjects import path_from_subject
from schemas.errors import BackendUnavailable, SecretsError
from schemas.events import (
    ChangeEvent,
    NewVersionEvent,
    SecretDeleted,
    SecretDestroyed,
    SecretUndeleted,
    event_decoder,
)

__all__ = ["STOP", "Frame", "TooManyStreams", "Watch", "WatchFeed"]

log = logging.getLogger("secrets.watch")

Frame = tuple[int, str, bytes]
"""(stream sequence, event type, the event's JSON): one SSE event to send."""
STOP: Frame = (-1, "", b"")
"""Queued by `Watch.stop`: the writer ends the stream with `end: shutdown`."""


class TooManyStreams(SecretsError):
    status = 429
    code = "too_many_streams"


@dataclass(eq=False)
class Watch:
    """One HTTP watch stream: what it wants, and the queue of what it gets."""

    caller: str
    prefix: str
    may_read: Callable[[str], bool]
    queue: asyncio.Queue[Frame]
    floor: int = 0  # events at or below this sequence were sent already (by a replay)
    overflowed: asyncio.Event = field(default_factory=asyncio.Event)
    end_reason: str = "shutdown"  # what `end` says once STOP is dequeued

    def wants(self, path: str) -> bool:
        prefix = self.prefix
        if prefix and not (path == prefix or path.startswith(prefix + "/")):
            return False
        return self.may_read(path)

    def stop(self, reason: str = "shutdown") -> None:
        """End the stream: the writer sends what is queued, then `end` with `reason`."""
        self.end_reason = reason
        try:
            self.queue.put_nowait(STOP)
        except asyncio.QueueFull:
            self.overflowed.set()

    def offer(self, frame: Frame, path: str) -> None:
        if frame[0] <= self.floor or self.overflowed.is_set() or not self.wants(path):
            return
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.overflowed.set()  # the writer ends the stream; the reader resumes from its id


class WatchFeed:
    def __init__(
        self,
        bus: EventBus,
        *,
        coherence: ChangeHandler | None = None,
        max_streams: int = 2000,
        max_per_caller: int = 16,
        queue_size: int = 256,
    ) -> None:
        self.bus = bus
        # The manager: an event goes to this instance's cache before any stream hears of it, so
        # a client re-reading on the event never gets the old version back from this instance.
        self.coherence = coherence
        self.max_streams = max_streams
        self.max_per_caller = max_per_caller
        self.queue_size = queue_size
        self.watches: set[Watch] = set()
        self._per_caller: dict[str, int] = {}
        self._sub: Any = None
        self._down = False  # NATS dropped: events may be missed until it is back
        self.last_seen = 0  # the newest sequence the live consumer delivered
        self._resubscribing = asyncio.Lock()  # one new consumer at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self.overflows = 0  # streams cut off for being slow (a plain int, for metrics)

    @property
    def ready(self) -> bool:
        return self._sub is not None and self.bus.connected and not self._down

    async def start(self) -> None:
        """Subscribe to new change events (an ordered consumer: it re-creates itself after a
        gap or a reconnect)."""
        await self._subscribe()
        self.bus.state_listeners.append(self._on_bus_state)

    async def _subscribe(self) -> None:
        """The live consumer: new events at the start, and after a resubscription every event
        after the last one delivered, so that none falls between two consumers."""
        js = self.bus.js
        if js is None:
            raise BackendUnavailable("NATS is not connected")
        if self.last_seen:
            policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            config = js_api.ConsumerConfig(opt_start_seq=self.last_seen + 1)
        else:
            policy, config = js_api.DeliverPolicy.NEW, None
        self._sub = await js.subscribe(
            f"{self.bus.prefix}.changed.>",
            stream=CHANGE_STREAM,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
            cb=self._on_message,
        )

    async def watchdog(self, interval: float = 2.0) -> None:
        """Until cancelled: if the stream moved on twice in a row while the live consumer
        delivered nothing (a consumer lost in a JetStream failover stays silent), subscribe
        again from the last event delivered."""
        stalled = 0
        while True:
            await asyncio.sleep(interval)
            js = self.bus.js
            if js is None or self._sub is None or not self.bus.connected:
                continue
            seen = self.last_seen
            try:
                last = int((await js.stream_info(CHANGE_STREAM)).state.last_seq)
            except (NatsError, JsError, TimeoutError):
                continue
            stalled = stalled + 1 if last > seen and self.last_seen == seen else 0
            if stalled >= 2:
                log.warning("watch feed stalled; subscribing again", extra={"from": seen + 1})
                stalled = 0
                await self._resubscribe()

    def _on_bus_state(self, up: bool) -> None:
        log.debug("watch feed sees the bus", extra={"up": up})
        """NATS dropped: end every stream (`end: unavailable`), so that clients apply their
        fallback bound and resume later; back: a new live consumer, and streams resume with
        Last-Event-ID (the replay covers the gap)."""
        if not up:
            self._down = True
            for watch in list(self.watches):
                watch.stop("unavailable")
            return
        task = asyncio.get_running_loop().create_task(self._resubscribe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resubscribe(self) -> None:
        async with self._resubscribing:
            old, self._sub = self._sub, None
            if old is not None:
                try:
                    await old.unsubscribe()
                except (NatsError, JsError):
                    pass
            delay = 0.5
            while True:  # until it works, or the service stops (cancelled)
                try:
                    await self._subscribe()
                except (NatsError, JsError, TimeoutError, SecretsError) as exc:
                    log.warning(
                        "watch feed not resubscribed yet", extra={"error_type": type(exc).__name__}
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                self._down = False
                return

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except (NatsError, JsError):
                pass

    def open(self, caller: str, prefix: str, may_read: Callable[[str], bool]) -> Watch:
        """Register a stream; TooManyStreams (429) beyond the instance's or the caller's bound."""
        if len(self.watches) >= self.max_streams:
            raise TooManyStreams("this instance serves as many watch streams as it may")
        if self._per_caller.get(caller, 0) >= self.max_per_caller:
            raise TooManyStreams(f"at most {self.max_per_caller} watch streams per caller")
        watch = Watch(caller, prefix, may_read, asyncio.Queue(self.queue_size))
        self.watches.add(watch)
        self._per_caller[caller] = self._per_caller.get(caller, 0) + 1
        return watch

    def stop_all(self) -> None:
        """End every stream (the service stops); each writer sends `end: shutdown`."""
        for watch in list(self.watches):
            watch.stop()

    def close(self, watch: Watch) -> None:
        if watch in self.watches:
            self.watches.discard(watch)
            left = self._per_caller.get(watch.caller, 1) - 1
            if left:
                self._per_caller[watch.caller] = left
            else:
                self._per_caller.pop(watch.caller, None)
            if watch.overflowed.is_set():
                self.overflows += 1

    async def _on_message(self, msg: Any) -> None:
        decoded = self._decode(msg.data, msg.subject)
        if decoded is None:
            self.last_seen = max(self.last_seen, msg.metadata.sequence.stream)
            return
        event, kind = decoded
        coherence = self.coherence
        if coherence is not None and event.instance_id != self.bus.instance_id:
            # The bus's own subscription may deliver it later: applying it twice is harmless.
            if isinstance(event, NewVersionEvent):
                coherence.apply_change(event.path, event.version)
            elif isinstance(event, SecretDeleted | SecretUndeleted | SecretDestroyed):
                coherence.apply_lifecycle(event)
        frame = (msg.metadata.sequence.stream, kind, msg.data)
        self.last_seen = max(self.last_seen, frame[0])
        for watch in list(self.watches):
            watch.offer(frame, event.path)

    def _decode(self, data: bytes, subject: str) -> tuple[ChangeEvent, str] | None:
        """The event and its type, if it is well formed and its path is its subject's: what the
        bus would drop is not sent either."""
        try:
            event = event_decoder.decode(data)
            if path_from_subject(self.bus.prefix, subject) != event.path:
                return None
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            return None
        if check_event(event) is not None:
            return None
        return event, str(event.__struct_config__.tag)

    async def last_sequence(self) -> int:
        """The stream's newest sequence: a new stream's first `id`, its resume point."""
        js = self.bus.js
        if js is None:
            raise BackendUnavailable("NATS is not connected")
        info = await js.stream_info(CHANGE_STREAM)
        return int(info.state.last_seq)

    async def replay(self, watch: Watch, after: int) -> AsyncIterator[Frame | int]:
        """The stored events after sequence `after` that `watch` wants, oldest first; then its
        floor is the last sequence looked at. An int instead of a frame means the stream no
        longer holds what came right after `after`: it is the first sequence it still has."""
        js = self.bus.js
        if js is None:
            raise BackendUnavailable("NATS is not connected")
        info = await js.stream_info(CHANGE_STREAM)
        first, last = info.state.first_seq, info.state.last_seq
        log.debug("watch replay", extra={"after": after, "first": first, "last": last})
        if after + 1 < first or after > last:
            yield first  # a gap, or a sequence from another stream: the client starts over
            watch.floor = last
            return
        watch.floor = after
        if after >= last:
            return
        sub = await js.subscribe(
            f"{self.bus.prefix}.changed.>",
            stream=CHANGE_STREAM,
            ordered_consumer=True,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            config=js_api.ConsumerConfig(opt_start_seq=after + 1),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=5.0)
                except TimeoutError:
                    # Short of `last`: never a silent gap; the writer ends the stream and the
                    # client resumes from what it got.
                    raise BackendUnavailable("the replay stopped short") from None
                sequence = msg.metadata.sequence.stream
                decoded = self._decode(msg.data, msg.subject)
                if decoded is not None and watch.wants(decoded[0].path):
                    yield (sequence, decoded[1], msg.data)
                watch.floor = sequence
                # Up to `last` as the stream's leader reported it, not until `num_pending` says
                # 0: a consumer placed on a replica still catching up (a node just back) counts
                # pending against that replica's copy, and stopping there skipped an event.
                if sequence >= last:
                    break
        finally:
            try:
                await sub.unsubscribe()
            except (NatsError, JsError):
                pass

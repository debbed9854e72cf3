"""Freshness for bench/watch_bench.py: a PATCH on instance B reaching the cache of a client
watching instance A, for `AsyncSecretsClient` and `SecretsClient`, 1,000 writes each.

Each write is timed from the moment B's answer is in to the moment the client's cache no longer
holds the old version: the client's public eviction counter (`stats.evictions`), watched by a
thread. A plain SSE reader of A's stream (`RawStream`, no client library) says which version
each event was for, so that a late duplicate of an older one is not taken for the write's own,
and how much of the delay is the service's and NATS's rather than the client's.
"""

# Where the time goes (bench/results/watch.json; py-spy --gil on A over 1,000 writes, --py-spy):
# - p50 ~1.5-2.1 ms from B's answer to the eviction: the event is at a core NATS subscriber on
#   A's node after ~0.6 ms (B publishes in a background task as it answers, then a route hop);
#   at a JetStream ordered consumer there, as A's feed subscribes, after ~1.0-1.4 ms (stored on
#   the three nodes first); at a plain SSE reader of A's stream after ~1.4-1.7 ms (A's feed, the
#   stream's queue, the StreamingResponse, the socket); in the client's cache 0.05-0.4 ms later
#   (its reading and decoding, and the poller's own resolution, ~170 µs between looks).
# - A's CPU per event is small: ~70 µs in the fan-out (WatchFeed._on_message: decoding, checks,
#   two streams offered it) and ~35 µs per stream writing it out (the _events generator, which
#   makes a Task per `asyncio.wait_for` on Python 3.11, and StreamingResponse); A held the GIL
#   ~2 ms per write of this loop, mostly to answer the bench's own re-read (a GET that reads
#   Vault). The ~0.5 ms from the consumer to the wire is turns of the event loop on two cores
#   shared by three NATS nodes, OpenBao, two instances and the bench, not work.
# - The p99 (3-4.5 ms over the runs so far, goal 5) follows JetStream's (2.7-4 ms): the margin is
#   the machine's, and most of the way is NATS's, not the watch stream's.
# - A's version watcher (SECRETS_VAULT_POLL_INTERVAL, 10 s) sometimes announces a write of B's
#   as its own `vault-direct` change, when its poll lands between B's Vault write and B's event
#   reaching A: a second event for that version (`duplicate_events`). It evicts once more; when
#   it arrives during the next write's window it could pass for that write's, so such a write is
#   left out (`disturbed`) rather than timed.

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import httpx
import nats
import rotation_bench
import run as bench
from nats.js.api import DeliverPolicy

from events.bus import CHANGE_STREAM
from events.subjects import changed_subject
from schemas.secret import Secret
from secrets_client import AsyncSecretsClient, CacheStats, SecretsClient

__all__ = ["bench_freshness", "until"]

POLL_S = 20e-6  # the eviction poller's sleep between looks (it lets the GIL go)
EVICTION_TIMEOUT_S = 2.0
T = TypeVar("T")


def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise bench.BenchError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Subject(NamedTuple):
    """What the freshness loop needs of a client, the same for both kinds."""

    get: Callable[[str], Secret]
    stats: Callable[[], CacheStats]
    connected: Callable[[], bool]


class EvictionPoller:
    """A thread that notes when a client's eviction counter moves past a mark: the client's own
    thread or event loop does the eviction, this one only looks (and lets the GIL go between
    looks), so the moment is known to within a poll interval (reported)."""

    def __init__(self, evictions: Callable[[], int]) -> None:
        self.evictions = evictions
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="poller")
        self.intervals: list[float] = []

    def arm(self, mark: int) -> concurrent.futures.Future[int | None]:
        started = threading.Event()
        future = self.pool.submit(self._wait, mark, started)
        started.wait()
        return future

    def _wait(self, mark: int, started: threading.Event) -> int | None:
        first = time.monotonic_ns()
        deadline = first + int(EVICTION_TIMEOUT_S * 1e9)
        polls = 0
        started.set()
        while True:
            now = time.monotonic_ns()
            if self.evictions() > mark:
                if polls:
                    self.intervals.append((now - first) / polls / 1000)
                return now
            if now > deadline:
                return None
            polls += 1
            time.sleep(POLL_S)

    def close(self) -> None:
        self.pool.shutdown()


class RawStream:
    """A plain reader of an instance's watch stream (no client library), in a thread: when each
    event for one path arrived, by version. It tells what the eviction counter cannot: which
    version an eviction was for (a duplicate of an older one may come late), and how much of
    the delay is the service's and NATS's rather than the client's."""

    def __init__(self, url: str, token: str, path: str) -> None:
        self.path = path
        self.arrivals: dict[int, list[int]] = {}  # version -> monotonic ns, one per event
        self._http = httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=None))
        self._response: httpx.Response | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(token,), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise bench.BenchError("the raw watch stream did not open")

    def _read(self, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with contextlib.suppress(httpx.HTTPError, OSError):
            with self._http.stream("GET", "/secrets:watch", headers=headers) as response:
                self._response = response
                self._ready.set()
                data = None
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data = line.removeprefix("data:").strip()
                    elif line == "" and data is not None:
                        now = time.monotonic_ns()
                        event = json.loads(data)
                        if event.get("path") == self.path:
                            self.arrivals.setdefault(event["version"], []).append(now)
                        data = None

    def first(self, version: int, timeout: float = EVICTION_TIMEOUT_S) -> int | None:
        deadline = time.monotonic() + timeout
        while version not in self.arrivals:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0005)
        return self.arrivals[version][0]

    def older_between(self, version: int, start: int, end: int) -> bool:
        """Whether an event for a version before `version` arrived between `start` and `end`."""
        return any(
            start <= t <= end for v, ts in list(self.arrivals.items()) if v < version for t in ts
        )

    def close(self) -> None:
        response = self._response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread
        self._thread.join(5)
        self._http.close()


class LoopThread:
    """An event loop in a thread, for the async client: its watch task runs there, while the
    freshness loop (the same code for both clients) calls it from this thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.call(self._cancel_the_rest())  # nats-py leaves an ordered consumer's tasks behind
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    @staticmethod
    async def _cancel_the_rest() -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class NatsTap:
    """Two plain NATS subscribers on A's node, their callbacks run by `loop`: when each change
    event of `path` was published (a core subscriber: the message as B sent it, before it is
    stored) and when a JetStream ordered push consumer got it (stored, replicated: what A's
    watch feed subscribes with), by version."""

    def __init__(self, loop: LoopThread, url: str, path: str) -> None:
        self.published: dict[int, int] = {}
        self.consumed: dict[int, int] = {}
        self.loop = loop
        self.nc = loop.call(nats.connect(url))
        subject = changed_subject("secrets", path)
        loop.call(self.nc.subscribe(subject, cb=self._noting(self.published)))
        js = self.nc.jetstream()
        loop.call(
            js.subscribe(
                subject, stream=CHANGE_STREAM, ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW, cb=self._noting(self.consumed),
            )
        )  # fmt: skip

    @staticmethod
    def _noting(arrivals: dict[int, int]) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def on_message(msg: Any) -> None:
            now = time.monotonic_ns()
            arrivals.setdefault(json.loads(msg.data)["version"], now)

        return on_message

    def close(self) -> None:
        self.loop.call(self.nc.close())


def _freshness(
    client: Subject, on_b: httpx.Client, raw: RawStream, tap: NatsTap, writes: int
) -> dict[str, Any]:
    """`writes` PATCHes of `raw.path` on B, each timed from B's answer to the client's eviction,
    the path cached (with the version before the write) each time the PATCH is sent."""
    path = raw.path

    def evictions() -> int:
        return client.stats().evictions

    def write(version: int) -> int:
        body = {"data": bench.secret_data(), "version": version}
        response = on_b.patch(f"/secrets/{path}", json=body)
        if response.status_code != 200:
            raise bench.BenchError(f"PATCH on B answered {response.status_code}")
        new: int = response.json()["version"]
        return new

    version = write(0)
    if raw.first(version) is None:
        raise bench.BenchError("the first write's event never came")
    client.get(path)  # starts the client's watch stream
    until(client.connected, "the client's watch stream")
    warmup = min(20, writes // 10)
    poller = EvictionPoller(evictions)
    evicted: list[float] = []
    seen: list[float] = []  # B's answer -> the event at the raw reader
    acks: dict[int, int] = {}  # version -> B's answer, of the writes timed
    count = dict.fromkeys(
        ("before_ack", "lost", "disturbed", "refills", "stale_after_event", "stale_before_event"),
        0,
    )
    try:
        for n in range(warmup + writes):
            for _ in range(50):  # a read the stream marked stale is not cached: read again
                read_at = time.monotonic_ns()
                got = client.get(path).version
                if got < version:
                    # The service answered an older version than B's: had the client seen
                    # the event already, it now caches an old version until the next event.
                    first = raw.arrivals.get(version, [read_at + 1])[0]
                    count["stale_after_event" if first < read_at else "stale_before_event"] += 1
                if client.stats().entries:
                    break
                count["refills"] += 1
            armed = time.monotonic_ns()
            future = poller.arm(evictions())
            version = write(version)
            acked = time.monotonic_ns()
            at = future.result()
            arrived = raw.first(version)
            if n < warmup:
                continue
            if at is None or arrived is None:
                count["lost"] += 1
            elif raw.older_between(version, armed, at + 1_000_000):
                count["disturbed"] += 1  # a late event for an older version may have evicted
            else:
                count["before_ack"] += at <= acked
                evicted.append(max(0, at - acked) / 1e6)
                seen.append(max(0, arrived - acked) / 1e6)
                acks[version] = acked
    finally:
        poller.close()
    if not evicted:
        raise bench.BenchError("no write reached the client's cache")
    deadline = time.monotonic() + 5  # the taps' last events (counted: `count` of each)
    while not all(v in tap.consumed for v in acks) and time.monotonic() < deadline:
        time.sleep(0.01)

    def after_ack(arrivals: dict[int, int]) -> dict[str, float]:
        return bench.summary_ms(
            [max(0, arrivals[v] - acked) / 1e6 for v, acked in acks.items() if v in arrivals]
        )

    duplicates = sum(len(ts) - 1 for ts in raw.arrivals.values())
    return {
        **bench.summary_ms(evicted),
        "mean_ms": round(statistics.fmean(evicted), 3),
        "raw_stream": bench.summary_ms(seen),
        "nats_published": after_ack(tap.published),
        "jetstream_consumer": after_ack(tap.consumed),
        **{f"evicted_{k}" if k == "before_ack" else k: v for k, v in count.items()},
        "duplicate_events": duplicates,
        "poll_interval_us_median": round(statistics.median(poller.intervals), 1),
    }


def _async_subject(loop: LoopThread, client: AsyncSecretsClient) -> Subject:
    return Subject(
        lambda path: loop.call(client.get(path)),
        lambda: client.stats,
        lambda: client.stream_connected,
    )


def _blocking_subject(client: SecretsClient) -> Subject:
    return Subject(client.get, lambda: client.stats, lambda: client.stream_connected)


def bench_freshness(
    a: bench.Child,
    b: bench.Child,
    nats_url: str,
    reader: str,
    writer: str,
    writes: int,
    py_spy: Path | None = None,
) -> dict[str, Any]:
    """Both clients on A (`nats_url`: A's NATS node), writes through B, one after the other;
    `py_spy`: where to write the collapsed stacks of A (its Python CPU) during the first."""
    print(f"watch: freshness x {writes} writes, each client ...", file=sys.stderr)
    headers = {"Authorization": f"Bearer {writer}"}
    figures: dict[str, Any] = {}
    with contextlib.ExitStack() as stop:
        on_b = stop.enter_context(
            httpx.Client(base_url=b.url, headers=headers, timeout=10, trust_env=False)
        )
        taps, loop = LoopThread(), LoopThread()  # the client's loop runs nothing else
        stop.callback(taps.close)
        stop.callback(loop.close)
        for kind in ("async_client", "blocking_client"):
            path = f"app/bench/fresh-{kind.split('_')[0]}-{os.urandom(4).hex()}"
            with contextlib.ExitStack() as done:
                raw = RawStream(a.url, reader, path)
                done.callback(raw.close)
                tap = NatsTap(taps, nats_url, path)
                done.callback(tap.close)
                if kind == "async_client":
                    aclient = AsyncSecretsClient(a.url, token=reader)
                    done.callback(loop.call, aclient.aclose())
                    subject = _async_subject(loop, aclient)
                else:
                    client = SecretsClient(a.url, token=reader)
                    subject = _blocking_subject(done.enter_context(client))
                spy = py_spy if kind == "async_client" else None
                with rotation_bench.profiled(a.pid, spy):
                    figures[kind] = _freshness(subject, on_b, raw, tap, writes)
    for name, f in figures.items():
        print(f"  {name}: p50 {f['p50_ms']} ms, p99 {f['p99_ms']} ms, max {f['max_ms']} ms; "
              f"p50/p99 at the raw stream {f['raw_stream']['p50_ms']}/"
              f"{f['raw_stream']['p99_ms']} ms, JetStream {f['jetstream_consumer']['p50_ms']}/"
              f"{f['jetstream_consumer']['p99_ms']} ms, NATS {f['nats_published']['p50_ms']}/"
              f"{f['nats_published']['p99_ms']} ms; disturbed {f['disturbed']}, lost "
              f"{f['lost']}, stale after the event {f['stale_after_event']}, duplicates "
              f"{f['duplicate_events']}", file=sys.stderr)  # fmt: skip
    return {
        "writes": writes,
        **figures,
        "note": (
            "PATCH on instance B (one keep-alive httpx.Client) -> the client's watch stream on "
            "instance A (another NATS node) evicts the path: from B's answer being in to the "
            "client's eviction counter (stats.evictions) moving, polled by a thread; the async "
            "client's loop runs in a thread of its own. The path is cached before each write "
            "(read again after each eviction, untimed). raw_stream: the same writes' events at a "
            "plain SSE reader of A's stream (no client library); jetstream_consumer: at an "
            "ordered push consumer on A's NATS node, as A's feed subscribes; nats_published: at "
            "a core NATS subscriber there (as published, before JetStream stored it). "
            "evicted_before_ack: the event came first (0 ms). disturbed: an event for an older "
            "version (a duplicate: A's version watcher announces what it finds in Vault before "
            "B's event reached A) arrived in the window, so the eviction may not be this "
            "write's: left out. stale_after_event: A answered the re-read with an older version "
            "after the client had the event (the client then caches it until the next event); "
            "refills: reads not cached because an event came meanwhile"
        ),
    }

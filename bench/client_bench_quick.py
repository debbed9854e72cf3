"""A quick look at the client library's cached `get` (issue 14's targets: median <= 2 us async,
<= 5 us blocking), without a service: an httpx.MockTransport answers the one read and holds the
watch stream open, so every timed call is a hit with the stream up. Prints medians; writes nothing.

    .venv/bin/python bench/client_bench_quick.py

Against the real stack, beside the HTTP round trip: bench/watch_bench.py (`make bench`).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx

from secrets_client import AsyncSecretsClient, SecretsClient

PATH = "app/bench/s0000"
BODY = json.dumps(
    {"path": PATH, "version": 1, "data": {"password": "x" * 32}, "created_time": "t"}
).encode()
BATCH = 10_000
ROUNDS = 15
STREAM_HEADERS = {"Content-Type": "text/event-stream"}


class _Held(httpx.SyncByteStream):
    def __init__(self, released: threading.Event) -> None:
        self.released = released

    def __iter__(self) -> Iterator[bytes]:
        yield b"retry: 1000\n\n"
        self.released.wait()


class _AsyncHeld(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        await asyncio.Event().wait()  # until the client's watch task is cancelled


def _per_call_us(batches: list[float]) -> float:
    return round(statistics.median(batches) / BATCH * 1e6, 3)


def blocking() -> float:
    released = threading.Event()

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(":watch"):
            return httpx.Response(200, headers=STREAM_HEADERS, stream=_Held(released))
        return httpx.Response(200, content=BODY)

    with SecretsClient("http://bench.test", token="t", transport=httpx.MockTransport(answer)) as c:
        c.get(PATH)
        while not c.stream_connected:
            time.sleep(0.001)
        c.get(PATH)
        get, hits, batches = c.get, c.stats.hits, []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(BATCH):
                get(PATH)
            batches.append(time.perf_counter() - started)
        assert c.stats.hits - hits == ROUNDS * BATCH, "a timed call missed"
        released.set()
    return _per_call_us(batches)


async def asynchronous() -> float:
    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(":watch"):
            return httpx.Response(200, headers=STREAM_HEADERS, stream=_AsyncHeld())
        return httpx.Response(200, content=BODY)

    transport = httpx.MockTransport(answer)
    async with AsyncSecretsClient("http://bench.test", token="t", transport=transport) as c:
        await c.get(PATH)
        while not c.stream_connected:
            await asyncio.sleep(0.001)
        await c.get(PATH)
        get, hits, batches = c.get, c.stats.hits, []
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(BATCH):
                await get(PATH)
            batches.append(time.perf_counter() - started)
        assert c.stats.hits - hits == ROUNDS * BATCH, "a timed call missed"
    return _per_call_us(batches)


def main() -> None:
    figures = {"async_median_us": asyncio.run(asynchronous()), "blocking_median_us": blocking()}
    print(json.dumps({**figures, "calls_per_batch": BATCH, "batches": ROUNDS}))


if __name__ == "__main__":
    main()

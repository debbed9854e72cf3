"""service/http/protocol.py: a response's writes leave as one send; nothing is held past a loop
turn, lost at close, or reordered.

Request heads, over real sockets to a tiny app behind HttpProtocol on loopback: more than 16 KiB
of request line and headers is 414 or 431 and a closed connection, however it is split or
pipelined; a head trickled past its deadline, and a connection that never sends, are closed;
pipelined requests and unread bodies are read no further ahead than their turn."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, NamedTuple

import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.server import ServerState

from devstack import free_port
from service.http.protocol import HEAD_LIMIT, HEAD_TIMEOUT, HttpProtocol, _CoalescingTransport
from tests.support import (
    _Server,
)


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True


def coalescing() -> tuple[_CoalescingTransport, RecordingTransport]:
    inner = RecordingTransport()
    proxy: Any = inner
    return _CoalescingTransport(proxy, asyncio.get_running_loop()), inner


async def test_writes_in_one_loop_turn_leave_as_one_write_at_its_end() -> None:
    transport, inner = coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"")  # nothing to send: no effect
    transport.write(b"{}")
    assert inner.writes == []
    await asyncio.sleep(0)
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


async def test_writes_in_separate_turns_stay_separate_and_in_order() -> None:
    transport, inner = coalescing()
    for chunk in (b"a", b"b", b"c"):
        transport.write(chunk)
        await asyncio.sleep(0)
    assert inner.writes == [b"a", b"b", b"c"]


async def test_a_complete_response_is_sent_at_once_not_at_the_end_of_the_turn() -> None:
    transport, inner = coalescing()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    transport.write(b"{}")
    transport.send_now()  # what HttpProtocol.on_response_complete does
    assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)  # the scheduled send finds nothing left
    assert len(inner.writes) == 1


async def test_close_sends_what_is_kept_first() -> None:
    transport, inner = coalescing()
    transport.write(b"last words")
    transport.close()
    assert inner.writes == [b"last words"] and inner.closed
    await asyncio.sleep(0)  # the scheduled send finds nothing left
    assert inner.writes == [b"last words"]


async def test_nothing_is_written_to_a_transport_closed_meanwhile() -> None:
    transport, inner = coalescing()
    transport.write(b"late")
    inner.closed = True  # the peer went away before the turn ended
    await asyncio.sleep(0)
    assert inner.writes == []


async def test_other_calls_reach_the_transport() -> None:
    transport, inner = coalescing()
    transport.pause_reading()
    assert inner.paused and transport.is_closing() is False


# -- request heads: size, deadline, idle connections, concurrency ------------------------


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


async def tiny_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers every request with its path and how many headers it had; reads no body."""
    body = json.dumps({"path": scope["path"], "headers": len(scope["headers"])}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(app: Any = tiny_app, **options: Any) -> AsyncIterator[uvicorn.Server]:
    """`app` on a free loopback port behind HttpProtocol; `server.config.port` is the port."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_config=None, lifespan="off",
        http=HttpProtocol, **options,
    )  # fmt: skip
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def connect(server: uvicorn.Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.config.port)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 10.0) -> Answer:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    """True once the server ends the connection (EOF or reset) within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            return await reader.read(1) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


def get(url: str = "/", *, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"GET {url} HTTP/1.1", "host: test", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def head_of(size: int, url: str = "/") -> bytes:
    """A GET whose request line and headers together are exactly `size` bytes."""
    bare = len(get(url, headers=[("x-pad", "")]))
    return get(url, headers=[("x-pad", "p" * (size - bare))])


def assert_refused(answer: Answer, status: int) -> None:
    assert answer.status == status
    assert answer.headers["connection"] == "close"
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.body)["error"] == "too_large"


async def test_a_url_beyond_16_kib_gets_414_and_the_connection_closed() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(get("/" + "u" * 20 * 1024))
        assert_refused(await read_answer(reader), 414)
        assert await closed_by_server(reader)
        await close(writer)


@pytest.mark.parametrize(
    "headers",
    [
        [(f"x-filler-{i:03}", "f" * 40) for i in range(400)],  # many headers, 20 KiB in all
        [("x-huge", "h" * 20 * 1024)],  # one header of 20 KiB
    ],
    ids=["many-headers", "one-huge-header"],
)
async def test_headers_beyond_16_kib_get_431_and_the_connection_closed(
    headers: list[tuple[str, str]],
) -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(get("/", headers=headers))
        assert_refused(await read_answer(reader), 431)
        assert await closed_by_server(reader)
        await close(writer)


@pytest.mark.parametrize("pieces", [1, 7], ids=["one-write", "seven-writes"])
async def test_a_head_of_exactly_16_kib_is_served(pieces: int) -> None:
    request = head_of(HEAD_LIMIT)
    assert len(request) == 16 * 1024
    async with serving() as server:
        reader, writer = await connect(server)
        step = -(-len(request) // pieces)
        for start in range(0, len(request), step):
            writer.write(request[start : start + step])
            await writer.drain()
            await asyncio.sleep(0.01)  # separate reads on the server
        assert (await read_answer(reader)).status == 200
        writer.write(get())  # and the connection stays usable
        assert (await read_answer(reader)).status == 200
        await close(writer)


async def test_one_byte_over_16_kib_is_refused() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(head_of(HEAD_LIMIT + 1))
        assert_refused(await read_answer(reader), 431)
        await close(writer)


async def test_a_url_just_under_16_kib_is_served() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(get("/" + "u" * 16_000))
        answer = await read_answer(reader)
        assert answer.status == 200 and len(json.loads(answer.body)["path"]) == 16_001
        await close(writer)


async def test_pipelined_requests_are_each_held_to_the_limit_on_their_own() -> None:
    burst = b"".join([head_of(12 * 1024, f"/{i}") for i in range(4)] + [get("/small")] * 200)
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(burst)  # 48 KiB of large heads then 200 small ones, in one write
        answers = [await read_answer(reader) for _ in range(204)]
        assert [a.status for a in answers] == [200] * 204
        assert [json.loads(a.body)["path"] for a in answers[:5]] == [
            "/0", "/1", "/2", "/3", "/small",
        ]  # fmt: skip
        await close(writer)


async def test_keep_alive_requests_are_each_held_to_the_limit_on_their_own() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        for i in range(6):  # 72 KiB of heads on one connection
            writer.write(head_of(12 * 1024, f"/{i}"))
            assert (await read_answer(reader)).status == 200
        await close(writer)


async def test_a_request_after_a_body_in_the_same_write_is_counted_from_its_first_byte() -> None:
    body = b"b" * 40 * 1024
    post = b"POST /p HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(post + head_of(12 * 1024, "/after") + get("/last"))
        answers = [await read_answer(reader) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 200]
        assert json.loads(answers[1].body)["path"] == "/after"
        await close(writer)


async def test_an_oversize_head_pipelined_after_a_request_is_refused_after_its_answer() -> None:
    async with serving() as server:
        reader, writer = await connect(server)
        writer.write(get("/first") + get("/", headers=[("x-huge", "h" * 20 * 1024)]))
        first = await read_answer(reader)
        assert first.status == 200 and json.loads(first.body)["path"] == "/first"
        assert_refused(await read_answer(reader), 431)
        assert await closed_by_server(reader)
        await close(writer)


async def test_two_connections_sending_8_mib_of_headers_each_are_refused_and_closed() -> None:
    async def attack(server: uvicorn.Server) -> tuple[Answer | None, bool, int]:
        reader, writer = await connect(server)
        sent = 0

        async def flood() -> None:
            nonlocal sent
            writer.write(b"GET / HTTP/1.1\r\nhost: test\r\nx-flood: ")
            with contextlib.suppress(ConnectionError):
                while sent < 8 * 1024 * 1024:
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    sent += 65536

        flooding = asyncio.get_running_loop().create_task(flood())
        try:
            answer = await read_answer(reader, timeout=20)
        except (ConnectionError, asyncio.IncompleteReadError):
            answer = None  # the reset overtook the answer
        closed = await closed_by_server(reader)
        await asyncio.wait_for(flooding, 20)
        await close(writer)
        return answer, closed, sent

    async with serving() as server:
        results = await asyncio.gather(attack(server), attack(server))
        for answer, closed, sent in results:
            assert closed
            assert answer is not None
            assert_refused(answer, 431)
            assert sent < 8 * 1024 * 1024  # cut off long before the end
        deadline = time.monotonic() + 5
        while server.server_state.connections:  # the server kept neither
            assert time.monotonic() < deadline, "the server still holds the connections"
            await asyncio.sleep(0.02)


class SocketLikeTransport(RecordingTransport):
    """What uvicorn's protocol asks of a socket transport, with reading paused or not."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Any = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def resume_reading(self) -> None:
        self.paused = False

    def get_protocol(self) -> Any:
        return self.protocol


async def feed(chunks: Sequence[bytes], responses: int) -> tuple[list[int], bool]:
    """Give `chunks` to one HttpProtocol as successive reads (while it reads), then return the
    statuses of the first `responses` answers and whether it closed the connection."""
    config = uvicorn.Config(tiny_app, http=HttpProtocol, lifespan="off", log_config=None)
    config.load()
    loop = asyncio.get_running_loop()
    protocol = HttpProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = SocketLikeTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    for chunk in chunks:
        while transport.paused and not transport.closed:
            assert time.monotonic() < deadline, "reading never resumed"
            await asyncio.sleep(0)
        if transport.closed:
            break
        protocol.data_received(chunk)
    while b"".join(transport.writes).count(b"HTTP/1.1 ") < responses:
        assert time.monotonic() < deadline, b"".join(transport.writes)[-500:]
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", b"".join(transport.writes))]
    closed = transport.closed
    protocol.connection_lost(None)
    return statuses, closed


def request(rng: random.Random, head: int, i: int) -> bytes:
    """A request with a head of `head` bytes; one in three carries a body of up to 40 KiB."""
    if rng.random() < 0.33:
        body = b"b" * rng.randint(1, 40 * 1024)
        bare = f"POST /{i} HTTP/1.1\r\nhost: test\r\ncontent-length: {len(body)}\r\nx-pad: "
        pad = head - len(bare) - 4
        return f"{bare}{'p' * pad}\r\n\r\n".encode() + body
    return head_of(head, f"/{i}")


def split(rng: random.Random, stream: bytes) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(1, 40))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


async def test_any_split_of_pipelined_requests_with_heads_up_to_12_kib_serves_them_all() -> None:
    rng = random.Random(20261130)
    for _ in range(40):
        heads = [rng.choice([200, 1500, rng.randint(200, 12 * 1024)]) for _ in range(8)]
        stream = b"".join(request(rng, head, i) for i, head in enumerate(heads))
        statuses, closed = await feed(split(rng, stream), len(heads))
        assert statuses == [200] * len(heads) and not closed


async def test_any_split_of_a_stream_with_an_oversize_head_answers_the_others_then_431() -> None:
    rng = random.Random(20261201)
    for _ in range(40):
        before = rng.randint(0, 4)
        stream = b"".join(request(rng, rng.randint(200, 12 * 1024), i) for i in range(before))
        stream += head_of(rng.randint(HEAD_LIMIT + 1, 3 * HEAD_LIMIT)) + get("/never")
        statuses, closed = await feed(split(rng, stream), before + 1)
        assert statuses == [200] * before + [431] and closed


async def test_pipelined_requests_are_parsed_no_further_ahead_than_one_piece() -> None:
    release = asyncio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        await tiny_app(scope, receive, send)

    small = get("/p")
    count = 256 * 1024 // len(small)
    async with serving(held) as server:
        reader, writer = await connect(server)
        writer.write(small * count)  # a quarter MiB of requests, answered one at a time
        await writer.drain()
        await asyncio.sleep(0.5)
        (protocol,) = server.server_state.connections
        assert isinstance(protocol, HttpProtocol)  # as `serving` configures it
        queued = len(protocol.pipeline)
        assert 0 < queued <= 4096 // len(small) + 1  # not the ~4,000 of one 128 KiB read
        release.set()
        for _ in range(count):
            assert (await read_answer(reader)).status == 200
        await close(writer)


def test_the_head_deadline_is_ten_seconds_and_the_head_limit_16_kib_by_default() -> None:
    assert HEAD_TIMEOUT == HttpProtocol.head_timeout == 10.0
    assert HEAD_LIMIT == HttpProtocol.head_limit == 16 * 1024


async def test_a_head_trickled_a_byte_at_a_time_is_dropped_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(HttpProtocol, "head_timeout", 1.0)  # 10 s in production
    async with serving() as server:
        reader, writer = await connect(server)
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in get("/", headers=[("x-slow", "s" * 1000)]):
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.05)

        trickling = asyncio.get_running_loop().create_task(trickle())
        try:
            assert await closed_by_server(reader, timeout=8)
            assert time.monotonic() - started >= 0.9  # not before the deadline
        finally:
            trickling.cancel()
            await close(writer)


async def test_each_head_on_a_connection_gets_its_own_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(HttpProtocol, "head_timeout", 3.0)
    async with serving() as server:
        reader, writer = await connect(server)
        for i in range(2):  # 2 x 1.5 s on one connection: more than one deadline in all
            request = get(f"/{i}")
            for start in range(0, len(request), len(request) // 5 + 1):
                writer.write(request[start : start + len(request) // 5 + 1])
                await writer.drain()
                await asyncio.sleep(0.3)
            assert (await read_answer(reader)).status == 200
        await close(writer)


async def test_a_connection_that_never_sends_a_byte_is_closed_at_the_keep_alive_timeout() -> None:
    async with serving(timeout_keep_alive=1) as server:
        reader, writer = await connect(server)
        assert await closed_by_server(reader, timeout=8)
        await close(writer)


async def test_a_body_the_app_does_not_read_yet_stops_being_read_at_the_high_water_mark() -> None:
    release = asyncio.Event()

    async def slow_reader(scope: Any, receive: Any, send: Any) -> None:
        await release.wait()
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    total = 8 * 1024 * 1024
    async with serving(slow_reader) as server:
        reader, writer = await connect(server)
        writer.write(b"POST / HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n" % total)

        async def stream() -> None:
            for _ in range(total // 65536):
                writer.write(b"b" * 65536)
                await writer.drain()

        streaming = asyncio.get_running_loop().create_task(stream())
        (protocol,) = server.server_state.connections
        assert isinstance(protocol, HttpProtocol)  # as `serving` configures it
        deadline = time.monotonic() + 10
        while not protocol.flow.read_paused:
            assert time.monotonic() < deadline, "uvicorn never paused reading"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        held = len(protocol.cycle.body)
        assert held <= HIGH_WATER_LIMIT + 256 * 1024  # the mark plus at most one read
        assert not streaming.done()  # the client is held back by TCP, not buffered for
        release.set()
        assert (await read_answer(reader, timeout=30)).body == str(total).encode()
        await streaming
        await close(writer)

"""service/server.py: a response's writes leave as one send; nothing is held past a loop turn,
lost at close, or reordered; and the real service answers through it (tests/support.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from service.server import _CoalescingTransport
from tests.support import bearer, running_service, service_settings, write_policy


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


@pytest.mark.integration
async def test_the_service_answers_whole_over_keep_alive_through_it(
    openbao: Any, nats: Any, oidc: Any, tmp_path: Any
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path))
    token = oidc.mint("writer")
    async with running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            body = {"data": {"k": "v" * 5000}, "version": 0}  # a body of several segments
            written = await client.patch("/secrets/app/coalesce", json=body, headers=bearer(token))
            assert written.status_code == 200
            for _ in range(50):  # one connection: each answer must end where it says
                read = await client.get("/secrets/app/coalesce", headers=bearer(token))
                assert read.status_code == 200 and read.json()["data"] == body["data"]
            missing = await client.get("/secrets/app/none-here", headers=bearer(token))
            assert missing.status_code == 404

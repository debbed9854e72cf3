"""HvacBackend over several Vault nodes: which failures move a call on to the next node (any for a
read; for a CAS write only those proving it was not applied), and that every call, hvac's too,
goes to the node in use. Fake nodes are small loopback servers; a real cluster: tests/integration.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from devstack import free_port
from schemas.errors import VaultUnavailable
from service.vault.nodes import NodeRing, retry_on_next
from tests import support
from tests.support import backend_for
from tests.unit.service.vault.test_backend import HostilePeer, Request

no_proxy_settings = support.no_proxy_settings
pytestmark = pytest.mark.usefixtures("no_proxy_settings")

CREATED = "2026-11-28T00:00:00Z"
READ = {"data": {"data": {"user": "app"}, "metadata": {"version": 3, "created_time": CREATED}}}
WRITTEN = {"data": {"version": 4, "created_time": CREATED}}
LISTED = {"data": {"keys": ["db"]}}
NO_ACTIVE = {"errors": ["local node not active but active cluster node not found"]}
SEALED = {"errors": ["Vault is sealed"]}


# -- the rules, as a table ---------------------------------------------------------------------


def _payload(document: Any) -> bytes:
    return json.dumps(document).encode()


@pytest.mark.parametrize(
    ("status", "payload", "read", "write"),
    [
        (200, b"{}", False, False),
        (400, _payload({"errors": ["check-and-set parameter did not match"]}), False, False),
        (403, _payload({"errors": ["permission denied"]}), False, False),
        (404, _payload({"errors": []}), False, False),
        (307, b"", True, True),
        (503, _payload(SEALED), True, True),
        (500, _payload(NO_ACTIVE), True, True),
        (500, _payload({"errors": ["node is not the leader"]}), True, True),
        (500, _payload({"errors": ["internal error"]}), True, False),
        (500, b"not json", True, False),
        (502, b"", True, False),
        (504, b"", True, False),
    ],
)
def test_an_answer_moves_a_read_on_when_the_node_failed_and_a_write_only_when_not_applied(
    status: int, payload: bytes, read: bool, write: bool
) -> None:
    assert retry_on_next(status, payload, None, idempotent=True) is read
    assert retry_on_next(status, payload, None, idempotent=False) is write


def _connector_error() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))


@pytest.mark.parametrize(
    ("error", "write"),
    [
        (_connector_error(), True),
        (aiohttp.ConnectionTimeoutError("connect"), True),
        (aiohttp.ServerDisconnectedError(), False),
        (aiohttp.ClientOSError(104, "reset"), False),
        (aiohttp.SocketTimeoutError("read"), False),
        (TimeoutError(), False),
    ],
    ids=["refused", "connect-timeout", "disconnected", "reset", "read-timeout", "timeout"],
)
def test_a_transport_failure_moves_a_read_on_and_a_write_only_when_nothing_was_sent(
    error: BaseException, write: bool
) -> None:
    assert retry_on_next(None, b"", error, idempotent=True)
    assert retry_on_next(None, b"", error, idempotent=False) is write


def test_a_burst_of_failures_on_one_node_moves_the_ring_one_step() -> None:
    ring = NodeRing(["http://a:8200", "http://b:8200/", "http://c:8200"])
    first = ring.current
    moved = [ring.move_on(first) for _ in range(5)]  # five callers saw `a` fail
    assert {node.addr for node in moved} == {"http://b:8200"}
    assert ring.switches == 1
    assert ring.move_on(ring.current).addr == "http://c:8200"
    assert ring.move_on(ring.current).addr == "http://a:8200"  # round again
    assert ring.switches == 3


def test_a_single_node_never_moves() -> None:
    ring = NodeRing(["http://a:8200"])
    assert ring.move_on(ring.current) is ring.current
    assert ring.switches == 0


# -- the backend against fake nodes ------------------------------------------------------------

Behaviour = Callable[["FakeNode", str, str], Awaitable[bytes | None]]
"""What a fake node does with a request (method, path): the bytes to answer, or None to close
the connection without a word after reading it."""


def http(status: int, document: Any = None) -> bytes:
    body = b"" if document is None else json.dumps(document).encode()
    head = b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % (status, len(body)) + body


def answering(status: int, document: Any = None) -> Behaviour:
    async def behave(node: FakeNode, method: str, path: str) -> bytes | None:
        return http(status, document)

    return behave


async def healthy(node: FakeNode, method: str, path: str) -> bytes | None:
    if method == "LIST":
        return http(200, LISTED)
    return http(200, WRITTEN if method == "POST" else READ)


async def dropping(node: FakeNode, method: str, path: str) -> bytes | None:
    return None  # read the request, then close: the write's fate is unknown


async def hanging(node: FakeNode, method: str, path: str) -> bytes | None:
    await asyncio.sleep(30)
    return None


class FakeNode(HostilePeer):
    """A Vault node on loopback (test_backend's HostilePeer) answering as `behaviour` says;
    `seen`: the (method, target) of every request it read."""

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(self._answer)
        self.behaviour = behaviour

    @property
    def seen(self) -> list[tuple[str, str]]:
        return [(request.method, request.target) for request in self.requests]

    async def _answer(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        reply = await self.behaviour(self, request.method, request.target)
        if reply is None:
            return False  # close without an answer
        writer.write(reply)
        return True


MakeNodes = Callable[..., Awaitable[list[FakeNode]]]


@pytest.fixture
async def nodes() -> AsyncIterator[MakeNodes]:
    started: list[FakeNode] = []

    async def make(*behaviours: Behaviour) -> list[FakeNode]:
        made = [FakeNode(b) for b in behaviours]
        for node in made:
            await node.start()
            started.append(node)
        return made

    yield make
    for node in started:
        await node.stop()


def closed_addr() -> str:
    """A loopback address nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


async def test_a_read_moves_on_at_once_from_a_node_refusing_connections_and_stays_there(
    nodes: MakeNodes,
) -> None:
    (second,) = await nodes(healthy)
    async with backend_for(f"{closed_addr()},{second.addr}") as backend:
        assert (await backend.read("app/db")).version == 3
        assert (await backend.read("app/db")).version == 3
        assert backend.node_switches == 1
    assert len(second.seen) == 2


@pytest.mark.parametrize(
    "failure",
    [
        answering(503, SEALED),
        answering(500, NO_ACTIVE),
        answering(500, {"errors": ["internal error"]}),
        answering(307),
        answering(502),
        dropping,
    ],
    ids=["sealed", "no-active-node", "500", "redirect", "bad-gateway", "dropped"],
)
async def test_a_read_moves_on_from_a_node_that_failed_it(
    nodes: MakeNodes, failure: Behaviour
) -> None:
    first, second = await nodes(failure, healthy)
    async with backend_for(f"{first.addr},{second.addr}") as backend:
        assert (await backend.read("app/db")).version == 3
    assert second.seen[0] == ("GET", "/v1/secret/data/app/db")


async def test_a_read_moves_on_from_a_node_that_does_not_answer_in_time(
    nodes: MakeNodes,
) -> None:
    first, second = await nodes(hanging, healthy)
    async with backend_for(f"{first.addr},{second.addr}", timeout=0.5) as backend:
        assert (await backend.read("app/db")).version == 3


@pytest.mark.parametrize(
    "not_applied",
    [answering(503, SEALED), answering(500, NO_ACTIVE), answering(307)],
    ids=["sealed", "no-active-node", "redirect"],
)
async def test_a_write_moves_on_when_the_node_says_it_could_not_process_it(
    nodes: MakeNodes, not_applied: Behaviour
) -> None:
    first, second = await nodes(not_applied, healthy)
    async with backend_for(f"{first.addr},{second.addr}") as backend:
        written = await backend.write("app/db", {"user": "app"}, cas=3)
    assert written.version == 4
    assert [m for m, _ in first.seen] == ["POST"]
    assert [m for m, _ in second.seen] == ["POST"]


async def test_a_write_moves_on_when_its_connection_was_refused(nodes: MakeNodes) -> None:
    (second,) = await nodes(healthy)
    async with backend_for(f"{closed_addr()},{second.addr}") as backend:
        assert (await backend.write("app/db", {"user": "app"}, cas=3)).version == 4


@pytest.mark.parametrize(
    ("unknown", "timeout"),
    [
        (dropping, 2.0),
        (hanging, 0.5),
        (answering(500, {"errors": ["internal error"]}), 2.0),
        (answering(502), 2.0),
    ],
    ids=["dropped-after-sending", "no-answer-in-time", "500", "bad-gateway"],
)
async def test_a_write_whose_fate_is_unknown_is_never_sent_again_and_fails_503(
    nodes: MakeNodes, unknown: Behaviour, timeout: float
) -> None:
    first, second = await nodes(unknown, healthy)
    async with backend_for(f"{first.addr},{second.addr}", timeout=timeout) as backend:
        with pytest.raises(VaultUnavailable) as raised:
            await backend.write("app/db", {"user": "app"}, cas=3)
        assert raised.value.status == 503
        assert backend.node_switches == 0
    assert [m for m, _ in first.seen] == ["POST"]
    assert second.seen == []


async def test_when_every_node_fails_a_read_tries_each_once_and_fails_503(
    nodes: MakeNodes,
) -> None:
    made = await nodes(*[answering(503, SEALED)] * 3)
    async with backend_for(",".join(n.addr for n in made)) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db")
    assert [len(n.seen) for n in made] == [1, 1, 1]


async def test_hvac_calls_go_to_the_node_in_use_and_move_on_from_a_failed_one(
    nodes: MakeNodes,
) -> None:
    first, second, third = await nodes(answering(503, SEALED), answering(503, SEALED), healthy)
    async with backend_for(f"{first.addr},{second.addr},{third.addr}") as backend:
        assert await backend.list_keys("app") == ["db"]  # hvac, in a thread: 503, 503, 200
        assert (await backend.read("app/db")).version == 3  # aiohttp: on the node that served
        await backend.delete_versions("app/db", [1])
    assert [len(first.seen), len(second.seen)] == [1, 1]
    assert [m for m, _ in third.seen] == ["LIST", "GET", "POST"]


async def test_concurrent_reads_failing_on_a_node_move_the_backend_one_step(
    nodes: MakeNodes,
) -> None:
    first, second, third = await nodes(answering(503, SEALED), healthy, healthy)
    async with backend_for(f"{first.addr},{second.addr},{third.addr}") as backend:
        reads = await asyncio.gather(*(backend.read("app/db") for _ in range(20)))
        assert {r.version for r in reads} == {3}
        assert backend.node_switches == 1
    assert third.seen == []


async def test_a_single_address_behaves_as_before(nodes: MakeNodes) -> None:
    (only,) = await nodes(answering(503, SEALED))
    async with backend_for(only.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db")
        assert backend.node_switches == 0
    assert len(only.seen) == 1

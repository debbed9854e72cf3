"""HvacBackend's HTTP to Vault, against hostile peers on loopback: small asyncio servers that
send raw bytes (interim 1xx answers, odd statuses and shapes, answers cut short, too long or
never sent, a second unasked-for answer), over TLS and through proxies; and the AppRole
re-login's rate limit. TLS against a real `bao server -dev-tls`: tests/integration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from schemas.errors import (
    ConfigError,
    NotFound,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from schemas.secret import SecretData
from service.vault.backend import HvacBackend
from tests import support
from tests.support import backend_for, eventually

CREATED = "2026-11-28T00:00:00Z"


def read_document(data: Any, version: Any = 3) -> dict[str, Any]:
    return {"data": {"data": data, "metadata": {"version": version, "created_time": CREATED}}}


READ_ANSWER = read_document({"user": "app"})

# Fixtures of tests/support.py, shared with tests/integration.
ca = support.ca
no_proxy_settings = support.no_proxy_settings


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    reader: asyncio.StreamReader = field(repr=False, compare=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


Handler = Callable[[Request, asyncio.StreamWriter], Awaitable[bool]]


@dataclass
class HostilePeer:
    """A TCP (or TLS) server on loopback answering each request with the bytes `handler`
    writes; `handler` returns False to close the connection without a word."""

    handler: Handler
    tls: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    handled: int = 0  # requests whose handler has returned or failed
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def addr(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                request = await read_request(reader)
                self.requests.append(request)
                try:
                    if not await self.handler(request, writer):
                        break
                    await writer.drain()
                finally:
                    self.handled += 1
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> Request:
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head.decode("latin-1").split("\r\n")
    method, target, _ = line.split(" ", 2)
    headers = {}
    for entry in fields:
        if entry:
            name, _, value = entry.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Request(method, target, headers, body, reader)


def answer(
    status: int, document: Any, *, close: bool = False, extra: bytes = b"", reason: bytes = b"X"
) -> bytes:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n"
        % (status, reason, len(body), b"Connection: close\r\n" if close else b"", extra)
    ) + body


def replying(reply: bytes, *, keep_open: bool = True) -> Handler:
    async def handler(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply)
        await writer.drain()
        return keep_open

    return handler


MakePeer = Callable[..., Awaitable[HostilePeer]]
"""The `peer` fixture: starts a HostilePeer with the handler (and TLS context) given."""


@pytest.fixture
async def peer() -> AsyncIterator[MakePeer]:
    servers: list[HostilePeer] = []

    async def make(handler: Handler, tls: ssl.SSLContext | None = None) -> HostilePeer:
        server = HostilePeer(handler, tls)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


async def outcome(call: Awaitable[Any]) -> Any:
    """What a call gave, as data or as the name of what it raised (for one readable assert)."""
    try:
        result = await call
    except Exception as exc:
        return type(exc).__name__
    return result.data.reveal()


# -- (a) interim 1xx answers -----------------------------------------------------------------

OWNERS = {"alice/db": {"owner": "alice", "password": "alice-pw"}, "bob/db": {"owner": "bob"}}


@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
    ],
    ids=["100-continue", "103-early-hints", "two-interims"],
)
async def test_interim_answers_before_each_real_one_never_hand_a_path_another_paths_secret(
    peer: MakePeer, interim: bytes
) -> None:
    async def proxy_with_interims(request: Request, writer: asyncio.StreamWriter) -> bool:
        path = request.path.removeprefix("/v1/secret/data/")
        writer.write(interim)
        await writer.drain()
        # The real answer in a segment of its own, as a proxy relaying Vault's answer sends it.
        await asyncio.sleep(0.05)
        writer.write(answer(200, read_document(OWNERS[path])))
        return True

    server = await peer(proxy_with_interims)
    seen = []
    async with backend_for(server.addr) as backend:
        for n, path in enumerate(["alice/db", "bob/db"] * 2, start=1):
            seen.append((path, await outcome(backend.read(path))))

            def answered(n: int = n) -> bool:
                return server.handled >= n

            await eventually(answered)  # each real answer is out before the next read starts
    # The old client took the interim answer for the whole response (a KeyError, a 500) and
    # pooled the connection with alice's real answer unread: bob's read returned alice's secret.
    assert seen == [(path, OWNERS[path]) for path in ["alice/db", "bob/db"] * 2]


async def test_a_second_unasked_for_answer_is_never_taken_for_the_next_reads(
    peer: MakePeer,
) -> None:
    async def smuggling(request: Request, writer: asyncio.StreamWriter) -> bool:
        path = request.path.removeprefix("/v1/secret/data/")
        writer.write(answer(200, read_document(OWNERS[path])))
        writer.write(answer(200, read_document(OWNERS["alice/db"])))  # never asked for
        return True

    server = await peer(smuggling)
    async with backend_for(server.addr) as backend:
        seen = [(path, await outcome(backend.read(path))) for path in ["alice/db", "bob/db"] * 2]
    assert seen == [(path, OWNERS[path]) for path in ["alice/db", "bob/db"] * 2]


# -- (b) statuses and shapes a call does not expect ------------------------------------------

_HUGE = 2 * 1024 * 1024
_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

ODD_READ_ANSWERS = {
    "204-kv-v1": b"HTTP/1.1 204 No Content\r\n\r\n",
    "307-standby": answer(
        307, b"", extra=b"Location: http://127.0.0.1:9/v1/secret/data/app/db\r\n"
    ),
    "500": answer(500, {"errors": ["internal error"]}),
    "502": answer(502, b"<html>bad gateway</html>"),
    "429": answer(429, {"errors": ["rate limited"]}),
    "412": answer(412, {"errors": ["required index state not present"]}),
    "not-json": answer(200, b"not json at all"),
    "json-array": answer(200, [1, 2, 3]),
    "json-string": answer(200, "data"),
    "data-null": answer(200, {"data": None}),
    "no-metadata": answer(200, {"data": {"data": {"k": "v"}}}),
    "no-version": answer(200, {"data": {"data": {}, "metadata": {"created_time": CREATED}}}),
    "version-string": answer(200, read_document({}, "3")),
    "version-float": answer(200, read_document({}, 3.5)),
    "version-bool": answer(200, read_document({}, True)),
    "version-zero": answer(200, read_document({}, 0)),
    "version-huge": answer(200, read_document({}, 10**30)),
    "data-a-list": answer(200, read_document(["k", "v"])),
    "created-time-a-number": answer(
        200, {"data": {"data": {}, "metadata": {"version": 3, "created_time": 5}}}
    ),
    "gzip-unasked": answer(200, b"\x1f\x8b\x08\x00", extra=b"Content-Encoding: gzip\r\n"),
    "huge-declared": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (_HUGE,) + b" " * _HUGE,
    "huge-chunked": _CHUNKED_HEAD + b"%x\r\n%s\r\n" % (_HUGE, b" " * _HUGE) + b"0\r\n\r\n",
    "truncated": b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"data":',
    "not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "closed-without-a-word": b"",
}


@pytest.mark.parametrize("reply", ODD_READ_ANSWERS.values(), ids=ODD_READ_ANSWERS.keys())
async def test_a_read_answered_oddly_is_backend_unavailable_and_nothing_else(
    peer: MakePeer, reply: bytes
) -> None:
    server = await peer(replying(reply, keep_open=False))
    async with backend_for(server.addr) as backend:
        for _ in range(2):
            with pytest.raises(VaultUnavailable) as caught:
                await backend.read("app/db")
            assert "OpenSSH" not in str(caught.value) and "json" not in str(caught.value)
    # A connection that carried a broken exchange is never used again.
    assert server.connections >= 2


async def test_a_redirect_is_not_followed_and_the_token_stays_home(peer: MakePeer) -> None:
    elsewhere = await peer(replying(answer(200, READ_ANSWER)))
    location = f"Location: {elsewhere.addr}/v1/secret/data/app/db\r\n".encode()
    standby = await peer(replying(answer(307, b"", extra=location)))
    async with backend_for(standby.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db")
        with pytest.raises(VaultUnavailable):
            await backend.write("app/db", {"k": "v"}, 1)
        with pytest.raises(VaultUnavailable):
            await backend.list_keys("app")  # hvac, through requests
        with pytest.raises(VaultUnavailable):
            await backend.delete_versions("app/db", [1])  # a 307 is not "done"
    assert elsewhere.requests == []


async def test_a_read_of_a_version_answered_with_another_version_is_unavailable(
    peer: MakePeer,
) -> None:
    server = await peer(replying(answer(200, read_document({"k": "v"}, 4))))
    async with backend_for(server.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db", 3)
        assert (await backend.read("app/db", 4)).version == 4


ODD_WRITE_ANSWERS = {
    "204-kv-v1": b"HTTP/1.1 204 No Content\r\n\r\n",
    "no-data": answer(200, {"warnings": ["x"]}),
    "no-version": answer(200, {"data": {"created_time": CREATED}}),
    "version-string": answer(200, {"data": {"version": "2", "created_time": CREATED}}),
    "version-null": answer(200, {"data": {"version": None, "created_time": CREATED}}),
    "400-other": answer(400, {"errors": ["invalid request"]}),
    "400-not-json": answer(400, b"check-and-set parameter did not match (not JSON)"),
}


@pytest.mark.parametrize("reply", ODD_WRITE_ANSWERS.values(), ids=ODD_WRITE_ANSWERS.keys())
async def test_a_write_answered_oddly_is_backend_unavailable(peer: MakePeer, reply: bytes) -> None:
    server = await peer(replying(reply))
    async with backend_for(server.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.write("app/db", {"k": "v"}, 1)


ODD_METADATA_ANSWERS = {
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "no-current-version": answer(200, {"data": {"versions": {}}}),
    "current-version-string": answer(200, {"data": {"current_version": "7"}}),
    "versions-a-list": answer(
        200,
        {
            "data": {
                "current_version": 1,
                "created_time": CREATED,
                "updated_time": CREATED,
                "versions": [{"created_time": CREATED}],
            }
        },
    ),
    "version-key-not-a-number": answer(
        200,
        {
            "data": {
                "current_version": 1,
                "created_time": CREATED,
                "updated_time": CREATED,
                "versions": {"one": {"created_time": CREATED}},
            }
        },
    ),
}


@pytest.mark.parametrize("reply", ODD_METADATA_ANSWERS.values(), ids=ODD_METADATA_ANSWERS.keys())
async def test_metadata_answered_oddly_is_backend_unavailable(peer: MakePeer, reply: bytes) -> None:
    server = await peer(replying(reply))
    async with backend_for(server.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.read_metadata("app/db")
        with pytest.raises(VaultUnavailable):
            await backend.current_version("app/db")


ODD_LIST_ANSWERS = {
    "204": b"HTTP/1.1 204 No Content\r\n\r\n",
    "keys-a-string": answer(200, {"data": {"keys": "app/"}}),
    "keys-of-numbers": answer(200, {"data": {"keys": [1, 2]}}),
    "no-data": answer(200, {"auth": None}),
}


@pytest.mark.parametrize("reply", ODD_LIST_ANSWERS.values(), ids=ODD_LIST_ANSWERS.keys())
async def test_a_listing_answered_oddly_is_backend_unavailable(
    peer: MakePeer, reply: bytes
) -> None:
    server = await peer(replying(reply))
    async with backend_for(server.addr) as backend:
        with pytest.raises(VaultUnavailable):
            await backend.list_keys("app")


async def test_a_server_that_never_answers_times_out_within_the_deadline(peer: MakePeer) -> None:
    async def silent(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.Event().wait()  # until the client gives up and the server stops
        return False

    server = await peer(silent)
    observed: list[tuple[str, str | None]] = []

    def observer(op: str, _seconds: float, error: str | None) -> None:
        observed.append((op, error))

    async with backend_for(server.addr, timeout=0.3, observer=observer) as backend:
        started = time.monotonic()
        with pytest.raises(VaultUnavailable) as caught:
            await backend.write("app/db", {"k": "v"}, 0)
        assert time.monotonic() - started < 0.3 * 2 + 1
        assert "timed out" in str(caught.value)
    assert observed == [("write", "timeout")]  # the metric's label


async def test_statuses_map_to_service_errors(peer: MakePeer) -> None:
    replies = iter(
        [
            answer(404, {"errors": []}),
            answer(400, {"errors": ["check-and-set parameter did not match the current version"]}),
            answer(
                200,
                {
                    "data": {
                        "current_version": 7,
                        "created_time": CREATED,
                        "updated_time": CREATED,
                        "versions": {},
                    }
                },
            ),
            answer(503, {"errors": ["Vault is sealed"]}),
            answer(403, {"errors": ["permission denied"]}),
        ]
    )

    async def scripted(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(next(replies))
        return True

    server = await peer(scripted)
    async with backend_for(server.addr) as backend:
        with pytest.raises(NotFound):
            await backend.read("app/db", 9)
        with pytest.raises(VersionConflict) as conflict:
            await backend.write("app/db", {"k": "v"}, 2)
        assert conflict.value.current_version == 7
        with pytest.raises(VaultUnavailable):
            await backend.read("app/db")
        with pytest.raises(VaultAccessDenied):
            await backend.read("app/db")
    first, cas, metadata = server.requests[:3]
    assert (first.method, first.target) == ("GET", "/v1/secret/data/app/db?version=9")
    assert first.headers["x-vault-token"] == "t0ken"
    assert json.loads(cas.body)["options"] == {"cas": 2}
    assert (metadata.method, metadata.target) == ("GET", "/v1/secret/metadata/app/db")


async def test_a_write_of_secret_data_sends_its_values(peer: MakePeer) -> None:
    server = await peer(replying(answer(200, {"data": {"version": 2, "created_time": CREATED}})))
    async with backend_for(server.addr) as backend:
        # A rollback writes an old version's data as read: a SecretData, not a dict.
        secret = await backend.write("app/db", SecretData({"user": "app"}), 1)
    assert secret.version == 2
    (request,) = server.requests
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {"options": {"cas": 1}, "data": {"user": "app"}}


async def test_chunked_answers_are_read_whole(peer: MakePeer) -> None:
    body = json.dumps(READ_ANSWER).encode()

    async def chunked(request: Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(_CHUNKED_HEAD)
        for i in range(0, len(body), 7):
            piece = body[i : i + 7]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return True

    server = await peer(chunked)
    async with backend_for(server.addr) as backend:
        assert (await backend.read("app/db")).data.reveal() == {"user": "app"}
        assert (await backend.read("app/db")).version == 3
    assert server.connections == 1


# -- (c) keep-alive, and what is sent again ----------------------------------------------------


async def test_sequential_reads_share_one_connection(peer: MakePeer) -> None:
    server = await peer(replying(answer(200, READ_ANSWER)))
    async with backend_for(server.addr) as backend:
        for _ in range(20):
            secret = await backend.read("app/db")
            assert secret.version == 3 and secret.data.reveal() == {"user": "app"}
    assert server.connections == 1
    assert {(r.method, r.target) for r in server.requests} == {("GET", "/v1/secret/data/app/db")}


async def test_concurrent_reads_open_no_more_connections_than_the_concurrency(
    peer: MakePeer,
) -> None:
    async def slow(request: Request, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.01)
        writer.write(answer(200, READ_ANSWER))
        return True

    server = await peer(slow)
    async with backend_for(server.addr, concurrency=4) as backend:
        secrets = await asyncio.gather(*(backend.read("app/db") for _ in range(64)))
    assert {s.version for s in secrets} == {3}
    assert server.connections <= 4


async def test_a_read_on_a_connection_the_server_closed_is_sent_again_on_a_new_one(
    peer: MakePeer,
) -> None:
    # Answers, then closes without saying so (no Connection: close), as after an idle limit.
    server = await peer(replying(answer(200, READ_ANSWER), keep_open=False))
    async with backend_for(server.addr) as backend:
        for _ in range(5):
            assert (await backend.read("app/db")).version == 3
            await asyncio.sleep(0)  # the close may or may not have been seen yet
    assert server.connections == 5


async def test_a_write_is_never_sent_twice(peer: MakePeer) -> None:
    async def drop_writes(request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.method == "POST":
            return False  # reset without an answer: Vault may or may not have written
        writer.write(answer(200, READ_ANSWER))
        return True

    server = await peer(drop_writes)
    async with backend_for(server.addr) as backend:
        await backend.read("app/db")  # a pooled connection for the write to reuse
        with pytest.raises(VaultUnavailable):
            await backend.write("app/db", {"user": "app"}, 3)
        with pytest.raises(VaultUnavailable):
            await backend.write("app/db", {"user": "app"}, 3)  # on a new connection
    assert [r.method for r in server.requests].count("POST") == 2


# -- (d) TLS with a CA of the test's own; (e) proxies --------------------------------------------


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def vault_like(request: Request, writer: asyncio.StreamWriter) -> bool:
    """Just enough of Vault for a read, a write, a listing and hvac's lookup-self."""
    if request.method == "POST":
        writer.write(answer(200, {"data": {"version": 4, "created_time": CREATED}}))
    elif request.path == "/v1/auth/token/lookup-self":
        writer.write(answer(200, {"data": {"ttl": 0}}))
    elif request.method == "LIST" or "list=true" in request.target:
        writer.write(answer(200, {"data": {"keys": ["db", "web/"]}}))
    else:
        writer.write(answer(200, READ_ANSWER))
    return True


async def test_https_trusts_the_ca_bundle_named_by_requests_ca_bundle_and_no_other(
    peer: MakePeer, ca: trustme.CA, ca_file: Path, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    server = await peer(vault_like, tls=server_tls(ca))
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    async with backend_for(server.addr) as backend:
        await backend.ping()  # hvac, through requests
        assert (await backend.read("app/db")).version == 3
        assert (await backend.write("app/db", {"k": "v"}, 3)).version == 4
    no_proxy_settings.delenv("REQUESTS_CA_BUNDLE")
    async with backend_for(server.addr) as untrusting:
        with pytest.raises(VaultUnavailable):
            await untrusting.read("app/db")  # certifi's bundle does not hold the test's CA
        with pytest.raises(VaultUnavailable):
            await untrusting.ping()
    assert len(server.requests) == 3  # the untrusting client never got as far as a request


def test_a_ca_bundle_that_cannot_be_read_is_a_setting_error_at_start(
    tmp_path: Path, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    (tmp_path / "not-a-ca.pem").write_text("not a certificate")
    for bundle in (tmp_path / "missing.pem", tmp_path / "not-a-ca.pem"):
        no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", str(bundle))
        with pytest.raises(ConfigError) as caught:
            HvacBackend("https://127.0.0.1:8200", token="t")
        assert caught.value.setting == "REQUESTS_CA_BUNDLE"


@dataclass
class CountingProxy:
    """An HTTP proxy: CONNECT tunnels to the target; an absolute-form request is answered
    here, as Vault would (a plain-HTTP proxy's cache, say)."""

    tunnels: list[str] = field(default_factory=list)
    forwarded: list[str] = field(default_factory=list)

    async def handle(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        if request.method != "CONNECT":
            self.forwarded.append(f"{request.method} {request.target}")
            return await vault_like(request, writer)
        self.tunnels.append(request.target)
        host, _, port = request.target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError):
                sink.close()

        try:
            await asyncio.gather(
                pipe(request.reader, upstream_writer), pipe(upstream_reader, writer)
            )
        finally:
            upstream_writer.close()
        return False


async def test_https_goes_through_the_proxy_named_by_https_proxy_unless_no_proxy_says_not(
    peer: MakePeer, ca: trustme.CA, ca_file: Path, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    vault = await peer(vault_like, tls=server_tls(ca))
    proxy = CountingProxy()
    proxy_server = await peer(proxy.handle)
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", str(ca_file))
    no_proxy_settings.setenv("HTTPS_PROXY", proxy_server.addr)
    async with backend_for(vault.addr) as backend:
        assert (await backend.read("app/db")).version == 3
        assert (await backend.write("app/db", {"k": "v"}, 3)).version == 4
        assert len(proxy.tunnels) == 1  # aiohttp's, kept alive for both calls
        assert await backend.list_keys("app") == ["db", "web/"]
        assert len(proxy.tunnels) == 2  # hvac's (requests) own
    assert set(proxy.tunnels) == {f"127.0.0.1:{vault.port}"}
    assert vault.connections == 2  # none but through the proxy
    tunnels_before = len(proxy.tunnels)
    no_proxy_settings.setenv("NO_PROXY", "127.0.0.1")
    async with backend_for(vault.addr) as direct:
        assert (await direct.read("app/db")).version == 3
    assert len(proxy.tunnels) == tunnels_before


async def test_plain_http_goes_through_the_proxy_named_by_http_proxy(
    peer: MakePeer, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    vault = await peer(vault_like)
    proxy = CountingProxy()
    proxy_server = await peer(proxy.handle)
    no_proxy_settings.setenv("HTTP_PROXY", proxy_server.addr)
    async with backend_for(vault.addr) as backend:
        assert (await backend.read("app/db")).version == 3
    assert proxy.forwarded == [f"GET {vault.addr}/v1/secret/data/app/db"]
    assert vault.requests == []


# -- (f) AppRole: logging in again only when the token is gone, and not too often --------------


@dataclass
class AppRoleVault:
    """Vault with AppRole: each login issues a new token; `valid` says which tokens Vault still
    honours; KV answers 403 to every token unless `kv_allows` says otherwise."""

    lease: int = 3600
    logins: int = 0
    lookups: int = 0
    valid: set[str] = field(default_factory=set)
    kv_allows: bool = False

    async def handle(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        token = request.headers.get("x-vault-token", "")
        if request.path == "/v1/auth/approle/login":
            self.logins += 1
            issued = f"token-{self.logins}"
            self.valid.add(issued)
            auth = {"client_token": issued, "lease_duration": self.lease, "renewable": True}
            writer.write(answer(200, {"auth": auth}))
        elif request.path == "/v1/auth/token/lookup-self":
            self.lookups += 1
            if token in self.valid:
                writer.write(answer(200, {"data": {"ttl": self.lease}}))
            else:
                writer.write(answer(403, {"errors": ["permission denied"]}))
        elif self.kv_allows and token in self.valid:
            writer.write(answer(200, READ_ANSWER))
        else:
            writer.write(answer(403, {"errors": ["1 error occurred:\n\t* permission denied\n\n"]}))
        return True


@contextlib.asynccontextmanager
async def approle_backend(addr: str, **options: Any) -> AsyncIterator[HvacBackend]:
    backend = HvacBackend(addr, role_id="role", secret_id="secret", timeout=2.0, **options)
    try:
        await backend.login()
        yield backend
    finally:
        await backend.aclose()


async def many_reads(backend: HvacBackend, n: int) -> list[Any]:
    concurrent = await asyncio.gather(
        *(outcome(backend.read(f"app/s{i}")) for i in range(n)), return_exceptions=True
    )
    return list(concurrent) + [await outcome(backend.read("app/db")) for _ in range(n // 4)]


async def test_a_vault_denying_every_read_by_policy_makes_the_service_log_in_no_more(
    peer: MakePeer,
) -> None:
    vault = AppRoleVault()  # the token stays valid: the 403s are the policy's
    server = await peer(vault.handle)
    async with approle_backend(server.addr, relogin_interval=3600) as backend:
        outcomes = await many_reads(backend, 200)
    assert set(outcomes) == {"VaultAccessDenied"}
    assert vault.logins == 1  # at start, and never again
    assert vault.lookups <= 1


async def test_a_vault_refusing_every_token_gets_at_most_one_login_per_rate_window(
    peer: MakePeer,
) -> None:
    vault = AppRoleVault()
    server = await peer(vault.handle)
    async with approle_backend(server.addr, relogin_interval=3600) as backend:
        vault.valid.clear()  # revoked: each login's token is refused at once from now on

        async def revoking(request: Request, writer: asyncio.StreamWriter) -> bool:
            keep = await AppRoleVault.handle(vault, request, writer)
            vault.valid.clear()
            return keep

        server.handler = revoking
        outcomes = await many_reads(backend, 200)
    assert set(outcomes) == {"VaultAccessDenied"}
    assert vault.logins == 2  # the one at start and one re-login, however many requests


async def test_a_revoked_approle_token_is_replaced_once_and_the_read_succeeds(
    peer: MakePeer,
) -> None:
    vault = AppRoleVault(kv_allows=True)
    server = await peer(vault.handle)
    async with approle_backend(server.addr) as backend:
        assert (await backend.read("app/db")).version == 3
        vault.valid.clear()  # revoked, or expired
        secrets = await asyncio.gather(*(backend.read("app/db") for _ in range(50)))
        assert {s.version for s in secrets} == {3}
    assert vault.logins == 2  # concurrent callers shared the one re-login
    assert vault.lookups == 1


async def test_a_token_past_its_lease_is_replaced_without_asking_vault_about_it(
    peer: MakePeer,
) -> None:
    vault = AppRoleVault(kv_allows=True, lease=1)
    server = await peer(vault.handle)
    async with approle_backend(server.addr) as backend:
        vault.valid.clear()
        deadline = time.monotonic() + 1.1
        while time.monotonic() < deadline:  # the lease (1 s) runs out
            await asyncio.sleep(0.1)
        assert (await backend.read("app/db")).version == 3
    assert vault.logins == 2
    assert vault.lookups == 0


async def test_a_service_token_is_never_replaced(peer: MakePeer) -> None:
    vault = AppRoleVault()
    server = await peer(vault.handle)
    async with backend_for(server.addr) as backend:
        assert set(await many_reads(backend, 20)) == {"VaultAccessDenied"}
    assert vault.logins == vault.lookups == 0

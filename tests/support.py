"""Test helpers: run the real app under uvicorn in the test's event loop, capture its logs; and
what unit and integration tests share (a Vault client, a test CA and TLS files, a busy port)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import asyncpg
import httpx
import pytest
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import State

from devstack import DEV_POLICY_TOML, NatsEndpoint, OpenBaoEndpoint, PostgresServer, free_port
from devstack.stack import least_privilege_token
from events.bus import EventBus
from service.http.app import create_app
from service.http.protocol import HttpProtocol
from service.http.serving import Server, server_config
from service.obs.logs import JsonFormatter
from service.settings import Settings
from service.vault.backend import HvacBackend
from service.vault.protocol import VaultBackend


class _Server(Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # tests keep their own signal handling


class OidcEndpoint(Protocol):
    """The issuer a service trusts: OpenBao's (the `oidc` fixture, an OidcIssuer) or a test's own
    (a loopback server, named by a SimpleNamespace)."""

    @property
    def issuer(self) -> str: ...
    @property
    def audience(self) -> str: ...


def service_settings(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint | str,
    oidc: OidcEndpoint,
    policy_file: Path,
    **overrides: str,
) -> Settings:
    return Settings.from_environ(service_environ(openbao, nats, oidc, policy_file, **overrides))


def service_environ(
    openbao: OpenBaoEndpoint,
    nats: NatsEndpoint | str,
    oidc: OidcEndpoint,
    policy_file: Path,
    **overrides: str,
) -> dict[str, str]:
    """SECRETS_* for a service on a free port; `overrides` by setting name (`vault_timeout`).

    `nats` is a server, or the URL of one (a node of a cluster, a proxy in front of one).
    """
    environ = {
        "SECRETS_VAULT_ADDR": openbao.addr,
        "SECRETS_VAULT_TOKEN": openbao.root_token,
        "SECRETS_NATS_URL": nats if isinstance(nats, str) else nats.url,
        "SECRETS_OIDC_ISSUER": oidc.issuer,
        "SECRETS_OIDC_AUDIENCE": oidc.audience,
        "SECRETS_POLICY_FILE": str(policy_file),
        "SECRETS_PORT": str(free_port()),
        # Beside the policy, not on stdout, where pytest would show lines written between tests.
        "SECRETS_AUDIT_SINK": f"file:{policy_file.parent / 'audit.log'}",
    }
    environ.update({f"SECRETS_{k.upper()}": v for k, v in overrides.items()})
    return environ


@dataclass(frozen=True)
class LeastPrivilege:
    """The same OpenBao, reached with a token of the dev stack's own Vault policy for the
    service (devstack.stack.DEV_SERVICE_POLICY) instead of the root token."""

    addr: str
    root_token: str

    @classmethod
    def of(cls, openbao: OpenBaoEndpoint) -> LeastPrivilege:
        return cls(openbao.addr, least_privilege_token(openbao.addr, openbao.root_token))


READER_WRITER_POLICY = """\
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]

[roles.writer]
read = ["**"]
write = ["**"]
"""
"""A policy for tokens from tests.tokens.LocalIssuer: `app-reader` reads app/**, `writer` reads
and writes everything (the watch stream's and the client library's tests)."""


def write_policy(directory: Path, text: str = DEV_POLICY_TOML) -> Path:
    path = directory / "policy.toml"
    path.write_text(text)
    return path


class RunningService:
    def __init__(self, app: Starlette, url: str) -> None:
        self.app = app
        self.url = url

    @property
    def state(self) -> State:
        """The lifespan's resources: `manager`, `bus`, `metrics`, ... (attributes of a State)."""
        return self.app.state


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, *, backend: VaultBackend | None = None, bus: EventBus | None = None
) -> AsyncIterator[RunningService]:
    """Serve the app on settings.port until the block ends; fail fast if startup fails."""
    app = create_app(settings, backend=backend, bus=bus)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_config=None,
        lifespan="on",
        http=HttpProtocol,  # as `secrets-service serve` runs it
    )
    server = _Server(config)
    task = asyncio.get_running_loop().create_task(_serve(server))
    try:
        while not server.started:
            if task.done():
                raise RuntimeError(f"service failed to start: {app.state.startup_error!r}")
            await asyncio.sleep(0.02)
        yield RunningService(app, f"http://127.0.0.1:{settings.port}")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit:
        # uvicorn exits 3 when the lifespan fails. Escaping the task, SystemExit would stop
        # the event loop and pytest with it, before the session's servers are torn down.
        pass


class LogCapture:
    """Every log record of the process, formatted as the service formats them."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        root.addHandler(self.handler)
        self._level = root.level
        root.setLevel(logging.DEBUG)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self._level)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()


async def raw_request(url: str, method: str, target: bytes, token: str, body: bytes) -> int:
    """Send a request line exactly as given (no client normalises it); return the status."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            method.encode() + b" " + target + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        await writer.drain()
        status_line = await reader.readline()
        await reader.read()
        return int(status_line.split()[1])
    finally:
        writer.close()


def bearer(token: str) -> Mapping[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def get_json(client: httpx.AsyncClient, url: str, token: str) -> httpx.Response:
    return await client.get(url, headers=bearer(token))


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 if absent): `name` is the sample's name."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def record_figures(scenario: str, **figures: Any) -> None:
    """Append one JSON line of measured figures to $RELIABILITY_FIGURES, if set.

    `make reliability` sets it, so RELIABILITY.md's numbers come from a run anyone can repeat.
    """
    target = os.environ.get("RELIABILITY_FIGURES")
    if not target:
        return
    line = json.dumps({"scenario": scenario, "at": time.time(), **figures})
    with open(target, "a", encoding="utf-8") as out:
        out.write(line + "\n")


@contextlib.asynccontextmanager
async def cluster_services(
    openbao: OpenBaoEndpoint,
    oidc: OidcEndpoint,
    nodes: Sequence[NatsEndpoint],
    policy_file: Path,
    prefix: str,
    **overrides: str,
) -> AsyncIterator[list[RunningService]]:
    """One service instance per NATS node (ids `<prefix>-A`, ...), all connected to the bus."""
    async with contextlib.AsyncExitStack() as stack:
        services = []
        for name, node in zip("ABC", nodes, strict=False):
            settings = service_settings(
                openbao, node.url, oidc, policy_file, instance_id=f"{prefix}-{name}",
                nats_replicas="3", **overrides,
            )  # fmt: skip
            services.append(await stack.enter_async_context(running_service(settings)))
        deadline = time.monotonic() + 10
        while not all(svc.state.manager.bus_connected for svc in services):
            if time.monotonic() > deadline:
                raise AssertionError("instances never connected to NATS")
            await asyncio.sleep(0.01)
        await _wait_meshed(services)
        yield services


async def _wait_meshed(services: Sequence[RunningService], timeout: float = 10.0) -> None:
    """Return once a message published by each instance reached every instance: connected is
    not enough, since a subscription's interest reaches the other nodes over routes later."""
    tag = f"_probe.{os.urandom(4).hex()}"
    heard: list[set[str]] = [set() for _ in services]
    subs = []
    for i, svc in enumerate(services):

        async def on_probe(msg: Any, i: int = i) -> None:
            heard[i].add(msg.data.decode())

        subs.append(await svc.state.bus.nc.subscribe(f"{tag}.>", cb=on_probe))
    names = {str(i) for i in range(len(services))}
    deadline = time.monotonic() + timeout
    try:
        while not all(h == names for h in heard):
            if time.monotonic() > deadline:
                raise AssertionError(f"events do not flow between every instance: {heard}")
            for i, svc in enumerate(services):
                await svc.state.bus.nc.publish(f"{tag}.{i}", str(i).encode())
            await asyncio.sleep(0.05)
    finally:
        for sub in subs:
            await sub.unsubscribe()


REQUIRE_SERVERS_ENV = "SECRETS_TEST_REQUIRE_SERVERS"
"""Set to 1 by `make test` (and so by CI): a server binary the tests need must be there."""


def skip_unless_required(reason: str) -> NoReturn:
    """Skip for a missing tool, except under `make test`, where that is a failure: a suite
    that skipped its integration tests must not pass."""
    if os.environ.get(REQUIRE_SERVERS_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SERVERS_ENV}=1: make test needs it)", pytrace=False)
    pytest.skip(reason)


def vault_write(openbao: OpenBaoEndpoint, path: str, data: dict[str, Any]) -> None:
    """Write `data` straight to OpenBao (a new KV v2 version), as a person or tool bypassing
    the service would: no event, nothing cached."""
    response = httpx.post(
        f"{openbao.addr}/v1/secret/data/{path}",
        json={"data": data},
        headers={"X-Vault-Token": openbao.root_token},
    )
    response.raise_for_status()


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll `condition` (sync or async) until it holds; AssertionError after `timeout` seconds.

    The one polling helper of the tests: they wait for a state with a deadline, never sleep a
    guessed time. A test stating a bound passes it as `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition still false after {timeout} s")
        await asyncio.sleep(interval)


# --- shared by unit and integration tests: import a fixture, then bind it in the module ----------


@contextlib.asynccontextmanager
async def backend_for(addr: str, **options: Any) -> AsyncIterator[HvacBackend]:
    backend = HvacBackend(addr, **{"token": "t0ken", "timeout": 2.0, **options})
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    return monkeypatch


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port some other program is already listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclass(frozen=True)
class Tls:
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM
    ca: Path  # the CA that signed it, PEM

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> Tls:
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = Tls(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key", ca=tmp_path / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


@contextlib.asynccontextmanager
async def serving_as_serve(app: Any, settings: Settings) -> AsyncIterator[str]:
    """`app` run as `secrets-service serve` runs it (`server_config`); yields its base URL."""
    server = _Server(server_config(app, settings))
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server did not start"
            await asyncio.sleep(0.02)
        scheme = "https" if settings.tls_cert else "http"
        yield f"{scheme}://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


# -- PostgreSQL logins (the rotator's tests) ------------------------------------------------


def role_name(prefix: str = "app") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def password() -> str:
    return f"pw-{secrets.token_urlsafe(18)}"


async def login_error(server: PostgresServer, role: str, secret: str) -> str | None:
    """None when `role` logs in with `secret` over TCP, else the server's reason."""
    try:
        conn = await asyncpg.connect(
            host=server.host,
            port=server.port,
            user=role,
            password=secret,
            database="postgres",
            timeout=10,
            ssl=False,
        )
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        return str(exc)
    await conn.close()
    return None


async def logs_in(server: PostgresServer, role: str, secret: str) -> bool:
    return await login_error(server, role, secret) is None


def make_login(server: PostgresServer, **options: Any) -> dict[str, Any]:
    role, secret = role_name(), password()
    server.create_login(role, secret, **options)
    return server.secret(role, secret)


def make_pair(server: PostgresServer) -> tuple[dict[str, Any], dict[str, Any]]:
    """An application login and a master (CREATEROLE, ADMIN on the application's role)."""
    base = make_login(server)
    master = make_login(server, createrole=True)
    server.sql(f'GRANT "{base["username"]}" TO "{master["username"]}" WITH ADMIN OPTION')
    return base, master

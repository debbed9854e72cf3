"""NATS users, permissions, credentials files and mutual TLS, against real nats-servers.

The permissions and TLS blocks are compose/nats/auth.conf and compose/nats/tls.conf themselves
(passwords and certificate paths swapped in), so what the README and the compose stack give
is what is tested: the service works with exactly those grants, a listener reads and cannot
publish, and the wrong credentials or no client certificate are refused.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats as nats_client
import nkeys
import pytest
import trustme
from nats.aio.client import Client as NATS

from devstack import NatsServer, OidcIssuer, OpenBaoEndpoint
from events.bus import EventBus
from events.listener import ChangeListener
from events.subjects import changed_subject
from schemas.errors import ConfigError, NotFound
from schemas.events import SecretUpdated, event_encoder
from service.core.manager import SecretsManager
from service.core.poller import ClusterPoller
from service.vault.backend import HvacBackend
from tests.support import (
    LogCapture,
    bearer,
    eventually,
    running_service,
    service_settings,
    write_policy,
)

ROOT = Path(__file__).resolve().parents[2]
AUTH_CONF = ROOT / "compose" / "nats" / "auth.conf"
TLS_CONF = ROOT / "compose" / "nats" / "tls.conf"
PREFIX = "secrets"  # the prefix compose/nats/auth.conf grants
TIMEOUT = 10.0
SERVICE_PASSWORD = "svc-" + secrets.token_hex(12)
LISTENER_PASSWORD = "lis-" + secrets.token_hex(12)


def auth_block() -> str:
    text = AUTH_CONF.read_text()
    for name, value in (
        ("SECRETS_NATS_SERVICE_PASSWORD", SERVICE_PASSWORD),
        ("SECRETS_NATS_LISTENER_PASSWORD", LISTENER_PASSWORD),
    ):
        text = text.replace(f"${name}", json.dumps(value))
    return text


def grants(user: str) -> tuple[list[str], list[str]]:
    """The publish and subscribe allow lists auth.conf gives `user`."""
    block = AUTH_CONF.read_text().split(f"user: {user}\n", 1)[1].split("user:", 1)[0]
    found = []
    for kind in ("publish", "subscribe"):
        match = re.search(kind + r":\s*{\s*allow:\s*\[(.*?)\]", block, re.S)
        assert match is not None, f"no {kind} list for {user}"
        found.append(re.findall(r'"([^"]+)"', match.group(1)))
    return found[0], found[1]


def server_log(server: NatsServer) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(errors="replace")


def url(
    server: NatsServer, user: str | None = None, password: str = "", scheme: str = "nats"
) -> str:
    login = "" if user is None else f"{user}:{password}@"
    return f"{scheme}://{login}127.0.0.1:{server.port}"


@contextlib.contextmanager
def nats_server(config: str) -> Iterator[NatsServer]:
    server = NatsServer(config=config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def secured_nats() -> Iterator[NatsServer]:
    """Users `service` and `listener` with compose's permissions; no anonymous access."""
    with nats_server(auth_block()) as server:
        yield server


class Handler:
    def apply_change(self, path: str, version: int) -> None: ...

    def apply_lifecycle(self, event: object) -> None: ...

    def bus_down(self) -> None: ...

    def bus_up(self, *, replayed: bool = False) -> None: ...


@contextlib.asynccontextmanager
async def instance(
    openbao: OpenBaoEndpoint, servers: list[str], **bus_options: Any
) -> AsyncIterator[tuple[SecretsManager, EventBus]]:
    backend = HvacBackend(openbao.addr, token=openbao.root_token)
    bus = EventBus(servers, PREFIX, instance_id=f"auth-{uuid.uuid4().hex[:6]}", **bus_options)
    manager = SecretsManager(backend, events=bus, instance_id=bus.instance_id)
    try:
        await bus.connect(manager)
        yield manager, bus
    finally:
        await manager.aclose()
        await bus.aclose()
        await backend.aclose()


async def first_change(listener: ChangeListener, path: str) -> Any:
    async def find() -> Any:
        async for change in listener:
            if change.path == path:
                return change
        return None

    return await asyncio.wait_for(find(), TIMEOUT)


def forged(path: str, version: int) -> bytes:
    return event_encoder.encode(
        SecretUpdated(
            event_id=uuid.uuid4().hex,
            path=path,
            version=version,
            actor="mallory",
            instance_id="forger",
            time=datetime.now(UTC).isoformat(),
        )
    )


# -- user and password in the URL -----------------------------------------------------------------


async def test_the_service_logs_in_with_the_password_in_its_url_and_a_listener_follows_its_writes(
    openbao: OpenBaoEndpoint, oidc: OidcIssuer, secured_nats: NatsServer, tmp_path: Path
) -> None:
    settings = service_settings(
        openbao, url(secured_nats, "service", SERVICE_PASSWORD), oidc, write_policy(tmp_path)
    )
    path = f"app/auth-{uuid.uuid4().hex[:8]}/db"
    listener_url = url(secured_nats, "listener", LISTENER_PASSWORD)
    heard: list[str] = []

    async def on_change(msg: Any) -> None:
        heard.append(msg.subject)

    with LogCapture() as logs:
        async with running_service(settings) as svc:
            core = await nats_client.connect(listener_url)
            try:
                await core.subscribe(f"{PREFIX}.changed.>", cb=on_change)
                await core.flush()
                async with httpx.AsyncClient(base_url=svc.url) as client:
                    # Over HTTP: the request's audit record goes to NATS too.
                    answer = await client.patch(
                        f"/secrets/{path}",
                        json={"data": {"password": "p1"}, "version": 0},
                        headers=bearer(oidc.mint("writer")),
                    )
                assert answer.status_code == 200, answer.text
                subject = changed_subject(PREFIX, path)
                await eventually(lambda: subject in heard, timeout=TIMEOUT)
                async with ChangeListener(
                    listener_url, "app/**", start_sequence=1, connect_timeout=TIMEOUT
                ) as changes:
                    change = await first_change(changes, path)
                assert change.version == 1
                assert svc.state.bus.connected
            finally:
                await core.close()
    assert "Violation" not in server_log(secured_nats), "compose's grants are not enough"
    assert SERVICE_PASSWORD not in logs.text and LISTENER_PASSWORD not in logs.text


async def test_a_listener_may_read_but_the_server_refuses_its_forged_change_event(
    openbao: OpenBaoEndpoint, secured_nats: NatsServer
) -> None:
    path = f"app/auth-{uuid.uuid4().hex[:8]}/db"
    service_url = url(secured_nats, "service", SERVICE_PASSWORD)
    async with instance(openbao, [service_url]) as (manager, bus):
        await manager.set(path, {"password": "p1"}, 0)
        await manager.get(path)
        await eventually(lambda: bus.received == 1, timeout=TIMEOUT)  # our own event, back
        received = bus.received
        errors: list[Exception] = []

        async def collect(exc: Exception) -> None:
            errors.append(exc)

        nc = await nats_client.connect(
            url(secured_nats, "listener", LISTENER_PASSWORD), error_cb=collect
        )
        try:
            await nc.publish(changed_subject(PREFIX, path), forged(path, 2**40))
            await nc.flush()
            await eventually(
                lambda: any("permissions violation" in str(e).lower() for e in errors),
                timeout=TIMEOUT,
            )
        finally:
            await nc.close()
        assert bus.received == received, "the forged event reached the service"
        assert manager.cached_document(path) is not None
        assert (await manager.get(path)).version == 1


async def test_a_wrong_password_or_none_is_refused_and_the_password_is_never_shown(
    secured_nats: NatsServer,
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    bus = EventBus([url(secured_nats, "service", wrong)], PREFIX, instance_id="intruder")
    with LogCapture() as logs, pytest.raises(ConfigError) as info:
        await bus.connect(Handler(), connect_timeout=0.5)
    await bus.aclose()
    assert "refused our credentials" in str(info.value)
    for shown in (str(info.value), logs.text, repr(bus)):
        assert wrong not in shown
    listener = ChangeListener(url(secured_nats, "listener", wrong), connect_timeout=1.0)
    with pytest.raises(ConnectionError) as refused:
        await listener.__aenter__()
    assert wrong not in str(refused.value)
    assert "refused our credentials" in str(refused.value)
    anonymous = NATS()
    with pytest.raises(nats_client.errors.Error, match="Authorization Violation"):
        await anonymous.connect(url(secured_nats), allow_reconnect=False, connect_timeout=1)
    await anonymous.close()  # nats-py leaves the refused socket open otherwise


# -- a credentials file (operator mode: JWTs signed with NKEYs) ----------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _keypair(prefix: int) -> tuple[bytes, Any]:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return seed, nkeys.from_seed(bytearray(seed))


def _jwt(issuer: Any, subject: str, name: str, claims: dict[str, Any]) -> str:
    """A NATS JWT (what `nsc` makes): ed25519-nkey signed, `jti` the hash of the claims."""
    body: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**claims, "version": 2},
    }
    digest = hashlib.new("sha512_256", json.dumps(body).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    return f"{head}.{payload}.{_b64(issuer.sign(f'{head}.{payload}'.encode()))}"


class Operator:
    """An operator, a system account and one application account with JetStream."""

    def __init__(self) -> None:
        _, self.operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
        _, self.system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        _, self.account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        unlimited = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1}
        unlimited |= {"wildcards": True, "conn": -1, "leaf": -1}
        jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        system = self.system.public_key.decode()
        account = self.account.public_key.decode()
        op_jwt = _jwt(
            self.operator,
            self.operator.public_key.decode(),
            "operator",
            {"type": "operator", "system_account": system},
        )
        sys_jwt = _jwt(self.operator, system, "SYS", {"type": "account", "limits": unlimited})
        app_jwt = _jwt(
            self.operator,
            account,
            "APP",
            {"type": "account", "limits": unlimited | jetstream},
        )
        self.config = (
            f'operator: "{op_jwt}"\nsystem_account: "{system}"\nresolver: MEMORY\n'
            f'resolver_preload: {{\n  {system}: "{sys_jwt}"\n  {account}: "{app_jwt}"\n}}\n'
        )

    def creds(self, user: str, directory: Path) -> Path:
        """A credentials file for `user` with the grants auth.conf gives that user."""
        seed, keypair = _keypair(nkeys.PREFIX_BYTE_USER)
        publish, subscribe = grants(user)
        token = _jwt(
            self.account,
            keypair.public_key.decode(),
            user,
            {
                "type": "user",
                "pub": {"allow": publish},
                "sub": {"allow": subscribe},
                "subs": -1,
                "data": -1,
                "payload": -1,
            },
        )
        path = directory / f"{user}.creds"
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        path.chmod(0o600)
        return path


async def test_the_service_logs_in_with_a_credentials_file_and_a_listener_with_its_own(
    openbao: OpenBaoEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    operator = Operator()
    service_creds, listener_creds = (
        operator.creds("service", tmp_path),
        operator.creds("listener", tmp_path),
    )
    path = f"app/creds-{uuid.uuid4().hex[:8]}/db"
    with nats_server(operator.config) as server:
        settings = service_settings(
            openbao, url(server), oidc, write_policy(tmp_path), nats_creds=str(service_creds)
        )
        async with running_service(settings) as svc:
            await svc.state.manager.set(path, {"password": "p1"}, 0)
            async with ChangeListener(
                url(server),
                "app/**",
                start_sequence=1,
                connect_timeout=TIMEOUT,
                credentials=str(listener_creds),
            ) as changes:
                change = await first_change(changes, path)
            assert change.version == 1
        refused = EventBus([url(server)], PREFIX, instance_id="no-creds")
        with pytest.raises(ConfigError, match="refused our credentials"):
            await refused.connect(Handler(), connect_timeout=0.5)
        await refused.aclose()
        assert "Violation" not in server_log(server)


# -- mutual TLS ------------------------------------------------------------------------------------


class Pki:
    """A test CA (trustme), the server's certificate and client certificates, as files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.server_cert, self.server_key = self._pair("nats", server)
        self.service_cert, self.service_key = self._pair("service", self.ca.issue_cert("service"))
        other = trustme.CA()
        self.other_ca_file = self._write("other-ca.pem", other.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return str(path)

    def _pair(self, name: str, leaf: trustme.LeafCert) -> tuple[str, str]:
        chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        return self._write(f"{name}.pem", chain), self._write(
            f"{name}-key.pem", leaf.private_key_pem.bytes()
        )

    def tls_block(self) -> str:
        """compose/nats/tls.conf with this CA's files."""
        text = TLS_CONF.read_text()
        for name, path in (
            ("nats.pem", self.server_cert),
            ("nats-key.pem", self.server_key),
            ("ca.pem", self.ca_file),
        ):
            text = text.replace(f'"/etc/nats-certs/{name}"', json.dumps(path))
        assert "/etc/nats-certs" not in text
        return text


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Pki]]:
    """As in the compose stack: mutual TLS for every client, and the users of auth.conf."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    with nats_server(pki.tls_block() + auth_block()) as server:
        yield server, pki


@pytest.mark.parametrize("tls_first", [False, True], ids=["greeted-first", "tls-first"])
async def test_the_service_connects_over_mutual_tls_and_a_listener_follows_it(
    openbao: OpenBaoEndpoint,
    oidc: OidcIssuer,
    tls_nats: tuple[NatsServer, Pki],
    tmp_path: Path,
    tls_first: bool,
) -> None:
    # The servers answer both: TLS from the client's first byte, or after their greeting.
    server, pki = tls_nats
    settings = service_settings(
        openbao,
        url(server, "service", SERVICE_PASSWORD, scheme="tls"),
        oidc,
        write_policy(tmp_path),
        nats_tls_ca=pki.ca_file,
        nats_tls_cert=pki.service_cert,
        nats_tls_key=pki.service_key,
        nats_tls_first=str(tls_first).lower(),
    )
    assert settings.nats_tls_first is tls_first
    path = f"app/tls-{uuid.uuid4().hex[:8]}/db"
    async with running_service(settings) as svc:
        await svc.state.manager.set(path, {"password": "p1"}, 0)
        async with ChangeListener(
            url(server, "listener", LISTENER_PASSWORD, scheme="tls"),
            "app/**",
            start_sequence=1,
            connect_timeout=TIMEOUT,
            tls_ca=pki.ca_file,
            tls_cert=pki.service_cert,  # any certificate of the CA: the user says who it is
            tls_key=pki.service_key,
            tls_first=tls_first,
        ) as changes:
            change = await first_change(changes, path)
        assert change.version == 1
    assert "Violation" not in server_log(server)


@pytest.mark.parametrize("client", ["no certificate", "no TLS at all", "another CA"])
async def test_a_client_without_a_certificate_of_the_ca_is_refused(
    tls_nats: tuple[NatsServer, Pki], client: str
) -> None:
    server, pki = tls_nats
    options: dict[str, Any] = {
        "no certificate": {"tls_ca": pki.ca_file},
        "no TLS at all": {},
        "another CA": {
            "tls_ca": pki.other_ca_file,
            "tls_cert": pki.service_cert,
            "tls_key": pki.service_key,
        },
    }[client]
    bus = EventBus(
        [url(server, "service", SERVICE_PASSWORD)], PREFIX, instance_id="tls-x", **options
    )
    with pytest.raises(ConfigError) as info:
        await bus.connect(Handler(), connect_timeout=0.5)
    await bus.aclose()
    assert info.value.setting == "SECRETS_NATS_URL"
    assert SERVICE_PASSWORD not in str(info.value)


async def test_the_version_poller_elects_records_and_watches_with_the_services_grants_alone(
    openbao: OpenBaoEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    """Every key-value call of the poller: buckets made (then updated to another TTL), the
    lease taken, refused (read back) and given up, the interest written, watched and withdrawn."""
    with nats_server(auth_block()) as server:
        service_url = url(server, "service", SERVICE_PASSWORD)
        policy = write_policy(tmp_path)
        async with contextlib.AsyncExitStack() as stack:
            services = []
            for name, interval in (("a", "0.5"), ("b", "1.5")):  # b updates the lease's TTL
                settings = service_settings(
                    openbao, service_url, oidc, policy, instance_id=f"poll-{name}",
                    vault_poll_interval=interval,
                )  # fmt: skip
                services.append(await stack.enter_async_context(running_service(settings)))
            path = f"app/auth-{uuid.uuid4().hex[:8]}/db"
            for svc in services:
                with contextlib.suppress(NotFound):
                    await svc.state.manager.get(path)
            await services[0].state.manager.set(path, {"password": "p1"}, 0)
            for svc in services:
                await svc.state.manager.get(path)
            pollers: list[ClusterPoller] = [svc.state.poller for svc in services]

            def settled() -> bool:
                modes = sorted(p.current_mode().value for p in pollers)
                leader = next((p for p in pollers if p.leader), None)
                return (
                    modes == ["follower", "leader"]
                    and leader is not None
                    and path in leader.union.targets()
                )

            await eventually(settled, timeout=TIMEOUT)
            await eventually(lambda: sum(p.rounds for p in pollers) >= 2, timeout=TIMEOUT)
        # Both stopped: the lease given up and the interest withdrawn, with the same grants.
        assert "Violation" not in server_log(server), "compose's grants are not enough"


async def test_after_a_reconnect_the_service_replays_what_it_missed_with_its_grants_alone(
    openbao: OpenBaoEndpoint,
) -> None:
    """The replay (an ordered consumer on the change stream) needs grants of its own."""
    with nats_server(auth_block()) as server:
        service_url = url(server, "service", SERVICE_PASSWORD)
        async with (
            instance(openbao, [service_url]) as (a, bus_a),
            instance(openbao, [service_url]) as (b, bus_b),
        ):
            path = f"app/replay-{uuid.uuid4().hex[:8]}/db"
            await a.set(path, {"password": "p1"}, 0)
            await eventually(lambda: bus_b.received >= 1, timeout=TIMEOUT)
            heard: list[str] = []
            b.add_listener("l", lambda p, v: heard.append(p))
            server.restart()
            await eventually(lambda: bus_a.connected and bus_b.disconnects == 1, timeout=TIMEOUT)
            await a.set(path, {"password": "p2"}, 1)
            await eventually(lambda: path in heard and bus_b.connected, timeout=TIMEOUT)
            await eventually(lambda: not bus_b._tasks, timeout=TIMEOUT)  # the replay ran
        log = server_log(server)
        assert "Violation" not in log, log[-2000:]


# -- TLS that nobody on the path can strip -------------------------------------------------------


class StrippingProxy:
    """A man in the middle: relays bytes, deletes `tls_required` from a plain-text INFO
    greeting, and keeps what the client sent. nats-py upgrades to TLS only when the greeting
    asks, so a client it fools sends its CONNECT, password included, in plain text."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.from_client = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> StrippingProxy:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def downstream() -> None:  # server -> client, the greeting rewritten
            first = True
            while data := await up_reader.read(65536):
                if first and data.startswith(b"INFO "):
                    line, rest = data.split(b"\r\n", 1)
                    info = json.loads(line[5:])
                    for key in ("tls_required", "tls_verify", "tls_available"):
                        info.pop(key, None)
                    data = b"INFO " + json.dumps(info).encode() + b"\r\n" + rest
                first = False
                writer.write(data)
                await writer.drain()

        async def upstream() -> None:  # client -> server, kept
            while data := await reader.read(65536):
                self.from_client += data
                up_writer.write(data)
                await up_writer.drain()

        tasks = [asyncio.ensure_future(downstream()), asyncio.ensure_future(upstream())]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            up_writer.close()


async def test_a_client_that_waits_for_the_greeting_can_be_stripped_of_tls(
    tls_nats: tuple[NatsServer, Pki],
) -> None:
    # The attack SECRETS_NATS_TLS_FIRST closes, shown on a client without it.
    server, pki = tls_nats
    assert server.port is not None
    async with StrippingProxy(server.port) as proxy:
        bus = EventBus(
            [f"nats://service:{SERVICE_PASSWORD}@127.0.0.1:{proxy.port}"],
            PREFIX,
            instance_id="strip-x",
            tls_ca=pki.ca_file,
            tls_cert=pki.service_cert,
            tls_key=pki.service_key,
        )
        with pytest.raises(ConfigError):
            await bus.connect(Handler(), connect_timeout=1.0)
        await bus.aclose()
    assert SERVICE_PASSWORD.encode() in proxy.from_client


async def test_a_tls_first_client_never_sends_its_password_where_the_path_can_read_it(
    tls_nats: tuple[NatsServer, Pki],
) -> None:
    server, pki = tls_nats
    assert server.port is not None
    async with StrippingProxy(server.port) as proxy:
        bus = EventBus(
            [f"nats://service:{SERVICE_PASSWORD}@127.0.0.1:{proxy.port}"],
            PREFIX,
            instance_id="tls-first",
            tls_ca=pki.ca_file,
            tls_cert=pki.service_cert,
            tls_key=pki.service_key,
            tls_hostname="127.0.0.1",
            tls_first=True,
        )
        try:
            await bus.connect(Handler(), connect_timeout=TIMEOUT)
            assert bus.connected
            assert await bus.publish_audit("read", b'{"probe": 1}')  # JetStream answered
        finally:
            await bus.aclose()
    assert proxy.from_client, "the client went through the proxy"
    assert SERVICE_PASSWORD.encode() not in proxy.from_client
    assert b"CONNECT" not in proxy.from_client
    assert proxy.from_client[:1] == b"\x16"  # a TLS handshake record from the first byte

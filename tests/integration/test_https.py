"""HTTPS: with SECRETS_TLS_CERT and SECRETS_TLS_KEY the service serves TLS 1.2 or later through
its own protocol (service/server.py); plain HTTP to that port fails; a certificate that does not
load stops `serve` with exit code 2; `serve` end to end; the image's HEALTHCHECK both ways."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, ServiceProcess, free_port
from service.http.app import create_app
from service.http.serving import server_config, tls_context
from service.settings import Settings
from tests.support import _Server, bearer, service_environ, service_settings, write_policy

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Tls:
    cert: Path  # the server's certificate chain, PEM
    key: Path  # its private key, PEM
    ca: Path  # the CA that signed it, PEM

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls(ca: trustme.CA, tmp_path: Path) -> Tls:
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = Tls(cert=tmp_path / "tls.crt", key=tmp_path / "tls.key", ca=tmp_path / "ca.pem")
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(files.key))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def tls_overrides(tls: Tls) -> dict[str, str]:
    return {"tls_cert": str(tls.cert), "tls_key": str(tls.key)}


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


async def scheme_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the scope's scheme (https when the protocol sees the TLS transport)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = json.dumps({"scheme": scope["scheme"], "path": scope["path"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bare_settings(tls: Tls | None = None) -> Settings:
    """Settings for an app that never calls a backend (scheme_app)."""
    environ = {
        "SECRETS_VAULT_ADDR": "http://127.0.0.1:9",
        "SECRETS_VAULT_TOKEN": "unused",
        "SECRETS_OIDC_ISSUER": "http://127.0.0.1:9",
        "SECRETS_OIDC_AUDIENCE": "unused",
        "SECRETS_POLICY_FILE": "unused.toml",
        "SECRETS_PORT": str(free_port()),
    }
    if tls is not None:
        environ |= {"SECRETS_TLS_CERT": str(tls.cert), "SECRETS_TLS_KEY": str(tls.key)}
    return Settings.from_environ(environ)


def healthcheck_argv() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, with this interpreter for the image's `python`."""
    line = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("HEALTHCHECK ")
    )  # fmt: skip
    argv: list[str] = json.loads(line.split(" CMD ", 1)[1])
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def healthcheck_environ(port: int, tls: Tls | None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SECRETS_")}
    environ["SECRETS_PORT"] = str(port)
    if tls is not None:
        environ |= {"SECRETS_TLS_CERT": str(tls.cert), "SECRETS_TLS_KEY": str(tls.key)}
    return environ


async def test_keep_alive_and_pipelined_requests_over_tls_are_answered_whole(tls: Tls) -> None:
    async with serving_as_serve(scheme_app, bare_settings(tls)) as url:
        async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as client:
            for i in range(20):  # one connection: every answer whole, through the coalescing
                answer = await client.get(f"{url}/{i}")
                assert answer.json() == {"scheme": "https", "path": f"/{i}"}
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=tls.client_context(), server_hostname="127.0.0.1"
        )
        writer.write(b"".join(b"GET /p%d HTTP/1.1\r\nhost: t\r\n\r\n" % i for i in range(5)))
        answers = []
        for _ in range(5):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answers.append(json.loads(await reader.readexactly(length))["path"])
        assert answers == [f"/p{i}" for i in range(5)]
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_an_oversize_head_over_tls_is_refused_with_431(tls: Tls) -> None:
    async with serving_as_serve(scheme_app, bare_settings(tls)) as url:
        async with httpx.AsyncClient(verify=tls.client_context(), timeout=10) as client:
            answer = await client.get(f"{url}/", headers={"x-huge": "h" * 20 * 1024})
            assert answer.status_code == 431 and answer.json()["error"] == "too_large"


async def test_plain_http_to_the_https_port_fails(tls: Tls) -> None:
    async with serving_as_serve(scheme_app, bare_settings(tls)) as url:
        plain = url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=10) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(f"{plain}/healthz")


async def test_tls_1_2_with_aead_ciphers_is_the_oldest_protocol_served(tls: Tls) -> None:
    assert tls_context(str(tls.cert), str(tls.key)).minimum_version == ssl.TLSVersion.TLSv1_2
    async with serving_as_serve(scheme_app, bare_settings(tls)) as url:
        port = int(url.rsplit(":", 1)[1])
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = tls.client_context()
            context.minimum_version = context.maximum_version = version
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
            )
            ssl_object = writer.get_extra_info("ssl_object")
            assert ssl_object.version() == version.name.replace("v1_", "v1.")
            if version is ssl.TLSVersion.TLSv1_2:  # forward secrecy and AEAD
                name = ssl_object.cipher()[0]
                assert name.startswith("ECDHE-") and ("GCM" in name or "CHACHA20" in name)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        cbc = tls.client_context()  # TLS 1.2 with only ciphers that lack AEAD: refused
        cbc.maximum_version = ssl.TLSVersion.TLSv1_2
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, cbc)
        old = tls.client_context()
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client offers TLS 1.0 and 1.1 (it can, here)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 itself
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        # asyncio's server ends a failed handshake without sending its alert: EOF or a reset.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, old)


def handshake(port: int, context: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass


def run_serve(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETS_")} | environ
    return subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def tls_serve_environ(tmp_path: Path, cert: Path, key: Path) -> dict[str, str]:
    return {
        "SECRETS_VAULT_ADDR": "http://127.0.0.1:9",
        "SECRETS_VAULT_TOKEN": "s.not-a-real-token",
        "SECRETS_OIDC_ISSUER": "http://127.0.0.1:9",
        "SECRETS_OIDC_AUDIENCE": "secrets-service",
        "SECRETS_POLICY_FILE": str(write_policy(tmp_path)),
        "SECRETS_PORT": str(free_port()),
        "SECRETS_TLS_CERT": str(cert),
        "SECRETS_TLS_KEY": str(key),
    }


def test_a_key_that_does_not_match_the_certificate_exits_2_naming_the_setting(
    tls: Tls, ca: trustme.CA, tmp_path: Path
) -> None:
    other_key = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    result = run_serve(tls_serve_environ(tmp_path, tls.cert, other_key))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("secrets-service: configuration error: SECRETS_TLS_CERT: ")


def test_an_encrypted_key_exits_2_instead_of_asking_for_a_passphrase(
    tls: Tls, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    result = run_serve(tls_serve_environ(tmp_path, tls.cert, encrypted))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "SECRETS_TLS_CERT" in line and "encrypted" in line


async def test_the_service_answers_healthz_and_an_authenticated_read_over_https(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path, tls: Tls
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path), **tls_overrides(tls))
    writer_token, reader_token = oidc.mint("writer"), oidc.mint("reader")
    async with serving_as_serve(create_app(settings), settings) as url:
        assert url.startswith("https://")
        async with httpx.AsyncClient(base_url=url, verify=tls.client_context(), timeout=10) as c:
            assert (await c.get("/healthz")).status_code == 200
            body = {"data": {"password": "over-tls"}, "version": 0}
            written = await c.patch("/secrets/app/tls", json=body, headers=bearer(writer_token))
            assert written.status_code == 200
            for _ in range(10):  # keep-alive reads, served from the cache
                read = await c.get("/secrets/app/tls", headers=bearer(reader_token))
                assert read.status_code == 200 and read.json()["data"] == body["data"]
        async with httpx.AsyncClient(timeout=10) as untrusting:  # the system CAs only
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{url}/healthz")


def test_serve_with_tls_settings_serves_readyz_over_https_and_the_healthcheck_passes(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path, tls: Tls
) -> None:
    environ = service_environ(openbao, nats, oidc, write_policy(tmp_path), **tls_overrides(tls))
    with ServiceProcess(environ, log_path=tmp_path / "service.log", tls_ca=tls.ca) as svc:
        assert svc.url.startswith("https://")
        ready = httpx.get(f"{svc.url}/readyz", verify=tls.client_context(), timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        check = subprocess.run(
            healthcheck_argv(), env=healthcheck_environ(svc.port, tls), timeout=30,
            capture_output=True,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr
        plain = subprocess.run(  # the healthcheck with the TLS settings missing must fail
            healthcheck_argv(), env=healthcheck_environ(svc.port, None), timeout=30,
            capture_output=True,
        )  # fmt: skip
        assert plain.returncode != 0


def test_the_image_healthcheck_passes_against_a_plain_http_service(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    environ = service_environ(openbao, nats, oidc, write_policy(tmp_path))
    with ServiceProcess(environ, log_path=tmp_path / "service.log") as svc:
        check = subprocess.run(
            healthcheck_argv(), env=healthcheck_environ(svc.port, None), timeout=30,
            capture_output=True,
        )  # fmt: skip
        assert check.returncode == 0, check.stderr

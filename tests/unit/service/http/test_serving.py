"""service/http/serving.py: with SECRETS_TLS_CERT and SECRETS_TLS_KEY, `serve` speaks TLS 1.2 or
later through the service's own protocol, to a tiny app on loopback; plain HTTP to that port
fails; a certificate that does not load stops `serve` with exit code 2 (a child process that
never reaches a backend). The service itself over HTTPS: tests/integration/test_https.py."""

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
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from devstack import free_port
from service.http.serving import tls_context
from service.settings import Settings
from tests import support
from tests.support import Tls, serving_as_serve, write_policy

# Fixtures of tests/support.py, shared with tests/integration.
ca = support.ca
tls = support.tls


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

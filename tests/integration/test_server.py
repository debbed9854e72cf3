"""The real service answers through service/http/protocol.py: whole answers over keep-alive,
oversize heads refused, 503 beyond SECRETS_LIMIT_CONCURRENCY.

The protocol alone, on loopback: tests/unit/service/http/test_protocol.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, ServiceProcess
from tests.support import bearer, running_service, service_environ, service_settings, write_policy


async def test_the_service_answers_whole_over_keep_alive_through_it(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
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


async def test_the_service_refuses_oversize_heads_and_serves_a_read_just_under(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path))
    writer_token, reader_token = oidc.mint("writer"), oidc.mint("reader")
    async with running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            body = {"data": {"k": "v"}, "version": 0}
            written = await client.patch(
                "/secrets/app/heads", json=body, headers=bearer(writer_token)
            )
            assert written.status_code == 200
            near = {**bearer(reader_token), "x-pad": "p" * (15 * 1024 - len(reader_token))}
            read = await client.get("/secrets/app/heads", headers=near)
            assert read.status_code == 200 and read.json()["data"] == {"k": "v"}
            huge_url = await client.get("/secrets/app/" + "a" * 20 * 1024)
            assert huge_url.status_code == 414 and huge_url.json()["error"] == "too_large"
            huge_header = await client.get("/healthz", headers={"x-huge": "h" * 20 * 1024})
            assert huge_header.status_code == 431 and huge_header.json()["error"] == "too_large"


def test_serve_answers_503_beyond_the_concurrency_limit(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    environ = service_environ(openbao, nats, oidc, write_policy(tmp_path), limit_concurrency="3")
    with ServiceProcess(environ, log_path=tmp_path / "service.log") as svc:
        held = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(3)]
        try:
            deadline = time.monotonic() + 10
            while True:  # once the service has accepted all three
                answer = httpx.get(f"{svc.url}/healthz", timeout=5)
                if answer.status_code == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert answer.status_code == 503
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{svc.url}/healthz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.05)

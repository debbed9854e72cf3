"""HTTPS end to end: the service answers /healthz and an authenticated read over TLS; `serve` with
the TLS settings serves /readyz over HTTPS; the image's HEALTHCHECK passes both ways. TLS alone,
on a tiny app, and the certificate errors: tests/unit/service/http/test_serving.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, ServiceProcess
from service.http.app import create_app
from tests import support
from tests.support import (
    Tls,
    bearer,
    service_environ,
    service_settings,
    serving_as_serve,
    write_policy,
)

ROOT = Path(__file__).resolve().parents[2]

# Fixtures of tests/support.py, shared with the unit tests.
ca = support.ca
tls = support.tls


def tls_overrides(tls: Tls) -> dict[str, str]:
    return {"tls_cert": str(tls.cert), "tls_key": str(tls.key)}


def healthcheck_argv() -> list[str]:
    """The Dockerfile's HEALTHCHECK command, with this interpreter for the image's `python3`."""
    line = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("HEALTHCHECK ")
    )  # fmt: skip
    argv: list[str] = json.loads(line.split(" CMD ", 1)[1])
    assert argv[0] == "python3"
    return [sys.executable, *argv[1:]]


def healthcheck_environ(port: int, tls: Tls | None) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SECRETS_")}
    environ["SECRETS_PORT"] = str(port)
    if tls is not None:
        environ |= {"SECRETS_TLS_CERT": str(tls.cert), "SECRETS_TLS_KEY": str(tls.key)}
    return environ


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

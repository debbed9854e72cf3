"""HvacBackend's token calls over HTTP, against a small Vault on loopback: the JWT login's request,
renew-self kept up by `keep_token`, a login Vault refuses, and the token every call then sends.
What the identity decides is tested on a fake clock in test_identity.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from schemas.errors import VaultAccessDenied
from service.vault.backend import HvacBackend
from service.vault.identity import JwtLogin, LoginMethod
from tests.support import eventually
from tests.unit.service.vault import test_backend
from tests.unit.service.vault.test_backend import READ_ANSWER, MakePeer, Request, answer

peer = test_backend.peer  # the fixture: a server on loopback answering with a handler


@dataclass
class TokenVault:
    """Logins at auth/<any mount>/login issue `lease`-second renewable tokens; renew-self and
    KV reads need a token it issued. `accept` decides whether a login is taken."""

    lease: int = 1
    accept: bool = True
    logins: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    renewals: int = 0
    tokens_seen: list[str] = field(default_factory=list)

    async def handle(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        token = request.headers.get("x-vault-token", "")
        if request.path.endswith("/login"):
            self.logins.append((request.path, json.loads(request.body)))
            if not self.accept:
                writer.write(answer(400, {"errors": ["invalid role or secret id"]}))
                return True
            issued = f"token-{len(self.logins)}"
            auth = {"client_token": issued, "lease_duration": self.lease, "renewable": True}
            writer.write(answer(200, {"auth": auth}))
        elif request.path == "/v1/auth/token/renew-self":
            self.renewals += 1
            auth = {"client_token": token, "lease_duration": self.lease, "renewable": True}
            writer.write(answer(200, {"auth": auth}))
        else:
            self.tokens_seen.append(token)
            writer.write(answer(200, READ_ANSWER))
        return True


@contextlib.asynccontextmanager
async def backend(addr: str, auth: LoginMethod) -> AsyncIterator[HvacBackend]:
    vault = HvacBackend(addr, auth=auth, timeout=2.0)
    try:
        yield vault
    finally:
        await vault.aclose()


async def test_a_jwt_login_posts_the_role_and_the_file_s_token_and_calls_then_send_its_token(
    peer: MakePeer, tmp_path: Path
) -> None:
    vault = TokenVault(lease=3600)
    server = await peer(vault.handle)
    jwt_file = tmp_path / "token"
    jwt_file.write_text("eyJ.first.sig\n")
    async with backend(server.addr, JwtLogin("secrets-service", str(jwt_file), "k8s")) as b:
        await b.login()
        assert (await b.read("app/db")).version == 3
    assert vault.logins == [
        ("/v1/auth/k8s/login", {"role": "secrets-service", "jwt": "eyJ.first.sig"})
    ]
    assert vault.tokens_seen == ["token-1"]


async def test_keep_token_renews_a_one_second_login_token_before_it_ends(
    peer: MakePeer, tmp_path: Path
) -> None:
    vault = TokenVault(lease=1)
    server = await peer(vault.handle)
    jwt_file = tmp_path / "token"
    jwt_file.write_text("eyJ.first.sig")
    async with backend(server.addr, JwtLogin("svc", str(jwt_file))) as b:
        await b.login()
        task = asyncio.get_running_loop().create_task(b.keep_token())
        try:
            await eventually(lambda: vault.renewals >= 3, timeout=10)
            assert b.identity.valid
            assert len(vault.logins) == 1  # renewed, never logged in again
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_a_login_vault_refuses_is_access_denied_not_unavailable(
    peer: MakePeer, tmp_path: Path
) -> None:
    vault = TokenVault(accept=False)
    server = await peer(vault.handle)
    jwt_file = tmp_path / "token"
    jwt_file.write_text("eyJ.expired.sig")
    async with backend(server.addr, JwtLogin("svc", str(jwt_file))) as b:
        with pytest.raises(VaultAccessDenied):
            await b.login()
        assert b.identity.logins == {("jwt", "denied"): 1}

"""The service's own Vault identity against a real OpenBao: a short-lived renewable token kept
alive past its TTL, AppRole logging in again on expiry (and not on a policy's 403), OpenBao's
jwt auth method with the token file re-read at each login, and /readyz false while no login is
possible. No token, secret id or JWT ever reaches a log line or /metrics."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import NatsEndpoint, OidcIssuer, OpenBaoEndpoint, configure_oidc
from devstack.stack import DEV_SERVICE_POLICY
from service.vault.backend import HvacBackend
from service.vault.identity import VaultIdentity
from tests.support import (
    LogCapture,
    RunningService,
    bearer,
    eventually,
    metric_value,
    running_service,
    service_settings,
    write_policy,
)

# The service's Vault policy: the dev stack's, and a denied corner for policy 403s.
VAULT_POLICY = DEV_SERVICE_POLICY + 'path "secret/data/denied/*" { capabilities = ["deny"] }\n'


@dataclass
class Bao:
    """OpenBao administered with its root token."""

    addr: str
    client: httpx.Client
    policy: str

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.client.request(method, f"/v1/{path}", json=body)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def mount(self, kind: str) -> str:
        """A new auth mount of `kind` of the test's own (tests share the one OpenBao)."""
        mount = f"{kind}-{uuid.uuid4().hex[:8]}"
        self.call("POST", f"sys/auth/{mount}", {"type": kind})
        return mount

    def approle(self, mount: str, **role: Any) -> tuple[str, str]:
        """An AppRole role with the service's policy: its role id and a fresh secret id."""
        self.call("POST", f"auth/{mount}/role/svc", {"token_policies": [self.policy], **role})
        role_id = self.call("GET", f"auth/{mount}/role/svc/role-id")["data"]["role_id"]
        secret_id = self.call("POST", f"auth/{mount}/role/svc/secret-id")["data"]["secret_id"]
        return role_id, secret_id

    def revoke_logins(self, mount: str) -> None:
        """Revoke every token issued by logins on `mount`."""
        self.call("PUT", f"sys/leases/revoke-prefix/auth/{mount}")

    def token_alive(self, token: str) -> bool:
        response = self.client.post("/v1/auth/token/lookup", json={"token": token})
        return response.status_code == 200


@pytest.fixture(scope="module")
def bao(openbao: OpenBaoEndpoint) -> Iterator[Bao]:
    headers = {"X-Vault-Token": openbao.root_token}
    with httpx.Client(base_url=openbao.addr, headers=headers, timeout=10, trust_env=False) as c:
        admin = Bao(openbao.addr, c, f"secrets-service-{uuid.uuid4().hex[:6]}")
        admin.call("PUT", f"sys/policies/acl/{admin.policy}", {"policy": VAULT_POLICY})
        yield admin


@dataclass
class Service:
    running: RunningService
    client: httpx.AsyncClient
    writer: str

    @property
    def identity(self) -> VaultIdentity:
        backend = self.running.state.manager.backend
        assert isinstance(backend, HvacBackend)
        return backend.identity

    async def write(self, path: str, data: dict[str, str], version: int = 0) -> int:
        body = {"data": data, "version": version}
        response = await self.client.patch(f"/secrets/{path}", json=body, headers=self.auth)
        return response.status_code

    async def read(self, path: str) -> int:
        return (await self.client.get(f"/secrets/{path}", headers=self.auth)).status_code

    async def write_and_read(self) -> bool:
        """A new path written, then read back: both from Vault (the service caches nothing)."""
        return await self.statuses() == (200, 200)

    async def statuses(self) -> tuple[int, int]:
        """The statuses of a write to a new path and of its read."""
        path = f"app/id-{uuid.uuid4().hex[:10]}"
        return await self.write(path, {"k": "v"}), await self.read(path)

    @property
    def auth(self) -> dict[str, str]:
        return dict(bearer(self.writer))

    async def metric(self, name: str, **labels: str) -> float:
        return metric_value((await self.client.get("/metrics")).text, name, **labels)

    async def ready(self) -> bool:
        return (await self.client.get("/readyz")).status_code == 200


@contextlib.asynccontextmanager
async def service(
    openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path, **env: str
) -> AsyncIterator[Service]:
    # No cache: every read goes to Vault with the token of the moment.
    settings = service_settings(openbao, nats, oidc, write_policy(tmp_path), cache_ttl="0", **env)
    async with running_service(settings) as svc:
        async with httpx.AsyncClient(base_url=svc.url, timeout=10) as client:
            yield Service(svc, client, oidc.mint("writer"))


def approle_settings(bao: Bao, **role: str) -> tuple[dict[str, str], str]:
    """An AppRole role on an auth mount of its own: the settings logging in with it, and the
    secret id."""
    mount = bao.mount("approle")
    role_id, secret_id = bao.approle(mount, **role)
    settings = {
        "vault_auth": "approle",
        "vault_role_id": role_id,
        "vault_secret_id": secret_id,
        "vault_auth_mount": mount,
    }
    return settings, secret_id


def assert_never_shown(logs: LogCapture, metrics: str, *credentials: str) -> None:
    for credential in credentials:
        assert credential not in logs.text
        assert credential not in metrics


async def test_a_renewable_token_with_a_short_ttl_stays_valid_past_it_because_it_is_renewed(
    bao: Bao, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    created = bao.call(
        "POST",
        "auth/token/create-orphan",
        {"policies": [bao.policy], "ttl": "3s", "explicit_max_ttl": "5m", "renewable": True},
    )
    token = created["auth"]["client_token"]
    started = time.monotonic()
    with LogCapture() as logs:
        async with service(openbao, nats, oidc, tmp_path, vault_token=token) as svc:
            await eventually(lambda: svc.identity.renewals.get("ok", 0) >= 4, timeout=30)
            assert time.monotonic() - started > 6  # twice the TTL
            assert bao.token_alive(token)
            assert await svc.write_and_read()
            assert await svc.metric("secrets_vault_token_valid") == 1
            assert 0 < await svc.metric("secrets_vault_token_expiry_seconds") <= 3
            metrics = (await svc.client.get("/metrics")).text
    assert_never_shown(logs, metrics, token)


async def test_approle_logs_in_again_when_its_token_expires_and_reads_keep_working(
    bao: Bao, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    env, secret_id = approle_settings(bao, token_ttl="2s", token_max_ttl="4s")
    # No SECRETS_VAULT_AUTH, a token beside: both AppRole ids mean approle, as before the setting.
    env["vault_auth"] = ""
    with LogCapture() as logs:
        async with service(openbao, nats, oidc, tmp_path, **env) as svc:
            first = svc.identity.token
            assert first
            outcomes = []
            deadline = time.monotonic() + 12  # three token lifetimes (max TTL 4 s)
            while time.monotonic() < deadline:
                outcomes.append(await svc.statuses())
            logins = svc.identity.logins.get(("approle", "ok"), 0)
            assert logins >= 3  # each token ended at its max TTL: a new login each time
            assert logins <= 6  # and only then: once per ~3.3 s (renewed in between)
            assert svc.identity.renewals.get("ok", 0) >= 2
            assert set(outcomes) == {(200, 200)} and len(outcomes) > 20
            assert await svc.metric("secrets_vault_logins_total", method="approle", outcome="ok")
            metrics = (await svc.client.get("/metrics")).text
    assert_never_shown(logs, metrics, secret_id, first)


async def test_approle_does_not_log_in_again_for_a_403_from_vaults_policy(
    bao: Bao, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    env, _ = approle_settings(bao, token_ttl="1h")
    async with service(openbao, nats, oidc, tmp_path, **env) as svc:
        admin = {"Authorization": f"Bearer {oidc.mint('admin')}"}
        for _ in range(30):  # the service may read it, Vault's policy denies it: 503
            response = await svc.client.get("/secrets/denied/x", headers=admin)
            assert response.status_code == 503, response.text
        assert svc.identity.logins == {("approle", "ok"): 1}
        assert await svc.write_and_read()


def jwt_issuer(bao: Bao, openbao: OpenBaoEndpoint) -> tuple[OidcIssuer, str]:
    """OpenBao's identity tokens for two workloads (`svc-a`, `svc-b`), and a jwt auth mount
    trusting them (keys from OpenBao's own JWKS)."""
    audience = f"vault-login-{uuid.uuid4().hex[:6]}"
    issuer = configure_oidc(
        openbao.addr, openbao.root_token, audience=audience, personas={"svc-a": [], "svc-b": []}
    )
    mount = bao.mount("jwt")
    config = {"jwks_url": f"{issuer.issuer}/.well-known/keys", "bound_issuer": issuer.issuer}
    bao.call("POST", f"auth/{mount}/config", config)
    return issuer, mount


def subject(jwt: str) -> str:
    payload = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    sub: str = claims["sub"]
    return sub


async def test_jwt_login_works_and_the_next_login_uses_the_token_file_as_it_is_then(
    bao: Bao, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    issuer, mount = jwt_issuer(bao, openbao)
    first, second = issuer.mint("svc-a"), issuer.mint("svc-b")

    def bind_role_to(jwt: str) -> None:
        # Only the named workload may log in: a login with any other JWT is refused.
        role = {
            "role_type": "jwt",
            "bound_audiences": [issuer.audience],
            "user_claim": "sub",
            "bound_claims": {"sub": subject(jwt)},
            "token_policies": [bao.policy],
            "token_ttl": "1h",
        }
        bao.call("POST", f"auth/{mount}/role/secrets-service", role)

    bind_role_to(first)
    jwt_file = tmp_path / "token"
    jwt_file.write_text(first)
    env = {
        "vault_token": "",
        "vault_auth": "jwt",
        "vault_role": "secrets-service",
        "vault_jwt_file": str(jwt_file),
        "vault_auth_mount": mount,
    }
    with LogCapture() as logs:
        async with service(openbao, nats, oidc, tmp_path, **env) as svc:
            assert await svc.write_and_read()
            assert svc.identity.logins == {("jwt", "ok"): 1}
            # Kubernetes rotates the projected token in place; the old one stops logging in.
            jwt_file.write_text(second)
            bind_role_to(second)
            bao.revoke_logins(mount)  # the service's token is gone: the next call logs in
            assert await svc.write_and_read()
            assert svc.identity.logins == {("jwt", "ok"): 2}
            metrics = (await svc.client.get("/metrics")).text
    assert_never_shown(logs, metrics, first, second)


async def test_readyz_is_false_while_no_login_is_possible_and_true_again_once_it_is(
    bao: Bao, openbao: OpenBaoEndpoint, nats: NatsEndpoint, oidc: OidcIssuer, tmp_path: Path
) -> None:
    env, secret_id = approle_settings(bao, token_ttl="1h")
    mount = env["vault_auth_mount"]
    with LogCapture() as logs:
        async with service(openbao, nats, oidc, tmp_path, **env) as svc:
            assert await svc.ready()
            # The secret id is withdrawn and the service's token revoked: no way in.
            bao.call("POST", f"auth/{mount}/role/svc/secret-id/destroy", {"secret_id": secret_id})
            bao.revoke_logins(mount)
            await eventually(lambda: _not(svc.ready()), timeout=10, interval=0.2)
            assert await svc.metric("secrets_vault_token_valid") == 0
            assert await svc.read("app/anything") == 503
            # The same secret id is issued again: the service's next attempt gets in.
            bao.call("POST", f"auth/{mount}/role/svc/custom-secret-id", {"secret_id": secret_id})
            await eventually(svc.ready, timeout=30, interval=0.2)
            assert await svc.metric("secrets_vault_token_valid") == 1
            assert await svc.write_and_read()
            metrics = (await svc.client.get("/metrics")).text
    assert metric_value(metrics, "secrets_vault_logins_total", method="approle", outcome="denied")
    assert_never_shown(logs, metrics, secret_id)


async def _not(ready: Any) -> bool:
    return not await ready

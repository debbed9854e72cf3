"""The `make dev` stack: OpenBao, nats-server with JetStream, OpenBao as the OIDC issuer, a sample
policy and one service instance, with ready-to-use tokens printed. Ctrl-C stops everything."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import httpx

from devstack.nats import NatsServer
from devstack.oidc import DEV_POLICY_TOML, DEV_ROTATION_TOML, OidcIssuer, configure_oidc
from devstack.openbao import OpenBaoServer
from devstack.processes import free_port
from service.cli import serve_until_stopped
from service.obs.logs import configure_logging
from service.settings import Settings

__all__ = ["DEV_SERVICE_POLICY", "least_privilege_token", "run_dev"]

_EXAMPLE_BODY = '{"data": {"username": "app", "password": "n3w-Secret-value!"}, "version": 1}'

# The service's own Vault policy, least privilege on the KV v2 mount: the very file compose's
# openbao-init and `make stack` install.
DEV_SERVICE_POLICY = (
    Path(__file__).resolve().parents[1] / "compose" / "openbao" / "secrets-service.hcl"
).read_text()


def run_dev(*, port: int = 8080) -> int:
    configure_logging("WARNING")
    # uvicorn re-raises SIGTERM after its own shutdown; make that unwind through the `finally`
    # below like Ctrl-C does, so no child process is left behind.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="secrets-dev-"))
    with contextlib.ExitStack() as stack:
        print("starting OpenBao and NATS ...", file=sys.stderr)
        bao = stack.enter_context(
            OpenBaoServer(log_path=workdir / "openbao.log", root_token="dev-root")
        )
        nats = stack.enter_context(
            NatsServer(store_dir=workdir / "jetstream", log_path=workdir / "nats.log")
        )
        oidc = configure_oidc(bao.addr, bao.root_token)
        service_token = least_privilege_token(bao.addr, bao.root_token)
        _seed(bao.addr, bao.root_token)
        policy_file = workdir / "policy.toml"
        policy_file.write_text(DEV_POLICY_TOML + DEV_ROTATION_TOML)
        if not _port_free(port):
            port = free_port()
        settings = Settings.from_environ(
            {
                "SECRETS_VAULT_ADDR": bao.addr,
                "SECRETS_VAULT_TOKEN": service_token,
                "SECRETS_NATS_URL": nats.url,
                "SECRETS_OIDC_ISSUER": oidc.issuer,
                "SECRETS_OIDC_AUDIENCE": oidc.audience,
                "SECRETS_POLICY_FILE": str(policy_file),
                "SECRETS_PORT": str(port),
                "SECRETS_LOG_LEVEL": "WARNING",
                # Audit records go beside the servers' logs, not between the banner's lines.
                "SECRETS_AUDIT_SINK": f"file:{workdir / 'audit.log'}",
            }
        )
        tokens = {persona: oidc.mint(persona) for persona in ("reader", "writer", "admin")}
        url = f"http://127.0.0.1:{port}"

        async def run() -> int:
            started = asyncio.Event()
            task = asyncio.get_running_loop().create_task(
                serve_until_stopped(settings, started=started)
            )
            waiter = asyncio.get_running_loop().create_task(started.wait())
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if started.is_set():
                _print_banner(url, tokens, oidc, bao.addr, nats.url, workdir)
            waiter.cancel()
            return await task

        try:
            return asyncio.run(run())
        except KeyboardInterrupt:
            return 0
        finally:
            print("\nstopping the dev stack ...", file=sys.stderr)
    return 0


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def least_privilege_token(addr: str, root_token: str) -> str:
    headers = {"X-Vault-Token": root_token}
    with httpx.Client(base_url=addr, headers=headers, timeout=10) as client:
        client.put("/v1/sys/policies/acl/secrets-service", json={"policy": DEV_SERVICE_POLICY})
        response = client.post(
            "/v1/auth/token/create-orphan",
            json={"policies": ["secrets-service"], "ttl": "768h", "renewable": True},
        )
        response.raise_for_status()
        token: str = response.json()["auth"]["client_token"]
        return token


def _seed(addr: str, root_token: str) -> None:
    headers = {"X-Vault-Token": root_token}
    with httpx.Client(base_url=addr, headers=headers, timeout=10) as client:
        client.post(
            "/v1/secret/data/app/db",
            json={"data": {"username": "app", "password": "dev-only-Xq7!kP2#vR9"}},
        ).raise_for_status()


def _print_banner(
    url: str, tokens: Mapping[str, str], oidc: OidcIssuer, vault: str, nats: str, workdir: Path
) -> None:
    mint = oidc.mint_command
    lines = [
        "",
        f"secrets-service dev stack is up: {url}",
        f"  OpenBao {vault} (root token dev-root)   NATS {nats}   files in {workdir}",
        "",
        "Bearer tokens (valid 1 hour):",
    ]
    for persona, token in tokens.items():
        lines.append(f"  export {persona.upper()}_TOKEN={token}")
    lines += [
        "",
        "Try:",
        f'  curl -s -H "Authorization: Bearer $READER_TOKEN" {url}/secrets/app/db',
        f'  curl -s -X PATCH -H "Authorization: Bearer $WRITER_TOKEN" '
        f"-H 'Content-Type: application/json' "
        f"-d '{_EXAMPLE_BODY}' {url}/secrets/app/db",
        f'  curl -s -H "Authorization: Bearer $READER_TOKEN" {url}/secrets/other/x   # 403',
        f'  curl -s -X POST -H "Authorization: Bearer $ADMIN_TOKEN" '
        f"{url}/secrets/app/db:rotate   # a new password, the username kept",
        "",
        "Fresh tokens when these expire:",
    ]
    for persona in tokens:
        lines.append(f"  export {persona.upper()}_TOKEN=$({mint(persona)})")
    lines += ["", "Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)

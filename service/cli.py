"""`secrets-service serve` (production, configured by environment) and `secrets-service dev`.

A bad or missing setting ends the process with exit code 2 and one line naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import uvicorn

from schemas.errors import ConfigError
from service.auth.policy import Policy
from service.core.validation import Validator
from service.http.app import create_app
from service.http.protocol import server_config
from service.obs.logs import configure_logging
from service.settings import Settings

if TYPE_CHECKING:
    from devstack import OidcIssuer

__all__ = ["main"]

EXIT_CONFIG = 2
_EXAMPLE_BODY = '{"data": {"username": "app", "password": "n3w-Secret-value!"}, "version": 1}'

# The service's own Vault policy in the dev stack: least privilege on the KV v2 mount.
DEV_SERVICE_POLICY = """
path "secret/data/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["read", "list"] }
path "secret/delete/*" { capabilities = ["update"] }
path "secret/undelete/*" { capabilities = ["update"] }
path "secret/destroy/*" { capabilities = ["update"] }
path "auth/token/lookup-self" { capabilities = ["read"] }
"""


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="secrets-service", description="Secrets service in front of Vault/OpenBao"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service, configured by SECRETS_* environment variables")
    dev = sub.add_parser("dev", help="run OpenBao, NATS, an OIDC issuer and the service locally")
    dev.add_argument("--port", type=int, default=8080, help="service port (default 8080)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        sys.exit(serve(os.environ))
    sys.exit(run_dev(port=args.port))


def _config_failure(exc: ConfigError) -> int:
    print(f"secrets-service: configuration error: {exc.setting}: {exc.problem}", file=sys.stderr)
    return EXIT_CONFIG


def serve(environ: Mapping[str, str]) -> int:
    try:
        settings = Settings.from_environ(environ)
        Validator.from_policy(Policy.load(settings.policy_file).raw)
    except ConfigError as exc:
        return _config_failure(exc)
    configure_logging(settings.log_level)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(settings))
    except ConfigError as exc:
        return _config_failure(exc)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (uvicorn[standard] brings it), else asyncio's own loop.

    Server.serve() runs on whatever loop it is given; only Server.run() picks uvloop by itself,
    so this is what `uvicorn.run` would do. (Measured on cached reads: within noise of the
    default loop, as the Python work of each request dominates; bench/run.py.)
    """
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop does not build everywhere (Windows)
        return None
    return uvloop.new_event_loop


async def _serve(settings: Settings, *, started: asyncio.Event | None = None) -> int:
    app = create_app(settings)
    # HttpProtocol (one send per response, bounded request heads), the concurrency limit, and
    # HTTPS when SECRETS_TLS_CERT/KEY are set: a key that does not load is a ConfigError here.
    server = uvicorn.Server(server_config(app, settings))
    if started is not None:
        watcher = asyncio.get_running_loop().create_task(_signal_started(server, started))
    try:
        await server.serve()
    except SystemExit:
        pass  # uvicorn exits 3 when startup fails; the error kept by the app says why
    error = app.state.startup_error
    if isinstance(error, ConfigError):
        raise error
    if started is not None:
        watcher.cancel()
    return 0 if error is None else 1


async def _signal_started(server: uvicorn.Server, started: asyncio.Event) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    started.set()


# -- dev stack ---------------------------------------------------------------------------


def run_dev(*, port: int = 8080) -> int:
    import devstack  # the dev stack pulls in test-server helpers; load on demand

    configure_logging("WARNING")
    # uvicorn re-raises SIGTERM after its own shutdown; make that unwind through the `finally`
    # below like Ctrl-C does, so no child process is left behind.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="secrets-dev-"))
    with contextlib.ExitStack() as stack:
        print("starting OpenBao and NATS ...", file=sys.stderr)
        bao = stack.enter_context(
            devstack.OpenBaoServer(log_path=workdir / "openbao.log", root_token="dev-root")
        )
        nats = stack.enter_context(
            devstack.NatsServer(store_dir=workdir / "jetstream", log_path=workdir / "nats.log")
        )
        oidc = devstack.configure_oidc(bao.addr, bao.root_token)
        service_token = _dev_service_token(bao.addr, bao.root_token)
        _seed(bao.addr, bao.root_token)
        policy_file = workdir / "policy.toml"
        policy_file.write_text(devstack.DEV_POLICY_TOML)
        if not _port_free(port):
            port = devstack.free_port()
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
            task = asyncio.get_running_loop().create_task(_serve(settings, started=started))
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
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _dev_service_token(addr: str, root_token: str) -> str:
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
        "",
        "Fresh tokens when these expire:",
    ]
    for persona in tokens:
        lines.append(f"  export {persona.upper()}_TOKEN=$({mint(persona)})")
    lines += ["", "Ctrl-C stops everything.", ""]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

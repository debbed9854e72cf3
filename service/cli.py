"""`secrets-service serve` (production, configured by environment) and `secrets-service dev`.

A bad or missing setting ends the process with exit code 2 and one line naming the setting.
With SECRETS_WORKERS above 1, `serve` supervises that many workers (service.workers).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence

import uvicorn

from schemas.errors import ConfigError
from service.approvals.rules import ApprovalRules
from service.auth.policy import Policy
from service.core.validation import Validator
from service.http.app import create_app
from service.http.serving import Server, reuse_port_socket, server_config
from service.obs.logs import configure_logging
from service.rotation.rules import RotationRules
from service.settings import Settings
from service.workers import Supervisor, WorkerLink

__all__ = ["main", "serve", "serve_until_stopped"]

EXIT_CONFIG = 2


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
    try:
        # Only in a source checkout: the dev harness is not part of the installed package.
        from devstack.stack import run_dev
    except ImportError:
        print(
            "secrets-service dev: the dev stack runs from a source checkout (make dev)",
            file=sys.stderr,
        )
        sys.exit(EXIT_CONFIG)
    sys.exit(run_dev(port=args.port))


def _config_failure(exc: ConfigError) -> int:
    print(f"secrets-service: configuration error: {exc.setting}: {exc.problem}", file=sys.stderr)
    return EXIT_CONFIG


def serve(environ: Mapping[str, str]) -> int:
    try:
        settings = Settings.from_environ(environ)
        # Every policy section is checked before anything starts: one line, exit code 2.
        policy = Policy.load(settings.policy_file)
        RotationRules.from_policy(policy.raw, Validator.from_policy(policy.raw))
        ApprovalRules.from_policy(policy.raw)
    except ConfigError as exc:
        return _config_failure(exc)
    configure_logging(settings.log_level)
    link = WorkerLink.from_environ(environ)
    if link is None and settings.workers > 1:
        return Supervisor(settings, environ).run()
    if hasattr(signal, "SIGHUP") and threading.current_thread() is threading.main_thread():
        # Until the app's lifespan installs the policy reload, a SIGHUP (a supervisor forwards
        # one to a worker still starting) must not end the process, as its default would.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve_until_stopped(settings, link=link))
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


async def serve_until_stopped(
    settings: Settings, *, started: asyncio.Event | None = None, link: WorkerLink | None = None
) -> int:
    """Serve until a signal stops it. `link`: this process is a worker of a supervisor; it
    shares the port with the other workers, and drains when the supervisor is gone."""
    app = create_app(settings)
    # HttpProtocol (one send per response, bounded request heads), the concurrency limit, and
    # HTTPS when SECRETS_TLS_CERT/KEY are set: a key that does not load is a ConfigError here.
    config = server_config(app, settings)
    server = Server(config)
    sockets = None
    loop = asyncio.get_running_loop()
    if link is not None:
        sockets = [reuse_port_socket(settings.host, settings.port, config.backlog)]
        link.watch(loop, lambda: setattr(server, "should_exit", True))
    watcher = loop.create_task(_signal_started(server, started, link))
    try:
        await server.serve(sockets=sockets)
    except SystemExit:
        pass  # uvicorn exits 3 when startup fails; the error kept by the app says why
    finally:
        watcher.cancel()
    error = app.state.startup_error
    if isinstance(error, ConfigError):
        raise error
    return 0 if error is None else 1


async def _signal_started(
    server: uvicorn.Server, started: asyncio.Event | None, link: WorkerLink | None
) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    if started is not None:
        started.set()
    if link is not None:
        link.ready()

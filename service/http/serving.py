"""How `secrets-service serve` runs the app: uvicorn on service.http.protocol.HttpProtocol, with
the concurrency limit, HTTPS when the settings name a certificate and key, and (in each worker of
SECRETS_WORKERS, service.workers) a listening socket the other workers share (SO_REUSEPORT)."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import uvicorn

from schemas.errors import ConfigError
from service.http.protocol import HttpProtocol
from service.settings import Settings

__all__ = ["Server", "reuse_port_socket", "server_config", "tls_context"]


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for the PEM certificate chain `cert` and its key: TLS 1.2 at least, and
    for TLS 1.2 only ciphers with forward secrecy and authenticated encryption (Mozilla's
    "intermediate" profile; TLS 1.3 keeps OpenSSL's suites, all of that kind).

    Loaded at startup so that a bad file is a configuration error (exit code 2), not a failure
    on the first connection.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!aDSS")
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            "SECRETS_TLS_CERT",
            f"{cert} with SECRETS_TLS_KEY {key} is not a PEM certificate chain and its "
            f"unencrypted private key ({reason})",
        ) from None
    return context


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise ValueError("the private key is encrypted")


class Server(uvicorn.Server):
    """uvicorn's Server, ending the app's watch streams first when it stops: uvicorn waits for
    every response to finish, and a stream would otherwise run until its token expires."""

    async def shutdown(self, sockets: Any = None) -> None:
        feed = getattr(getattr(self.config.app, "state", None), "watch_feed", None)
        if feed is not None:
            feed.stop_all()
        await super().shutdown(sockets)


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """How `secrets-service serve` runs `app`: HttpProtocol, the concurrency limit (503 beyond
    it, from uvicorn), and HTTPS when `settings` name a certificate and key."""
    tls: dict[str, Any] = {}
    if settings.tls_cert and settings.tls_key:
        context = tls_context(settings.tls_cert, settings.tls_key)
        tls["ssl_context_factory"] = lambda config, default: context
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        proxy_headers=False,
        http=HttpProtocol,
        limit_concurrency=settings.limit_concurrency,
        **tls,
    )


def reuse_port_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket on `host`:`port` that every worker binds (SO_REUSEPORT): the kernel
    spreads new connections over the workers' sockets, each served by its own process.

    A port held by a process that is not one of them is a ConfigError (exit code 2).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            "SECRETS_PORT", f"cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    return sock

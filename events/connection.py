"""Connecting to NATS safely: the TLS context (mutual TLS included), the options of
`nats.connect` for credentials and TLS-first, and errors described without their text.

Shared by the service's bus and the remote listener, so both read the same settings the same way.
"""

from __future__ import annotations

import importlib.util
import ssl
from typing import Any

from schemas.errors import ConfigError

__all__ = [
    "TlsFileError",
    "check_credentials",
    "connect_options",
    "describe_error",
    "is_telling",
    "tls_context",
]


class TlsFileError(ValueError):
    """A TLS file for NATS did not load: `which` is ``"ca"`` or ``"cert"`` (with its key)."""

    def __init__(self, which: str, detail: str) -> None:
        super().__init__(detail)
        self.which = which


def tls_context(
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    *,
    required: bool = False,
) -> ssl.SSLContext | None:
    """A client TLS context for NATS: server certificates checked against `ca` (the system's
    CAs without it), and `cert`/`key` presented for mutual TLS. None when nothing is given and
    TLS is not `required` (nats-py then makes a default context itself if the URL or the server
    asks for TLS). Raises `TlsFileError` for a file that does not load."""
    if ca is None and cert is None and key is None and not required:
        return None
    if (cert is None) != (key is None):
        raise TlsFileError("cert", "a client certificate needs its key, and a key its certificate")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError("ca", f"not a PEM CA bundle ({type(exc).__name__})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                "cert", f"certificate and key do not load as a pair ({type(exc).__name__})"
            ) from None
    return context


def connect_options(
    credentials: str | None,
    tls: ssl.SSLContext | None,
    tls_hostname: str | None,
    *,
    tls_first: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of `nats.connect` for a credentials file and TLS, where given."""
    options: dict[str, Any] = {}
    if tls_first:
        # nats-py otherwise upgrades only when the server's plain-text greeting says
        # `tls_required`, which whoever sits on the path can delete.
        options["tls_handshake_first"] = True
    if credentials is not None:
        options["user_credentials"] = credentials
    if tls is not None:
        options["tls"] = tls
    if tls_hostname is not None:
        options["tls_hostname"] = tls_hostname
    return options


def check_credentials(path: str) -> None:
    """Fail at start, naming the setting, rather than at every connection attempt."""
    if importlib.util.find_spec("nkeys") is None:
        raise ConfigError(
            "SECRETS_NATS_CREDS", "needs the nkeys package: pip install 'nats-py[nkeys]'"
        )
    try:
        with open(path, encoding="utf-8") as creds:
            text = creds.read(65536)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("SECRETS_NATS_CREDS", f"cannot read: {type(exc).__name__}") from None
    if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
        raise ConfigError(
            "SECRETS_NATS_CREDS", "not a NATS credentials file (a user JWT and an NKEY seed)"
        )


def is_telling(exc: BaseException) -> bool:
    """Whether `describe_error` says more of `exc` than its type (a refusal, a TLS failure)."""
    return describe_error(exc) != type(exc).__name__


def describe_error(exc: BaseException) -> str:
    """What went wrong, without the text of the error: some hold a server URL, which may
    hold a password."""
    text = str(exc).lower()
    if "authorization violation" in text or "authentication" in text:
        return "the server refused our credentials (Authorization Violation)"
    if "permissions violation" in text:
        return "Permissions Violation (a subject this user may not use)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate was not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    return type(exc).__name__

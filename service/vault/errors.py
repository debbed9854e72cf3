"""The one place hvac, requests, aiohttp and HTTP failures become schemas.errors (`mapped`), and
the internal signals the backend raises within it (`CasMismatch`, `Malformed`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, TypeVar

import aiohttp
import hvac.exceptions as hvac_errors
import msgspec
import requests

from schemas.errors import NotFound, SecretsError, VaultAccessDenied, VaultUnavailable
from service.vault.answers import error_answer

__all__ = ["CasMismatch", "Malformed", "check_done", "mapped", "status_error"]

log = logging.getLogger("secrets.vault")
T = TypeVar("T")


class CasMismatch(SecretsError):
    """Internal: the CAS check failed; `write` reads the current version and raises 409."""


class Malformed(Exception):
    """Internal: an answer this call cannot take (too large, another version, a 3xx)."""


@contextlib.contextmanager
def mapped(op: str, path: str) -> Iterator[None]:
    """The one place hvac, requests, aiohttp and HTTP errors become service errors.

    Raised `from None`: a dependency's exception (its URL, Vault's error text) is never chained
    to ours, so no traceback of ours can carry it."""
    try:
        yield
    except TimeoutError:
        raise  # the caller's deadline, or aiohttp's: `HvacBackend._observed` reports a timeout
    except hvac_errors.InvalidPath:
        raise NotFound("no secret at this path", path=path) from None
    except hvac_errors.InvalidRequest as exc:
        if op == "write" and "check-and-set" in str(exc):
            raise CasMismatch() from None
        if op == "login":  # Vault answers 400 to credentials it does not take
            log.error(
                "vault refused the service's login: check SECRETS_VAULT_AUTH and its credentials"
            )
            raise VaultAccessDenied("the secrets backend refused the service's login") from None
        log.error("vault rejected a request", extra={"op": op, "path": path})
        raise VaultUnavailable("the secrets backend rejected the request", path=path) from None
    except (hvac_errors.Forbidden, hvac_errors.Unauthorized):
        log.error(
            "vault refused the service's token: check SECRETS_VAULT_TOKEN and its policy "
            "(it needs read, create, update on <mount>/data/*, read and list on "
            "<mount>/metadata/*, update on <mount>/delete/*, <mount>/undelete/* and "
            "<mount>/destroy/*)",
            extra={"op": op, "path": path},
        )
        raise VaultAccessDenied("the secrets backend is unavailable", path=path) from None
    except (
        requests.exceptions.RequestException,
        hvac_errors.VaultError,  # any other status: 204, 3xx, 412, 429, 5xx
        aiohttp.ClientError,  # refused, reset, closed midway, not HTTP, TLS, proxy
        OSError,  # ConnectionError and ssl.SSLError among them
        UnicodeError,  # a token that is not ASCII
        msgspec.DecodeError,  # not JSON, or not the shape the call expects (ValidationError)
        Malformed,
    ) as exc:
        log.error(
            "vault unavailable", extra={"op": op, "path": path, "error_type": type(exc).__name__}
        )
        raise VaultUnavailable("the secrets backend is unavailable", path=path) from None


def status_error(status: int, payload: bytes, method: str, url: str) -> hvac_errors.VaultError:
    """The hvac error for a status, so that `mapped` maps both clients' answers alike."""
    try:
        errors: list[str] | None = error_answer.decode(payload).errors
    except msgspec.DecodeError:
        errors = None
    return hvac_errors.VaultError.from_status(
        status, f"HTTP {status}", errors=errors, method=method, url=url
    )


def check_done(answer: Any) -> None:
    """An hvac lifecycle call's answer: 204 (or 200) is done; a 3xx or another 2xx is not."""
    status = 200 if isinstance(answer, dict) else getattr(answer, "status_code", None)
    if status not in (200, 204):
        raise Malformed(f"HTTP {status}")

"""What a failed rotation is called: `ROTATION_ERRORS`, the codes `last_error`, events and
audit records carry (never a value), and `error_code`, which names the code of any failure."""

from __future__ import annotations

from schemas.errors import InvalidSecret, VaultUnavailable
from service.rotation.postgres import PostgresError

__all__ = ["ROTATION_ERRORS", "BaseUnreadable", "MasterNotFound", "error_code"]

ROTATION_ERRORS = (
    "invalid_secret",  # the data (or the generated values) break the path's validation rules
    "base_unreadable",  # the version the rotation starts from is deleted or destroyed
    "bad_secret",  # a postgres secret lacks host, port, dbname, username or password
    "master_not_found",  # the `master` secret of an alternating postgres rule is not readable
    "postgres_unreachable",
    "postgres_login_failed",
    "postgres_refused",
    "vault_unavailable",
    "conflict",  # human writes kept winning: the rotation gave up re-planning
    "internal",
)
"""Every `last_error` and `secret.rotation_failed` `error`: a code, never a value."""


class BaseUnreadable(Exception):
    """The version the rotation starts from is deleted or destroyed."""


class MasterNotFound(Exception):
    """The `master` secret of an alternating postgres rule is not readable."""


def error_code(exc: BaseException) -> str:
    """The ROTATION_ERRORS code of a failure: what `last_error` and events say, no value."""
    if isinstance(exc, PostgresError):
        return "bad_secret" if exc.code == "bad_secret" else f"postgres_{exc.code}"
    if isinstance(exc, InvalidSecret):
        return "invalid_secret"
    if isinstance(exc, BaseUnreadable):
        return "base_unreadable"
    if isinstance(exc, MasterNotFound):
        return "master_not_found"
    if isinstance(exc, VaultUnavailable):
        return "vault_unavailable"
    return "internal"

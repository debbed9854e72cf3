"""secrets-service: OIDC-authenticated, cached, event-driven access to Vault/OpenBao KV v2."""

import typing as _typing

from service.errors import (
    BackendUnavailable,
    ConfigError,
    Forbidden,
    InvalidPath,
    InvalidRequest,
    InvalidSecret,
    NotFound,
    SecretsError,
    TooLarge,
    Unauthenticated,
    VaultAccessDenied,
    VaultUnavailable,
    VersionConflict,
)
from service.manager import SecretsManager
from service.secret import Secret, SecretData
from service.settings import Settings
from service.vault import HvacBackend, VaultBackend

if _typing.TYPE_CHECKING:
    from service.app import create_app


def __getattr__(name: str) -> _typing.Any:
    # The app pulls in the events package, which imports service modules: loading it lazily
    # lets `import events` come first without a cycle.
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(f"module 'service' has no attribute {name!r}")


__all__ = [
    "BackendUnavailable",
    "ConfigError",
    "Forbidden",
    "HvacBackend",
    "InvalidPath",
    "InvalidRequest",
    "InvalidSecret",
    "NotFound",
    "Secret",
    "SecretData",
    "SecretsError",
    "SecretsManager",
    "Settings",
    "TooLarge",
    "Unauthenticated",
    "VaultAccessDenied",
    "VaultBackend",
    "VaultUnavailable",
    "VersionConflict",
    "create_app",
]

"""secrets-service: OIDC-authenticated, cached, event-driven access to Vault/OpenBao KV v2."""

from schemas.errors import (
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
from schemas.secret import Secret, SecretData
from service.core.manager import SecretsManager
from service.http.app import create_app
from service.settings import Settings
from service.vault import HvacBackend, VaultBackend

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

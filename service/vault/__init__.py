"""Vault/OpenBao KV v2: the backend protocol the manager uses, and its implementation."""

from service.vault.backend import HvacBackend, VaultBackend

__all__ = ["HvacBackend", "VaultBackend"]

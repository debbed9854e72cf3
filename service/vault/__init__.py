"""Vault/OpenBao KV v2: the `VaultBackend` protocol the manager uses (protocol), its real
implementation `HvacBackend` (backend), Vault's answers (answers) and the one error mapping
(errors)."""

from service.vault.backend import HvacBackend
from service.vault.protocol import CallObserver, VaultBackend

__all__ = ["CallObserver", "HvacBackend", "VaultBackend"]

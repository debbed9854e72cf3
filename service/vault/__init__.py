"""Vault/OpenBao KV v2: the `VaultBackend` protocol the manager uses (protocol), its real
implementation `HvacBackend` (backend), Vault's answers (answers), the one error mapping
(errors) and the nodes of an HA cluster with the rules for moving on (nodes)."""

from service.vault.backend import HvacBackend
from service.vault.protocol import CallObserver, VaultBackend

__all__ = ["CallObserver", "HvacBackend", "VaultBackend"]

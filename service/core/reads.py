"""`Reads`: a GET's way through the manager: the cache first, else one Vault read per path shared
by every caller waiting, cached unless the ledger knows a newer version; history and listings.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from schemas.api import SecretBody, SecretMetadata
from schemas.errors import InvalidRequest
from schemas.paths import validate_path, validate_prefix
from schemas.secret import Secret, SecretData
from service.core.cache import SecretCache
from service.core.ledger import VersionLedger
from service.tasks import SingleFlight
from service.vault.protocol import VaultBackend

__all__ = ["Reads", "compact", "encode_document"]

_encode = msgspec.json.Encoder().encode
_REREADS = 3  # reads of a path that Vault answers with a version older than one announced


class Reads:
    """Cache-through reads of latest and pinned versions (their documents encoded once), and
    the uncached reads of version history and folder listings.

    `confirm(path)` is called when Vault answers a read with a version older than the ledger's
    newest: it asks Vault about a version only an event vouches for (`Coherence.confirm_stale`).
    """

    def __init__(
        self,
        backend: VaultBackend,
        cache: SecretCache,
        ledger: VersionLedger,
        flights: SingleFlight[str, Secret],
        *,
        fallback_ttl: float,
        bus_connected: bool,
        confirm: Callable[[str], Awaitable[None]],
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.ledger = ledger
        self.flights = flights
        self.fallback_ttl = fallback_ttl
        # While the bus is down, invalidations may be missed: serve cached entries only
        # within fallback_ttl of their fetch.
        self.bus_connected = bus_connected
        self._confirm = confirm

    @property
    def max_age(self) -> float:
        # While the bus is down, invalidations may be missed: only young entries are served,
        # pinned versions included (one destroyed meanwhile must not outlive the bound).
        return self.cache.ttl if self.bus_connected else self.fallback_ttl

    async def get(self, path: str, version: int | None = None) -> Secret:
        """The latest version of `path` (or version `version`). Raises NotFound."""
        return (await self.get_document(path, version))[0]

    async def get_document(self, path: str, version: int | None = None) -> tuple[Secret, bytes]:
        """The secret and its JSON document (path, version, data, created_time), encoded once."""
        validate_path(path)
        if version is not None and (isinstance(version, bool) or version < 1):
            raise InvalidRequest("version must be a positive integer", path=path)
        max_age = self.max_age
        entry = self.cache.get(path, version, max_age)
        if entry is not None:
            return entry.secret, entry.body
        if version is not None:
            secret = await self.backend.read(path, version)
            compacted, body = compact(secret)
            if secret.version == version and not self.ledger.is_gone(path, version):
                self.cache.put(compacted, body, pinned=True)
            return secret, body
        # The read runs as its own task, shared by every caller of this path meanwhile.
        secret = await self.flights.run(path, lambda: self._fetch(path))
        entry = self.cache.get(path, None, max_age, count=False)
        if entry is not None and entry.secret.version == secret.version:
            return secret, entry.body
        return secret, encode_document(secret)

    def cached_document(self, path: str) -> tuple[Secret, bytes] | None:
        """The latest version of `path` and its document if the cache holds it fresh, else None.

        Synchronous, for the HTTP fast path: nothing is read, and a miss is not counted (the
        caller then calls `get_document`, which counts it). `path` must be valid already.
        """
        entry = self.cache.get(path, None, self.max_age, count=False)
        if entry is None:
            return None
        self.cache.hits += 1
        return entry.secret, entry.body

    async def versions(self, path: str) -> SecretMetadata:
        """The version history of `path`, straight from Vault (never cached)."""
        validate_path(path)
        return await self.backend.read_metadata(path)

    async def list_keys(self, prefix: str) -> list[str]:
        """The keys right under `prefix`, unfiltered, straight from Vault (never cached)."""
        validate_prefix(prefix)
        return await self.backend.list_keys(prefix)

    def forget_flight(self, path: str) -> None:
        """New readers of `path` must not join a read in flight: it may predate a change."""
        self.flights.forget(path)

    def cache_latest(self, secret: Secret) -> None:
        """Cache `secret`, which Vault returned as its latest, unless the ledger forbids it."""
        if self.ledger.confirms(secret.path, secret.version):
            self.cache.put(*compact(secret))

    async def _fetch(self, path: str) -> Secret:
        secret = await self.backend.read(path)
        if secret.version < self.ledger.newest(path):
            # If only an event vouches for the newer version and no check is on its way,
            # Vault is asked now, the one time the claim matters (see Coherence.apply_change).
            await self._confirm(path)
        for _ in range(_REREADS):
            if secret.version >= self.ledger.newest(path):
                break
            # A newer version was announced while we read: read again.
            secret = await self.backend.read(path)
        self.cache_latest(secret)
        return secret


def compact(secret: Secret) -> tuple[Secret, bytes]:
    """`secret` as the cache keeps it, with its document: the data is decoded from the document
    when first read in process, so that a cached secret is held once, as JSON."""
    body = encode_document(secret)
    data = SecretData.from_document(body)
    return Secret(secret.path, secret.version, data, secret.created_time), body


def encode_document(secret: Secret) -> bytes:
    """The JSON document of `secret`: what a GET of it answers."""
    return _encode(
        SecretBody(
            path=secret.path,
            version=secret.version,
            data=secret.data.reveal(),
            created_time=secret.created_time,
        )
    )

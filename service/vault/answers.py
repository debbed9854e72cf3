"""Vault's answers as the backend expects them (KV v2 data, metadata, lists, logins, errors), one
msgspec Struct and decoder each, and KV v2 metadata converted to our SecretMetadata."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from schemas.api import SecretMetadata, VersionMetadata, VersionNumber

__all__ = [
    "ErrorAnswer",
    "KvMetadata",
    "ListAnswer",
    "LoginAnswer",
    "LookupAnswer",
    "MetadataAnswer",
    "ReadAnswer",
    "TokenInfo",
    "TokenLookupAnswer",
    "WriteAnswer",
    "error_answer",
    "metadata_answer",
    "metadata_from_vault",
    "read_answer",
    "secret_metadata",
    "write_answer",
]


class VersionStamp(msgspec.Struct):
    version: VersionNumber
    created_time: str


class ReadData(msgspec.Struct):
    data: dict[str, Any] | None  # null when the version was deleted (Vault then says 404)
    metadata: VersionStamp


class ReadAnswer(msgspec.Struct):
    data: ReadData


class WriteAnswer(msgspec.Struct):
    data: VersionStamp


class VersionEntry(msgspec.Struct):
    created_time: str
    deletion_time: str = ""
    destroyed: bool = False


class KvMetadata(msgspec.Struct):
    current_version: Annotated[int, msgspec.Meta(ge=0, le=2**53)]
    created_time: str
    updated_time: str
    versions: dict[VersionNumber, VersionEntry] = {}


class MetadataAnswer(msgspec.Struct):
    data: KvMetadata


class Keys(msgspec.Struct):
    keys: list[str]


class ListAnswer(msgspec.Struct):
    data: Keys


class LoginAuth(msgspec.Struct):
    client_token: Annotated[str, msgspec.Meta(min_length=1)]
    lease_duration: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: never expires
    renewable: bool = False


class LoginAnswer(msgspec.Struct):
    auth: LoginAuth


class LookupAnswer(msgspec.Struct):
    data: dict[str, Any]


class TokenInfo(msgspec.Struct):
    ttl: Annotated[int, msgspec.Meta(ge=0)] = 0  # seconds left; 0: never expires
    renewable: bool = False


class TokenLookupAnswer(msgspec.Struct):
    data: TokenInfo


class ErrorAnswer(msgspec.Struct):
    errors: list[str] = []


read_answer = msgspec.json.Decoder(ReadAnswer)
write_answer = msgspec.json.Decoder(WriteAnswer)
metadata_answer = msgspec.json.Decoder(MetadataAnswer)
error_answer = msgspec.json.Decoder(ErrorAnswer)


def metadata_from_vault(
    path: str, data: Mapping[str, Any], now: datetime | None = None
) -> SecretMetadata:
    """A KV v2 metadata answer's ``data`` as a SecretMetadata, versions oldest first.
    Raises msgspec.ValidationError when `data` is not shaped as Vault's."""
    return secret_metadata(path, msgspec.convert(data, KvMetadata, strict=False), now)


def secret_metadata(path: str, meta: KvMetadata, now: datetime | None = None) -> SecretMetadata:
    """`meta` as a SecretMetadata, versions oldest first, `deleted` as of `now`."""
    moment = now or datetime.now(UTC)
    versions = []
    for number, entry in sorted(meta.versions.items()):
        deletion_time = entry.deletion_time or None
        versions.append(
            VersionMetadata(
                version=number,
                created_time=entry.created_time,
                deletion_time=deletion_time,
                deleted=deletion_time is not None and _not_after(deletion_time, moment),
                destroyed=entry.destroyed,
            )
        )
    return SecretMetadata(
        path=path,
        current_version=meta.current_version,
        created_time=meta.created_time,
        updated_time=meta.updated_time,
        versions=tuple(versions),
    )


def _not_after(timestamp: str, moment: datetime) -> bool:
    # A deletion time in the future is one scheduled by delete_version_after: not deleted yet.
    try:
        return datetime.fromisoformat(timestamp) <= moment
    except ValueError:
        return True  # unparseable: take Vault's word that it is deleted

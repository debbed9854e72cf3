"""Request, response and error bodies of the HTTP API, as msgspec Structs.

The encoder and decoders are built once here; /openapi.json is generated from these types.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

__all__ = [
    "ConflictError",
    "ErrorBody",
    "InvalidSecretError",
    "KeyList",
    "LifecycleResponse",
    "MAX_VERSIONS_PER_REQUEST",
    "RollbackRequest",
    "RotateRequest",
    "RotateResponse",
    "RotationStatus",
    "SecretBody",
    "SecretMetadata",
    "VersionMetadata",
    "VersionsRequest",
    "ViolationBody",
    "WriteRequest",
    "WriteResponse",
    "encoder",
    "rollback_request_decoder",
    "rotate_request_decoder",
    "versions_request_decoder",
    "write_request_decoder",
]

Version = Annotated[int, msgspec.Meta(ge=0, le=2**53, description="KV v2 version number")]


class WriteRequest(msgspec.Struct, forbid_unknown_fields=True):
    """PATCH body: write `data` as the next version if the current version is `version`."""

    data: dict[str, Any]
    version: Annotated[
        Version, msgspec.Meta(description="The version the caller last saw; 0 = must not exist")
    ]

    def __repr__(self) -> str:
        return f"WriteRequest(data='**redacted**', version={self.version})"

    def __rich_repr__(self) -> list[tuple[str, Any]]:
        return [("data", "**redacted**"), ("version", self.version)]


class SecretBody(msgspec.Struct):
    path: str
    version: int
    data: dict[str, Any]
    created_time: str


class WriteResponse(msgspec.Struct):
    path: str
    version: int


class ErrorBody(msgspec.Struct):
    error: str
    detail: str


class ConflictError(msgspec.Struct):
    error: str
    detail: str
    current_version: int


class ViolationBody(msgspec.Struct):
    field: str
    rule: str


class InvalidSecretError(msgspec.Struct):
    error: str
    detail: str
    violations: list[ViolationBody]


# -- version history and lifecycle (custom methods) -------------------------------------------

MAX_VERSIONS_PER_REQUEST = 100
VersionNumber = Annotated[int, msgspec.Meta(ge=1, le=2**53)]


class VersionMetadata(msgspec.Struct, frozen=True):
    """One version as KV v2 keeps it: never its data."""

    version: VersionNumber
    created_time: str
    deletion_time: Annotated[
        str | None,
        msgspec.Meta(description="When it was (or, with delete_version_after, will be) deleted"),
    ] = None
    deleted: Annotated[
        bool, msgspec.Meta(description="Soft-deleted now: unreadable until undeleted")
    ] = False
    destroyed: Annotated[bool, msgspec.Meta(description="Destroyed: the data is gone")] = False

    @property
    def readable(self) -> bool:
        return not (self.deleted or self.destroyed)


class SecretMetadata(msgspec.Struct, frozen=True):
    """GET /secrets/{path}:versions: the version history of a path, oldest first."""

    path: str
    current_version: int
    created_time: str
    updated_time: str
    versions: tuple[VersionMetadata, ...]

    def version(self, number: int) -> VersionMetadata | None:
        for entry in self.versions:
            if entry.version == number:
                return entry
        return None


class KeyList(msgspec.Struct, frozen=True, omit_defaults=True):
    """GET /secrets/{prefix}:list: the readable keys right under `prefix`; folders end in '/'.

    A folder is listed only if the caller can read a secret that exists below it.
    `truncated` (present only when true): the service stopped looking before it could tell
    for some folder, which is then left out.
    """

    prefix: str
    keys: list[str]
    truncated: bool = False


class VersionsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST :undelete and :destroy body: the versions to act on."""

    versions: Annotated[
        list[VersionNumber],
        msgspec.Meta(min_length=1, max_length=MAX_VERSIONS_PER_REQUEST),
    ]


class RollbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST :rollback body: write version `to_version`'s data as the next version (CAS)."""

    to_version: Annotated[VersionNumber, msgspec.Meta(description="The version to restore")]
    version: Annotated[
        VersionNumber, msgspec.Meta(description="The current version the caller last saw")
    ]


class LifecycleResponse(msgspec.Struct):
    """DELETE, :undelete and :destroy answer: the versions acted on."""

    path: str
    versions: list[int]


class RotateRequest(msgspec.Struct, forbid_unknown_fields=True):
    """POST :rotate body (optional): rotate only if the current version is still `version`."""

    version: Annotated[
        VersionNumber | None, msgspec.Meta(description="The current version the caller last saw")
    ] = None


class RotateResponse(msgspec.Struct):
    """POST :rotate answer: the version the rotation wrote and the one it replaced."""

    path: str
    version: int
    previous_version: int


class RotationStatus(msgspec.Struct):
    """GET :rotation answer. `state`: idle, running, failed or stalled; `last_error` is a code
    (never a value); times are RFC 3339 UTC, `next_rotation` null when only on request."""

    path: str
    state: str
    last_rotated: str | None
    next_rotation: str | None
    failures: int
    last_error: str | None


encoder = msgspec.json.Encoder()
write_request_decoder = msgspec.json.Decoder(WriteRequest)
versions_request_decoder = msgspec.json.Decoder(VersionsRequest)
rollback_request_decoder = msgspec.json.Decoder(RollbackRequest)
rotate_request_decoder = msgspec.json.Decoder(RotateRequest)

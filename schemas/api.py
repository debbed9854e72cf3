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
    "SecretBody",
    "ViolationBody",
    "WriteRequest",
    "WriteResponse",
    "encoder",
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


encoder = msgspec.json.Encoder()
write_request_decoder = msgspec.json.Decoder(WriteRequest)

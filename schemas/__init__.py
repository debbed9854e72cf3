"""msgspec Structs for requests, responses, errors and events; codecs built once."""

from schemas.api import (
    ConflictError,
    ErrorBody,
    InvalidSecretError,
    SecretBody,
    ViolationBody,
    WriteRequest,
    WriteResponse,
    encoder,
    write_request_decoder,
)

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

"""OpenAPI 3.1 document of the whole HTTP API, with schemas generated from schemas.api."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.api import (
    ConflictError,
    ErrorBody,
    InvalidSecretError,
    SecretBody,
    WriteRequest,
    WriteResponse,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{name}"


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _json(struct: type, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(struct)}}}


def _error(description: str) -> dict[str, Any]:
    return _json(ErrorBody, description)


_PATH_PARAM = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "1 to 16 segments of [A-Za-z0-9_.-]+ joined by '/', no '.' or '..' segment, "
    "at most 512 characters",
    "schema": {"type": "string", "maxLength": 512, "pattern": r"^[A-Za-z0-9_.\-/]+$"},
}

_COMMON_ERRORS = {
    "400": _error("invalid_path or invalid_request"),
    "401": {
        **_error("unauthenticated: missing or invalid bearer token"),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "403": _error("forbidden: no grant for this path (same answer whether it exists or not)"),
    "503": _error("backend_unavailable: Vault or the audit sink cannot serve the request"),
}


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    structs = [SecretBody, WriteRequest, WriteResponse, ErrorBody, ConflictError]
    structs.append(InvalidSecretError)
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    no_store = {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}}
    paths: dict[str, Any] = {
        "/secrets/{path}": {
            "parameters": [_PATH_PARAM],
            "get": {
                "operationId": "readSecret",
                "summary": "Read the latest (or a given) version of a secret",
                "security": [{"bearer": []}],
                "parameters": [
                    {
                        "name": "version",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1},
                    }
                ],
                "responses": {
                    "200": {
                        **_json(SecretBody, "The secret"),
                        "headers": {"ETag": {"schema": {"type": "string"}}, **no_store},
                    },
                    **_COMMON_ERRORS,
                    "404": _error("not_found (only to a caller allowed to read the path)"),
                },
            },
            "patch": {
                "operationId": "writeSecret",
                "summary": "Write the next version if the current version matches (CAS)",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref(WriteRequest)}},
                },
                "responses": {
                    "200": _json(WriteResponse, "Written"),
                    **_COMMON_ERRORS,
                    "409": _json(ConflictError, "version_conflict"),
                    "413": _error("too_large: the body exceeds the limit"),
                    "422": _json(InvalidSecretError, "invalid_secret"),
                },
            },
        },
        "/healthz": {"get": _plain("alive", "Liveness")},
        "/readyz": {"get": _plain("ready: Vault and NATS answer (else 503)", "Readiness")},
        "/metrics": {"get": _plain("Prometheus text exposition", "Metrics", "text/plain")},
        "/openapi.json": {"get": _plain("This document", "OpenAPI")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "secrets-service", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _plain(description: str, summary: str, media: str = "application/json") -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": description, "content": {media: {}}}},
    }

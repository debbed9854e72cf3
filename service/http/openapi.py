"""OpenAPI 3.1 document of the whole HTTP API, with schemas generated from schemas.api."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.api import (
    ConflictError,
    ErrorBody,
    InvalidSecretError,
    KeyList,
    LifecycleResponse,
    RollbackRequest,
    RotateRequest,
    RotateResponse,
    RotationStatus,
    SecretBody,
    SecretMetadata,
    VersionsRequest,
    WriteRequest,
    WriteResponse,
)
from schemas.approvals import ChangeList, ChangeView, ProposeRequest

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

_APPROVAL_REQUIRED = {
    "428": _error(
        "approval_required: the path is under an approval rule; propose the change, or break "
        "glass (secrets:bypass and an X-Bypass-Reason header)"
    )
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
    structs += [SecretMetadata, KeyList, VersionsRequest, RollbackRequest, LifecycleResponse]
    structs += [RotateRequest, RotateResponse, RotationStatus]
    structs += [ProposeRequest, ChangeView, ChangeList]
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
                    **_APPROVAL_REQUIRED,
                    "409": _json(ConflictError, "version_conflict"),
                    "413": _error("too_large: the body exceeds the limit"),
                    "422": _json(InvalidSecretError, "invalid_secret"),
                },
            },
            "delete": _delete_operation(),
        },
        **_lifecycle_paths(),
        **_rotation_paths(),
        **_change_paths(),
        **_watch_paths(),
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


_PREFIX_PARAM = {
    **_PATH_PARAM,
    "name": "prefix",
    "description": "A path whose keys to list; /secrets:list lists the top of the tree",
}
_NOT_FOUND = _error("not_found (only to a caller allowed to read the path)")
_METHOD_NOT_ALLOWED = {
    **_error("method_not_allowed: this path or verb takes another HTTP method"),
    "headers": {"Allow": {"schema": {"type": "string"}}},
}


def _operation(
    operation_id: str,
    summary: str,
    ok: dict[str, Any],
    *,
    body: type | None = None,
    errors: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {
            "200": ok,
            **_COMMON_ERRORS,
            "404": _NOT_FOUND,
            "405": _METHOD_NOT_ALLOWED,
            **(errors or {}),
        },
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(body)}},
        }
    if parameters:
        op["parameters"] = parameters
    return op


def _lifecycle_paths() -> dict[str, Any]:
    """Version history and lifecycle: DELETE on the secret and the AIP-136 custom methods."""
    list_op = _operation(
        "listSecrets",
        "Keys right under a prefix: secrets the caller may read, and folders (ending in '/') "
        "below which the caller can read a secret that exists; 404 when there are none, "
        "whether or not the prefix exists; 403 when no secrets:read glob could match below "
        "the prefix; truncated: true when some folder was left out undecided",
        _json(KeyList, "The visible keys"),
    )
    return {
        "/secrets/{path}:versions": {
            "parameters": [_PATH_PARAM],
            "get": _operation(
                "listSecretVersions",
                "Version history: current version, times, each version's state (secrets:read)",
                _json(SecretMetadata, "The version history"),
            ),
        },
        "/secrets/{prefix}:list": {"parameters": [_PREFIX_PARAM], "get": list_op},
        "/secrets:list": {"get": {**list_op, "operationId": "listTopSecrets"}},
        "/secrets/{path}:undelete": {
            "parameters": [_PATH_PARAM],
            "post": _operation(
                "undeleteSecretVersions",
                "Restore soft-deleted versions (secrets:write); a destroyed one is 404",
                _json(LifecycleResponse, "The versions restored"),
                body=VersionsRequest,
                errors=_APPROVAL_REQUIRED,
            ),
        },
        "/secrets/{path}:destroy": {
            "parameters": [_PATH_PARAM],
            "post": _operation(
                "destroySecretVersions",
                "Remove the data of versions for good (secrets:destroy)",
                _json(LifecycleResponse, "The versions destroyed"),
                body=VersionsRequest,
                errors=_APPROVAL_REQUIRED,
            ),
        },
        "/secrets/{path}:rollback": {
            "parameters": [_PATH_PARAM],
            "post": _operation(
                "rollbackSecret",
                "Write an earlier version's data as the next version if the current version "
                "matches (CAS; secrets:read and secrets:write). A deleted or destroyed "
                "to_version is 404",
                _json(WriteResponse, "Written"),
                body=RollbackRequest,
                errors={
                    **_APPROVAL_REQUIRED,
                    "409": _json(ConflictError, "version_conflict"),
                    "422": _json(InvalidSecretError, "invalid_secret"),
                },
            ),
        },
    }


def _rotation_paths() -> dict[str, Any]:
    rotate = _operation(
        "rotateSecret",
        "Rotate now under the path's [[rotation.rules]] entry (secrets:rotate): the listed "
        "fields regenerated, every other field carried over, written with CAS. The body is "
        'optional: {"version": N} rotates only if N is still the current version',
        _json(RotateResponse, "Rotated"),
        errors={
            **_APPROVAL_REQUIRED,
            "409": _error("version_conflict (a stale version) or rotation_in_progress"),
            "422": _error("no_rotation_rule, or invalid_secret (the path's validation rules)"),
            "502": _error("rotation_failed: every attempt failed; the current version stands"),
        },
    )
    rotate["requestBody"] = {
        "required": False,
        "content": {"application/json": {"schema": _ref(RotateRequest)}},
    }
    return {
        "/secrets/{path}:rotate": {"parameters": [_PATH_PARAM], "post": rotate},
        "/secrets/{path}:rotation": {
            "parameters": [_PATH_PARAM],
            "get": _operation(
                "getSecretRotation",
                "Rotation state (secrets:read): idle, running, failed or stalled, the last "
                "and next rotation, failed cycles in a row and the last error code",
                _json(RotationStatus, "The rotation state"),
                errors={"422": _error("no_rotation_rule")},
            ),
        },
    }


_CHANGE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "A change request's id: 32 lowercase hex digits",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}


def _watch_paths() -> dict[str, Any]:
    stream = {
        "description": "Server-Sent Events: `id: <stream sequence>`, `event: <type>`, `data: "
        "<change event JSON>` for each change the caller may read (never a value); a "
        "`: keep-alive` comment every 15 s; `event: reset` when Last-Event-ID is older than "
        "the stream keeps; `event: end` (token_expired, overflow, shutdown) before it closes",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    last_id = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "Resume right after this stream sequence",
        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
    }

    def op(name: str, summary: str) -> dict[str, Any]:
        return {
            "operationId": name,
            "summary": summary,
            "security": [{"bearer": []}],
            "parameters": [last_id],
            "responses": {
                "200": stream,
                **_COMMON_ERRORS,
                "405": _METHOD_NOT_ALLOWED,
                "429": _error("too_many_streams: per caller or per instance; retry later"),
            },
        }

    return {
        "/secrets/{prefix}:watch": {
            "parameters": [_PREFIX_PARAM],
            "get": op("watchSecrets", "Changes at or below a prefix the caller may read (SSE)"),
        },
        "/secrets:watch": {
            "get": op("watchAllSecrets", "Every change the caller may read (SSE)"),
        },
    }


def _query(name: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}


def _change_action(name: str, summary: str) -> dict[str, Any]:
    return {
        "parameters": [_CHANGE_ID],
        "post": _operation(
            name,
            summary,
            _json(ChangeView, "The request after the action"),
            errors={"409": _error("change_conflict: the request's state forbids it")},
        ),
    }


def _change_paths() -> dict[str, Any]:
    """Change requests: proposals for paths under [[approvals.rules]]."""
    view = _json(ChangeView, "The request: changed field names, never values")
    return {
        "/secrets/{path}:propose": {
            "parameters": [_PATH_PARAM],
            "post": {
                **_operation(
                    "proposeChange",
                    "Propose data as the version after `version` for a path under an approval "
                    "rule (secrets:write); validated now and again at apply",
                    {"description": "Created", "content": {}},
                    body=ProposeRequest,
                    errors={
                        "409": _json(ConflictError, "version_conflict: version is not current"),
                        "422": _error("no_approval_rule, or invalid_secret"),
                    },
                ),
                "responses": {
                    "201": view,
                    **_COMMON_ERRORS,
                    "409": _json(ConflictError, "version_conflict: version is not current"),
                    "422": _error("no_approval_rule, or invalid_secret"),
                },
            },
        },
        "/changes": {
            "get": {
                **_operation(
                    "listChanges",
                    "Change requests the caller may see (read, write or approve on the path), "
                    "newest first",
                    _json(ChangeList, "The requests"),
                ),
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "path",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
            }
        },
        "/changes/{id}": {
            "parameters": [_CHANGE_ID],
            "get": _operation("getChange", "One change request (404 if not visible)", view),
        },
        "/changes/{id}:approve": _change_action(
            "approveChange", "Approve (secrets:approve; never the requester: 403 self_approval)"
        ),
        "/changes/{id}:reject": _change_action("rejectChange", "Reject (secrets:approve)"),
        "/changes/{id}:cancel": _change_action("cancelChange", "Cancel (the requester)"),
        "/changes/{id}:apply": {
            "parameters": [_CHANGE_ID],
            "post": _operation(
                "applyChange",
                "Apply with CAS on base_version (the requester or an approver, once approved); "
                "if the secret moved on, 409 version_conflict and the request turns stale",
                view,
                errors={
                    "409": _json(ConflictError, "version_conflict (stale) or change_conflict"),
                    "422": _json(InvalidSecretError, "invalid_secret: validation at apply"),
                },
            ),
        },
    }


def _delete_operation() -> dict[str, Any]:
    return _operation(
        "deleteSecretVersions",
        "Soft-delete the current version, or those in ?versions=1,2 (secrets:write)",
        _json(LifecycleResponse, "The versions deleted"),
        errors=_APPROVAL_REQUIRED,
        parameters=[
            {
                "name": "versions",
                "in": "query",
                "required": False,
                "description": "Comma-separated versions to delete (default: the current one)",
                "schema": {"type": "string", "pattern": "^[1-9][0-9]*(,[1-9][0-9]*)*$"},
            }
        ],
    )


def _plain(description: str, summary: str, media: str = "application/json") -> dict[str, Any]:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": description, "content": {media: {}}}},
    }

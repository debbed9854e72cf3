"""The service's HTTP API as both clients call it: each method's request (`Call`), checked before
it is sent, the URLs, the token as a header, and a read's answer decoded into a `Secret`.

`ApiMethods` holds the methods whose answer is the API's JSON as given; `SecretsClient` and
`AsyncSecretsClient` supply `_send` (blocking, or a coroutine) and their own `get`, `set`, `watch`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote

import msgspec

from schemas.errors import InvalidPath
from schemas.paths import validate_path, validate_prefix
from schemas.secret import Secret, SecretData
from secrets_client.errors import ClientError

__all__ = [
    "DEFAULT_URL",
    "ApiMethods",
    "Call",
    "authorization",
    "change_url",
    "changed_path",
    "decode_secret",
    "get_call",
    "json_body",
    "prefix_url",
    "secret_url",
    "set_call",
    "watch_url",
]

DEFAULT_URL = "http://127.0.0.1:8080"

# The service names a change request by a uuid4 in hex; nothing else may reach the URL.
_CHANGE_ID = re.compile(r"[0-9a-f]{32}")
# What h11 sends unaltered in a header value: printable ASCII (no CR, LF or other control).
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")

R = TypeVar("R")


class Call(NamedTuple):
    """One request. `changes` is the path whose cached entry the call may make stale (evicted
    once it is answered, whatever the answer), or ``"*"`` for the path named in the answer."""

    method: str
    url: str
    params: Mapping[str, str] | None = None
    json: Any = None
    headers: Mapping[str, str] | None = None
    changes: str | None = None


class ApiMethods(Generic[R]):
    """The API calls answered with JSON, as given: `R` is `Any` for the blocking client and an
    awaitable of it for the async one."""

    def _send(self, call: Call) -> R:
        raise NotImplementedError

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> R:
        """One API call; its decoded JSON body, or ClientError. `headers` are added to the
        client's own (`X-Bypass-Reason` for a break-glass change). The cache is left alone:
        a change made this way is seen when its event arrives."""
        for name, value in (headers or {}).items():
            if not _HEADER_VALUE.fullmatch(value):
                raise ClientError("invalid_request", f"header {name} must be printable ASCII")
        return self._send(Call(method, url, params, json, headers))

    def versions(self, path: str) -> R:
        return self._send(Call("GET", f"{secret_url(path)}:versions"))

    def list(self, prefix: str = "") -> R:
        """`{"keys": [...]}`: the keys right under `prefix` you may read; folders end in '/'."""
        return self._send(Call("GET", f"{prefix_url(prefix)}:list"))

    def delete(self, path: str, versions: Sequence[int] | None = None) -> R:
        params = None if versions is None else {"versions": ",".join(map(str, versions))}
        return self._send(Call("DELETE", secret_url(path), params, changes=path))

    def undelete(self, path: str, versions: Sequence[int]) -> R:
        url = f"{secret_url(path)}:undelete"
        return self._send(Call("POST", url, json={"versions": versions}, changes=path))

    def destroy(self, path: str, versions: Sequence[int]) -> R:
        url = f"{secret_url(path)}:destroy"
        return self._send(Call("POST", url, json={"versions": versions}, changes=path))

    def rollback(self, path: str, to_version: int, *, version: int) -> R:
        payload = {"to_version": to_version, "version": version}
        return self._send(Call("POST", f"{secret_url(path)}:rollback", json=payload, changes=path))

    def rotate(self, path: str, *, version: int | None = None) -> R:
        """Rotate now: `{"path", "version", "previous_version"}`. With `version`, only if it
        is still the current version (else ClientError `version_conflict`)."""
        payload = None if version is None else {"version": version}
        return self._send(Call("POST", f"{secret_url(path)}:rotate", json=payload, changes=path))

    def rotation(self, path: str) -> R:
        """The rotation state: `{"path", "state", "last_rotated", "next_rotation", "failures",
        "last_error"}`."""
        return self._send(Call("GET", f"{secret_url(path)}:rotation"))

    # -- change requests (approvals) --------------------------------------------------------

    def propose(self, path: str, data: Mapping[str, Any], *, version: int, reason: str) -> R:
        """Ask for `data` to be written as the version after `version`, once approved; the
        change request (`id`, `state` pending, `required`, `approvals` [], ...)."""
        payload = {"data": dict(data), "version": version, "reason": reason}
        return self._send(Call("POST", f"{secret_url(path)}:propose", json=payload))

    def changes(self, *, state: str | None = None, path: str | None = None) -> R:
        """`{"changes": [...], "truncated"}`: the requests you may see, by state or path;
        each shows the changed field names, never their values."""
        filters = {"state": state, "path": path}
        params = {name: value for name, value in filters.items() if value is not None}
        return self._send(Call("GET", "/changes", params or None))

    def change(self, id: str) -> R:
        return self._send(Call("GET", change_url(id)))

    def approve(self, id: str) -> R:
        """Count your approval (never the requester's: ClientError `self_approval`, 403)."""
        return self._send(Call("POST", f"{change_url(id)}:approve"))

    def reject(self, id: str) -> R:
        return self._send(Call("POST", f"{change_url(id)}:reject"))

    def cancel(self, id: str) -> R:
        return self._send(Call("POST", f"{change_url(id)}:cancel"))

    def apply(self, id: str) -> R:
        """Write an approved request with CAS on its base version; `applied_version` is the
        version written. If the secret moved on, ClientError `version_conflict` (409), and the
        request is stale for good."""
        return self._send(Call("POST", f"{change_url(id)}:apply", changes="*"))


def get_call(path: str, version: int | None) -> Call:
    if version is not None and (isinstance(version, bool) or version < 1):
        raise ClientError("invalid_request", "version must be a positive integer")
    params = None if version is None else {"version": str(version)}
    return Call("GET", secret_url(path), params)


def set_call(path: str, data: Mapping[str, Any], version: int) -> Call:
    payload = {"data": dict(data), "version": version}
    return Call("PATCH", secret_url(path), json=payload, changes=path)


def changed_path(call: Call, body: Any) -> str | None:
    """The path whose cached entry `call` may have made stale, given its answer's `body`."""
    if call.changes != "*":
        return call.changes
    path = body.get("path") if isinstance(body, dict) else None
    return path if isinstance(path, str) else None


def json_body(content: bytes) -> Any:
    """A successful answer's JSON, or None if it holds none."""
    try:
        return _json_decoder.decode(content)
    except msgspec.DecodeError:
        return None


_json_decoder = msgspec.json.Decoder()


class _Head(msgspec.Struct):
    path: str
    version: int
    created_time: str  # `data` is skipped here, and decoded by SecretData when first read


_head_decoder = msgspec.json.Decoder(_Head)


def decode_secret(document: bytes) -> Secret:
    """A `Secret` from the body of a read; its data stays JSON until first used."""
    try:
        head = _head_decoder.decode(document)
    except msgspec.DecodeError:
        raise ClientError("invalid_response", "the service's answer is not a secret") from None
    data = SecretData.from_document(document)
    return Secret(head.path, head.version, data, head.created_time)


def authorization(token: object) -> str:
    """The Authorization header for `token`; ClientError `invalid_token` (never quoting it)
    if it is not a non-empty string that can be sent in a header."""
    if not isinstance(token, str) or not token or not _HEADER_VALUE.fullmatch(token):
        raise ClientError("invalid_token", "the token must be a non-empty printable ASCII string")
    return f"Bearer {token}"


def secret_url(path: str) -> str:
    """`/secrets/<path>`, the path checked and quoted; ClientError `invalid_path` if bad."""
    try:
        validate_path(path)
    except InvalidPath as exc:
        raise ClientError(exc.code, exc.detail) from None
    return "/secrets/" + quote(path, safe="/")


def prefix_url(prefix: str) -> str:
    """`/secrets/<prefix>`, or `/secrets` for the top of the tree (`""`)."""
    try:
        validate_prefix(prefix)
    except InvalidPath as exc:
        raise ClientError(exc.code, exc.detail) from None
    return "/secrets/" + quote(prefix, safe="/") if prefix else "/secrets"


def watch_url(prefix: str) -> str:
    """`/secrets/<prefix>:watch`, or `/secrets:watch` for everything the caller may read."""
    return f"{prefix_url(prefix)}:watch"


def change_url(id: str) -> str:
    """`/changes/<id>`; ClientError `invalid_request` unless `id` is a change request's id."""
    if not _CHANGE_ID.fullmatch(id):
        raise ClientError("invalid_request", "a change id is 32 lowercase hex digits")
    return "/changes/" + quote(id, safe="")

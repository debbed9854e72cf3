"""`SecretsClient`: the blocking HTTP client of the service's API, one call per method.

Paths and change ids are checked before a request is made (a `:` or `..` never turns into
another request); a refusal or an unreachable service raises `ClientError` with the API's `error`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from schemas.errors import InvalidPath
from schemas.paths import validate_path, validate_prefix
from schemas.secret import Secret, SecretData

__all__ = ["DEFAULT_URL", "ClientError", "SecretsClient", "change_url", "secret_url"]

DEFAULT_URL = "http://127.0.0.1:8080"

# The service names a change request by a uuid4 in hex; nothing else may reach the URL.
_CHANGE_ID = re.compile(r"[0-9a-f]{32}")
# What h11 sends unaltered in a header value: printable ASCII (no CR, LF or other control).
_HEADER_VALUE = re.compile(r"[\x20-\x7e]*")


class ClientError(Exception):
    """The service refused a request, or could not be asked.

    `error` is the API's error code (`not_found`, `conflict`, ...) or, with `status` 0, what
    kept the request from being answered: `timeout`, `unreachable`, `invalid_url`,
    `invalid_path`. `body` is the API's error body (never a secret value: the API puts none in
    one), with `status` added.
    """

    def __init__(self, error: str, detail: str, *, status: int = 0, body: Any = None) -> None:
        super().__init__(f"{error}: {detail}")
        self.error = error
        self.detail = detail
        self.status = status
        shown: dict[str, Any] = dict(body) if isinstance(body, Mapping) else {"error": error}
        shown.setdefault("detail", detail)
        if status:
            shown["status"] = status
        self.body = shown


class SecretsClient:
    """`with SecretsClient(url, token=...) as client: client.get("app/db")`."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """`transport` replaces the network (an `httpx.MockTransport` in tests)."""
        self.url = url
        self.timeout = timeout
        try:
            self._http = httpx.Client(
                base_url=url,
                timeout=timeout,
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
                transport=transport,
            )
        except httpx.InvalidURL:
            raise ClientError("invalid_url", "the service URL is not a valid http(s) URL") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- the API -------------------------------------------------------------------------

    def get(self, path: str, version: int | None = None) -> Secret:
        params = None if version is None else {"version": str(version)}
        body = self.request("GET", secret_url(path), params=params)
        return Secret(
            path=body["path"],
            version=body["version"],
            data=SecretData(body["data"]),
            created_time=body["created_time"],
        )

    def set(self, path: str, data: Mapping[str, Any], *, version: int) -> int:
        """Write `data` if the current version is `version` (0: the path must not exist yet);
        the new version. A stale `version` raises ClientError `version_conflict` (409)."""
        body = self.request(
            "PATCH", secret_url(path), json={"data": dict(data), "version": version}
        )
        new_version: int = body["version"]
        return new_version

    def versions(self, path: str) -> Any:
        return self.request("GET", f"{secret_url(path)}:versions")

    def list(self, prefix: str = "") -> Any:
        return self.request("GET", f"{_prefix_url(prefix)}:list" if prefix else "/secrets:list")

    def delete(self, path: str, versions: Sequence[int] | None = None) -> Any:
        params = None if versions is None else {"versions": ",".join(map(str, versions))}
        return self.request("DELETE", secret_url(path), params=params)

    def undelete(self, path: str, versions: Sequence[int]) -> Any:
        return self.request("POST", f"{secret_url(path)}:undelete", json={"versions": versions})

    def destroy(self, path: str, versions: Sequence[int]) -> Any:
        return self.request("POST", f"{secret_url(path)}:destroy", json={"versions": versions})

    def rollback(self, path: str, to_version: int, *, version: int) -> Any:
        payload = {"to_version": to_version, "version": version}
        return self.request("POST", f"{secret_url(path)}:rollback", json=payload)

    def rotate(self, path: str, *, version: int | None = None) -> Any:
        """Rotate now: `{"path", "version", "previous_version"}`. With `version`, only if it
        is still the current version (else ClientError `version_conflict`)."""
        payload = None if version is None else {"version": version}
        return self.request("POST", f"{secret_url(path)}:rotate", json=payload)

    def rotation(self, path: str) -> Any:
        """The rotation state: `{"path", "state", "last_rotated", "next_rotation", "failures",
        "last_error"}`."""
        return self.request("GET", f"{secret_url(path)}:rotation")

    # -- change requests (approvals) --------------------------------------------------------

    def propose(
        self, path: str, data: Mapping[str, Any], *, version: int, reason: str
    ) -> dict[str, Any]:
        """Ask for `data` to be written as the version after `version`, once approved; the
        change request (`id`, `state` pending, `required`, `approvals` [], ...)."""
        payload = {"data": dict(data), "version": version, "reason": reason}
        return self._object("POST", f"{secret_url(path)}:propose", json=payload)

    def changes(self, *, state: str | None = None, path: str | None = None) -> dict[str, Any]:
        """`{"changes": [...], "truncated"}`: the requests you may see, by state or path;
        each shows the changed field names, never their values."""
        filters = {"state": state, "path": path}
        params = {name: value for name, value in filters.items() if value is not None}
        return self._object("GET", "/changes", params=params or None)

    def change(self, id: str) -> dict[str, Any]:
        return self._object("GET", change_url(id))

    def approve(self, id: str) -> dict[str, Any]:
        """Count your approval (never the requester's: ClientError `self_approval`, 403)."""
        return self._object("POST", f"{change_url(id)}:approve")

    def reject(self, id: str) -> dict[str, Any]:
        return self._object("POST", f"{change_url(id)}:reject")

    def cancel(self, id: str) -> dict[str, Any]:
        return self._object("POST", f"{change_url(id)}:cancel")

    def apply(self, id: str) -> dict[str, Any]:
        """Write an approved request with CAS on its base version; `applied_version` is the
        version written. If the secret moved on, ClientError `version_conflict` (409), and the
        request is stale for good."""
        return self._object("POST", f"{change_url(id)}:apply")

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One API call; its decoded JSON body, or ClientError. `headers` are added to the
        client's own (`X-Bypass-Reason` for a break-glass change)."""
        for name, value in (headers or {}).items():
            if not _HEADER_VALUE.fullmatch(value):
                raise ClientError("invalid_request", f"header {name} must be printable ASCII")
        try:
            response = self._http.request(method, url, params=params, json=json, headers=headers)
        except httpx.TimeoutException:
            raise ClientError(
                "timeout", f"no answer from {self.url} within {self.timeout}s"
            ) from None
        except httpx.TransportError as exc:
            raise ClientError(
                "unreachable", f"cannot reach {self.url}: {type(exc).__name__}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            return body
        fields: dict[str, Any] = body if isinstance(body, dict) else {}
        error, detail = fields.get("error"), fields.get("detail")
        raise ClientError(
            error if isinstance(error, str) else "http_error",
            str(detail) if detail is not None else response.reason_phrase,
            status=response.status_code,
            body=fields or None,
        )

    def _object(
        self, method: str, url: str, *, params: Mapping[str, str] | None = None, json: Any = None
    ) -> dict[str, Any]:
        """`request` for an answer that is a JSON object (a change request, a listing)."""
        body: dict[str, Any] = self.request(method, url, params=params, json=json)
        return body


def secret_url(path: str) -> str:
    """`/secrets/<path>`, the path checked and quoted; ClientError `invalid_path` if bad."""
    try:
        validate_path(path)
    except InvalidPath as exc:
        raise ClientError(exc.code, exc.detail) from None
    return "/secrets/" + quote(path, safe="/")


def change_url(id: str) -> str:
    """`/changes/<id>`; ClientError `invalid_request` unless `id` is a change request's id."""
    if not _CHANGE_ID.fullmatch(id):
        raise ClientError("invalid_request", "a change id is 32 lowercase hex digits")
    return "/changes/" + quote(id, safe="")


def _prefix_url(prefix: str) -> str:
    try:
        validate_prefix(prefix)
    except InvalidPath as exc:
        raise ClientError(exc.code, exc.detail) from None
    return "/secrets/" + quote(prefix, safe="/")

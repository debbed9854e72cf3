"""`/secrets/{path}` and `/secrets/{path}:verb`: the path checked, the caller authenticated, then
the handler picked by (HTTP method, custom verb) from one table.

A verb is an AIP-136 custom method: an unknown one is 404, a known one with the wrong HTTP
method 405 (JSON, with Allow). Handlers live in secrets, lifecycle, listing, rotation and
changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import ErrorBody
from schemas.errors import InvalidPath, NotFound
from schemas.paths import split_custom_method, validate_path, validate_prefix
from service.auth import Principal
from service.http import changes, lifecycle, listing, rotation, secrets, watch
from service.http.access import authenticate
from service.http.responses import NO_STORE, json_response
from service.http.trace import trace_of

__all__ = ["HTTP_METHODS", "METHODS", "Handler", "secret_endpoint"]

Handler = Callable[[Request, Principal, str], Awaitable[Response]]

METHODS: dict[tuple[str, str | None], Handler] = {
    ("GET", None): secrets.read,
    ("PATCH", None): secrets.write,
    ("DELETE", None): lifecycle.delete,
    ("GET", "versions"): lifecycle.versions,
    ("GET", "list"): listing.list_keys,
    ("POST", "undelete"): lifecycle.undelete,
    ("POST", "destroy"): lifecycle.destroy,
    ("POST", "rollback"): lifecycle.rollback,
    ("POST", "rotate"): rotation.rotate,
    ("GET", "rotation"): rotation.rotation,
    ("POST", "propose"): changes.propose,
    ("GET", "watch"): watch.watch,
}
"""Every handler of `/secrets/{path}`, keyed by (HTTP method, custom verb or None)."""

HTTP_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
"""What the routes take: `secret_endpoint` answers 405 itself for a pair not in METHODS."""


async def secret_endpoint(request: Request) -> Response:
    principal = await authenticate(request)
    # /secrets:list and /secrets:watch have no path parameter: they are about the whole tree.
    rest: str = request.path_params.get("rest") or request.scope["path"].removeprefix("/secrets")
    if not request.scope["path"].endswith(rest):
        # A route's regex ends in `$`, which also matches before a final newline: for
        # `/secrets/app/db%0A` the parameter is `app/db`. The path as received decides.
        raise InvalidPath("a path or custom method must not end with a line break")
    path, verb = split_custom_method(rest)
    if verb in ("list", "watch"):
        validate_prefix(path)
    else:
        validate_path(path)
    trace_of(request).path = path
    method = "GET" if request.method == "HEAD" else request.method
    handler = METHODS.get((method, verb))
    if handler is not None:
        return await handler(request, principal, path)
    return _not_allowed(path, verb)


def _not_allowed(path: str, verb: str | None) -> Response:
    allowed = sorted({m for m, v in METHODS if v == verb})
    if not allowed:
        raise NotFound(f"no method ':{verb}'", path=path)
    if "GET" in allowed:
        allowed.insert(allowed.index("GET") + 1, "HEAD")
    what = "this path" if verb is None else f"':{verb}'"
    body = ErrorBody("method_not_allowed", f"{what} allows {', '.join(allowed)}")
    return json_response(body, status=405, headers={"Allow": ", ".join(allowed), **NO_STORE})

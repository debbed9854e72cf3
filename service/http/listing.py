"""`GET /secrets/{prefix}:list` and `GET /secrets:list`: the keys under a prefix that the caller
may see, a folder only if a readable secret exists below it (service.core.listing walks)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from schemas.api import KeyList
from schemas.errors import Forbidden, NotFound
from schemas.paths import is_reserved
from service.auth import Policy, Principal
from service.auth.policy import READ
from service.core import SecretsManager
from service.core.listing import readable_keys
from service.http.access import start_op
from service.http.responses import json_response
from service.http.trace import trace_of
from service.obs.metrics import Metrics

__all__ = ["list_keys", "visible_keys"]

_NOTHING_READABLE = "nothing readable under this prefix"  # missing or not: the same words


async def list_keys(request: Request, principal: Principal, path: str) -> Response:
    # Not `require`: a prefix is judged by what could lie below it, not by a path grant.
    start_op(request, "list")
    policy: Policy = request.state.policy
    globs = policy.grants(principal.roles, principal.scopes, READ)
    # Forbidden unless some readable path could lie below: decided by the policy alone, so
    # the same answer whether the prefix exists or not.
    if is_reserved(path) or not any(glob.could_match_under(path) for glob in globs):
        raise Forbidden(path=path)
    manager: SecretsManager = request.state.manager
    try:
        keys = await manager.list_keys(path)
    except NotFound:
        raise NotFound(_NOTHING_READABLE, path=path) from None
    candidates = visible_keys(policy, principal, path, keys)
    # A folder is shown only if a readable secret exists below it: walking to find one
    # is bounded (service.core.listing), and a folder left undecided is hidden.
    listing = await readable_keys(manager.list_keys, globs, path, candidates)
    trace = trace_of(request)
    trace.list_calls = listing.calls + 1
    trace.list_truncated = listing.truncated
    if listing.truncated:
        metrics: Metrics = request.app.state.metrics
        metrics.listings_truncated += 1
    if not listing.keys:
        # Nothing readable: the answer a missing prefix gets, byte for byte. A truncated
        # walk that found nothing says so only in the log: saying it here would tell that
        # the prefix exists.
        raise NotFound(_NOTHING_READABLE, path=path)
    return json_response(KeyList(prefix=path, keys=listing.keys, truncated=listing.truncated))


def visible_keys(policy: Policy, principal: Principal, prefix: str, keys: list[str]) -> list[str]:
    """The listed `keys` the policy alone lets the caller see: a key if the caller may read
    it, a folder key (ending in ``/``) if some path the caller may read could lie below it.

    Whether a folder really holds a readable secret is for `service.core.listing.readable_keys`."""
    globs = policy.grants(principal.roles, principal.scopes, READ)
    shown = []
    for key in keys:
        full = f"{prefix}/{key}" if prefix else key
        if is_reserved(full.rstrip("/")):
            continue  # the service's own state: never shown, whatever the globs say
        if key.endswith("/"):
            visible = any(glob.could_match_under(full[:-1]) for glob in globs)
        else:
            visible = any(glob.matches(full) for glob in globs)
        if visible:
            shown.append(key)
    return shown

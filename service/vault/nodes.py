"""The nodes of a Vault cluster as the backend sees them (`NodeRing`: the one in use, moving on)
and the rules for when a failed call may be sent again to the next node (`retry_on_next`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import NamedTuple

import aiohttp
import hvac.exceptions as hvac_errors
import msgspec
import requests
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from schemas.secret import redact_url
from service.vault.answers import error_answer

__all__ = ["Node", "NodeRing", "hvac_node_failure", "retry_on_next"]

log = logging.getLogger("secrets.vault")

# What a node answers when it could not process a request at all (so none was applied): a
# standby with no active node to forward to, a sealed node, a Raft follower asked to commit.
_NOT_PROCESSED = (
    "local node not active",
    "active cluster node not found",
    "node is not the leader",
    "vault is sealed",
)


class Node(NamedTuple):
    """One Vault address: `api` is its `/v1/` prefix; the proxy the environment names for it."""

    addr: str
    api: str
    proxy: URL | None
    proxy_auth: aiohttp.BasicAuth | None

    @classmethod
    def of(cls, addr: str) -> Node:
        addr = addr.rstrip("/")
        proxy: URL | None = None
        proxy_auth: aiohttp.BasicAuth | None = None
        # Read once here, not per request as aiohttp's trust_env does (two thread hops and a
        # ~/.netrc read every call): HTTPS_PROXY or HTTP_PROXY, unless NO_PROXY covers it.
        with contextlib.suppress(LookupError):
            proxy, proxy_auth = get_env_proxy_for_url(URL(addr))
        return cls(addr, f"{addr}/v1/", proxy, proxy_auth)


class NodeRing:
    """The nodes of one cluster, in the order given, and the one calls go to (`current`).

    Every call starts on `current`; a call that failed there in a way the rules allow to try
    again calls `move_on`, which makes the next node current for everyone. Callers that failed
    on a node already left do not move further: a burst of failures moves one step. The ring
    never moves back by itself: a node stays in use while it serves.
    """

    def __init__(self, addrs: Sequence[str]) -> None:
        if not addrs:
            raise ValueError("at least one Vault address")
        self.nodes = tuple(Node.of(addr) for addr in addrs)
        self.current = self.nodes[0]
        self.switches = 0  # times `current` changed: a counter for metrics

    def __len__(self) -> int:
        return len(self.nodes)

    def move_on(self, failed: Node) -> Node:
        """`failed` did not serve a call: make the node after it current (unless another call
        did already), and return the node to try now."""
        if self.current is failed and len(self.nodes) > 1:
            following = self.nodes[(self.nodes.index(failed) + 1) % len(self.nodes)]
            self.current = following
            self.switches += 1
            log.warning(
                "vault node failed: moving on to the next",
                extra={"vault": redact_url(failed.addr), "next": redact_url(following.addr)},
            )
        return self.current


def retry_on_next(
    status: int | None, payload: bytes, error: BaseException | None, *, idempotent: bool
) -> bool:
    """Whether a call may be sent again to the next node after this outcome on one node.

    `status`/`payload` are Vault's answer; `error` is the transport failure instead (then
    `status` is None). `idempotent` (reads, and calls that do the same when sent twice): any
    node failure moves on. Otherwise (a CAS write) only a failure showing that the request was
    not applied does: a connection never made, or Vault saying it could not process it. A write
    whose fate is unknown (the connection dropped after it was sent, no answer in time) is not
    sent again: had it landed, its own CAS check would refuse the copy, and the caller would
    hear 409 for its success; it fails (503) and the caller decides, reading the version."""
    if error is not None:
        if isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
            return True  # never connected (refused, unreachable, TLS, no slot): nothing sent
        return idempotent and isinstance(error, aiohttp.ClientError | OSError)
    if status in (307, 503):
        # 307: a standby with no active node points elsewhere (redirects are not followed);
        # 503: sealed, or no active node. Neither processed the request.
        return True
    if status == 500:
        return idempotent or _not_processed(payload)
    return idempotent and status in (502, 504)  # a proxy in front of a failed node


def _not_processed(payload: bytes) -> bool:
    try:
        errors = error_answer.decode(payload).errors
    except msgspec.DecodeError:
        return False
    return any(marker in error.lower() for error in errors for marker in _NOT_PROCESSED)


def hvac_node_failure(exc: BaseException) -> bool:
    """An hvac call's failure that another node may not share: no connection, a timeout, or
    Vault's 500/502/503. (hvac serves only calls that do the same when sent twice.)"""
    return isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | hvac_errors.InternalServerError
        | hvac_errors.BadGateway
        | hvac_errors.VaultDown,
    )

"""Who a request speaks for: `Principal`, the bearer token taken from its Authorization header
(`bearer_token`, `MAX_TOKEN_LENGTH`), and the closed set of REASONS a token is refused for."""

from __future__ import annotations

import msgspec

from schemas.errors import Unauthenticated

__all__ = ["MAX_TOKEN_LENGTH", "REASONS", "Principal", "bearer_token"]

#: Why a token was refused: a closed set, for logs and metrics (`Unauthenticated.reason`).
REASONS: frozenset[str] = frozenset(
    {
        "missing_token",  # no Authorization header, or not a Bearer one
        "malformed",  # not a compact JWS: shape, base64url, JSON or size
        "unsupported_header",  # `crit`, `b64: false`, or a nested JWT (`cty: JWT`)
        "bad_algorithm",  # `alg` not in the allowed list, or not usable with the kid's key
        "unknown_key",  # no key for the `kid` (never published, or withdrawn by the issuer)
        "bad_signature",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "wrong_issuer",
        "wrong_audience",
        "lifetime_too_long",
        "missing_claim",  # iss, aud, exp or sub absent, or both iat and nbf absent
        "invalid_claim",  # a claim of the wrong type: exp as a string, sub as a number, ...
        "issuer_unavailable",  # no keys were ever loaded: start() has not succeeded
    }
)

#: Largest token accepted, in characters (tokens are ASCII).
MAX_TOKEN_LENGTH = 12 * 1024


class Principal(msgspec.Struct, frozen=True):
    """Who a verified token speaks for."""

    subject: str
    client_id: str | None
    roles: frozenset[str]
    scopes: frozenset[str] | None
    expires_at: float


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value."""
    if not authorization_header:
        raise Unauthenticated("missing_token")
    parts = authorization_header.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        raise Unauthenticated("missing_token")
    token = parts[1].strip() if len(parts) == 2 else ""
    if not token or len(token) > MAX_TOKEN_LENGTH or len(token.split(None, 1)) != 1:
        raise Unauthenticated("malformed")
    return token

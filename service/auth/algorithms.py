"""The JWS algorithms a token may be signed with: asymmetric only (a shared HMAC secret would let
anyone holding the verification key mint tokens), the one list settings and verifier share."""

from __future__ import annotations

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHMS"]

DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip
"""Accepted unless SECRETS_OIDC_ALGORITHMS narrows them."""

ALGORITHMS: frozenset[str] = frozenset(DEFAULT_ALGORITHMS) | {"Ed25519", "Ed448"}
"""Every name the verifier knows (RFC 9864's fully specified EdDSA names included)."""

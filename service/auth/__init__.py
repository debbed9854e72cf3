"""Who is calling and what they may do: the Principal of a bearer token (principal), verified
against the OIDC issuer (oidc) with its keys (keys), and the path-scoped policy (policy)."""

from service.auth.oidc import OIDCVerifier
from service.auth.policy import Policy
from service.auth.principal import MAX_TOKEN_LENGTH, REASONS, Principal, bearer_token

__all__ = ["MAX_TOKEN_LENGTH", "REASONS", "OIDCVerifier", "Policy", "Principal", "bearer_token"]

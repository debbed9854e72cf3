"""Who is calling (OIDC bearer tokens) and what they may do (the path-scoped policy)."""

from service.auth.oidc import OIDCVerifier, Principal, bearer_token
from service.auth.policy import Policy

__all__ = ["OIDCVerifier", "Policy", "Principal", "bearer_token"]

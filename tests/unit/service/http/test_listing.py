"""service/http/listing.py: which listed keys the policy alone lets a caller see."""

from __future__ import annotations

import msgspec
import pytest

from schemas.globs import PathGlob
from service.auth.policy import READ, Policy
from service.auth.principal import Principal
from service.http.listing import visible_keys


@pytest.mark.parametrize(
    ("globs", "prefix", "keys", "shown"),
    [
        (["app/**"], "", ["app/", "ops/", "apple"], ["app/"]),
        (["app/*/db"], "app", ["x/", "db", "y/"], ["x/", "y/"]),
        (["app/*/db"], "app/x", ["db", "dbx", "z/"], ["db"]),
        (["app/db-*"], "app", ["db-main", "db-main/", "cache"], ["db-main"]),
        (["**/config"], "ops/a", ["config", "b/", "other"], ["config", "b/"]),
        (["app/**"], "", ["bad key/", "app/"], ["app/"]),
    ],
)
def test_a_listed_key_is_shown_only_if_a_readable_path_lies_at_or_below_it(
    globs: list[str], prefix: str, keys: list[str], shown: list[str]
) -> None:
    policy = Policy(roles_claim="roles", grants={"r": {READ: [PathGlob(g) for g in globs]}})
    principal = Principal(
        subject="s", client_id=None, roles=frozenset({"r"}), scopes=None, expires_at=0.0
    )
    assert visible_keys(policy, principal, prefix, keys) == shown
    narrowed = msgspec.structs.replace(principal, scopes=frozenset({"secrets:write"}))
    assert visible_keys(policy, narrowed, prefix, keys) == []  # scopes narrow listings too

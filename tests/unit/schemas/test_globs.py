"""PathGlob.covers_all_under: a glob covers a folder only if it matches every path below it."""

from __future__ import annotations

import pytest

from schemas.errors import ConfigError
from schemas.globs import PathGlob, policy_globs


@pytest.mark.parametrize(
    ("pattern", "prefix", "covers"),
    [
        ("app/**", "app", True),
        ("app/**", "app/x/y", True),
        ("app/**", "", False),
        ("app/**", "ops", False),
        ("**", "", True),
        ("**", "a/b", True),
        ("**/config", "", False),
        ("**/config", "customers", False),
        ("app/*/**", "app/x", True),
        ("app/*/**", "app", False),  # app/x itself is not matched
        ("app/**/*", "app", True),
        ("app/*", "app", False),
        ("*/**", "", False),  # a top-level key is not matched
        ("**/x/**", "a/b/x", True),
        ("**/x/**", "a/b", False),
        ("app/db-*/**", "app/db-main", True),
        ("app/db-*/**", "app/cache", False),
        ("app/**", "app/x y", False),
        ("**", "/".join(["a"] * 16), False),  # nothing can lie below 16 segments
        ("/".join(["a"] + ["*"] * 15), "/".join(["a"] * 15), True),
    ],
)
def test_a_glob_covers_a_folder_only_if_it_matches_every_path_below_it(
    pattern: str, prefix: str, covers: bool
) -> None:
    assert PathGlob(pattern).covers_all_under(prefix) is covers


@pytest.mark.parametrize(
    ("patterns", "required", "message"),
    [
        ("app/**", False, "roles.x.read: must be a list of path globs"),
        ([], True, "roles.x.read: required, a non-empty list of path globs"),
        (["app/*", 7], False, r"roles.x.read\[1\]: must be a string"),
        (["app/*", "a/**/b/**/c/*x*y"], False, r"roles.x.read\[1\]: "),
    ],
)
def test_a_policy_glob_list_is_refused_naming_where_and_which_entry(
    patterns: object, required: bool, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        policy_globs("SECRETS_POLICY_FILE", "roles.x.read", patterns, required=required)
    assert raised.value.setting == "SECRETS_POLICY_FILE"


def test_a_policy_glob_list_may_be_empty_unless_required() -> None:
    assert policy_globs("S", "roles.x.read", [], required=False) == []
    globs = policy_globs("S", "rules[0].paths", ["app/**", "db-*"], required=True)
    assert [g.matches("app/x") for g in globs] == [True, False]

"""PathGlob.covers_all_under: a glob covers a folder only if it matches every path below it."""

from __future__ import annotations

import pytest

from schemas.globs import PathGlob


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

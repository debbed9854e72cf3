"""The authorization policy: glob semantics, deny by default, scopes, and config errors."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.errors import ConfigError
from schemas.globs import PathGlob
from schemas.paths import MAX_PATH_LENGTH, MAX_SEGMENTS
from service.auth.policy import (
    APPROVE,
    BYPASS,
    DESTROY,
    PERMISSIONS,
    READ,
    ROTATE,
    WRITE,
    Policy,
)

CONTRACT_POLICY = """
[auth]
roles_claim = "roles"

[roles.app-reader]
read = ["app/**"]
[roles.app-writer]
read = ["app/**"]
write = ["app/**"]
"""


@pytest.fixture
def policy() -> Policy:
    return Policy.from_toml(CONTRACT_POLICY)


# -- globs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # a literal segment matches exactly
        ("app/db", "app/db", True),
        ("app/db", "app/dbx", False),
        ("app/db", "App/db", False),
        ("app/db", "app/db/x", False),
        ("app/db.main", "app/dbxmain", False),
        # `*` as a segment is exactly one segment
        ("app/*", "app/db", True),
        ("app/*", "app", False),
        ("app/*", "app/db/password", False),
        ("app/*/password", "app/db/password", True),
        ("app/*/password", "app/password", False),
        ("app/*/password", "app/a/b/password", False),
        # `*` inside a segment is any run of segment characters, possibly empty, never a "/"
        ("app/db-*", "app/db-main", True),
        ("app/db-*", "app/db-", True),
        ("app/db-*", "app/db", False),
        ("app/db-*", "app/db-main/x", False),
        ("app/*-db", "app/main-db", True),
        ("app/a*z", "app/az", True),
        ("app/a*z", "app/a.b-c_z", True),
        ("app/a*z", "app/a/z", False),
        # a trailing `**` is one or more segments, not the prefix itself
        ("app/**", "app/x", True),
        ("app/**", "app/x/y", True),
        ("app/**", "app/x/y/z/w", True),
        ("app/**", "app", False),
        ("app/**", "apple/x", False),
        ("app/**", "application", False),
        ("app/*/**", "app/x", False),
        ("app/*/**", "app/x/y", True),
        # a lone `**` is every path
        ("**", "a", True),
        ("**", "a/b/c", True),
        # a leading or middle `**` is zero or more segments
        ("**/db", "db", True),
        ("**/db", "a/b/db", True),
        ("**/db", "a/b/dbx", False),
        ("app/**/db", "app/db", True),
        ("app/**/db", "app/x/db", True),
        ("app/**/db", "app/x/y/db", True),
        ("app/**/db", "app/x/y/db/z", False),
        ("app/**/db", "appdb", False),
        ("a/**/b/**", "a/b/c", True),
        ("a/**/b/**", "a/x/b/c/d", True),
        ("a/**/b/**", "a/x/b", False),
    ],
)
def test_a_glob_matches_by_segment(pattern: str, path: str, expected: bool) -> None:
    assert PathGlob(pattern).matches(path) is expected


@pytest.mark.parametrize("path", ["app/../admin", "app/./x", "app//x", "app/x/", "app/\u0430"])
def test_a_glob_never_matches_an_invalid_path(path: str) -> None:
    assert not PathGlob("**").matches(path)
    assert not PathGlob("app/**").matches(path)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("", "non-empty"),
        ("/app/**", "empty segment"),
        ("app/**/", "empty segment"),
        ("app//db", "empty segment"),
        ("app/../**", "'..'"),
        ("./app", "'.'"),
        ("app/db?", "ASCII letters"),
        ("app/d b", "ASCII letters"),
        ("app/\u0430", "ASCII letters"),
        ("app/[ab]", "ASCII letters"),
        ("app/db**", "whole segment"),
        ("app/***", "whole segment"),
        ("app/**/**", "may not follow"),
        ("app/*a*", "at most one"),
        ("/".join(["a"] * 17), "16 segments"),
        ("a" * 513, "512 characters"),
    ],
)
def test_an_invalid_glob_raises_value_error(pattern: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        PathGlob(pattern)


# Globs that make a backtracking matcher work hardest: many `*` in one segment (polynomial in
# the segment's length, so the grammar allows one), and many `**` or `*` segments that a path's
# segments can be shared out among in many ways. Each ends in a literal the hostile paths lack,
# so every way is tried before the match fails.
BACKTRACKING_BAIT = [
    "*a*a*a*a*a*a*a*b",
    "app/*a*a*a*b",
    "/".join(["**", "a"] * 7 + ["**", "b"]),
    "/".join(["**", "*"] * 7 + ["**", "b"]),
    "/".join(["**", "a*"] * 7 + ["**", "b"]),
    "/".join(["**", "*a"] * 7 + ["**", "b"]),
    "/".join(["*", "**"] * 7 + ["*", "b"]),
    "/".join(["**", "a-*"] * 7 + ["**", "b"]),
    "**/" + "/".join(["a*"] * 14) + "/b",
]
# The largest paths the grammar allows (16 segments, 512 characters) that almost match.
HOSTILE_PATHS = [
    "a" * MAX_PATH_LENGTH,
    "/".join(["a"] * MAX_SEGMENTS),
    "/".join(["a" * 31] * MAX_SEGMENTS),
    "/".join(["a" * 31] * (MAX_SEGMENTS - 1) + ["a" * 30 + "c"]),
    "/".join(["a-" + "a" * 29] * MAX_SEGMENTS),
    "/".join(["a" * 33] * (MAX_SEGMENTS - 1)),
]
# CPU seconds for one glob against all the hostile paths. The worst glob here takes about
# 0.2 s on a 2-core machine that is busy; a glob that backtracks catastrophically takes hours,
# so the budget can be 25 times what it needs and still tell the two apart.
CPU_BUDGET = 5.0


class _OverBudget(Exception):
    pass


@contextlib.contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    """Raise `_OverBudget` once the block has used `seconds` of this process's CPU time.

    CPU time, not wall time, so a loaded machine does not make it fail; the regex engine checks
    for signals while it backtracks, so a runaway match is interrupted rather than waited out.
    """

    def over(signum: int, frame: object) -> None:
        raise _OverBudget(f"more than {seconds} s of CPU")

    previous = signal.signal(signal.SIGVTALRM, over)
    signal.setitimer(signal.ITIMER_VIRTUAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, previous)


def test_the_hostile_paths_are_as_large_as_a_path_may_be() -> None:
    assert all(len(path) <= MAX_PATH_LENGTH for path in HOSTILE_PATHS)
    assert max(len(path) for path in HOSTILE_PATHS) == MAX_PATH_LENGTH
    assert max(path.count("/") + 1 for path in HOSTILE_PATHS) == MAX_SEGMENTS


@pytest.mark.parametrize("pattern", BACKTRACKING_BAIT)
def test_a_backtracking_prone_glob_is_refused_or_matches_hostile_paths_within_a_cpu_budget(
    pattern: str,
) -> None:
    try:
        glob = PathGlob(pattern)
    except ValueError as exc:
        assert "at most one '*'" in str(exc)  # the rule that keeps a segment linear
        return
    with cpu_budget(CPU_BUDGET):
        for path in HOSTILE_PATHS:
            assert not glob.matches(path)
            prefix = path.rpartition("/")[0]
            glob.could_match_under(prefix)
            glob.covers_all_under(prefix)


def test_globs_are_equal_by_pattern() -> None:
    assert PathGlob("app/**") == PathGlob("app/**")
    assert len({PathGlob("app/**"), PathGlob("app/**"), PathGlob("app/*")}) == 2
    assert repr(PathGlob("app/*")) == "PathGlob('app/*')"


@pytest.mark.parametrize(
    ("pattern", "prefix", "expected"),
    [
        ("app/**", "", True),
        ("app/**", "app", True),
        ("app/**", "app/x", True),
        ("app/**", "other", False),
        ("app/**", "apple", False),
        ("app/db", "", True),
        ("app/db", "app", True),
        ("app/db", "app/db", False),  # nothing strictly below app/db matches
        ("app/db", "app/other", False),
        ("app/*", "app", True),
        ("app/*", "app/x", False),
        ("app/*/password", "app", True),
        ("app/*/password", "app/db", True),
        ("app/*/password", "app/db/password", False),
        ("app/db-*/x", "app/db-main", True),
        ("app/db-*/x", "app/web", False),
        ("**/db", "anything/at/all", True),
        ("app/**/db", "app/x/y", True),
        ("app/**/db", "other", False),
        ("**", "", True),
        ("**", "x/y", True),
        # the path's 16-segment limit leaves no room below a 16-segment prefix
        ("**", "/".join(["s"] * 16), False),
        ("app/**", "app/../x", False),
    ],
)
def test_could_match_under_tells_whether_a_folder_may_hold_a_match(
    pattern: str, prefix: str, expected: bool
) -> None:
    assert PathGlob(pattern).could_match_under(prefix) is expected


# -- loading -----------------------------------------------------------------------------------


def test_the_contract_example_loads(policy: Policy) -> None:
    assert policy.roles_claim == "roles"
    assert policy.role_names == {"app-reader", "app-writer"}


def test_roles_claim_defaults_to_roles_when_auth_is_absent() -> None:
    assert Policy.from_toml('[roles.r]\nread = ["a/**"]').roles_claim == "roles"


def test_roles_claim_can_be_renamed() -> None:
    assert Policy.from_toml('[auth]\nroles_claim = "groups"').roles_claim == "groups"


def test_unknown_top_level_sections_are_kept_in_raw_for_later_features() -> None:
    policy = Policy.from_toml(CONTRACT_POLICY + "\n[validation.app]\nmin_length = 12\n")
    assert policy.raw["validation"] == {"app": {"min_length": 12}}
    assert policy.raw["roles"]["app-reader"] == {"read": ["app/**"]}


def test_the_permission_names_are_the_contract_scopes() -> None:
    assert (READ, WRITE, DESTROY, ROTATE) == (
        "secrets:read",
        "secrets:write",
        "secrets:destroy",
        "secrets:rotate",
    )
    assert (APPROVE, BYPASS) == ("secrets:approve", "secrets:bypass")
    assert PERMISSIONS == {
        "read": READ,
        "write": WRITE,
        "destroy": DESTROY,
        "rotate": ROTATE,
        "approve": APPROVE,
        "bypass": BYPASS,
    }


def test_no_role_is_granted_the_services_own_folder_whatever_its_globs() -> None:
    policy = Policy.from_toml(
        '[roles.root]\nread = ["**"]\nwrite = ["**"]\nrotate = ["**"]\n'
        'destroy = [".secrets-service/**"]'
    )
    for permission in (READ, WRITE, DESTROY, ROTATE):
        assert not policy.allows(["root"], None, permission, ".secrets-service/rotation/app/db")
        assert not policy.allows(["root"], None, permission, ".secrets-service")
    assert policy.allows(["root"], None, READ, ".secrets-services/app")
    assert policy.allows(["root"], None, ROTATE, "app/db")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[roles.r\nread = 1", "not valid TOML"),
        ('[roles.app-reader]\nreed = ["app/**"]', "roles.app-reader.reed: unknown key"),
        ('[roles.app-reader]\nread = "app/**"', "roles.app-reader.read: must be a list"),
        ("[roles.app-reader]\nread = [1]", r"roles.app-reader.read\[0\]: must be a string"),
        (
            '[roles.app-reader]\nread = ["ok/**", "app/../x"]',
            r"roles.app-reader.read\[1\]: glob 'app/../x'",
        ),
        ('[roles.w]\nwrite = ["app//x"]', r"roles.w.write\[0\]: glob 'app//x'"),
        ('roles = ["admin"]', r"\[roles\] must be a table"),
        ('[roles]\nadmin = ["app/**"]', r"roles.admin: must be a table"),
        ('auth = "roles"', r"\[auth\] must be a table"),
        ('[auth]\nrole_claim = "roles"', "auth.role_claim: unknown key"),
        ("[auth]\nroles_claim = 3", "auth.roles_claim: must be a non-empty string"),
        ('[auth]\nroles_claim = ""', "auth.roles_claim: must be a non-empty string"),
    ],
)
def test_a_bad_policy_is_a_config_error_naming_the_setting_and_the_key(
    text: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        Policy.from_toml(text)
    assert caught.value.setting == "SECRETS_POLICY_FILE"
    assert str(caught.value).startswith("SECRETS_POLICY_FILE: ")


def test_the_source_named_in_errors_can_be_chosen() -> None:
    with pytest.raises(ConfigError) as caught:
        Policy.from_toml("[roles.r]\nreed = []", source="SECRETS_CONFIG")
    assert caught.value.setting == "SECRETS_CONFIG"


def test_a_policy_file_is_loaded_from_disk(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text(CONTRACT_POLICY, encoding="utf-8")
    assert Policy.load(file).allows(["app-reader"], None, READ, "app/db")
    assert Policy.load(str(file)).roles_claim == "roles"


def test_a_missing_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        Policy.load(tmp_path / "absent.toml")
    assert caught.value.setting == "SECRETS_POLICY_FILE"


def test_a_policy_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Policy.load(tmp_path)


def test_a_policy_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_bytes(b"\xff\xfe[roles]")
    with pytest.raises(ConfigError, match="not UTF-8") as caught:
        Policy.load(file)
    assert caught.value.setting == "SECRETS_POLICY_FILE"


def test_a_bad_policy_file_is_a_config_error_naming_the_setting(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text('[roles.r]\nread = ["../x"]', encoding="utf-8")
    with pytest.raises(ConfigError, match="roles.r.read") as caught:
        Policy.load(file)
    assert caught.value.setting == "SECRETS_POLICY_FILE"


# -- decisions ---------------------------------------------------------------------------------


def test_a_reader_may_read_under_its_glob(policy: Policy) -> None:
    assert policy.allows(["app-reader"], None, READ, "app/db/password")


def test_a_reader_may_not_read_outside_its_glob(policy: Policy) -> None:
    assert not policy.allows(["app-reader"], None, READ, "billing/db")
    assert not policy.allows(["app-reader"], None, READ, "app")


def test_a_reader_may_not_write(policy: Policy) -> None:
    assert not policy.allows(["app-reader"], None, WRITE, "app/db")


def test_a_writer_may_write_and_read(policy: Policy) -> None:
    assert policy.allows(["app-writer"], None, WRITE, "app/db")
    assert policy.allows(["app-writer"], None, READ, "app/db")


def test_write_does_not_imply_read() -> None:
    policy = Policy.from_toml('[roles.w]\nwrite = ["app/**"]')
    assert policy.allows(["w"], None, WRITE, "app/db")
    assert not policy.allows(["w"], None, READ, "app/db")


def test_destroy_is_granted_only_by_a_destroy_key(policy: Policy) -> None:
    assert not policy.allows(["app-writer"], None, DESTROY, "app/db")
    admin = Policy.from_toml('[roles.admin]\ndestroy = ["app/**"]')
    assert admin.allows(["admin"], None, DESTROY, "app/db")


def test_an_unknown_role_grants_nothing(policy: Policy) -> None:
    assert not policy.allows(["root"], None, READ, "app/db")


def test_no_roles_grant_nothing(policy: Policy) -> None:
    assert not policy.allows([], None, READ, "app/db")


def test_an_empty_policy_grants_nothing() -> None:
    assert not Policy.from_toml("").allows(["app-reader"], None, READ, "app/db")


def test_an_unknown_permission_is_never_granted(policy: Policy) -> None:
    assert not policy.allows(["app-writer"], None, "secrets:admin", "app/db")
    assert not policy.allows(["app-writer"], None, "read", "app/db")


def test_any_one_of_several_roles_is_enough(policy: Policy) -> None:
    assert policy.allows(["root", "app-reader"], None, READ, "app/db")
    assert policy.allows(iter(["nobody", "app-writer"]), None, WRITE, "app/db")


@pytest.mark.parametrize(
    "path", ["", "app/../db", "app/./x", "app//x", "app/x/", "/app", "app/\u0430", "a" * 513]
)
def test_an_invalid_path_is_never_allowed(path: str) -> None:
    policy = Policy.from_toml('[roles.admin]\nread = ["**"]')
    assert policy.allows(["admin"], None, READ, "app/db")
    assert not policy.allows(["admin"], None, READ, path)


def test_scopes_holding_the_permission_keep_the_grant(policy: Policy) -> None:
    assert policy.allows(["app-writer"], frozenset({READ, WRITE}), WRITE, "app/db")


def test_scopes_without_the_permission_narrow_the_grant(policy: Policy) -> None:
    assert not policy.allows(["app-writer"], frozenset({READ}), WRITE, "app/db")
    assert not policy.allows(["app-writer"], frozenset(), READ, "app/db")


def test_scopes_never_widen_what_roles_grant(policy: Policy) -> None:
    assert not policy.allows(["app-reader"], frozenset({READ, WRITE}), WRITE, "app/db")
    assert not policy.allows(["nobody"], frozenset({READ}), READ, "app/db")


def test_grants_lists_the_globs_of_every_role_once_in_order() -> None:
    policy = Policy.from_toml(
        '[roles.a]\nread = ["app/**", "x/*"]\n[roles.b]\nread = ["app/**", "y/**"]'
    )
    assert policy.grants(["a", "b", "nobody"], None, READ) == [
        PathGlob("app/**"),
        PathGlob("x/*"),
        PathGlob("y/**"),
    ]


def test_grants_is_empty_without_the_permission_or_the_scope(policy: Policy) -> None:
    assert policy.grants(["app-reader"], None, WRITE) == []
    assert policy.grants(["app-writer"], frozenset({READ}), WRITE) == []
    assert policy.grants(["nobody"], None, READ) == []


def test_an_empty_glob_list_grants_nothing() -> None:
    policy = Policy.from_toml("[roles.r]\nread = []")
    assert not policy.allows(["r"], None, READ, "app/db")
    assert policy.grants(["r"], None, READ) == []


def test_the_repr_names_the_roles_claim_and_roles(policy: Policy) -> None:
    assert repr(policy) == "Policy(roles_claim='roles', roles=['app-reader', 'app-writer'])"

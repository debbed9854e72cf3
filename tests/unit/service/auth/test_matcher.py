"""The compiled policy (service/auth/matcher.py) decides as the plain loop over every role's globs
does, whatever the globs and paths; and its cost does not grow with the number of globs."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.globs import PathGlob
from schemas.paths import MAX_SEGMENTS
from service.auth.matcher import GrantMatcher
from service.auth.policy import READ, WRITE, Policy

# Few distinct words, so that random globs and random paths often meet; dots and dashes included.
WORDS = ["a", "b", "ab", "ba", "a.b", "x-1", "aab", "db-", "-db"]
GLOB_SEGMENTS = st.one_of(
    st.sampled_from(WORDS),
    st.sampled_from(["*", "**", "a*", "*b", "a*b", "db-*", "*-db", "x*1", "*.b"]),
)
ROLES = ["r0", "r1", "r2", "r3"]


def _valid(pattern: str) -> bool:
    try:
        PathGlob(pattern)
    except ValueError:
        return False
    return True


globs = st.lists(GLOB_SEGMENTS, min_size=1, max_size=6).map("/".join).filter(_valid).map(PathGlob)
paths = st.lists(st.sampled_from(WORDS), min_size=1, max_size=MAX_SEGMENTS).map("/".join)
grants = st.dictionaries(st.sampled_from(ROLES), st.lists(globs, max_size=5), max_size=4)
callers = st.lists(st.sampled_from([*ROLES, "nobody"]), max_size=3)


def plain_loop(held: dict[str, list[PathGlob]], roles: list[str], path: str) -> bool:
    """What a check means: some glob of some role of the caller matches the path."""
    return any(glob.matches(path) for role in roles for glob in held.get(role, []))


@settings(max_examples=150, deadline=None)
@given(grants, callers, st.lists(paths, min_size=1, max_size=8))
def test_the_compiled_policy_decides_as_the_plain_loop_over_globs(
    held: dict[str, list[PathGlob]], roles: list[str], checked: list[str]
) -> None:
    policy = Policy(roles_claim="roles", grants={role: {READ: g} for role, g in held.items()})
    for path in checked:
        assert policy.allows(roles, None, READ, path) is plain_loop(held, roles, path), path
        assert not policy.allows(roles, None, WRITE, path)


@settings(max_examples=100, deadline=None)
@given(st.lists(globs, min_size=1, max_size=30), paths)
def test_the_matcher_agrees_with_each_globs_regex_one_role_or_one_role_per_glob(
    patterns: list[PathGlob], path: str
) -> None:
    expected = any(glob.matches(path) for glob in patterns)
    one_role = GrantMatcher({"r": patterns})
    assert one_role.matches(path, one_role.mask(["r"])) is expected
    per_glob = GrantMatcher({f"r{i}": [glob] for i, glob in enumerate(patterns)})
    for i, glob in enumerate(patterns):
        assert per_glob.matches(path, per_glob.mask([f"r{i}"])) is glob.matches(path)


def test_a_role_only_gets_what_its_own_globs_match_in_a_shared_trie() -> None:
    matcher = GrantMatcher(
        {
            "a": [PathGlob("app/**")],
            "b": [PathGlob("app/db"), PathGlob("**/config")],
            "c": [PathGlob("app/db-*"), PathGlob("app/*/x")],
        }
    )
    decisions = {
        (role, path): matcher.matches(path, matcher.mask([role]))
        for role in "abc"
        for path in ("app/db", "app/db-main", "app/q/x", "app/q/config", "config", "app")
    }
    assert [path for (role, path), ok in decisions.items() if role == "a" and ok] == [
        "app/db",
        "app/db-main",
        "app/q/x",
        "app/q/config",
    ]
    assert [path for (role, path), ok in decisions.items() if role == "b" and ok] == [
        "app/db",
        "app/q/config",
        "config",
    ]
    assert [path for (role, path), ok in decisions.items() if role == "c" and ok] == [
        "app/db-main",
        "app/q/x",
    ]
    assert matcher.mask(["nobody"]) == 0


def test_many_double_star_globs_on_the_longest_path_stay_fast() -> None:
    # Each `**` may take any share of the path: a regex alternation backtracks through them, the
    # automaton keeps one state per node and segment.
    patterns = ["/".join(["**", "a"] * 7 + ["**", f"b{i}"]) for i in range(50)]
    policy = Policy(roles_claim="roles", grants={"r": {READ: [PathGlob(p) for p in patterns]}})
    path = "/".join(["a"] * MAX_SEGMENTS)
    started = time.process_time()
    assert not policy.allows(["r"], None, READ, path)
    assert policy.allows(["r"], None, READ, "/".join(["a"] * 7 + ["b49"]))
    assert time.process_time() - started < 1.0  # ~1 ms; a backtracking matcher takes hours


def test_thousands_of_literal_and_partial_siblings_are_each_found() -> None:
    patterns = [PathGlob(f"team-{i}/**") for i in range(2500)]
    patterns += [PathGlob(f"svc/db-{i}-*") for i in range(2500)]
    policy = Policy(roles_claim="roles", grants={"bulk": {READ: patterns}})
    assert policy.allows(["bulk"], None, READ, "team-2499/app/password")
    assert policy.allows(["bulk"], None, READ, "svc/db-17-main")
    assert not policy.allows(["bulk"], None, READ, "team-2500/app")
    assert not policy.allows(["bulk"], None, READ, "svc/db-2500-main")
    assert not policy.allows(["bulk"], None, READ, "team-1")


def test_replace_with_swaps_every_decision_for_every_holder_at_once() -> None:
    held = Policy.from_toml('[auth]\nroles_claim = "roles"\n[roles.r]\nread = ["app/**"]')
    holder = {"policy": held}  # as request state keeps it
    held.replace_with(
        Policy.from_toml('[roles.r]\nread = ["billing/**"]\n[roles.w]\nwrite = ["x/*"]\n[z]\nk=1')
    )
    policy = holder["policy"]
    assert not policy.allows(["r"], None, READ, "app/db")
    assert policy.allows(["r"], None, READ, "billing/db")
    assert policy.allows(["w"], None, WRITE, "x/y")
    assert policy.role_names == {"r", "w"}
    assert policy.grants(["r"], None, READ) == [PathGlob("billing/**")]
    assert policy.raw["z"] == {"k": 1}

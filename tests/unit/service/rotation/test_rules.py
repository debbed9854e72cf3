"""Rotation rules: the [[rotation.rules]] section, its start-up errors, durations, when a rule is
due, which rule applies, and the checks against [validation]."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from schemas.errors import ConfigError
from schemas.globs import PathGlob
from service.auth.policy import Policy
from service.core.validation import Validator
from service.durations import parse_duration
from service.rotation.rules import RotationRule, RotationRules

CONTRACT_EXAMPLE = """
[[rotation.rules]]
paths = ["app/api/*"]          # first matching rule applies
every = "720h"                 # or cron = "0 3 * * 1" (UTC); neither: only on request
generator = "password"         # password | token | postgres
fields = ["password"]          # the fields regenerated; every other field carried over as is
length = 32                    # password characters / token bytes
grace = "24h"                  # the previous version stays valid this long (postgres)
"""

GOOD_RULE = """
[[rotation.rules]]
paths = ["good/*"]
"""


def parse(text: str) -> RotationRules:
    raw = Policy.from_toml(text).raw
    return RotationRules.from_policy(raw, Validator.from_policy(raw))


def refusal(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value.problem


def second_rule_refusal(body: str) -> str:
    """The problem with a rule placed second, after a good one (so the index is checked too)."""
    return refusal(GOOD_RULE + "\n[[rotation.rules]]\n" + body)


def at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: float = 0
) -> datetime:
    whole = int(second)
    micro = round((second - whole) * 1_000_000)
    return datetime(year, month, day, hour, minute, whole, micro, tzinfo=UTC)


# -- parsing -------------------------------------------------------------------------------------


def test_the_contracts_example_rule_parses_with_every_value_as_written() -> None:
    (rule,) = parse(CONTRACT_EXAMPLE).rules
    assert rule.where == "rotation.rules[0]"
    assert rule.paths == (PathGlob("app/api/*"),)
    assert rule.every == 720 * 3600
    assert rule.cron is None
    assert rule.generator == "password"
    assert rule.fields == ("password",)
    assert rule.length == 32
    assert rule.grace == 24 * 3600
    assert rule.master is None
    assert rule.scheduled


def test_a_policy_without_rotation_has_no_rules() -> None:
    rules = parse('[roles.r]\nread = ["app/**"]\n')
    assert len(rules) == 0
    assert rules.rule_for("app/x") is None


def test_a_rule_with_only_paths_is_an_on_request_password_rule_with_the_defaults() -> None:
    (rule,) = parse(GOOD_RULE).rules
    assert (rule.generator, rule.fields, rule.length, rule.grace) == (
        "password",
        ("password",),
        32,
        0,
    )
    assert not rule.scheduled
    assert rule.next_after(at(2024, 1, 1)) is None


def test_a_token_rule_regenerates_the_token_field_by_default() -> None:
    (rule,) = parse('[[rotation.rules]]\npaths = ["t/*"]\ngenerator = "token"\n').rules
    assert rule.fields == ("token",)


def test_a_rule_built_in_code_gets_its_generators_field_by_default() -> None:
    rule = RotationRule(where="test", paths=(PathGlob("t/*"),), generator="token")
    assert rule.fields == ("token",)
    assert RotationRule(where="test", paths=(PathGlob("t/*"),)).fields == ("password",)


def test_a_postgres_rule_with_master_and_grace_shorter_than_every_parses() -> None:
    (rule,) = parse(
        '[[rotation.rules]]\npaths = ["db/app"]\ngenerator = "postgres"\nevery = "720h"\n'
        'grace = "24h"\nmaster = "db/admin"\n'
    ).rules
    assert (rule.generator, rule.fields, rule.master, rule.grace) == (
        "postgres",
        ("password",),
        "db/admin",
        86400,
    )


def test_a_postgres_rule_with_master_and_a_weekly_cron_parses_with_a_day_of_grace() -> None:
    (rule,) = parse(
        '[[rotation.rules]]\npaths = ["db/app"]\ngenerator = "postgres"\ncron = "0 3 * * 1"\n'
        'grace = "24h"\nmaster = "db/admin"\n'
    ).rules
    assert rule.cron == "0 3 * * 1"


def test_a_bare_number_is_seconds() -> None:
    (rule,) = parse('[[rotation.rules]]\npaths = ["a/*"]\nevery = 90\n').rules
    assert rule.every == 90.0


# -- start-up errors name the rule and the key -----------------------------------------------


def test_a_rotation_section_that_is_not_a_table_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        RotationRules.from_policy({"rotation": 3}, Validator())
    assert info.value.problem == "[rotation] must be a table"


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("[rotation]\nschedule = 1\n", "rotation.schedule: unknown key; expected one of rules"),
        ("[rotation]\nrules = 3\n", "rotation.rules: must be an array of tables"),
        ("[rotation]\nrules = [3]\n", "rotation.rules[0]: must be a table"),
    ],
)
def test_a_wrong_rotation_section_is_refused_naming_the_key(text: str, start: str) -> None:
    assert refusal(text).startswith(start)


BAD_RULES = [
    # (the rule's body, the key named, a piece of the problem)
    ('paths = ["a/*"]\ncolour = "red"', "colour", "unknown key"),
    ('every = "1h"', "paths", "required"),
    ("paths = []", "paths", "non-empty"),
    ('paths = "a/*"', "paths", "non-empty list"),
    ("paths = [3]", "paths[0]", "must be a string"),
    ('paths = ["a/*", "a//b"]', "paths[1]", "empty segment"),
    ('paths = ["a/b**"]', "paths[0]", "'**' must be a whole segment"),
    ('paths = ["a/*"]\nevery = "1h"\ncron = "0 3 * * 1"', "cron", "not both"),
    ('paths = ["a/*"]\nevery = "soon"', "every", "a duration like"),
    ('paths = ["a/*"]\nevery = "0.5s"', "every", "at least 1s"),
    ('paths = ["a/*"]\nevery = 0', "every", "at least 1s"),
    ('paths = ["a/*"]\nevery = -5', "every", "0 or more"),
    ('paths = ["a/*"]\nevery = true', "every", "a duration like"),
    ('paths = ["a/*"]\nevery = "30m1h"', "every", "a duration like"),
    ('paths = ["a/*"]\nevery = "4000d"', "every", "at most 3650d"),
    ('paths = ["a/*"]\ncron = "61 * * * *"', "cron", "Bad minute"),
    ('paths = ["a/*"]\ncron = "* * * *"', "cron", "must be 5 fields"),
    ('paths = ["a/*"]\ncron = "0 0 3 * * 1"', "cron", "must be 5 fields"),
    ('paths = ["a/*"]\ncron = "0 0 30 2 *"', "cron", "Bad day-of-month"),
    ('paths = ["a/*"]\ncron = 5', "cron", "must be 5 fields"),
    ('paths = ["a/*"]\ngenerator = "ldap"', "generator", "one of password, token, postgres"),
    ('paths = ["a/*"]\ngenerator = 3', "generator", "one of password, token, postgres"),
    ('paths = ["a/*"]\nfields = []', "fields", "non-empty list"),
    ('paths = ["a/*"]\nfields = "password"', "fields", "non-empty list"),
    ('paths = ["a/*"]\nfields = [1]', "fields", "non-empty list"),
    ('paths = ["a/*"]\nfields = ["pass word"]', "fields", "must match"),
    ('paths = ["a/*"]\nfields = ["a", "a"]', "fields", "listed once"),
    ('paths = ["a/*"]\ngenerator = "postgres"\nfields = ["token"]', "fields", "postgres"),
    ('paths = ["a/*"]\ngenerator = "postgres"\nfields = ["password", "x"]', "fields", "postgres"),
    ('paths = ["a/*"]\nlength = "32"', "length", "must be an integer"),
    ('paths = ["a/*"]\nlength = 32.0', "length", "must be an integer"),
    ('paths = ["a/*"]\nlength = true', "length", "must be an integer"),
    ('paths = ["a/*"]\nlength = 7', "length", "8 to 1024 characters"),
    ('paths = ["a/*"]\nlength = 1025', "length", "8 to 1024 characters"),
    ('paths = ["a/*"]\ngenerator = "token"\nlength = 15', "length", "16 to 1024 bytes"),
    ('paths = ["a/*"]\ngenerator = "token"\nlength = 1025', "length", "16 to 1024 bytes"),
    ('paths = ["a/*"]\ngenerator = "postgres"\nlength = 7', "length", "8 to 1024 characters"),
    ('paths = ["a/*"]\ngrace = "a while"', "grace", "a duration like"),
    ('paths = ["a/*"]\ngrace = -1', "grace", "0 or more"),
    ('paths = ["a/*"]\nmaster = "db/admin"', "master", "only a postgres rule"),
    ('paths = ["a/*"]\ngenerator = "postgres"\nmaster = "/db"', "master", "a secret path"),
    ('paths = ["a/*"]\ngenerator = "postgres"\nmaster = 5', "master", "a secret path"),
    (
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = ".secrets-service/x"',
        "master",
        "a secret path",
    ),
    ('paths = ["a/*"]\ngenerator = "postgres"\ngrace = "1h"', "grace", "needs master"),
    (
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = "db/admin"\nevery = "1h"\ngrace = "1h"',
        "grace",
        "shorter than every (3600s)",
    ),
    (
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = "db/admin"\nevery = "1h"\ngrace = "2h"',
        "grace",
        "shorter than every",
    ),
    (
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = "db/admin"\ncron = "*/5 * * * *"\n'
        'grace = "10m"',
        "grace",
        "shortest gap between cron fires (300s)",
    ),
    (
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = "db/admin"\ncron = "0 3 * * 1"\n'
        'grace = "7d"',
        "grace",
        "shortest gap between cron fires (604800s)",
    ),
    (
        # The 1st of the month or a Sunday: the two fall on consecutive days now and then.
        'paths = ["a/*"]\ngenerator = "postgres"\nmaster = "db/admin"\ncron = "0 0 1 * 0"\n'
        'grace = "36h"',
        "grace",
        "shortest gap between cron fires (86400s)",
    ),
]


@pytest.mark.parametrize(("body", "key", "fragment"), BAD_RULES)
def test_each_bad_rule_is_refused_naming_the_rule_and_the_key(
    body: str, key: str, fragment: str
) -> None:
    problem = second_rule_refusal(body)
    assert problem.startswith(f"rotation.rules[1].{key}: "), problem
    assert fragment in problem


def test_the_error_names_the_policy_source() -> None:
    raw = Policy.from_toml('[[rotation.rules]]\npaths = ["a/*"]\nlength = 2\n').raw
    with pytest.raises(ConfigError) as info:
        RotationRules.from_policy(raw, Validator(), source="policy.toml")
    assert info.value.setting == "policy.toml"
    assert str(info.value).startswith("policy.toml: rotation.rules[0].length: ")


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("720h", 720 * 3600),
        ("7d", 7 * 86400),
        ("1h30m", 5400),
        ("2.5s", 2.5),
        ("1d2h3m4s", 93784),
        ("0.5h", 1800),
        ("0s", 0),
        (90, 90),
        (2.5, 2.5),
        (0, 0),
        ("3650d", 3650 * 86400),
    ],
)
def test_a_duration_reads_as_seconds(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["", "90", "1.s", ".5s", "1h 30m", " 5s", "30m1h", "1h1h", "1H", "-5s", "5ms", "1w", "1e3s"]
    + ["3651d", "inf", -1, -0.5, math.nan, math.inf, 10**12, True, None, [1]],
)
def test_anything_else_is_refused_with_the_forms_accepted(value: Any) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert any(form in str(info.value) for form in ("duration like", "0 or more", "at most 3650d"))


def test_a_refused_duration_is_not_echoed() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("canary-9f1e")
    assert "canary" not in str(info.value)


# -- when a rule is due ----------------------------------------------------------------------


def cron_rule(expression: str) -> RotationRule:
    (rule,) = parse(f'[[rotation.rules]]\npaths = ["a/*"]\ncron = "{expression}"\n').rules
    return rule


def test_a_weekly_cron_from_a_tuesday_fires_the_next_monday_at_three_utc() -> None:
    tuesday = at(2024, 1, 2, 10, 0)
    assert cron_rule("0 3 * * 1").next_after(tuesday) == at(2024, 1, 8, 3, 0)


def test_a_cron_fire_is_strictly_after_the_baseline() -> None:
    rule = cron_rule("0 3 * * 1")
    assert rule.next_after(at(2024, 1, 8, 3, 0)) == at(2024, 1, 15, 3, 0)
    assert rule.next_after(at(2024, 1, 8, 3, 0, 0.5)) == at(2024, 1, 15, 3, 0)
    assert rule.next_after(at(2024, 1, 8, 2, 59, 59.999)) == at(2024, 1, 8, 3, 0)


def test_an_every_other_minute_cron_fires_on_even_minutes() -> None:
    rule = cron_rule("*/2 * * * *")
    assert rule.next_after(at(2024, 1, 2, 12, 0)) == at(2024, 1, 2, 12, 2)
    assert rule.next_after(at(2024, 1, 2, 12, 1, 30)) == at(2024, 1, 2, 12, 2)
    assert rule.next_after(at(2024, 1, 2, 12, 2, 0.5)) == at(2024, 1, 2, 12, 4)
    assert rule.next_after(at(2024, 1, 2, 23, 59)) == at(2024, 1, 3, 0, 0)


def test_a_cron_is_read_in_utc_whatever_the_baselines_zone() -> None:
    paris_noon = datetime(2024, 1, 2, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    fire = cron_rule("0 12 * * *").next_after(paris_noon)
    assert fire == at(2024, 1, 2, 12, 0)
    assert fire is not None and fire.utcoffset() == timedelta(0)


def test_every_is_the_baseline_plus_the_period() -> None:
    (rule,) = parse('[[rotation.rules]]\npaths = ["a/*"]\nevery = "1h30m"\n').rules
    baseline = at(2024, 1, 2, 10, 0, 12.25)
    assert rule.next_after(baseline) == baseline + timedelta(minutes=90)


def test_a_naive_baseline_is_refused() -> None:
    with pytest.raises(ValueError):
        cron_rule("* * * * *").next_after(datetime(2024, 1, 2, 10, 0))


# -- which rule applies ----------------------------------------------------------------------

TWO_RULES = """
[[rotation.rules]]
paths = ["app/api/*", "db-*/main"]
every = "1h"

[[rotation.rules]]
paths = ["app/**", "**"]
generator = "token"
"""


def test_the_first_matching_rule_applies() -> None:
    rules = parse(TWO_RULES)
    first, second = rules.rules
    assert len(rules) == 2
    assert rules.rule_for("app/api/x") is first
    assert rules.rule_for("db-orders/main") is first
    assert rules.rule_for("app/api/x/y") is second
    assert rules.rule_for("other") is second


def test_no_rule_matches_an_invalid_path_or_the_services_own_folder() -> None:
    rules = parse(TWO_RULES)
    assert rules.rule_for(".secrets-service/rotation/app/api/x") is None
    assert rules.rule_for("app//x") is None
    assert parse(GOOD_RULE).rule_for("other/x") is None


# -- what [validation] allows ----------------------------------------------------------------

STRICT = """
[validation]
sensitive_fields = "pass|token|key"

[validation.defaults]
min_entropy = 100

[[validation.rules]]
paths = ["strict/**"]
allowed = ["username", "password", "port"]
min_entropy = 150
[validation.rules.fields.password]
min_length = 20
max_length = 40
[validation.rules.fields.port]
type = "integer"
[validation.rules.fields.username]
min_entropy = 300

[[validation.rules]]
paths = ["db-x/**"]
allowed = ["username"]

[[validation.rules]]
paths = ["small/*"]
max_total_size = 100
"""


def feasibility_refusal(body: str) -> str:
    return refusal(STRICT + "\n[[rotation.rules]]\n" + body)


def test_a_rule_the_validation_rules_allow_parses() -> None:
    (rule,) = parse(STRICT + '[[rotation.rules]]\npaths = ["strict/*"]\nlength = 32\n').rules
    assert rule.length == 32


def test_a_field_the_validation_rule_does_not_allow_is_refused() -> None:
    problem = feasibility_refusal('paths = ["strict/*"]\nfields = ["api_key"]')
    assert problem == (
        "rotation.rules[0].fields: field 'api_key' is not in the allowed keys of "
        "validation.rules[0] (which applies to 'strict/x')"
    )


def test_a_field_the_validation_rule_types_as_other_than_string_is_refused() -> None:
    problem = feasibility_refusal('paths = ["strict/**"]\nfields = ["port"]')
    assert problem.startswith("rotation.rules[0].fields: field 'port' is generated as a string")
    assert "integer" in problem


@pytest.mark.parametrize(("length", "bound"), [(16, "min_length"), (41, "max_length")])
def test_a_length_outside_the_fields_bounds_is_refused(length: int, bound: str) -> None:
    problem = feasibility_refusal(f'paths = ["strict/*"]\nlength = {length}')
    assert problem.startswith(f"rotation.rules[0].length: {length}-character values are")
    assert f"the 'password' {bound} of validation.rules[0]" in problem


def test_a_token_is_measured_in_base64url_characters() -> None:
    # 32 bytes are 43 characters: above the password field's max_length of 40.
    body = 'paths = ["strict/*"]\ngenerator = "token"\nfields = ["password"]\nlength = 32'
    assert "43-character values are above" in feasibility_refusal(body)


@pytest.mark.parametrize(
    "body",
    [
        'paths = ["other/*"]\nlength = 8',  # about 53 bits against the defaults' 100
        'paths = ["strict/*"]\nlength = 20',  # about 131 bits against the rule's 150
    ],
)
def test_an_entropy_the_generated_values_cannot_reach_is_refused(body: str) -> None:
    assert "bits, below the 'password' min_entropy" in feasibility_refusal(body)


def test_a_token_of_sixteen_bytes_cannot_meet_three_hundred_bits() -> None:
    text = (
        "[validation.defaults]\nmin_entropy = 300\n"
        '[[rotation.rules]]\npaths = ["t/*"]\ngenerator = "token"\nlength = 16\n'
    )
    assert refusal(text) == (
        "rotation.rules[0].length: values reach about 131 bits, below the 'token' min_entropy "
        "of validation.defaults (which applies to 't/x')"
    )


def test_a_fields_own_min_entropy_applies_whatever_its_name() -> None:
    problem = feasibility_refusal('paths = ["strict/*"]\nfields = ["username"]\nlength = 40')
    assert "below the 'username' min_entropy" in problem


def test_a_rules_min_entropy_applies_only_to_sensitive_field_names() -> None:
    text = '[validation.defaults]\nmin_entropy = 300\n[[rotation.rules]]\npaths = ["a/*"]\n'
    assert "min_entropy" in refusal(text + 'fields = ["api_key"]\n')
    (rule,) = parse(text + 'fields = ["username"]\n').rules
    assert rule.fields == ("username",)


def test_a_partial_wildcard_is_sampled_with_x_in_place_of_the_star() -> None:
    problem = feasibility_refusal('paths = ["db-*/main"]')
    assert "validation.rules[1] (which applies to 'db-x/main')" in problem


def test_every_glob_of_the_rule_is_checked() -> None:
    problem = feasibility_refusal('paths = ["strict/*", "other/**"]\nlength = 12')
    assert problem.startswith("rotation.rules[0].length: 12-character values are below")
    problem = feasibility_refusal(
        'paths = ["other/*", "small/*"]\nfields = ["password", "key"]\nlength = 40'
    )
    assert "(which applies to 'small/x')" in problem


def test_generated_fields_larger_than_max_total_size_are_refused() -> None:
    problem = feasibility_refusal('paths = ["small/*"]\nfields = ["password", "key"]\nlength = 40')
    assert problem == (
        "rotation.rules[0].length: the generated fields alone take 104 bytes, above the "
        "max_total_size of validation.rules[2] (which applies to 'small/x')"
    )

"""Validation rules one by one, the [validation] policy section, the entropy estimate, the list."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.errors import ConfigError, InvalidRequest, InvalidSecret, Violation
from service.auth.policy import Policy
from service.core.manager import SecretsManager
from service.core.validation import (
    RULES,
    Validator,
    common_passwords,
    estimate_entropy,
    validate_data,
)
from tests.fakes import FakeVault

CANARY = "canary-5e2b-validation-never-echoed"
STRONG = "Zq8#vT2!mL9$wR4p"  # 16 characters from all four classes: about 105 bits

APP_POLICY = """
[roles.r]
read = ["app/**"]

[validation]
sensitive_fields = "pass|secret|token|key"

[validation.defaults]
max_total_size = 4096

[[validation.rules]]
paths = ["app/db/**", "app/db"]
required = ["username", "password"]
allowed = ["username", "password", "host", "port", "options"]
max_length = 256
min_entropy = 60
[validation.rules.fields.password]
type = "string"
min_length = 12
max_length = 64
[validation.rules.fields.port]
type = "integer"
[validation.rules.fields.options]
type = "object"

[[validation.rules]]
paths = ["app/**"]
max_total_size = 512
deny_common = false
"""


def validator(text: str = APP_POLICY) -> Validator:
    return Validator.from_policy(Policy.from_toml(text).raw)


def rules(violations: list[Violation]) -> set[tuple[str, str]]:
    return {(v.field, v.rule) for v in violations}


GOOD_DB: dict[str, Any] = {"username": "app", "password": STRONG, "host": "db", "port": 5432}


# -- the built-in defaults --------------------------------------------------------------------


def test_plain_data_passes_the_defaults() -> None:
    assert validate_data({"username": "app", "password": "n0t-in-any-list", "n": 3}) == []


def test_empty_data_is_one_not_empty_violation_on_the_empty_field() -> None:
    assert validate_data({}) == [Violation("", "not_empty")]


@pytest.mark.parametrize("empty", ["", "   ", None, {}, []])
def test_every_kind_of_empty_value_is_refused(empty: Any) -> None:
    assert rules(validate_data({"k": empty})) == {("k", "not_empty")}


def test_a_malformed_key_is_reported_without_its_name() -> None:
    violations = validate_data({f"bad key {CANARY}": "v"})
    assert violations == [Violation("<key>", "key_format")]


def test_data_larger_than_the_default_limit_breaks_max_total_size() -> None:
    data = {f"k{i}": "x" * 1000 for i in range(70)}
    assert rules(validate_data(data)) == {("", "max_total_size")}


def test_nesting_deeper_than_32_levels_breaks_max_depth() -> None:
    deep: Any = "v"
    for _ in range(40):
        deep = {"k": deep}
    assert ("deep", "max_depth") in rules(validate_data({"deep": deep}))


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", float("nan"), object()])
def test_values_json_cannot_hold_are_an_invalid_request(value: Any) -> None:
    with pytest.raises(InvalidRequest):
        validate_data({"k": value})


@pytest.mark.parametrize("number", [2**53, -(2**53), 10**30, [1, {"n": 2**63}]])
def test_integers_vault_would_round_are_an_invalid_request(number: Any) -> None:
    # Vault keeps JSON numbers as 64-bit floats: 2**53 + 1 would be stored as 2**53.
    with pytest.raises(InvalidRequest):
        validate_data({"k": number})


def test_the_largest_safe_integers_and_floats_are_accepted() -> None:
    assert validate_data({"max": 2**53 - 1, "min": -(2**53 - 1), "f": 1e308, "b": True}) == []


def test_a_common_password_in_a_sensitive_field_is_refused_by_default() -> None:
    assert rules(validate_data({"db_password": "Password"})) == {("db_password", "common_password")}
    assert rules(validate_data({"api_token": "letmein"})) == {("api_token", "common_password")}


def test_a_common_word_in_a_field_that_is_not_sensitive_is_fine() -> None:
    assert validate_data({"username": "password", "city": "dragon"}) == []


def test_the_defaults_check_no_entropy() -> None:
    assert validate_data({"password": "zz9-not-listed"}) == []


# -- one rule at a time, from the policy ------------------------------------------------------


def test_a_matching_rule_passes_good_data() -> None:
    assert validator().validate("app/db", GOOD_DB) == []


def test_missing_required_keys_are_each_reported() -> None:
    violations = validator().validate("app/db", {"host": "db"})
    assert rules(violations) == {("username", "required"), ("password", "required")}


def test_a_key_outside_allowed_is_reported_by_name() -> None:
    violations = validator().validate("app/db/main", {**GOOD_DB, "extra": "x"})
    assert rules(violations) == {("extra", "allowed")}


@pytest.mark.parametrize(
    ("field", "value"), [("port", "5432"), ("port", True), ("port", 1.5), ("options", [1])]
)
def test_a_value_of_the_wrong_type_breaks_type(field: str, value: Any) -> None:
    assert rules(validator().validate("app/db", {**GOOD_DB, field: value})) == {(field, "type")}


def test_a_field_minimum_length_applies_to_that_field() -> None:
    violations = validator().validate("app/db", {**GOOD_DB, "password": "Zq8#vT2!mL9"})
    assert ("password", "min_length") in rules(violations)


def test_a_field_maximum_length_overrides_the_rule_maximum() -> None:
    violations = validator().validate("app/db", {**GOOD_DB, "password": STRONG * 5})
    assert ("password", "max_length") in rules(violations)


def test_the_rule_maximum_length_applies_to_a_string_field_without_a_maximum_of_its_own() -> None:
    violations = validator().validate("app/db", {**GOOD_DB, "host": "h" * 257})
    assert rules(violations) == {("host", "max_length")}


def test_a_low_entropy_value_in_a_sensitive_field_breaks_min_entropy() -> None:
    violations = validator().validate("app/db", {**GOOD_DB, "password": "aaaaaaaaaaaaaaaaaaaa"})
    assert rules(violations) == {("password", "min_entropy")}


def test_entropy_is_not_asked_of_fields_that_are_not_sensitive() -> None:
    assert validator().validate("app/db", {**GOOD_DB, "host": "db"}) == []


def test_a_common_password_breaks_common_password_whatever_its_case() -> None:
    violations = validator().validate("app/db", {**GOOD_DB, "password": "Trustno1Trustno1"})
    assert ("password", "common_password") not in rules(violations)  # not the whole value
    violations = validator().validate("app/db", {**GOOD_DB, "password": "ILOVEYOU1234"})
    assert ("password", "common_password") not in rules(violations)
    violations = validator().validate("app/db", {**GOOD_DB, "password": "QWERTYUIOP"})
    assert ("password", "common_password") in rules(violations)


def test_the_rule_total_size_limit_replaces_the_default() -> None:
    violations = validator().validate("app/other", {"blob": "x" * 600})
    assert rules(violations) == {("", "max_total_size")}


def test_a_rule_can_turn_the_deny_list_off() -> None:
    assert validator().validate("app/other", {"password": "password"}) == []


def test_paths_no_rule_matches_get_the_policy_defaults() -> None:
    v = validator()
    assert rules(v.validate("ops/x", {"blob": "x" * 5000})) == {("", "max_total_size")}
    assert rules(v.validate("ops/x", {"secret": "dragon"})) == {("secret", "common_password")}


def test_the_first_matching_rule_wins() -> None:
    v = validator()
    assert v.rule_for("app/db").required == ("username", "password")
    assert v.rule_for("app/db/replica").required == ("username", "password")
    assert v.rule_for("app/cache").required == ()
    assert v.rule_for("other/x") is v.defaults


def test_every_violation_is_listed_at_once() -> None:
    data = {"password": "abc", "port": "x", "extra": "", "<": "v"}
    found = rules(validator().validate("app/db", data))
    assert {
        ("password", "min_length"),
        ("password", "min_entropy"),
        ("port", "type"),
        ("extra", "allowed"),
        ("extra", "not_empty"),
        ("<key>", "key_format"),
        ("username", "required"),
    } <= found


def test_violations_never_hold_a_value() -> None:
    data = {"password": CANARY, "port": CANARY, "x": CANARY}
    violations = validator().validate("app/db", data)
    assert violations
    assert CANARY not in repr(violations)
    assert all(v.rule in RULES for v in violations)


def test_failures_are_counted_by_rule() -> None:
    v = validator()
    v.validate("app/db", {"host": "db"})
    v.validate("app/db", {**GOOD_DB, "port": "x"})
    assert v.failures["required"] == 2
    assert v.failures["type"] == 1
    assert set(v.failures) == set(RULES)


# -- the policy section -----------------------------------------------------------------------


def test_a_policy_without_a_validation_section_gets_the_built_in_defaults() -> None:
    v = Validator.from_policy(Policy.from_toml('[roles.r]\nread = ["a/**"]').raw)
    assert v.rules == ()
    assert v.defaults.max_total_size == 65536 and v.defaults.deny_common


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ("[validation]\nunknown = 1", "validation.unknown"),
        ("[validation]\nsensitive_fields = '('", "validation.sensitive_fields"),
        ("[validation.defaults]\nmin_entropy = 'high'", "validation.defaults.min_entropy"),
        ("[validation.defaults]\nrequired = ['a']", "validation.defaults.required"),
        ("[validation.defaults]\nmax_total_size = -1", "validation.defaults.max_total_size"),
        ("[validation.defaults]\nnot_empty = 1", "validation.defaults.not_empty"),
        ("[[validation.rules]]\nrequired = ['a']", "validation.rules[0].paths"),
        ("[[validation.rules]]\npaths = ['a/../b']", "validation.rules[0].paths[0]"),
        (
            "[[validation.rules]]\npaths = ['a/**']\nmin_lenght = 3",
            "validation.rules[0].min_lenght",
        ),
        (
            "[[validation.rules]]\npaths = ['a/**']\nrequired = ['x']\nallowed = ['y']",
            "validation.rules[0].required",
        ),
        (
            "[[validation.rules]]\npaths = ['a/**']\n[validation.rules.fields.p]\ntype = 'text'",
            "validation.rules[0].fields.p.type",
        ),
        (
            "[[validation.rules]]\npaths = ['a/**']\n[validation.rules.fields.p]\nmin_length = 9"
            "\nmax_length = 3",
            "validation.rules[0].fields.p.min_length",
        ),
        ("[[validation.rules]]\npaths = ['a/**']\nmin_entropy = 5000", "min_entropy"),
        ("validation = 3", "[validation]"),
    ],
)
def test_a_wrong_validation_section_names_the_policy_setting_and_the_key(
    section: str, named: str
) -> None:
    with pytest.raises(ConfigError) as error:
        validator(section)
    assert error.value.setting == "SECRETS_POLICY_FILE"
    assert named in error.value.problem


# -- the entropy estimate and the list --------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bits"),
    [
        ("", 0.0),
        ("aaaa", 4.70),  # one character, repeated: counted once
        ("abcd", 18.80),  # 4 x log2(26)
        ("abcD", 22.80),  # 4 x log2(52)
        ("abD1", 23.82),  # 4 x log2(62)
        ("aD1!", 26.28),  # 4 x log2(95)
        ("aé", 13.95),  # 2 x log2(126)
    ],
)
def test_the_entropy_estimate_is_length_times_log2_of_the_classes_used(
    value: str, bits: float
) -> None:
    assert estimate_entropy(value) == pytest.approx(bits, abs=0.01)


def test_the_deny_list_holds_a_few_thousand_lowercase_entries_and_no_comment() -> None:
    listed = common_passwords()
    assert 3000 <= len(listed) <= 10000
    assert {"password", "123456", "qwerty", "letmein"} <= listed
    assert not any(entry.startswith("#") or entry != entry.lower() for entry in listed)
    assert common_passwords() is listed  # read once


# -- the manager uses its injected validator --------------------------------------------------


async def test_the_manager_validates_in_process_writes_with_its_validator() -> None:
    vault = FakeVault()
    manager = SecretsManager(vault, validator=validator())
    with pytest.raises(InvalidSecret) as invalid:
        await manager.set("app/db", {"username": "app"}, 0)
    assert invalid.value.violations == [Violation("password", "required")]
    assert vault.total_calls == 0
    await manager.set("app/db", GOOD_DB, 0)
    assert vault.current("app/db") == 1


async def test_a_manager_without_a_validator_applies_the_built_in_defaults() -> None:
    manager = SecretsManager(FakeVault())
    with pytest.raises(InvalidSecret) as invalid:
        await manager.set("app/db", {"password": "123456"}, 0)
    assert invalid.value.violations == [Violation("password", "common_password")]

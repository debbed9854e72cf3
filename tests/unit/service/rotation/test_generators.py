"""Generators: passwords and tokens of the promised shape, checked against the path's validation
rules without counting failures, regenerated when refused, never shown in an error."""

from __future__ import annotations

import base64
import math
import re
import string
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import InvalidSecret, Violation
from schemas.globs import PathGlob
from service.auth.policy import Policy
from service.core.validation import Validator, estimate_entropy
from service.rotation.generators import (
    MAX_TRIES,
    PASSWORD_ALPHABET,
    SYMBOLS,
    generated_length,
    new_values,
    sample_value,
)
from service.rotation.rules import RotationRule, RotationRules

# The strictest the start-up check lets through for 32 characters: 32 x log2(95) is 210.2 bits.
STRICT = """
[validation]
sensitive_fields = "pass|token|key"

[[validation.rules]]
paths = ["app/**"]
required = ["username", "password"]
allowed = ["username", "password", "host"]
min_entropy = 210
deny_common = true
[validation.rules.fields.password]
type = "string"
min_length = 32
max_length = 32

[[validation.rules]]
paths = ["tokens/*"]
min_entropy = 130
"""

DATA: dict[str, Any] = {"username": "app", "password": "the-previous-one", "host": "db"}
BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def strict_validator() -> Validator:
    return Validator.from_policy(Policy.from_toml(STRICT).raw)


def rule(
    generator: str = "password", length: int = 32, *, glob: str = "app/**", **more: Any
) -> RotationRule:
    return RotationRule(
        where="test", paths=(PathGlob(glob),), generator=generator, length=length, **more
    )


def password(length: int = 32) -> str:
    return new_values(rule(length=length), "any/path", {}, Validator())["password"]


# -- passwords -------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(length=st.integers(min_value=8, max_value=1024))
def test_a_password_has_the_length_every_class_and_only_the_alphabet(length: int) -> None:
    value = password(length)
    assert len(value) == length
    assert set(value) <= set(PASSWORD_ALPHABET)
    for group in (string.ascii_uppercase, string.ascii_lowercase, string.digits, SYMBOLS):
        assert set(value) & set(group)
    assert all(a != b for a, b in zip(value, value[1:], strict=False))
    # So the estimate is always the one the start-up check computed from the sample.
    assert estimate_entropy(value) == pytest.approx(length * math.log2(95))


def test_the_alphabet_holds_nothing_unsafe_in_urls_dsns_or_shells() -> None:
    assert len(PASSWORD_ALPHABET) == 26 + 26 + 10 + 11
    assert not set(PASSWORD_ALPHABET) & set("\"'`\\$@:/ ?&;|<>(){}[],")


def test_a_thousand_passwords_pass_a_strict_rule_and_are_all_different() -> None:
    validator = strict_validator()
    seen = set()
    for _ in range(1000):
        values = new_values(rule(), "app/db", DATA, validator)
        assert validator.violations("app/db", {**DATA, **values}) == []
        seen.add(values["password"])
    assert len(seen) == 1000


def test_the_strict_rule_is_one_the_start_up_check_accepts() -> None:
    raw = Policy.from_toml(STRICT + '[[rotation.rules]]\npaths = ["app/**"]\n').raw
    (parsed,) = RotationRules.from_policy(raw, Validator.from_policy(raw)).rules
    assert parsed.length == 32


def test_the_postgres_generator_gives_a_password() -> None:
    values = new_values(rule("postgres"), "app/db", DATA, strict_validator())
    assert list(values) == ["password"]
    assert len(values["password"]) == 32
    assert set(values["password"]) <= set(PASSWORD_ALPHABET)


# -- tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "chars"), [(16, 22), (32, 43), (33, 44), (1024, 1366)])
def test_a_token_is_its_bytes_in_base64url_without_padding(length: int, chars: int) -> None:
    (value,) = new_values(rule("token", length), "any/path", {}, Validator()).values()
    assert len(value) == chars == generated_length("token", length)
    assert BASE64URL.fullmatch(value)
    assert len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))) == length


def test_tokens_meet_a_min_entropy_set_just_under_the_start_up_bound() -> None:
    # The start-up check puts 16 bytes at 131 bits; a random token falls short of that in about
    # one draw in seven, and the generator draws again.
    assert estimate_entropy(sample_value("token", 16)) > 130
    validator = strict_validator()
    token_rule = rule("token", 16, glob="tokens/*")
    for _ in range(200):
        values = new_values(token_rule, "tokens/t", {}, validator)
        assert validator.violations("tokens/t", values) == []


# -- fields ----------------------------------------------------------------------------------


def test_only_the_rules_fields_are_returned_and_the_others_are_left_to_the_caller() -> None:
    values = new_values(rule(), "app/db", DATA, strict_validator())
    assert set(values) == {"password"}
    assert values["password"] != DATA["password"]


def test_each_listed_field_gets_its_own_value() -> None:
    two = rule("token", 32, fields=("api_key", "password"))
    values = new_values(two, "any/path", {"username": "app"}, Validator())
    assert set(values) == {"api_key", "password"}
    assert values["api_key"] != values["password"]


# -- refusals --------------------------------------------------------------------------------


class RefusingValidator(Validator):
    """Refuses the first `times` checks on the given field; records every data it was shown."""

    def __init__(self, times: int, field: str = "password") -> None:
        super().__init__()
        self.times = times
        self.field = field
        self.seen: list[dict[str, Any]] = []

    def violations(self, path: str, data: Mapping[str, Any]) -> list[Violation]:
        self.seen.append(dict(data))
        if len(self.seen) <= self.times:
            return [Violation(self.field, "common_password")]
        return []


def test_a_refused_value_is_drawn_again() -> None:
    validator = RefusingValidator(times=3)
    values = new_values(rule(), "app/db", DATA, validator)
    assert len(validator.seen) == 4
    assert validator.seen[-1] == {**DATA, **values}
    assert len({seen["password"] for seen in validator.seen}) == 4


def test_a_value_refused_every_time_raises_invalid_secret_naming_field_and_rule_only() -> None:
    validator = RefusingValidator(times=MAX_TRIES)
    with pytest.raises(InvalidSecret) as info:
        new_values(rule(), "app/db", DATA, validator)
    assert len(validator.seen) == MAX_TRIES
    assert info.value.violations == [Violation("password", "common_password")]
    assert info.value.path == "app/db"
    shown = f"{info.value} {info.value!r} {info.value.violations!r} {info.value.detail}"
    for seen in validator.seen:
        assert seen["password"] not in shown


def test_a_carried_over_field_at_fault_raises_at_once_since_drawing_again_cannot_help() -> None:
    validator = RefusingValidator(times=MAX_TRIES, field="username")
    with pytest.raises(InvalidSecret) as info:
        new_values(rule(), "app/db", DATA, validator)
    assert len(validator.seen) == 1
    assert info.value.violations == [Violation("username", "common_password")]


def test_carried_over_data_breaking_the_rules_is_reported_with_the_real_validator() -> None:
    with pytest.raises(InvalidSecret) as info:
        new_values(rule(), "app/db", {"password": "old"}, strict_validator())
    assert info.value.violations == [Violation("username", "required")]


def test_the_validators_failure_counters_do_not_move_during_generation() -> None:
    validator = strict_validator()
    before = dict(validator.failures)
    new_values(rule(), "app/db", DATA, validator)
    with pytest.raises(InvalidSecret):
        new_values(rule(), "app/db", {"password": "old", "extra": "x"}, validator)
    assert validator.failures == before


def test_violations_finds_what_validate_finds_without_counting_it() -> None:
    validator = strict_validator()
    data = {"password": "short", "extra": "x"}
    found = validator.violations("app/db", data)
    assert sum(validator.failures.values()) == 0
    assert validator.validate("app/db", data) == found != []
    assert sum(validator.failures.values()) == len(found)

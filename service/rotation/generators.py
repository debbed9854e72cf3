"""New values for a rotation (the password, token and postgres generators), held to the path's
validation rules: at start-up, whether they can pass (`infeasible`); at rotation, that they do."""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from schemas.errors import InvalidSecret, Violation
from schemas.globs import PathGlob
from service.core.validation import FieldSpec, Rule, Validator, estimate_entropy

if TYPE_CHECKING:
    from service.rotation.rules import RotationRule

__all__ = [
    "GENERATORS",
    "MAX_TRIES",
    "PASSWORD_ALPHABET",
    "SYMBOLS",
    "generated_length",
    "infeasible",
    "new_values",
    "sample_value",
]

GENERATORS: tuple[str, ...] = ("password", "token", "postgres")
SYMBOLS = "-_.~!#%^*+="
"""No quote, backslash, `$`, `@`, `:`, `/` or space: safe in URLs, DSNs and shell words."""
PASSWORD_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + SYMBOLS
MAX_TRIES = 16
"""Draws before giving up: a token misses a min_entropy at its start-up bound in 1 draw of 6."""

_encode = msgspec.json.Encoder().encode
_CLASSES = (string.ascii_uppercase, string.ascii_lowercase, string.digits, SYMBOLS)
# Letters and digits interleaved, so that even a short sample holds the three classes.
_TOKEN_CHARS = "".join(
    lower + upper + digit
    for lower, upper, digit in zip(
        string.ascii_lowercase, string.ascii_uppercase, string.digits * 3, strict=False
    )
)


def new_values(
    rule: RotationRule, path: str, data: Mapping[str, Any], validator: Validator
) -> dict[str, str]:
    """New values for rule.fields (the postgres generator: a password, like `password`), checked
    so that `{**data, **values}` passes the path's validation rules; else InvalidSecret naming
    field and rule (never a value)."""
    violations: list[Violation] = []
    for _ in range(MAX_TRIES):
        values = {field: _generate(rule.generator, rule.length) for field in rule.fields}
        violations = validator.violations(path, {**data, **values})
        if not violations:
            return values
        # Another draw can only help when the generated fields are at fault (a value in the deny
        # list, a token short of entropy); not with a field carried over or the total size.
        if any(violation.field not in values for violation in violations):
            break
    raise InvalidSecret(violations, path=path)


def infeasible(rotation: RotationRule, validator: Validator) -> tuple[str, str] | None:
    """(rotation key, problem) when the validation rule of one of the rule's globs would refuse
    the values it generates; None when they can pass. Each glob is tried on a sample path."""
    sample = sample_value(rotation.generator, rotation.length)
    size = len(_encode(dict.fromkeys(rotation.fields, sample)))
    for glob in rotation.paths:
        path = _sample_path(glob)
        rule = validator.rule_for(path)
        named = f"{_name(validator, rule)} (which applies to {path!r})"
        for field in rotation.fields:
            found = _field_problem(validator, rule, field, sample)
            if found is not None:
                return found[0], f"{found[1]} of {named}"
        if size > rule.max_total_size:
            problem = f"the generated fields alone take {size} bytes, above the max_total_size"
            return "length", f"{problem} of {named}"
    return None


def generated_length(generator: str, length: int) -> int:
    """Characters of each value: `length` for a password, base64url of `length` bytes unpadded
    for a token."""
    return length if generator != "token" else (4 * length + 2) // 3


def sample_value(generator: str, length: int) -> str:
    """A value shaped like the generated ones, for the start-up checks: its `estimate_entropy`
    is what every password reaches, and what a token reaches in most draws."""
    # A password holds all four classes and never one character twice in a row; a token is
    # held to letters and digits, since a random one lacks `-` and `_` about half the time.
    chars = "aA0-" if generator != "token" else _TOKEN_CHARS
    count = generated_length(generator, length)
    return (chars * (count // len(chars) + 1))[:count]


def _generate(generator: str, length: int) -> str:
    if generator == "token":
        return secrets.token_urlsafe(length)  # base64url of `length` random bytes, unpadded
    return _password(length)


def _password(length: int) -> str:
    """`length` characters with each class present and no character twice in a row."""
    # Without repeats the entropy estimate is exactly length x log2(95), so a rule the start-up
    # check accepted is always met; it costs under 0.02 bits a character.
    while True:
        chars = [secrets.choice(PASSWORD_ALPHABET)]
        while len(chars) < length:
            char = secrets.choice(PASSWORD_ALPHABET)
            if char != chars[-1]:
                chars.append(char)
        if all(any(char in group for char in chars) for group in _CLASSES):
            return "".join(chars)


# -- what [validation] would say of generated values, for the start-up check -----------------


def _field_problem(
    validator: Validator, rule: Rule, field: str, sample: str
) -> tuple[str, str] | None:
    """(key, problem) if `rule` refuses `field` holding values like `sample`, else None."""
    spec = rule.fields.get(field, FieldSpec())
    if rule.allowed is not None and field not in rule.allowed:
        return "fields", f"field {field!r} is not in the allowed keys"
    if spec.type not in (None, "string"):
        return "fields", f"field {field!r} is generated as a string, not the {spec.type} type"
    length = len(sample)
    if length < _pick(spec.min_length, rule.min_length):
        return "length", f"{length}-character values are below the {field!r} min_length"
    if length > _pick(spec.max_length, rule.max_length):
        return "length", f"{length}-character values are above the {field!r} max_length"
    bits = estimate_entropy(sample)
    if bits < _min_entropy(validator, rule, spec, field):
        return "length", f"values reach about {bits:.0f} bits, below the {field!r} min_entropy"
    return None


def _sample_path(glob: PathGlob) -> str:
    """A path the glob matches: each ``*`` or ``**`` becomes ``x`` (``db-*`` -> ``db-x``)."""
    return "/".join("x" if s == "**" else s.replace("*", "x") for s in glob.segments)


def _name(validator: Validator, rule: Rule) -> str:
    for index, candidate in enumerate(validator.rules):
        if candidate is rule:
            return f"validation.rules[{index}]"
    return "validation.defaults"


def _pick(own: int | None, inherited: int) -> int:
    return inherited if own is None else own


def _min_entropy(validator: Validator, rule: Rule, spec: FieldSpec, field: str) -> float:
    """As validation's `_check_string`: the field's own, else the rule's for sensitive names."""
    if spec.min_entropy is not None:
        return spec.min_entropy
    return rule.min_entropy if validator.sensitive.search(field) is not None else 0.0

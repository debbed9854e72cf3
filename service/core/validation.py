"""Validation of secret structure before anything reaches Vault: the rules, their policy section.

Every violation is reported as (field, rule), never with the value.

Rules live in the policy file (SECRETS_POLICY_FILE), in a ``[validation]`` section::

    [validation]
    # Fields whose names match this regular expression (searched, case-insensitive) hold
    # credentials: the entropy and common-password checks apply to them.
    sensitive_fields = "pass|pwd|secret|token|key|credential|private"

    # What applies where no rule matches, and what a rule inherits for keys it leaves out.
    # These are the built-in values.
    [validation.defaults]
    not_empty = true            # no null, "", whitespace-only string, {} or [] value
    max_total_size = 65536      # bytes of the data encoded as JSON
    min_length = 0              # characters of each string value
    max_length = 65536
    min_entropy = 0             # estimated bits, string values of sensitive fields (0: off)
    deny_common = true          # refuse a sensitive field holding a common password

    # The first rule whose paths match a secret's path applies (file order).
    [[validation.rules]]
    paths = ["app/**"]                              # globs, as in [roles]
    required = ["username", "password"]             # keys that must be present
    allowed = ["username", "password", "host", "port"]  # no other key; omit to allow any
    min_entropy = 60
    max_total_size = 8192
    [validation.rules.fields.password]              # per-field settings of this rule
    type = "string"             # string | integer | number | boolean | object | array
    min_length = 16
    max_length = 128
    [validation.rules.fields.port]
    type = "integer"

A rule may set `not_empty`, `max_total_size`, `min_length`, `max_length`, `min_entropy` and
`deny_common` (each overriding the defaults), `required`, `allowed` and `fields`. A field table
may set `type`, `min_length`, `max_length`, `min_entropy` and `deny_common`; a field with its
own `min_entropy` or `deny_common` is checked whatever its name. Rules look at the top-level
keys of the data; nested objects and arrays are only checked for emptiness at the top and for
depth (at most 32 levels). Lengths apply to strings only and count characters. Data that is
not plain JSON, and integers beyond 2**53 - 1 in size (Vault keeps numbers as 64-bit floats
and would round them silently), are refused as a 400 `invalid_request`, not a violation.

The rule names a 422 reports: ``required``, ``allowed``, ``type``, ``min_length``,
``max_length``, ``min_entropy``, ``common_password``, ``not_empty``, ``max_total_size``,
``key_format`` (a key that is not ``[A-Za-z0-9_.-]{1,128}``, reported as field ``<key>``) and
``max_depth``. Empty data is ``{"field": "", "rule": "not_empty"}``; the size rule reports
field ``""``.

The entropy estimate is deliberately simple: length x log2(size of the character classes
used), where the classes are lowercase (26), uppercase (26), digits (10), ASCII punctuation
and space (33) and anything else (100), and where a run of one repeated character counts once.
That is the entropy of a *random* string drawn from those classes: it is right for generated
secrets and an overestimate for human-chosen ones (``Password1!`` scores 66 bits), which is why
the common-password list is checked as well. It is a floor against obviously weak values, not a
strength meter like zxcvbn.

The common-password list is the 5,000 most frequent passwords of zxcvbn's list (MIT licensed,
see service/data/common-passwords.txt); it is compared case-insensitively with the whole value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import msgspec

from schemas.errors import ConfigError, InvalidRequest, Violation
from schemas.globs import PathGlob, policy_globs
from service.auth.policy import POLICY_SETTING

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SENSITIVE_FIELDS",
    "MAX_DEPTH",
    "FIELD_NAME",
    "MAX_SAFE_INTEGER",
    "RULES",
    "TYPES",
    "FieldSpec",
    "Rule",
    "Validator",
    "common_passwords",
    "estimate_entropy",
    "only_keys",
    "validate_data",
]

DEFAULT_MAX_BYTES = 65536
MAX_DEPTH = 32
MAX_SAFE_INTEGER = 2**53 - 1
"""Larger integers are refused (I-JSON, RFC 7493): Vault would store them rounded."""
DEFAULT_SENSITIVE_FIELDS = "pass|pwd|secret|token|key|credential|private"

RULES: tuple[str, ...] = (
    "required", "allowed", "type", "min_length", "max_length", "min_entropy",
    "common_password", "not_empty", "max_total_size", "key_format", "max_depth",
)  # fmt: skip
"""Every rule name a violation can carry: a closed set, also used as a metric label."""

TYPES: Mapping[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

FIELD_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""What a key of secret data (and a field named in the policy) must match."""
_encode = msgspec.json.Encoder().encode
_SCALARS = (str, int, float, bool, type(None))
_DATA_FILE = "common-passwords.txt"
_PUNCTUATION = frozenset(" !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FieldSpec:
    """Settings for one named field; `None` means: as the rule says."""

    type: str | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_entropy: float | None = None
    deny_common: bool | None = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """The checks for the paths one `[[validation.rules]]` entry (or the defaults) covers."""

    paths: tuple[PathGlob, ...] = ()
    required: tuple[str, ...] = ()
    allowed: frozenset[str] | None = None
    fields: Mapping[str, FieldSpec] = dataclasses.field(default_factory=dict)
    not_empty: bool = True
    max_total_size: int = DEFAULT_MAX_BYTES
    min_length: int = 0
    max_length: int = DEFAULT_MAX_BYTES
    min_entropy: float = 0.0
    deny_common: bool = True


_NO_FIELD = FieldSpec()


class Validator:
    """Checks secret data against the first rule matching its path, else the defaults.

    `failures` counts violations by rule name (plain ints, read by the metrics collector).
    """

    def __init__(
        self,
        rules: Sequence[Rule] = (),
        *,
        defaults: Rule | None = None,
        sensitive_fields: str = DEFAULT_SENSITIVE_FIELDS,
    ) -> None:
        self.rules = tuple(rules)
        self.defaults = defaults or Rule()
        self.sensitive = re.compile(sensitive_fields, re.IGNORECASE)
        self.failures: dict[str, int] = dict.fromkeys(RULES, 0)

    @classmethod
    def from_policy(cls, raw: Mapping[str, Any], *, source: str = POLICY_SETTING) -> Validator:
        """Build from the parsed policy TOML (`Policy.raw`); a wrong key raises ConfigError."""
        section = raw.get("validation", {})
        if not isinstance(section, dict):
            raise ConfigError(source, "[validation] must be a table")
        only_keys(source, "validation", section, {"sensitive_fields", "defaults", "rules"})
        sensitive = section.get("sensitive_fields", DEFAULT_SENSITIVE_FIELDS)
        if not isinstance(sensitive, str) or not sensitive:
            raise ConfigError(source, "validation.sensitive_fields: must be a non-empty string")
        try:
            re.compile(sensitive)
        except re.error as exc:
            raise ConfigError(
                source, f"validation.sensitive_fields: not a regular expression: {exc}"
            ) from None
        defaults_table = section.get("defaults", {})
        if not isinstance(defaults_table, dict):
            raise ConfigError(source, "validation.defaults: must be a table")
        only_keys(source, "validation.defaults", defaults_table, _LIMIT_KEYS)
        defaults = _rule(source, "validation.defaults", defaults_table, Rule())
        rules_list = section.get("rules", [])
        if not isinstance(rules_list, list):
            raise ConfigError(source, "validation.rules: must be an array of tables")
        rules = []
        for index, table in enumerate(rules_list):
            where = f"validation.rules[{index}]"
            if not isinstance(table, dict):
                raise ConfigError(source, f"{where}: must be a table, like [[validation.rules]]")
            only_keys(
                source, where, table, _LIMIT_KEYS | {"paths", "required", "allowed", "fields"}
            )
            rules.append(_rule(source, where, table, defaults))
        return cls(rules, defaults=defaults, sensitive_fields=sensitive)

    def rule_for(self, path: str) -> Rule:
        for rule in self.rules:
            if any(glob.regex.fullmatch(path) for glob in rule.paths):
                return rule
        return self.defaults

    def violations(self, path: str, data: Mapping[str, Any]) -> list[Violation]:
        """What `validate` finds, without counting it in `failures`: for checks that are no
        caller's write, such as a rotation trying out generated values."""
        return _check(self.rule_for(path), data, self.sensitive)

    def validate(self, path: str, data: Mapping[str, Any]) -> list[Violation]:
        """Every rule `data` breaks at `path`; empty when it is fine.

        Raises InvalidRequest if `data` is not plain JSON (a set, bytes, NaN...) or holds an
        integer beyond 2**53 - 1 in size.
        """
        violations = self.violations(path, data)
        for violation in violations:
            self.failures[violation.rule] += 1
        return violations


def validate_data(data: Mapping[str, Any]) -> list[Violation]:
    """The built-in default rules, whatever the path (a `Validator()` without a policy)."""
    return _check(Rule(), data, re.compile(DEFAULT_SENSITIVE_FIELDS, re.IGNORECASE))


def estimate_entropy(value: str) -> float:
    """Bits: length (runs of one character counted once) x log2(size of the classes used)."""
    if not value:
        return 0.0
    lower = upper = digit = punct = other = False
    for char in value:
        if "a" <= char <= "z":
            lower = True
        elif "A" <= char <= "Z":
            upper = True
        elif "0" <= char <= "9":
            digit = True
        elif char in _PUNCTUATION:
            punct = True
        else:
            other = True
    pool = 26 * lower + 26 * upper + 10 * digit + 33 * punct + 100 * other
    length = 1 + sum(1 for a, b in zip(value, value[1:], strict=False) if a != b)
    return length * math.log2(pool)


@functools.cache
def common_passwords() -> frozenset[str]:
    """The shipped deny-list, read once on first use."""
    text = resources.files("service").joinpath("data", _DATA_FILE).read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


# -- checking --------------------------------------------------------------------------------


def _check(rule: Rule, data: Mapping[str, Any], sensitive: re.Pattern[str]) -> list[Violation]:
    if not isinstance(data, Mapping):
        raise InvalidRequest("data must be an object")
    violations: list[Violation] = []
    if not data:
        violations.append(Violation("", "not_empty"))
    for key, value in data.items():
        if not isinstance(key, str):
            raise InvalidRequest("data must be an object with string keys")
        if FIELD_NAME.fullmatch(key) is None:
            violations.append(Violation("<key>", "key_format"))
            field = "<key>"
        else:
            field = key
            if rule.allowed is not None and key not in rule.allowed:
                violations.append(Violation(field, "allowed"))
        if not _plain_json(value, 1):
            violations.append(Violation(field, "max_depth"))
        if rule.not_empty and _empty(value):
            violations.append(Violation(field, "not_empty"))
            continue
        spec = rule.fields.get(key, _NO_FIELD)
        if spec.type is not None and not _has_type(value, spec.type):
            violations.append(Violation(field, "type"))
            continue
        if isinstance(value, str):
            violations.extend(_check_string(rule, spec, field, key, value, sensitive))
    for key in rule.required:
        if key not in data:
            violations.append(Violation(key, "required"))
    if len(_encode(dict(data))) > rule.max_total_size:
        violations.append(Violation("", "max_total_size"))
    return violations


def _check_string(
    rule: Rule, spec: FieldSpec, field: str, key: str, value: str, sensitive: re.Pattern[str]
) -> Iterable[Violation]:
    min_length = rule.min_length if spec.min_length is None else spec.min_length
    max_length = rule.max_length if spec.max_length is None else spec.max_length
    if len(value) < min_length:
        yield Violation(field, "min_length")
    if len(value) > max_length:
        yield Violation(field, "max_length")
    is_sensitive = sensitive.search(key) is not None
    min_entropy = spec.min_entropy
    if min_entropy is None:
        min_entropy = rule.min_entropy if is_sensitive else 0.0
    if min_entropy > 0 and estimate_entropy(value) < min_entropy:
        yield Violation(field, "min_entropy")
    deny = spec.deny_common
    if deny is None:
        deny = rule.deny_common and is_sensitive
    if deny and len(value) <= 64 and value.strip().lower() in common_passwords():
        yield Violation(field, "common_password")


def _empty(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip() == ""
    return value is None or value == {} or value == []


def _has_type(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return name == "boolean"
    return isinstance(value, TYPES[name])


def _plain_json(value: Any, depth: int) -> bool:
    """False if nested deeper than MAX_DEPTH; raises InvalidRequest on a non-JSON type."""
    if isinstance(value, _SCALARS):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("data must be plain JSON (no NaN or infinity)")
        if type(value) is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            # Vault keeps JSON numbers as 64-bit floats: it would round this one silently.
            raise InvalidRequest("integers must be between -(2**53 - 1) and 2**53 - 1")
        return True
    if depth >= MAX_DEPTH:
        return False
    if isinstance(value, list):
        return all(_plain_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise InvalidRequest("data must be an object with string keys")
        return all(_plain_json(v, depth + 1) for v in value.values())
    raise InvalidRequest("data must be plain JSON: objects, arrays, strings, numbers, booleans")


# -- the policy section ------------------------------------------------------------------------

_LIMIT_KEYS = frozenset(
    {"not_empty", "max_total_size", "min_length", "max_length", "min_entropy", "deny_common"}
)
_FIELD_KEYS = frozenset(f.name for f in dataclasses.fields(FieldSpec))


def rule_tables(
    source: str, raw: Mapping[str, Any], section: str
) -> list[tuple[str, dict[str, Any]]]:
    """The `[[<section>.rules]]` tables of a parsed policy, each with where it stands
    (`rotation.rules[0]`, ...); a ConfigError for a section or rule of the wrong shape."""
    tables = raw.get(section, {})
    if not isinstance(tables, dict):
        raise ConfigError(source, f"[{section}] must be a table")
    only_keys(source, section, tables, {"rules"})
    rules = tables.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(source, f"{section}.rules: must be an array of tables")
    found = []
    for index, table in enumerate(rules):
        where = f"{section}.rules[{index}]"
        if not isinstance(table, dict):
            raise ConfigError(source, f"{where}: must be a table, like [[{section}.rules]]")
        found.append((where, table))
    return found


def only_keys(source: str, where: str, table: Mapping[str, Any], keys: Iterable[str]) -> None:
    """ConfigError naming the first key of the policy table `table` not among `keys`."""
    allowed = sorted(keys)
    for key in table:
        if key not in allowed:
            raise ConfigError(
                source, f"{where}.{key}: unknown key; expected one of {', '.join(allowed)}"
            )


def _rule(source: str, where: str, table: Mapping[str, Any], base: Rule) -> Rule:
    limits: dict[str, Any] = {
        "not_empty": _bool(source, where, table, "not_empty", base.not_empty),
        "max_total_size": _count(source, where, table, "max_total_size", base.max_total_size),
        "min_length": _count(source, where, table, "min_length", base.min_length),
        "max_length": _count(source, where, table, "max_length", base.max_length),
        "min_entropy": _bits(source, where, table, "min_entropy", base.min_entropy),
        "deny_common": _bool(source, where, table, "deny_common", base.deny_common),
    }
    if limits["min_length"] > limits["max_length"]:
        raise ConfigError(source, f"{where}.min_length: greater than max_length")
    paths: list[PathGlob] = []
    if "paths" in table or where != "validation.defaults":
        paths = policy_globs(source, f"{where}.paths", table.get("paths"), required=True)
    required = _keys(source, where, table, "required")
    allowed = _keys(source, where, table, "allowed") if "allowed" in table else None
    if allowed is not None and not set(required) <= set(allowed):
        raise ConfigError(source, f"{where}.required: every required key must also be allowed")
    fields_table = table.get("fields", {})
    if not isinstance(fields_table, dict):
        raise ConfigError(source, f"{where}.fields: must be a table of field tables")
    fields: dict[str, FieldSpec] = {}
    for name, spec in fields_table.items():
        fields[name] = _field(source, f"{where}.fields.{name}", name, spec)
    return Rule(
        paths=tuple(paths),
        required=tuple(required),
        allowed=frozenset(allowed) if allowed is not None else None,
        fields=fields,
        **limits,
    )


def _field(source: str, where: str, name: str, spec: Any) -> FieldSpec:
    if FIELD_NAME.fullmatch(name) is None:
        raise ConfigError(source, f"{where}: a field name must match [A-Za-z0-9_.-]{{1,128}}")
    if not isinstance(spec, dict):
        raise ConfigError(source, f"{where}: must be a table")
    only_keys(source, where, spec, _FIELD_KEYS)
    kind = spec.get("type")
    if kind is not None and kind not in TYPES:
        raise ConfigError(source, f"{where}.type: must be one of {', '.join(TYPES)}")
    out = FieldSpec(
        type=kind,
        min_length=_count(source, where, spec, "min_length", None),
        max_length=_count(source, where, spec, "max_length", None),
        min_entropy=_bits(source, where, spec, "min_entropy", None),
        deny_common=_bool(source, where, spec, "deny_common", None),
    )
    if out.min_length is not None and out.max_length is not None:
        if out.min_length > out.max_length:
            raise ConfigError(source, f"{where}.min_length: greater than max_length")
    return out


def _keys(source: str, where: str, table: Mapping[str, Any], key: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, f"{where}.{key}: must be a list of field names")
    for name in value:
        if FIELD_NAME.fullmatch(name) is None:
            raise ConfigError(
                source, f"{where}.{key}: field names must match [A-Za-z0-9_.-]{{1,128}}"
            )
    return value


def _bool(source: str, where: str, table: Mapping[str, Any], key: str, default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and not isinstance(value, bool):
        raise ConfigError(source, f"{where}.{key}: must be true or false")
    return value


def _count(source: str, where: str, table: Mapping[str, Any], key: str, default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(source, f"{where}.{key}: must be an integer")
    if value is not default and value < 0:
        raise ConfigError(source, f"{where}.{key}: must be 0 or more")
    return value


def _bits(source: str, where: str, table: Mapping[str, Any], key: str, default: Any) -> Any:
    value = table.get(key, default)
    if value is default:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(source, f"{where}.{key}: must be a number of bits")
    if not 0 <= value <= 1024:
        raise ConfigError(source, f"{where}.{key}: must be between 0 and 1024")
    return float(value)

"""The `[[approvals.rules]]` policy section: which paths need approved change requests, how many
distinct approvers, and how long a request lives. Checked at start-up like every section.

    [[approvals.rules]]
    paths = ["prod/**"]            # globs as in [roles]; the first matching rule applies
    required = 2                   # distinct approvers, never the requester (1 to 10)
    expires = "72h"                # a request not applied by then turns expired (default 72h)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from schemas.errors import ConfigError
from schemas.globs import PathGlob, policy_globs
from schemas.paths import is_reserved
from service.auth.policy import POLICY_SETTING
from service.core.validation import only_keys, rule_tables
from service.durations import parse_duration

__all__ = ["DEFAULT_EXPIRES", "MAX_REQUIRED", "ApprovalRule", "ApprovalRules"]

DEFAULT_EXPIRES = 72 * 3600.0
MAX_REQUIRED = 10
_KEYS = frozenset({"paths", "required", "expires"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ApprovalRule:
    where: str  # "approvals.rules[0]"
    paths: tuple[PathGlob, ...]
    required: int = 1
    expires: float = DEFAULT_EXPIRES  # seconds

    def matches(self, path: str) -> bool:
        return not is_reserved(path) and any(glob.matches(path) for glob in self.paths)


class ApprovalRules:
    """The approval rules in file order; the first whose paths match a path applies."""

    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[ApprovalRule] = ()) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_policy(cls, raw: Mapping[str, Any], *, source: str = POLICY_SETTING) -> ApprovalRules:
        return cls([_rule(source, where, t) for where, t in rule_tables(source, raw, "approvals")])

    def rule_for(self, path: str) -> ApprovalRule | None:
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)


def _rule(source: str, where: str, table: Mapping[str, Any]) -> ApprovalRule:
    only_keys(source, where, table, _KEYS)
    globs = policy_globs(source, f"{where}.paths", table.get("paths"), required=True)
    required = table.get("required", 1)
    if isinstance(required, bool) or not isinstance(required, int):
        raise ConfigError(source, f"{where}.required: must be an integer")
    if not 1 <= required <= MAX_REQUIRED:
        raise ConfigError(source, f"{where}.required: must be 1 to {MAX_REQUIRED} approvers")
    expires = DEFAULT_EXPIRES
    if "expires" in table:
        try:
            expires = parse_duration(table["expires"])
        except ValueError as exc:
            raise ConfigError(source, f"{where}.expires: {exc}") from None
        if expires < 1:
            raise ConfigError(source, f"{where}.expires: must be at least 1s")
    return ApprovalRule(where=where, paths=tuple(globs), required=required, expires=expires)

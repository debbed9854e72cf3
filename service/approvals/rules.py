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
from schemas.globs import PathGlob
from schemas.paths import is_reserved
from service.auth.policy import POLICY_SETTING
from service.core.validation import only_keys
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
        section = raw.get("approvals", {})
        if not isinstance(section, dict):
            raise ConfigError(source, "[approvals] must be a table")
        only_keys(source, "approvals", section, {"rules"})
        tables = section.get("rules", [])
        if not isinstance(tables, list):
            raise ConfigError(source, "approvals.rules: must be an array of tables")
        rules = []
        for index, table in enumerate(tables):
            where = f"approvals.rules[{index}]"
            if not isinstance(table, dict):
                raise ConfigError(source, f"{where}: must be a table, like [[approvals.rules]]")
            rules.append(_rule(source, where, table))
        return cls(rules)

    def rule_for(self, path: str) -> ApprovalRule | None:
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)


def _rule(source: str, where: str, table: Mapping[str, Any]) -> ApprovalRule:
    only_keys(source, where, table, _KEYS)
    patterns = table.get("paths")
    if not isinstance(patterns, list) or not patterns:
        raise ConfigError(source, f"{where}.paths: required, a non-empty list of path globs")
    globs: list[PathGlob] = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(source, f"{where}.paths[{index}]: must be a string")
        try:
            globs.append(PathGlob(pattern))
        except ValueError as exc:
            raise ConfigError(source, f"{where}.paths[{index}]: {exc}") from None
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

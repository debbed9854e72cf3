"""Rotation rules: the ``[[rotation.rules]]`` policy section, checked at start-up (against
[validation] too, so that a generated value always passes it), and when each rule is next due.

    [[rotation.rules]]
    paths = ["app/api/*"]          # globs as in [roles]; the first matching rule applies
    every = "720h"                 # or cron = "0 3 * * 1" (UTC, 5 fields); neither: on request only
    generator = "password"         # password (the default) | token | postgres
    fields = ["password"]          # regenerated; every other field is carried over as is
    length = 32                    # password characters / token bytes
    grace = "24h"                  # postgres with master: the previous login stays valid this long
    master = "db/admin"            # postgres only: an admin secret's path -> alternating users

Durations are "90s", "15m", "720h", "7d", "1h30m", "2.5s" or a bare number of seconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from cronsim import CronSim, CronSimError

from schemas.errors import ConfigError
from schemas.globs import PathGlob, policy_globs
from schemas.paths import is_reserved, is_valid_path
from service.auth.policy import POLICY_SETTING
from service.core.validation import FIELD_NAME, Validator, only_keys, rule_tables
from service.durations import parse_duration
from service.rotation.generators import GENERATORS, infeasible

__all__ = ["LENGTHS", "RotationRule", "RotationRules"]

LENGTHS: Mapping[str, tuple[int, int]] = {
    "password": (8, 1024),
    "token": (16, 1024),
    "postgres": (8, 1024),
}
"""The `length` range of each generator: password characters, token bytes."""

_KEYS = frozenset({"paths", "every", "cron", "generator", "fields", "length", "grace", "master"})
_EPOCH = datetime(2001, 1, 1, tzinfo=UTC)  # a Monday: where cron expressions are tried out
_GAP_FIRES = 4000  # fires, over at most four years, looked at for the shortest gap


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RotationRule:
    """One ``[[rotation.rules]]`` entry: which paths rotate, when, and how."""

    where: str  # "rotation.rules[0]": named in errors and logs
    paths: tuple[PathGlob, ...]
    every: float | None = None  # seconds (>= 1)
    cron: str | None = None  # the expression as written (validated at parse)
    generator: str = "password"  # "password" | "token" | "postgres"
    fields: tuple[str, ...] = ()  # () here: the generator's own, ("token",) or ("password",)
    length: int = 32
    grace: float = 0.0  # seconds
    master: str | None = None  # postgres only

    def __post_init__(self) -> None:
        if not self.fields:
            default = ("token",) if self.generator == "token" else ("password",)
            object.__setattr__(self, "fields", default)

    @property
    def scheduled(self) -> bool:
        return self.every is not None or self.cron is not None

    def matches(self, path: str) -> bool:
        # The service's own folder holds rotation state: never a path to rotate.
        return not is_reserved(path) and any(glob.matches(path) for glob in self.paths)

    def next_after(self, baseline: datetime) -> datetime | None:
        """every: baseline + every; cron: the first fire strictly after baseline (UTC);
        None when on request only. `baseline` is timezone-aware (UTC)."""
        if baseline.tzinfo is None:
            raise ValueError("baseline must be a timezone-aware datetime")
        start = baseline.astimezone(UTC)
        if self.every is not None:
            return start + timedelta(seconds=self.every)
        if self.cron is not None:
            # cronsim drops the microseconds and steps one second before it searches, so its
            # first fire is strictly after `baseline`. (It gives up after 50 years without a
            # fire; the parse refused expressions that never fire.)
            return next(CronSim(self.cron, start), None)
        return None


class RotationRules:
    """The rotation rules in file order; the first whose paths match a path applies."""

    __slots__ = ("rules",)

    def __init__(self, rules: Sequence[RotationRule] = ()) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_policy(
        cls, raw: Mapping[str, Any], validator: Validator, *, source: str = POLICY_SETTING
    ) -> RotationRules:
        """Build from the parsed policy TOML (`Policy.raw`); a wrong rule, or one whose values
        the [validation] rules would refuse, raises ConfigError naming the rule and key."""
        rules = []
        for where, table in rule_tables(source, raw, "rotation"):
            rule = _rule(source, where, table)
            refused = infeasible(rule, validator)
            if refused is not None:
                key, problem = refused
                raise ConfigError(source, f"{where}.{key}: {problem}")
            rules.append(rule)
        return cls(rules)

    def rule_for(self, path: str) -> RotationRule | None:
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)


# -- the policy section ------------------------------------------------------------------------


def _rule(source: str, where: str, table: Mapping[str, Any]) -> RotationRule:
    only_keys(source, where, table, _KEYS)
    paths = _paths(source, where, table)
    if "every" in table and "cron" in table:
        raise ConfigError(source, f"{where}.cron: set every or cron, not both")
    every = _duration(source, where, table, "every")
    if every is not None and every < 1:
        raise ConfigError(source, f"{where}.every: must be at least 1s")
    cron = _cron(source, where, table)
    generator = table.get("generator", "password")
    if generator not in GENERATORS:
        raise ConfigError(source, f"{where}.generator: must be one of {', '.join(GENERATORS)}")
    fields = _fields(source, where, table, generator)
    length = table.get("length", 32)
    if isinstance(length, bool) or not isinstance(length, int):
        raise ConfigError(source, f"{where}.length: must be an integer")
    low, high = LENGTHS[generator]
    if not low <= length <= high:
        unit = "bytes" if generator == "token" else "characters"
        raise ConfigError(
            source, f"{where}.length: must be {low} to {high} {unit} for the {generator} generator"
        )
    grace = _duration(source, where, table, "grace") or 0.0
    master = table.get("master")
    if master is not None:
        if generator != "postgres":
            raise ConfigError(source, f"{where}.master: only a postgres rule has a master")
        if not isinstance(master, str) or not is_valid_path(master) or is_reserved(master):
            raise ConfigError(source, f'{where}.master: must be a secret path, like "db/admin"')
    if generator == "postgres" and grace > 0 and master is None:
        raise ConfigError(
            source,
            f"{where}.grace: needs master: a single-user rotation cannot keep the previous login",
        )
    if master is not None and grace > 0:
        # The previous login is retired `grace` after a rotation; the next one reuses its role.
        gap = every if every is not None else _shortest_gap(cron, grace) if cron else math.inf
        if gap <= grace:
            between = "every" if every is not None else "the shortest gap between cron fires"
            raise ConfigError(
                source,
                f"{where}.grace: must be shorter than {between} ({gap:g}s): the previous login "
                "must be retired before the next rotation reuses its role",
            )
    return RotationRule(
        where=where,
        paths=paths,
        every=every,
        cron=cron,
        generator=generator,
        fields=fields,
        length=length,
        grace=grace,
        master=master,
    )


def _paths(source: str, where: str, table: Mapping[str, Any]) -> tuple[PathGlob, ...]:
    return tuple(policy_globs(source, f"{where}.paths", table.get("paths"), required=True))


def _duration(source: str, where: str, table: Mapping[str, Any], key: str) -> float | None:
    if key not in table:
        return None
    try:
        return parse_duration(table[key])
    except ValueError as exc:
        raise ConfigError(source, f"{where}.{key}: {exc}") from None


def _cron(source: str, where: str, table: Mapping[str, Any]) -> str | None:
    expression = table.get("cron")
    if expression is None:
        return None
    if not isinstance(expression, str) or len(expression.split()) != 5:
        raise ConfigError(
            source,
            f"{where}.cron: must be 5 fields, minute hour day-of-month month day-of-week (UTC), "
            'like "0 3 * * 1"',
        )
    try:
        fires = CronSim(expression, _EPOCH)
    except CronSimError as exc:
        raise ConfigError(source, f"{where}.cron: not a cron expression: {exc}") from None
    if next(fires, None) is None:
        raise ConfigError(source, f"{where}.cron: never fires")
    return expression


def _shortest_gap(expression: str, floor: float) -> float:
    """The shortest time between two fires, over four years from `_EPOCH` and at most
    `_GAP_FIRES` fires; it stops early at a gap of `floor` or less."""
    fires = CronSim(expression, _EPOCH)
    end = _EPOCH + timedelta(days=4 * 366)
    previous = next(fires, None)
    shortest = math.inf
    if previous is None:
        return shortest
    for fire in itertools.islice(fires, _GAP_FIRES):
        if fire > end:
            break
        shortest = min(shortest, (fire - previous).total_seconds())
        if shortest <= floor:
            break
        previous = fire
    return shortest


def _fields(source: str, where: str, table: Mapping[str, Any], generator: str) -> tuple[str, ...]:
    names = table.get("fields", ["token"] if generator == "token" else ["password"])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(source, f"{where}.fields: must be a non-empty list of field names")
    for name in names:
        if FIELD_NAME.fullmatch(name) is None:
            raise ConfigError(
                source, f"{where}.fields: field names must match [A-Za-z0-9_.-]{{1,128}}"
            )
    if len(set(names)) != len(names):
        raise ConfigError(source, f"{where}.fields: each field may be listed once")
    if generator == "postgres" and names != ["password"]:
        raise ConfigError(source, f'{where}.fields: the postgres generator rotates ["password"]')
    return tuple(names)

"""Authorization policy: which roles hold which permission on which paths, from a TOML file.

Deny by default: a permission is granted only by a role that lists a glob matching the path, and,
where the token carries scopes, only if the permission is among them too (scopes narrow, never
widen). ``write`` does not imply ``read``. No role is granted anything below the service's own
folder, `.secrets-service/`, where it keeps its rotation state.

    [auth]
    roles_claim = "roles"        # claim holding role names

    [roles.app-reader]
    read = ["app/**"]
    [roles.app-writer]
    read = ["app/**"]
    write = ["app/**"]

Other top-level sections are kept in `Policy.raw` for the features that own them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.errors import ConfigError
from schemas.globs import PathGlob
from schemas.paths import is_reserved, is_valid_path

__all__ = [
    "APPROVE",
    "BYPASS",
    "DESTROY",
    "METRICS",
    "PERMISSIONS",
    "READ",
    "ROTATE",
    "WRITE",
    "Policy",
]

READ = "secrets:read"
WRITE = "secrets:write"
DESTROY = "secrets:destroy"
ROTATE = "secrets:rotate"
APPROVE = "secrets:approve"
BYPASS = "secrets:bypass"
METRICS = "secrets:metrics"
"""With SECRETS_METRICS_ROLE, a token carrying scopes must list this one to read /metrics."""
PERMISSIONS: Mapping[str, str] = {
    "read": READ,
    "write": WRITE,
    "destroy": DESTROY,
    "rotate": ROTATE,
    "approve": APPROVE,
    "bypass": BYPASS,
}
"""Keys a role may hold, and the permission each grants."""

POLICY_SETTING = "SECRETS_POLICY_FILE"

_AUTH_KEYS = frozenset({"roles_claim"})


class Policy:
    """The loaded policy: `roles_claim`, the compiled grants, and the parsed TOML as `raw`."""

    __slots__ = ("_globs", "_matchers", "raw", "roles_claim")

    def __init__(
        self,
        *,
        roles_claim: str,
        grants: Mapping[str, Mapping[str, Iterable[PathGlob]]],
        raw: dict[str, Any] | None = None,
    ) -> None:
        """`grants` maps role -> permission (``secrets:read``...) -> globs."""
        self.roles_claim = roles_claim
        self.raw: dict[str, Any] = raw if raw is not None else {}
        self._globs: dict[str, dict[str, tuple[PathGlob, ...]]] = {}
        # One alternation per (role, permission), so `allows` runs one regex per role.
        self._matchers: dict[str, dict[str, re.Pattern[str]]] = {}
        for role, by_permission in grants.items():
            for permission, globs in by_permission.items():
                unique = tuple(dict.fromkeys(globs))
                if not unique:
                    continue
                self._globs.setdefault(role, {})[permission] = unique
                self._matchers.setdefault(role, {})[permission] = re.compile(
                    "|".join(f"(?:{glob.regex.pattern})" for glob in unique)
                )

    @classmethod
    def from_toml(cls, text: str, *, source: str = POLICY_SETTING) -> Policy:
        """Parse and check a policy; anything wrong raises `ConfigError(source, ...)`."""
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, f"not valid TOML: {exc}") from exc
        auth = raw.get("auth", {})
        if not isinstance(auth, dict):
            raise ConfigError(source, "[auth] must be a table")
        unknown = sorted(set(auth) - _AUTH_KEYS)
        if unknown:
            raise ConfigError(
                source,
                f"auth.{unknown[0]}: unknown key; expected one of {', '.join(sorted(_AUTH_KEYS))}",
            )
        roles_claim = auth.get("roles_claim", "roles")
        if not isinstance(roles_claim, str) or not roles_claim:
            raise ConfigError(source, "auth.roles_claim: must be a non-empty string")
        roles = raw.get("roles", {})
        if not isinstance(roles, dict):
            raise ConfigError(source, "[roles] must be a table of [roles.<name>] tables")
        grants: dict[str, dict[str, list[PathGlob]]] = {}
        for role, table in roles.items():
            where = f"roles.{role}"
            if not isinstance(table, dict):
                raise ConfigError(source, f"{where}: must be a table, like [{where}]")
            grants[role] = {}
            for key, patterns in table.items():
                if key not in PERMISSIONS:
                    raise ConfigError(
                        source,
                        f"{where}.{key}: unknown key; expected one of {', '.join(PERMISSIONS)}",
                    )
                if not isinstance(patterns, list):
                    raise ConfigError(source, f"{where}.{key}: must be a list of path globs")
                globs = grants[role][PERMISSIONS[key]] = []
                for index, pattern in enumerate(patterns):
                    if not isinstance(pattern, str):
                        raise ConfigError(source, f"{where}.{key}[{index}]: must be a string")
                    try:
                        globs.append(PathGlob(pattern))
                    except ValueError as exc:
                        raise ConfigError(source, f"{where}.{key}[{index}]: {exc}") from exc
        return cls(roles_claim=roles_claim, grants=grants, raw=raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Policy:
        """Read and parse the policy file; an unreadable file is a `ConfigError` too."""
        try:
            with open(path, "rb") as file:
                text = file.read().decode("utf-8")
        except OSError as exc:
            raise ConfigError(
                POLICY_SETTING, f"cannot read {os.fspath(path)!r}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(POLICY_SETTING, f"{os.fspath(path)!r} is not UTF-8") from exc
        return cls.from_toml(text, source=POLICY_SETTING)

    @property
    def role_names(self) -> frozenset[str]:
        """Roles that grant at least one permission on at least one glob."""
        return frozenset(self._globs)

    def allows(
        self, roles: Iterable[str], scopes: frozenset[str] | None, permission: str, path: str
    ) -> bool:
        """True only if a role grants `permission` on `path` and `scopes` (if given) hold it.

        An invalid path is never allowed, whatever the globs say; nor is one in the service's own
        folder (`schemas.paths.RESERVED_FOLDER`).
        """
        if scopes is not None and permission not in scopes:
            return False
        if not is_valid_path(path) or is_reserved(path):
            return False
        matchers = self._matchers
        for role in roles:
            by_permission = matchers.get(role)
            if by_permission is None:
                continue
            matcher = by_permission.get(permission)
            if matcher is not None and matcher.fullmatch(path) is not None:
                return True
        return False

    def grants(
        self, roles: Iterable[str], scopes: frozenset[str] | None, permission: str
    ) -> list[PathGlob]:
        """The globs on which `roles` hold `permission`, first-seen order, without duplicates."""
        if scopes is not None and permission not in scopes:
            return []
        found: dict[PathGlob, None] = {}
        for role in roles:
            for glob in self._globs.get(role, {}).get(permission, ()):
                found.setdefault(glob, None)
        return list(found)

    def __repr__(self) -> str:
        return f"Policy(roles_claim={self.roles_claim!r}, roles={sorted(self._globs)!r})"

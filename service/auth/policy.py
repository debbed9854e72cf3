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
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from schemas.errors import ConfigError
from schemas.globs import PathGlob, policy_globs
from service.auth.matcher import GrantMatcher

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
    """The loaded policy: `roles_claim`, the compiled grants, and the parsed TOML as `raw`.

    A check costs about the same for 10 globs or 10,000 (`service.auth.matcher`). The state is
    one immutable snapshot: `replace_with` swaps it in one assignment, so every holder of this
    object (request state, the fast path, open watch streams) checks against the new policy
    from its next call, and no call ever sees half of each.
    """

    __slots__ = ("_current",)

    def __init__(
        self,
        *,
        roles_claim: str,
        grants: Mapping[str, Mapping[str, Iterable[PathGlob]]],
        raw: dict[str, Any] | None = None,
    ) -> None:
        """`grants` maps role -> permission (``secrets:read``...) -> globs."""
        self._current = _Compiled(roles_claim, grants, raw if raw is not None else {})

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
                grants[role][PERMISSIONS[key]] = policy_globs(
                    source, f"{where}.{key}", patterns, required=False
                )
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
    def roles_claim(self) -> str:
        return self._current.roles_claim

    @property
    def raw(self) -> dict[str, Any]:
        """The parsed TOML, every section, for the features that own the others."""
        return self._current.raw

    @property
    def role_names(self) -> frozenset[str]:
        """Roles that grant at least one permission on at least one glob."""
        return frozenset(self._current.globs)

    def replace_with(self, new: Policy) -> None:
        """From now on, decide as `new` does (its grants, roles claim and raw sections)."""
        self._current = new._current

    def allows(
        self, roles: Iterable[str], scopes: frozenset[str] | None, permission: str, path: str
    ) -> bool:
        """True only if a role grants `permission` on `path` and `scopes` (if given) hold it.

        An invalid path is never allowed, whatever the globs say; nor is one in the service's own
        folder (`schemas.paths.RESERVED_FOLDER`).
        """
        if scopes is not None and permission not in scopes:
            return False
        matcher = self._current.matchers.get(permission)
        return matcher is not None and matcher.allows(roles, path)

    def grants(
        self, roles: Iterable[str], scopes: frozenset[str] | None, permission: str
    ) -> list[PathGlob]:
        """The globs on which `roles` hold `permission`, first-seen order, without duplicates."""
        if scopes is not None and permission not in scopes:
            return []
        globs = self._current.globs
        found: dict[PathGlob, None] = {}
        for role in roles:
            for glob in globs.get(role, {}).get(permission, ()):
                found.setdefault(glob, None)
        return list(found)

    def __repr__(self) -> str:
        current = self._current
        return f"Policy(roles_claim={current.roles_claim!r}, roles={sorted(current.globs)!r})"


class _Compiled:
    """One policy's decisions, fixed once built (matchers only remember answers): what
    `Policy.replace_with` swaps."""

    __slots__ = ("globs", "matchers", "raw", "roles_claim")

    def __init__(
        self,
        roles_claim: str,
        grants: Mapping[str, Mapping[str, Iterable[PathGlob]]],
        raw: dict[str, Any],
    ) -> None:
        self.roles_claim = roles_claim
        self.raw = raw
        # role -> permission -> globs, for `grants` (listings, watch subscriptions).
        self.globs: dict[str, dict[str, tuple[PathGlob, ...]]] = {}
        by_permission: dict[str, dict[str, tuple[PathGlob, ...]]] = {}
        for role, held in grants.items():
            for permission, globs in held.items():
                unique = tuple(dict.fromkeys(globs))
                if unique:
                    self.globs.setdefault(role, {})[permission] = unique
                    by_permission.setdefault(permission, {})[role] = unique
        # permission -> every role's globs for it, as one trie.
        self.matchers: dict[str, GrantMatcher] = {
            permission: GrantMatcher(held) for permission, held in by_permission.items()
        }

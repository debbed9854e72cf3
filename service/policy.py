"""Authorization policy: which roles hold which permission on which paths, from a TOML file.

Deny by default: a permission is granted only by a role that lists a glob matching the path, and,
where the token carries scopes, only if the permission is among them too (scopes narrow, never
widen). ``write`` does not imply ``read``.

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

from service.errors import ConfigError
from service.paths import MAX_PATH_LENGTH, MAX_SEGMENTS, SEGMENT_CHARS, is_valid_path

__all__ = ["DESTROY", "PERMISSIONS", "READ", "WRITE", "PathGlob", "Policy"]

READ = "secrets:read"
WRITE = "secrets:write"
DESTROY = "secrets:destroy"
PERMISSIONS: Mapping[str, str] = {"read": READ, "write": WRITE, "destroy": DESTROY}
"""Keys a role may hold, and the permission each grants."""

POLICY_SETTING = "SECRETS_POLICY_FILE"

_AUTH_KEYS = frozenset({"roles_claim"})
_GLOB_SEGMENT_RE = re.compile(f"[*{SEGMENT_CHARS}]+")
_ANY_SEGMENT = f"[{SEGMENT_CHARS}]+"
_ANY_CHARS = f"[{SEGMENT_CHARS}]*"
_DOUBLE_STAR = "**"


class PathGlob:
    """A path pattern, validated and compiled once; matching works segment by segment.

    - a literal segment matches exactly that segment;
    - ``*`` as a whole segment matches exactly one segment;
    - ``*`` inside a segment (``db-*``) matches any run, possibly empty, of segment characters,
      never a ``/``; one such ``*`` per segment, which keeps matching linear (several would let
      a hostile path trigger heavy regex backtracking);
    - ``**`` as the **last** segment matches **one or more** segments: ``app/**`` matches
      ``app/x`` and ``app/x/y`` but not ``app`` itself (as Vault's ``app/*`` and NATS's ``app.>``);
      a lone ``**`` matches every path;
    - ``**`` anywhere else matches **zero or more** segments: ``app/**/db`` matches ``app/db`` and
      ``app/x/y/db``;
    - ``**`` must be a whole segment, and may not follow another ``**``.

    Patterns use the path alphabet plus ``*``, at most 16 segments and 512 characters, and no
    ``.`` or ``..`` segment. An invalid pattern raises `ValueError`.
    """

    __slots__ = ("_tokens", "pattern", "regex", "segments")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.segments: tuple[str, ...] = _check_glob(pattern)
        self.regex: re.Pattern[str] = re.compile(_glob_regex(self.segments))
        # For `could_match_under`: a trailing ``**`` is one segment then zero or more.
        tokens: list[re.Pattern[str] | None] = [
            None if seg == _DOUBLE_STAR else re.compile(_segment_regex(seg))
            for seg in self.segments
        ]
        if self.segments[-1] == _DOUBLE_STAR:
            tokens.insert(-1, re.compile(_ANY_SEGMENT))
        self._tokens: tuple[re.Pattern[str] | None, ...] = tuple(tokens)

    def matches(self, path: str) -> bool:
        """True if `path` is a valid path and the pattern matches all of it."""
        return is_valid_path(path) and self.regex.fullmatch(path) is not None

    def could_match_under(self, prefix: str) -> bool:
        """True if some path strictly below `prefix` (``prefix/...``; ``""`` is the top) matches.

        Used to filter listings: a folder is shown only if it could hold a readable path.
        """
        if prefix == "":
            segments: list[str] = []
        elif is_valid_path(prefix):
            segments = prefix.split("/")
        else:
            return False
        tokens = self._tokens
        end = len(tokens)
        states = self._closure({0})
        for segment in segments:
            moved: set[int] = set()
            for state in states:
                if state == end:
                    continue
                token = tokens[state]
                if token is None:
                    moved.add(state)
                elif token.fullmatch(segment):
                    moved.add(state + 1)
            states = self._closure(moved)
            if not states:
                return False
        # From any unfinished state at least one more segment can complete a match, since every
        # segment token is satisfiable; the only limit is the path's segment count.
        room = MAX_SEGMENTS - len(segments)
        return any(state < end and max(1, self._min_segments(state)) <= room for state in states)

    def covers_all_under(self, prefix: str) -> bool:
        """True if every valid path strictly below `prefix` (``""``: the top) matches.

        ``app/**`` covers ``app`` and ``app/x``; ``**/config`` covers nothing. Used by listings:
        a folder Vault lists holds some key, so under a covering glob it holds a readable one.
        """
        if prefix == "":
            segments: list[str] = []
        elif is_valid_path(prefix):
            segments = prefix.split("/")
        else:
            return False
        room = MAX_SEGMENTS - len(segments)
        if room < 1:
            return False
        tokens = self._tokens
        states = self._closure({0})
        for segment in segments:
            moved = {
                state if tokens[state] is None else state + 1
                for state in states
                if state < len(tokens) and _token_takes(tokens[state], segment)
            }
            states = self._closure(moved)
        return any(self._takes_every_tail(state, room) for state in states)

    def _takes_every_tail(self, state: int, room: int) -> bool:
        # The tokens left must take every run of 1 to `room` segments: only whole-segment `*`
        # (one segment) and `**` (any number), with at most one `*` if a `**` is among them,
        # or exactly one `*` when a single segment is all there is room for.
        rest = self._tokens[state:]
        if any(token is not None and token.pattern != _ANY_SEGMENT for token in rest):
            return False
        singles = sum(1 for token in rest if token is not None)
        if any(token is None for token in rest):
            return singles <= 1
        return singles == 1 == room

    def _closure(self, states: Iterable[int]) -> set[int]:
        # ``**`` may match nothing, so a state before one also stands after it.
        closed: set[int] = set()
        for state in states:
            while True:
                closed.add(state)
                if state < len(self._tokens) and self._tokens[state] is None:
                    state += 1
                else:
                    break
        return closed

    def _min_segments(self, state: int) -> int:
        return sum(1 for token in self._tokens[state:] if token is not None)

    def __repr__(self) -> str:
        return f"PathGlob({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathGlob) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


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

        An invalid path is never allowed, whatever the globs say.
        """
        if scopes is not None and permission not in scopes:
            return False
        if not is_valid_path(path):
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


def _check_glob(pattern: str) -> tuple[str, ...]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a glob must be a non-empty string")
    if len(pattern) > MAX_PATH_LENGTH:
        raise ValueError(f"glob is longer than {MAX_PATH_LENGTH} characters")
    segments = tuple(pattern.split("/"))
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    if len(segments) > MAX_SEGMENTS:
        raise ValueError(f"glob {shown!r} has more than {MAX_SEGMENTS} segments")
    for index, segment in enumerate(segments):
        if segment == "":
            raise ValueError(f"glob {shown!r} has an empty segment or a leading/trailing '/'")
        if segment in (".", ".."):
            raise ValueError(f"glob {shown!r} has a '.' or '..' segment")
        if _GLOB_SEGMENT_RE.fullmatch(segment) is None:
            raise ValueError(
                f"glob {shown!r} may hold only ASCII letters, digits, '_', '.', '-' and '*'"
            )
        if _DOUBLE_STAR in segment and segment != _DOUBLE_STAR:
            raise ValueError(f"glob {shown!r}: '**' must be a whole segment")
        if segment.count("*") > 1 and segment != _DOUBLE_STAR:
            raise ValueError(f"glob {shown!r}: at most one '*' inside a segment")
        if segment == _DOUBLE_STAR and index > 0 and segments[index - 1] == _DOUBLE_STAR:
            raise ValueError(f"glob {shown!r}: '**' may not follow '**'")
    return segments


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return _ANY_SEGMENT
    return _ANY_CHARS.join(re.escape(part) for part in segment.split("*"))


def _glob_regex(segments: tuple[str, ...]) -> str:
    last = len(segments) - 1
    out: list[str] = []
    separate = False  # whether the next literal or `*` segment needs a leading "/"
    for index, segment in enumerate(segments):
        if segment != _DOUBLE_STAR:
            out.append(("/" if separate else "") + _segment_regex(segment))
            separate = True
        elif index == last == 0:  # a lone `**`: any path at all
            out.append(f"{_ANY_SEGMENT}(?:/{_ANY_SEGMENT})*")
        elif index == last:  # trailing: one or more further segments
            out.append(f"(?:/{_ANY_SEGMENT})+")
        elif index == 0:  # leading: zero or more segments, each followed by "/"
            out.append(f"(?:{_ANY_SEGMENT}/)*")
            separate = False
        else:  # middle: zero or more segments, each preceded by "/"
            out.append(f"(?:/{_ANY_SEGMENT})*")
    return "".join(out)


def _token_takes(token: re.Pattern[str] | None, segment: str) -> bool:
    """Whether a `PathGlob` token takes `segment`: ``**`` (None) takes any."""
    return token is None or token.fullmatch(segment) is not None

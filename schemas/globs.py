"""Path patterns (`PathGlob`): the glob grammar policies, validation rules, listings and
subscriptions share. Pure functions of the path grammar in `schemas.paths`."""

from __future__ import annotations

import re
from collections.abc import Iterable

from schemas.errors import ConfigError
from schemas.paths import MAX_PATH_LENGTH, MAX_SEGMENTS, SEGMENT_CHARS, is_valid_path

__all__ = ["PathGlob", "policy_globs"]

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


def policy_globs(source: str, where: str, patterns: object, *, required: bool) -> list[PathGlob]:
    """The glob list at `where` of a policy file (roles, validation, rotation and approval rules
    all have them): a list of strings, each a valid PathGlob, non-empty when `required`; else a
    ConfigError naming `where` (and the index) for the setting `source`."""
    if not isinstance(patterns, list) or (required and not patterns):
        wanted = "required, a non-empty list" if required else "must be a list"
        raise ConfigError(source, f"{where}: {wanted} of path globs")
    globs = []
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ConfigError(source, f"{where}[{index}]: must be a string")
        try:
            globs.append(PathGlob(pattern))
        except ValueError as exc:
            raise ConfigError(source, f"{where}[{index}]: {exc}") from None
    return globs

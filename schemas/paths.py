"""Secret paths: the one rule every route applies before any backend call, and custom methods.

A path is 1 to 16 segments of ``[A-Za-z0-9_.-]+`` joined by single ``/``, with no ``.`` or ``..``
segment and at most 512 characters. Nothing else is accepted: no leading, trailing or doubled
slash, no percent-escapes, backslashes, whitespace, NUL or non-ASCII look-alikes. Error details
explain the rule broken and never echo the input, which may be huge or hostile.
"""

from __future__ import annotations

import re

from schemas.errors import InvalidPath

__all__ = [
    "MAX_PATH_LENGTH",
    "MAX_SEGMENTS",
    "RESERVED_FOLDER",
    "is_reserved",
    "is_valid_path",
    "split_custom_method",
    "validate_path",
    "validate_prefix",
]

MAX_PATH_LENGTH = 512
MAX_SEGMENTS = 16

SEGMENT_CHARS = "A-Za-z0-9_.-"  # "-" last, so that it stays literal
"""The segment alphabet as a regex character-class body (explicit ASCII ranges, so no Unicode)."""

RESERVED_FOLDER = ".secrets-service"
"""The top folder of the mount where the service keeps its own state (rotation runs): no role
can be granted a path below it, and no listing shows it."""
_RESERVED_BELOW = RESERVED_FOLDER + "/"

_SEGMENT = f"[{SEGMENT_CHARS}]+"
# The lookahead refuses a "." or ".." segment inside the same single scan: measured faster than a
# second search for dot segments, even on paths holding no dot at all.
_CHECKED_SEGMENT = rf"(?!\.\.?(?:/|\Z)){_SEGMENT}"
_PATH_RE = re.compile(f"{_CHECKED_SEGMENT}(?:/{_CHECKED_SEGMENT}){{0,{MAX_SEGMENTS - 1}}}")
_SEGMENT_RE = re.compile(_SEGMENT)
_VERB_RE = re.compile(r"[a-z]+")


def is_valid_path(raw: str) -> bool:
    """True if `raw` satisfies every path rule; the hot-path form of `validate_path`."""
    # The length check first bounds the regex's work on a huge input.
    return len(raw) <= MAX_PATH_LENGTH and _PATH_RE.fullmatch(raw) is not None


def is_reserved(path: str) -> bool:
    """True for `RESERVED_FOLDER` and every path below it."""
    return path.startswith(_RESERVED_BELOW) or path == RESERVED_FOLDER


def validate_path(raw: str) -> str:
    """Return `raw` unchanged if it is a valid secret path, else raise `InvalidPath`."""
    if is_valid_path(raw):
        return raw
    raise InvalidPath(_explain(raw))


def validate_prefix(raw: str) -> str:
    """Like `validate_path`, but ``""`` (the top of the tree) is also accepted; used for listing."""
    if raw == "" or is_valid_path(raw):
        return raw
    raise InvalidPath(_explain(raw))


def split_custom_method(raw: str) -> tuple[str, str | None]:
    """Split an AIP-136 custom method off a route path: ``"app/db:versions"`` -> ``("app/db",
    "versions")``; ``"app/db"`` -> ``("app/db", None)``.

    The verb must be ``[a-z]+`` and at most one ``:`` may appear, else `InvalidPath`. The path
    part is returned as given: the caller still runs `validate_path` on it.
    """
    colons = raw.count(":")
    if colons == 0:
        return raw, None
    if colons > 1:
        raise InvalidPath("a path may hold at most one ':', which starts a custom method")
    path, _, verb = raw.partition(":")
    if _VERB_RE.fullmatch(verb) is None:
        raise InvalidPath("a custom method after ':' must be one or more lowercase letters a-z")
    return path, verb


def _explain(raw: str) -> str:
    """Name the first rule `raw` breaks, without echoing it (only called on the failure path)."""
    if raw == "":
        return "a path must not be empty"
    if len(raw) > MAX_PATH_LENGTH:
        return f"a path must be at most {MAX_PATH_LENGTH} characters"
    if raw.startswith("/") or raw.endswith("/"):
        return "a path must not start or end with '/'"
    segments = raw.split("/")
    if "" in segments:
        return "a path must not contain an empty segment ('//')"
    if len(segments) > MAX_SEGMENTS:
        return f"a path must have at most {MAX_SEGMENTS} segments"
    if any(segment in (".", "..") for segment in segments):
        return "a path must not contain a '.' or '..' segment"
    if not all(_SEGMENT_RE.fullmatch(segment) for segment in segments):
        return "path segments may hold only ASCII letters, digits, '_', '.' and '-'"
    return "invalid path"  # pragma: no cover - every rule is named above

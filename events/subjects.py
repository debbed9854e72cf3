"""NATS subjects for secret changes: the path encoding, its inverse, and subscription patterns.

A change to a path is published on ``<prefix>.changed.<encoded path>``. `encode_path` turns each
``/`` into the token separator ``.`` and percent-encodes, inside each segment, the characters NATS
reserves in a token: ``%`` (first, so the encoding is reversible), ``.``, ``*``, ``>`` and
whitespace, as ``%`` and two uppercase hex digits. Valid paths only ever hold ``.`` among them::

    >>> encode_path("app/db.main/password")
    'app.db%2Emain.password'
    >>> decode_path("app.db%2Emain.password")
    'app/db.main/password'
    >>> changed_subject("secrets", "app/db.main")
    'secrets.changed.app.db%2Emain'
    >>> pattern_subject("secrets", "app/**")
    'secrets.changed.app.>'

The encoded form has exactly one token per path segment. Encoding takes a path and raises
`InvalidPath` for an invalid one; decoding takes what came off the bus and raises `ValueError` for
anything `encode_path` would not have produced.
"""

from __future__ import annotations

import re

from schemas.errors import InvalidPath
from schemas.globs import PathGlob
from schemas.paths import validate_path

__all__ = [
    "approvals_subject",
    "changed_subject",
    "decode_path",
    "encode_path",
    "path_from_subject",
    "pattern_subject",
]

_RESERVED = "%.*> \t\n\r\f\v"
_ENCODE = str.maketrans({char: f"%{ord(char):02X}" for char in _RESERVED})
_ESCAPE_RE = re.compile(r"%([0-9A-F]{2})")
_BAD_PREFIX_RE = re.compile(r"[*>\s]|^\.|\.\.|\.$")


def encode_path(path: str) -> str:
    """Encode a valid path as NATS subject tokens: ``"app/db.main"`` -> ``"app.db%2Emain"``."""
    validate_path(path)
    return ".".join(segment.translate(_ENCODE) for segment in path.split("/"))


def decode_path(tokens: str) -> str:
    """Inverse of `encode_path`: ``"app.db%2Emain"`` -> ``"app/db.main"``.

    Raises `ValueError` unless `tokens` is exactly what `encode_path` makes of some valid path
    (so a non-canonical escape such as ``%41`` for ``A`` is refused too).
    """
    path = "/".join(_ESCAPE_RE.sub(_unescape, token) for token in tokens.split("."))
    try:
        canonical = encode_path(path)
    except InvalidPath as exc:
        raise ValueError(f"subject tokens do not encode a valid path: {exc.detail}") from exc
    if canonical != tokens:
        raise ValueError("subject tokens are not in the canonical encoding of a path")
    return path


def changed_subject(prefix: str, path: str) -> str:
    """The subject a change to `path` is published on: ``<prefix>.changed.<encoded path>``."""
    return f"{_changed(prefix)}{encode_path(path)}"


def approvals_subject(prefix: str, path: str) -> str:
    """The subject a change request's transitions on `path` are published on:
    ``<prefix>.approvals.<encoded path>`` (the same encoding as `changed_subject`)."""
    return f"{_changed(prefix)[: -len('changed.')]}approvals.{encode_path(path)}"


def path_from_subject(prefix: str, subject: str) -> str:
    """The path a change subject is about; `ValueError` if it is not one under `prefix`."""
    head = _changed(prefix)
    if not subject.startswith(head):
        raise ValueError(f"not a change subject under {prefix!r}")
    return decode_path(subject[len(head) :])


def pattern_subject(prefix: str, glob: str) -> str:
    """A NATS wildcard subject for the changes a policy glob covers.

    ``"app/**"`` -> ``"<prefix>.changed.app.>"``, ``"app/*/db"`` -> ``"<prefix>.changed.app.*.db"``.
    Both wildcards mean the same on either side: ``*`` one segment, a trailing ``**`` (like ``>``)
    one or more. NATS cannot express ``**`` before the end nor ``*`` inside a segment (``db-*``):
    those raise `ValueError`; subscribe more widely and filter with `PathGlob.matches`.
    """
    segments = PathGlob(glob).segments
    tokens: list[str] = []
    for index, segment in enumerate(segments):
        if segment == "**":
            if index != len(segments) - 1:
                raise ValueError("'**' can only be the last segment of a subscription pattern")
            tokens.append(">")
        elif segment == "*":
            tokens.append("*")
        elif "*" in segment:
            raise ValueError("NATS cannot match '*' inside a segment; use a whole-segment '*'")
        else:
            tokens.append(segment.translate(_ENCODE))
    return _changed(prefix) + ".".join(tokens)


def _changed(prefix: str) -> str:
    if not prefix or _BAD_PREFIX_RE.search(prefix):
        raise ValueError("a subject prefix must be dot-separated tokens, no wildcards or spaces")
    return f"{prefix}.changed."


def _unescape(match: re.Match[str]) -> str:
    return chr(int(match.group(1), 16))

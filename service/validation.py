"""Validation of secret structure before anything reaches Vault.

Every violation is reported as (field, rule), never with the value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from service.errors import InvalidRequest, Violation

__all__ = ["DEFAULT_MAX_BYTES", "MAX_DEPTH", "validate_data"]

DEFAULT_MAX_BYTES = 65536
MAX_DEPTH = 32
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_encode = msgspec.json.Encoder().encode
_SCALARS = (str, int, float, bool, type(None))


def validate_data(
    data: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Violation]:
    """The rules every secret obeys, whatever its path: a non-empty object of named values.

    Raises InvalidRequest if `data` is not plain JSON (a set, bytes, an object...).
    """
    if not isinstance(data, Mapping):
        raise InvalidRequest("data must be an object")
    violations: list[Violation] = []
    if not data:
        violations.append(Violation("", "not_empty"))
    for key, value in data.items():
        if not isinstance(key, str):
            raise InvalidRequest("data must be an object with string keys")
        field = key if _KEY.fullmatch(key) else "<key>"
        if field == "<key>":
            violations.append(Violation(field, "key_format"))
        if value is None or value == "" or value == {} or value == []:
            violations.append(Violation(field, "not_empty"))
        if not _plain_json(value, 1):
            violations.append(Violation(field, "max_depth"))
    if len(_encode(dict(data))) > max_bytes:
        violations.append(Violation("", "max_total_size"))
    return violations


def _plain_json(value: Any, depth: int) -> bool:
    """False if nested deeper than MAX_DEPTH; raises InvalidRequest on a non-JSON type."""
    if isinstance(value, _SCALARS):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("data must be plain JSON (no NaN or infinity)")
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

"""Validation of secret structure before anything reaches Vault.

Every violation is reported as (field, rule), never with the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from service.errors import Violation

__all__ = ["DEFAULT_MAX_BYTES", "validate_data"]

DEFAULT_MAX_BYTES = 65536
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_encode = msgspec.json.Encoder().encode


def validate_data(
    data: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> list[Violation]:
    """The rules every secret obeys, whatever its path: a non-empty object of named values."""
    violations: list[Violation] = []
    if not data:
        violations.append(Violation("", "not_empty"))
    for key, value in data.items():
        field = key if _KEY.fullmatch(key) else "<key>"
        if field == "<key>":
            violations.append(Violation(field, "key_format"))
        if value is None or value == "" or value == {} or value == []:
            violations.append(Violation(field, "not_empty"))
    if len(_encode(dict(data))) > max_bytes:
        violations.append(Violation("", "max_total_size"))
    return violations

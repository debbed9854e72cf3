"""Durations in the policy file: "90s", "15m", "720h", "7d", "1h30m", "2.5s" or a bare number of
seconds, parsed once at start-up into float seconds."""

from __future__ import annotations

import math
import re

__all__ = ["MAX_DURATION", "parse_duration"]

MAX_DURATION = 3650 * 86400.0
"""Ten years: longer is a typo, and would overflow datetimes once added to a date."""

_NUMBER = r"(\d+(?:\.\d+)?)"
# Units largest first, each at most once: "1h30m" reads one way only ("30m1h" is refused).
_DURATION = re.compile(f"(?:{_NUMBER}d)?(?:{_NUMBER}h)?(?:{_NUMBER}m)?(?:{_NUMBER}s)?")
_SECONDS = (86400.0, 3600.0, 60.0, 1.0)
_FORMS = 'a duration like "90s", "15m", "720h", "7d", "1h30m" or "2.5s", or a number of seconds'


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value` (a duration string, or a TOML number meaning seconds).

    Raises ValueError saying what is accepted; the message does not echo the input.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be {_FORMS}")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError("must be a number of seconds, 0 or more")
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise ValueError(f"must be {_FORMS}")
        seconds = sum(
            float(amount) * unit
            for amount, unit in zip(match.groups(), _SECONDS, strict=True)
            if amount is not None
        )
    else:
        raise ValueError(f"must be {_FORMS}")
    if seconds > MAX_DURATION:
        raise ValueError("must be at most 3650d (ten years)")
    return seconds

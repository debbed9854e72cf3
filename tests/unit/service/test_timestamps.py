"""service/timestamps.py: the audit record's microseconds and the log line's milliseconds from one
reading, as `datetime.isoformat` writes them."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from service.timestamps import to_millis, utc_micros, utc_millis, utc_now


def test_timestamps_read_as_datetime_isoformat_writes_them() -> None:
    ns = 1_795_900_000_123_456_789
    expected = datetime.fromtimestamp(ns // 1000 / 1e6, UTC).isoformat(timespec="microseconds")
    assert utc_micros(ns) == expected == "2026-11-28T21:06:40.123456+00:00"
    assert utc_millis(1_795_900_000.5, 500.0) == "2026-11-28T21:06:40.500+00:00"
    # One reading serves a request's audit record (µs) and its log line (ms).
    assert (
        to_millis(utc_micros(ns))
        == utc_millis(ns / 1e9, 123.456)
        == "2026-11-28T21:06:40.123+00:00"
    )
    parsed = datetime.fromisoformat(utc_now())
    assert parsed.tzinfo is not None and abs(parsed.timestamp() - time.time()) < 5

"""bench/policy_bench.py in a small configuration: both matchers give every answer right (the run
stops otherwise) and the report rows and sentence show each size."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import policy_bench  # noqa: E402


def test_a_small_policy_bench_reports_each_size_for_both_matchers() -> None:
    figures = policy_bench.bench_policy(checks=200, rounds=2, sizes=(10, 100))
    assert [f["globs"] for f in figures["sizes"]] == [10, 100]
    for size in figures["sizes"]:
        for name in ("compiled", "linear"):
            for mode in ("distinct", "repeated"):
                measured = size[name][mode]
                assert measured["match"]["count"] == measured["miss"]["count"] == 100
    rows = policy_bench.markdown_rows(figures)
    assert len(rows) == 4 and rows[0].startswith("| policy check, 10 globs, compiled")
    note = policy_bench.markdown_note(figures)
    assert "at 10, 100 globs" in note and "Goal <= 2 µs at 100 globs" in note

"""bench/scale_bench.py's report, from the committed results (bench/results/scale.json): the rows
and sentences bench/run.py puts in latest.md, with and without the policy figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402
import scale_bench  # noqa: E402


def committed() -> dict[str, Any]:
    result: dict[str, Any] = json.loads((ROOT / "bench" / "results" / "scale.json").read_text())
    return result


def test_the_scale_table_has_a_row_per_cache_size_with_in_process_and_http_figures() -> None:
    scale = committed()
    rows = scale_bench.markdown_rows(scale)
    for key, figures in scale["inprocess"].items():
        hit = figures["hits"]["get_random"]
        served = scale["http"][f"generated_{key}"]
        row = next(r for r in rows if r.startswith(f"| {scale_bench.size_label(int(key))} |"))
        assert f"| {hit['median_us']:.2f} / {hit['p99_us']:.2f} µs |" in row
        assert f"| {served['requests_per_s']:,.0f} |" in row


def test_the_propagation_rows_give_the_last_instance_s_eviction_for_each_instance_count() -> None:
    scale = committed()
    rows = "\n".join(scale_bench.markdown_rows(scale))
    for count, p in scale["propagation"].items():
        last = p["ack_to_last_eviction"]
        assert f"the last of {int(count) - 1} other instances" in rows
        assert f"| {last['p50_ms']:.2f} ms | {last['p99_ms']:.2f} ms |" in rows
        assert len(p["per_instance"]) == int(count) - 1


def test_a_run_without_the_policy_module_says_so_instead_of_its_rows() -> None:
    scale = {**committed(), "policy": {"missing": "bench/policy_bench.py is not there"}}
    assert "policy check" not in "\n".join(scale_bench.markdown_rows(scale))
    assert "Policy check time: not measured" in scale_bench.markdown_note(scale)


def test_bench_run_s_report_shows_the_scale_figures_only_when_the_results_have_them() -> None:
    result = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    result.pop("scale", None)
    assert "| cached entries |" not in bench.markdown(result)
    table = bench.markdown({**result, "scale": committed()})
    assert "| cached entries |" in table and "Scale (bench/scale_bench.py)" in table

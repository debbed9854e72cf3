"""bench/run.py's reporting: paired per-round ratios, goals and the markdown table, computed from
the committed results (bench/results/latest.json) and from rounds made up here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import run as bench  # noqa: E402
import workers_bench  # noqa: E402


def reads(**targets: list[float]) -> dict[str, Any]:
    return {
        name: {"requests_per_s": sorted(rates)[len(rates) // 2], "rounds": [
            {"requests_per_s": rate} for rate in rates
        ]}
        for name, rates in targets.items()
    }  # fmt: skip


def test_the_ratio_is_the_median_of_each_round_s_own_ratio() -> None:
    # Round 2 ran while the machine was busy for both targets: pairing cancels it out.
    r = reads(service_cached=[20_000, 10_000, 21_000], openbao=[3_000, 1_500, 3_000])
    assert round(bench.paired_ratio(r, "service_cached", "openbao"), 3) == 6.667
    # The ratio of the medians would mix rounds: 18,000 / 3,500 = 5.14 here.
    r = reads(service_cached=[12_000, 21_000, 18_000], openbao=[2_000, 3_500, 4_000])
    assert bench.paired_ratio(r, "service_cached", "openbao") == 6.0


def test_goals_and_markdown_from_the_committed_results() -> None:
    result = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    goals = bench.goals(result)
    # The watch goals are judged only on results that have the watch figures.
    expected = set(bench.GOALS) - (set() if "watch" in result else bench.WATCH_GOALS)
    # The workers goals (issue 15) are judged only on results that have the workers figures.
    expected |= set(workers_bench.GOALS) if result.get("workers") else set()
    assert set(goals) == expected
    for goal in goals.values():
        assert isinstance(goal["met"], bool) and goal["goal"].split()[0] in (">=", "<=")
    ratios = result["http_reads"]
    assert goals["cached_vs_openbao_throughput"]["measured"] == round(
        bench.paired_ratio(ratios, "service_cached", "openbao"), 3
    )
    table = bench.markdown(result)
    assert "| cached read throughput / OpenBao's | >= 6 |" in table
    assert "Req/s per round" in table and "bare_stock_uvicorn" in table


def test_the_report_shows_the_cost_of_a_rotation_when_the_results_have_it() -> None:
    result = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    rotation = json.loads((ROOT / "bench" / "results" / "rotation.json").read_text())
    table = bench.markdown({**result, "rotation": rotation})
    pg = rotation["postgres"]["rotate"]
    assert (
        f"| service `:rotate`, postgres single-user ({pg['count']}): ALTER ROLE, login proven "
        f"| {pg['p50_ms']:.2f} ms | {pg['p99_ms']:.2f} ms |"
    ) in table
    ratio = rotation["postgres"]["rotate_over_write_p50"]
    assert f"for the PATCH ({ratio:.1f}×) with postgres" in table
    assert "`:rotate`" not in bench.markdown({k: v for k, v in result.items() if k != "rotation"})


def test_the_report_shows_the_watch_figures_and_goals_when_the_results_have_them() -> None:
    result = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    watch = json.loads((ROOT / "bench" / "results" / "watch.json").read_text())
    with_watch = {**result, "watch": watch}
    goals = bench.goals(with_watch)
    assert set(goals) - set(workers_bench.GOALS) == set(bench.GOALS)
    with_watch["goals"] = goals  # as bench/run.py's run() stores them
    fresh = watch["freshness"]
    worse = max(fresh["async_client"]["p99_ms"], fresh["blocking_client"]["p99_ms"])
    assert goals["watch_freshness_p99_ms"]["measured"] == round(worse, 3)
    assert goals["watch_idle_streams_read_ratio"]["goal"] == ">= 0.9"
    table = bench.markdown(with_watch)
    hit = watch["client_get"]["async_client"]
    assert (
        f"| `AsyncSecretsClient.get`, cached (watch stream up) | {hit['median_us']:,.2f} µs | "
        f"{hit['p99_us']:,.2f} µs |"
    ) in table
    assert "| `AsyncSecretsClient.get`, cached, median (µs) | <= 2 |" in table
    assert f"its RSS grows {watch['idle_streams']['rss_growth_mb']:.1f} MB" in table
    # A run without the watch figures (an older latest.json): neither their rows nor their goals.
    without = {k: v for k, v in result.items() if k not in ("watch", "goals")}
    without["goals"] = bench.goals(without)
    assert not set(without["goals"]) & bench.WATCH_GOALS
    assert "SecretsClient" not in bench.markdown(without)


def test_the_readme_quotes_the_committed_bench_results_verbatim() -> None:
    # The docs quote results; they never retype them (bench/run.py writes the block).
    readme = (ROOT / "README.md").read_text()
    begin = readme.index(bench.README_BEGIN) + len(bench.README_BEGIN)
    quoted = readme[begin : readme.index(bench.README_END, begin)]
    assert quoted.strip() == (ROOT / "bench" / "results" / "latest.md").read_text().strip()


def test_quote_in_readme_replaces_only_the_block_between_its_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{bench.README_BEGIN}\nold table\n\n{bench.README_END}after\n")
    bench.quote_in_readme("| new | table |\n", readme)
    assert readme.read_text() == (
        f"before\n{bench.README_BEGIN}\n| new | table |\n\n{bench.README_END}after\n"
    )


def test_a_part_run_alone_reports_its_figures_or_exits_2_saying_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "part.json"
    assert bench.run_alone("part.py", lambda: {"x": 1}, out, summary=lambda f: f"x={f['x']}") == 0
    assert json.loads(out.read_text())["x"] == 1
    assert "x=1" in capsys.readouterr().out

    def failing() -> dict[str, Any]:
        raise bench.BenchError("no wrk")

    assert bench.run_alone("part.py", failing, tmp_path / "none.json") == 2
    assert "bench failed: no wrk" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists()


def test_a_quick_run_fills_only_the_options_left_unset() -> None:
    args = argparse.Namespace(quick=True, rounds=None, duration=9)
    bench.fill_quick_or_full(args, {"rounds": (5, 2), "duration": (10, 3)})
    assert (args.rounds, args.duration) == (2, 9)

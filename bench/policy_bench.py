"""Issue 15's policy cost, side by side in one run: one authorization check (`Policy.allows`) with
10, 1,000 and 10,000 globs, the compiled policy (service/auth/matcher.py) beside the linear one it
replaced (one regex alternation per role and permission), on paths that match and paths that miss.

In-process, no server: the caller holds one role with N globs among other roles, of four shapes
(`team-i/app/**`, `team-i/*/config`, `team-i/db-*`, `svc/**/key-i`); each check is timed on its
own (perf_counter_ns twice: the timer's own ~60 ns included), the two matchers interleaved in
rounds over the same paths. Also the time to build (compile) each policy, which a reload pays.

    .venv/bin/python bench/policy_bench.py            # writes bench/results/policy.json
    .venv/bin/python bench/policy_bench.py --quick    # a smoke test: prints, writes nothing
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

from schemas.globs import PathGlob  # noqa: E402
from schemas.paths import is_reserved, is_valid_path  # noqa: E402
from service.auth.policy import READ, Policy  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "policy.json"
SIZES = (10, 1_000, 10_000)
GOAL_US = 2.0  # issue 15: a check at 10,000 globs, median


class LinearPolicy:
    """The policy check as it was before issue 15 (service/auth/policy.py at 21865bf): one
    alternation of every glob's regex per role and permission, tried role by role."""

    def __init__(self, grants: dict[str, dict[str, list[PathGlob]]]) -> None:
        self.matchers = {
            role: {
                permission: re.compile("|".join(f"(?:{g.regex.pattern})" for g in globs))
                for permission, globs in held.items()
                if globs
            }
            for role, held in grants.items()
        }

    def allows(
        self, roles: Iterable[str], scopes: frozenset[str] | None, permission: str, path: str
    ) -> bool:
        if scopes is not None and permission not in scopes:
            return False
        if not is_valid_path(path) or is_reserved(path):
            return False
        for role in roles:
            by_permission = self.matchers.get(role)
            if by_permission is None:
                continue
            matcher = by_permission.get(permission)
            if matcher is not None and matcher.fullmatch(path) is not None:
                return True
        return False


Grants = dict[str, dict[str, list[PathGlob]]]
Check = tuple[str, bool]  # a path, and whether the caller may read it
# Per glob shape: the glob, a path it matches and one it misses (by the last segment), made
# distinct per check by {k}.
SHAPES = (
    ("team-{i}/app/**", "team-{i}/app/db/p{k}", "team-{i}/web/p{k}"),
    ("team-{i}/*/config", "team-{i}/u{k}/config", "team-{i}/u{k}/configs"),
    ("team-{i}/db-*", "team-{i}/db-m{k}", "team-{i}/cache-m{k}"),
    ("svc/**/key-{i}", "svc/eu/r{k}/key-{i}", "svc/eu/r{k}/key-{i}x"),
)
REPEATED = 64  # distinct paths of the `repeated` checks: as many as bench/run.py's reads
BATCH = 500  # checks per timed batch (no timer inside: its mean per check, less noisy)


def workload(size: int, checks: int, seed: int = 15) -> tuple[Grants, list[Check]]:
    """`size` globs for the caller's role `bulk` (plus two other roles), and `checks` distinct
    paths, half matching one of its globs, half missing, over globs drawn at random."""
    globs = [PathGlob(SHAPES[i % len(SHAPES)][0].format(i=i)) for i in range(size)]
    grants = {
        "bulk": {READ: globs},
        "app-reader": {READ: [PathGlob("app/**")]},
        "ops": {READ: [PathGlob("ops/*/logs")]},
    }
    rng = random.Random(seed)
    paths: list[Check] = []
    for k in range(checks):
        i = rng.randrange(size)
        _, hit, miss = SHAPES[i % len(SHAPES)]
        matching = k % 2 == 0
        paths.append(((hit if matching else miss).format(i=i, k=k), matching))
    return grants, paths


def summary_us(values: Sequence[float]) -> dict[str, float]:
    return {
        "count": len(values),
        "median_us": round(statistics.median(values), 3),
        "p99_us": round(bench.pct(values, 0.99), 3),
        "max_us": round(max(values), 3),
    }


def _timed(policy: Any, checks: Sequence[Check], roles: frozenset[str]) -> dict[str, list[float]]:
    """Each check timed on its own, by whether the path matches; a wrong answer ends the run."""
    allows = policy.allows
    times: dict[str, list[float]] = {"match": [], "miss": []}
    for path, expected in checks:
        started = time.perf_counter_ns()
        ok = allows(roles, None, READ, path)
        spent = (time.perf_counter_ns() - started) / 1000
        if ok is not expected:
            raise bench.BenchError(f"{type(policy).__name__} got {path!r} wrong")
        times["match" if ok else "miss"].append(spent)
    return times


def _batched(policy: Any, checks: Sequence[Check], roles: frozenset[str]) -> list[float]:
    """The mean time per check over each batch of `BATCH` checks."""
    allows = policy.allows
    means: list[float] = []
    for start in range(0, len(checks) - BATCH + 1, BATCH):
        paths = [path for path, _ in checks[start : start + BATCH]]
        started = time.perf_counter_ns()
        for path in paths:
            allows(roles, None, READ, path)
        means.append((time.perf_counter_ns() - started) / BATCH / 1000)
    return means


def bench_size(size: int, checks: int, rounds: int) -> dict[str, Any]:
    """`checks` checks per matcher on distinct paths (nothing remembered from one to the next),
    then as many on `REPEATED` paths read again and again (cached reads), rounds interleaved;
    then the same again in batches, on other distinct paths."""
    grants, both = workload(size, 2 * checks)
    distinct, distinct_batched = both[:checks], both[checks:]
    started = time.perf_counter()
    compiled = Policy(roles_claim="roles", grants=grants)
    compile_s = time.perf_counter() - started
    started = time.perf_counter()
    linear = LinearPolicy(grants)
    linear_s = time.perf_counter() - started
    roles = frozenset({"bulk"})
    repeated = (distinct[:REPEATED] * (checks // REPEATED + 1))[:checks]
    figures: dict[str, Any] = {"globs": size}
    for mode, sample, batched in (
        ("distinct", distinct, distinct_batched),
        ("repeated", repeated, repeated),
    ):
        times: dict[str, dict[str, list[float]]] = {
            name: {"match": [], "miss": []} for name in ("compiled", "linear")
        }
        per_round = max(1, len(sample) // rounds)
        for k in range(rounds):
            chunk = sample[k * per_round : (k + 1) * per_round]
            order = [("compiled", compiled), ("linear", linear)]
            for name, policy in order if k % 2 == 0 else order[::-1]:
                for kind, spent in _timed(policy, chunk, roles).items():
                    times[name][kind] += spent
        means: dict[str, list[float]] = {"compiled": [], "linear": []}
        for k in range(rounds):
            chunk = batched[k * per_round : (k + 1) * per_round]
            order = [("compiled", compiled), ("linear", linear)]
            for name, policy in order if k % 2 == 0 else order[::-1]:
                means[name] += _batched(policy, chunk, roles)
        for name, by_kind in times.items():
            figures.setdefault(name, {})[mode] = {
                "all": summary_us(by_kind["match"] + by_kind["miss"]),
                "match": summary_us(by_kind["match"]),
                "miss": summary_us(by_kind["miss"]),
                "batch_mean_us": round(statistics.median(means[name]), 3) if means[name] else None,
            }
    figures["compiled"]["build_ms"] = round(compile_s * 1000, 1)
    figures["linear"]["build_ms"] = round(linear_s * 1000, 1)
    figures["linear_over_compiled_median"] = round(
        figures["linear"]["distinct"]["all"]["median_us"]
        / figures["compiled"]["distinct"]["all"]["median_us"],
        1,
    )
    return figures


def bench_policy(
    checks: int = 20_000, rounds: int = 4, sizes: Sequence[int] = SIZES
) -> dict[str, Any]:
    """Check time at each size, compiled beside linear: bench/run.py's `policy` figures."""
    result: dict[str, Any] = {"sizes": []}
    for size in sizes:
        print(f"policy: {size:,} globs, 2 x {checks:,} checks each ...", file=sys.stderr)
        figures = bench_size(size, checks, rounds)
        result["sizes"].append(figures)
        print(
            "  "
            + "; ".join(
                f"{name} {mode} {x['median_us']:.2f} µs / p99 {x['p99_us']:.2f} µs"
                for name in ("compiled", "linear")
                for mode in ("distinct", "repeated")
                for x in [figures[name][mode]["all"]]
            ),
            file=sys.stderr,
        )
    largest = max(result["sizes"], key=lambda f: f["globs"])
    measured = largest["compiled"]["distinct"]["all"]["median_us"]
    result["goal"] = {
        "what": f"policy check at {largest['globs']:,} globs, distinct paths, median (µs)",
        "goal": f"<= {GOAL_US:g}",
        "measured": measured,
        "met": measured <= GOAL_US,
    }
    result["note"] = (
        "each check timed on its own (perf_counter_ns twice, ~60 ns of timer included); the "
        "caller holds role `bulk` with N globs of four shapes, the policy two other roles; "
        "distinct: every check a new path (the compiled policy's per-path memory never hits), "
        f"repeated: {REPEATED} paths again and again, as cached reads; match / miss: paths one "
        "glob matches / paths differing from one in the last segment, half each; compiled and "
        "linear interleaved in rounds over the same paths; batch_mean_us: the median over "
        f"batches of {BATCH} checks (other distinct paths) of the mean time per check, no timer "
        "in the loop; build_ms: building the Policy (what a reload pays before the swap)"
    )
    return result


def markdown_rows(policy: dict[str, Any]) -> list[str]:
    """bench/run.py's table rows (`| measure | p50 | p99 | max |`) for the policy figures."""
    rows = []
    for figures in policy["sizes"]:
        for name, label in (("compiled", "compiled"), ("linear", "linear, as before issue 15")):
            x = figures[name]["distinct"]["all"]
            rows.append(
                f"| policy check, {figures['globs']:,} globs, {label} (distinct paths) | "
                f"{x['median_us']:.2f} µs | {x['p99_us']:.2f} µs | {x['max_us']:.2f} µs |"
            )
    return rows


def markdown_note(policy: dict[str, Any]) -> str:
    """bench/run.py's sentences on the policy's cost as it grows."""
    sizes, goal = policy["sizes"], policy["goal"]
    largest = sizes[-1]

    def medians(name: str, mode: str) -> str:
        return ", ".join(f"{f[name][mode]['all']['median_us']:.2f}" for f in sizes)

    def batches(name: str) -> str:
        means = [f[name]["distinct"]["batch_mean_us"] for f in sizes]
        return ", ".join("-" if m is None else f"{m:.2f}" for m in means)

    return (
        "Policy check (`Policy.allows`, in-process) at "
        + ", ".join(f"{f['globs']:,}" for f in sizes)
        + f" globs, median µs: compiled {medians('compiled', 'distinct')} on distinct paths "
        f"(mean in batches: {batches('compiled')}), {medians('compiled', 'repeated')} on "
        f"{REPEATED} paths read again and again; the linear check it replaced "
        f"{medians('linear', 'distinct')} (in batches: {batches('linear')}). Building the "
        f"{largest['globs']:,}-glob policy takes {largest['compiled']['build_ms']:.0f} ms (what "
        f"a reload pays, off the event loop). Goal {goal['goal']} µs at "
        f"{largest['globs']:,} globs: {'met' if goal['met'] else 'missed'}."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checks", type=int, help="checks per size and matcher: 20000 (quick 2000)"
    )
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="a smoke test; writes nothing")
    parser.add_argument("--out", type=Path, help=f"default {OUT.relative_to(bench.ROOT)}")
    args = parser.parse_args()
    checks = args.checks or (2_000 if args.quick else 20_000)
    return bench.run_alone(
        "policy_bench.py",
        lambda: bench_policy(checks, args.rounds),
        args.out or (None if args.quick else OUT),
        summary=lambda figures: "\n".join(markdown_rows(figures)) + "\n\n" + markdown_note(figures),
    )


if __name__ == "__main__":
    sys.exit(main())

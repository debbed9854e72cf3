"""Two builds of the service side by side over HTTP: the same OpenBao, NATS cluster and token,
each build serving cached and uncached reads, wrk rounds interleaved in rotating order.

For a change that may cost speed (issue 11, the redesign, was measured with it): install the
older tree in a venv of its own, then

    .venv/bin/python bench/side_by_side.py --before /path/to/old/.venv/bin \\
        --out bench/results/house_side_by_side.json

Both builds run as `secrets-service serve` processes with the default configuration (audit,
metrics and logging on); `SECRETS_CACHE_TTL=0` for the uncached ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="bin/ of the older build")
    parser.add_argument("--after", type=Path, default=bench.BIN, help="bin/ of this build")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    wrk_args = argparse.Namespace(threads=2, connections=32)
    workdir = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    wrk = bench.ensure_wrk()
    script = workdir / "wrk.lua"
    script.write_text(bench.WRK_SCRIPT)
    rates: dict[str, list[float]] = {}
    children: list[bench.Child] = []
    with bench.stack(workdir) as s:
        try:
            targets = []
            for label, binpath in (("before", args.before), ("after", args.after)):
                for mode, extra in (("uncached", {"SECRETS_CACHE_TTL": "0"}), ("cached", {})):
                    bench.BIN = binpath  # start_service runs BIN/secrets-service
                    child = bench.start_service(f"{label}-{mode}", workdir, {**s.environ, **extra})
                    children.append(child)
                    targets.append(
                        bench.Target(
                            f"{label}_{mode}",
                            child.url,
                            "/secrets/app/bench/s",
                            {"Authorization": f"Bearer {s.reader}"},
                            {"service": child.pid},
                        )
                    )
            for target in targets:  # warm: token and secret caches, connections
                bench.run_wrk(wrk, target, script, wrk_args, 2)
            for round_ in range(args.rounds):
                shift = round_ % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    rate = bench.run_wrk(wrk, target, script, wrk_args, args.duration)
                    rates.setdefault(target.name, []).append(rate["requests_per_s"])
                    print(round_, target.name, round(rate["requests_per_s"]), file=sys.stderr)
        finally:
            for child in children:
                child.stop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"wrk -t2 -c32 -d{args.duration}s, {args.rounds} rotating rounds",
        "req_per_s": {
            name: {"rounds": [round(r) for r in values], "median": round(statistics.median(values))}
            for name, values in rates.items()
        },
        "after_over_before_median_of_round_ratios": {
            mode: round(
                statistics.median(
                    a / b
                    for a, b in zip(rates[f"after_{mode}"], rates[f"before_{mode}"], strict=True)
                ),
                3,
            )
            for mode in ("cached", "uncached")
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

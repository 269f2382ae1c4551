"""Control-call latency pooled over several ``bench_cluster.py --json`` runs, so that a p99 is
not just the max of one run's 50 calls.

    for i in 1 2 3 4; do
        python benchmarks/bench_cluster.py --keys 100000 --skip-dask --skip-throughput \\
            --probe-pause 0.02 --json out/lat-$i.json
    done
    python benchmarks/pool_latency.py out/lat-*.json

Prints, per system, shape and call, the calls pooled and their p50, p90, p99 and max (ms) in
wall time, then the same of the serving loop's CPU while each call was in flight (what the call
waited behind in that loop, whatever the machine's load; amm only), and each run's load
average. For A/B pairs, ``--group old='*old*' --group new='*new*'`` pools the
runs whose file names match each pattern apart.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

#: Calls whose latency ``bench_cluster.py`` records (``PROBES``).
CALLS = ("running", "status", "who_has", "holds_keys", "who_has_view")


def _rank(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def pool(
    runs: list[dict[str, Any]], what: str = "samples_ms"
) -> dict[tuple[str, str, str], list[float]]:
    """Each call's latencies (ms) by (system, shape, call), over ``runs`` (``--json`` files);
    with ``what="loop_cpu_samples_ms"``, the serving loop's CPU while each was in flight."""
    pooled: dict[tuple[str, str, str], list[float]] = {}
    for run in runs:
        for system in ("amm", "dask"):
            for shape, figures in (run.get(system) or {}).items():
                for call in CALLS:
                    samples = figures.get(f"{call}_{what}")
                    if samples:
                        pooled.setdefault((system, shape, call), []).extend(samples)
    return pooled


def report(name: str, paths: list[Path]) -> list[str]:
    runs = [json.loads(p.read_text()) for p in paths]
    loads = [
        "{:.1f}->{:.1f}".format(*(r["load_average"][when][0] for when in ("start", "end")))
        for r in runs
        if "load_average" in r
    ]
    lines = [f"{name}: {len(runs)} run(s), load average (1 min) {', '.join(loads)}"]
    for what, label in (("samples_ms", "wall"), ("loop_cpu_samples_ms", "loop CPU")):
        for (system, shape, call), values in sorted(pool(runs, what).items()):
            ordered = sorted(values)
            lines.append(
                f"  {system} {int(shape):,} keys {call:>10} {label:>8}: n={len(ordered):5d}  "
                f"p50 {statistics.median(ordered):7.2f}  p90 {_rank(ordered, 0.9):7.2f}  "
                f"p99 {_rank(ordered, 0.99):7.2f}  max {ordered[-1]:7.2f} ms"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="bench_cluster.py --json files")
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=GLOB",
        help="pool the runs whose file name matches GLOB apart, as NAME (repeatable)",
    )
    args = parser.parse_args(argv)
    if not args.group:
        print("\n".join(report("pooled", args.runs)))
        return 0
    for group in args.group:
        name, _, pattern = group.partition("=")
        chosen = [p for p in args.runs if p.match(pattern or name)]
        if not chosen:
            print(f"{name}: no run matches {pattern!r}", file=sys.stderr)
            continue
        print("\n".join(report(name, chosen)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

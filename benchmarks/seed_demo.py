"""Side by side: amm's AMM-on/AMM-off ratios on a replayed trace, next to Dask's on the workload.

amm's ratios come from replaying the trace on local agents (``amm replay``), AMM off then on,
``--repeat`` times (medians). Dask's come from the trace's metadata, measured with Dask's own
``MemorySampler`` when the trace was recorded, and, with ``--with-dask`` (needs the ``bench``
extra), measured again now on a Dask ``LocalCluster`` of the recorded shape. The targets: amm's
peak managed memory ratio at least as good as Dask's, with wall time within 5% of AMM off.

    python benchmarks/seed_demo.py                       # the committed trace, make demo's settings
    python benchmarks/seed_demo.py --repeat 3 --json seed.json
    python benchmarks/seed_demo.py --with-dask           # and Dask again, in the same run
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from amm.replay.command import ReplayOptions, run_replay
from amm.replay.report import HONESTY_NOTE, DaskFigures, amm_ratios, dask_figures
from amm.replay.trace import load_trace
from amm.tables import render_table

HERE = Path(__file__).resolve().parent
TRACE = HERE / "traces" / "dot-8000.json.gz"
ROWS = (
    ("peak_managed", "peak cluster memory, managed"),
    ("peak_process", "peak cluster memory, process"),
    ("process_added", "  process memory above the start"),
    ("wall", "wall time"),
    ("bytes_transferred", "bytes transferred"),
)
WALL_TOLERANCE = 0.05


def measure_dask(meta: dict[str, Any], repeat: int) -> DaskFigures | None:
    """Run the recorded workload on Dask again, AMM off and on (the bench extra's Dask)."""
    sys.path.insert(0, str(HERE))
    recorder: Any = importlib.import_module("record_dask_trace")
    shape = meta.get("workload_args", {"size": 8_000, "chunk": 1_000})
    cluster = meta.get("cluster", {})
    runs = recorder.record(
        shape["size"],
        shape["chunk"],
        cluster.get("workers", 8),
        cluster.get("memory_limit", "2GiB"),
        0.5,
        repeat,
    )
    modes = {"amm_off": recorder._mode(runs[False]), "amm_on": recorder._mode(runs[True])}
    return dask_figures({"dask": modes}, source="measured in this run")


def median_ratios(ratios: list[dict[str, float | None]]) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for key, _ in ROWS:
        values = [r[key] for r in ratios if r.get(key) is not None]
        result[key] = statistics.median(v for v in values if v is not None) if values else None
    return result


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--byte-scale", type=float, default=1 / 16)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="amm replays per mode (medians)")
    parser.add_argument("--with-dask", action="store_true", help="measure Dask again now")
    parser.add_argument("--dask-repeat", type=int, default=1, help="Dask runs per mode")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--progress", action="store_true", help="show the replay's progress bar")
    args = parser.parse_args(argv)

    trace = load_trace(args.trace)
    print(HONESTY_NOTE)
    print(f"trace: {args.trace.name}: {trace.meta.get('workload', '')}")
    print(f"amm: times x{args.time_scale:g}, sizes x{args.byte_scale:g}, {args.repeat} repeat(s)\n")
    ours: list[dict[str, float | None]] = []
    for i in range(args.repeat):
        options = ReplayOptions(
            trace=args.trace,
            workers=args.workers,
            modes=(False, True),
            time_scale=args.time_scale,
            byte_scale=args.byte_scale,
            progress=args.progress,
        )
        outcome = run_replay(options, out=io.StringIO())
        if not outcome.ok:
            print(outcome.report, file=sys.stderr)
            print("error: an end-state check failed", file=sys.stderr)
            return 1
        off, on = outcome.runs
        ratios = amm_ratios(off, on)
        ours.append(ratios)
        print(
            f"amm repeat {i + 1}: " + ", ".join(f"{key} {fmt(ratios[key])}" for key, _ in ROWS),
            flush=True,
        )
    amm = median_ratios(ours)
    columns: list[tuple[str, dict[str, float] | dict[str, float | None]]] = [("amm (replay)", amm)]
    recorded = dask_figures(trace.meta)
    if recorded is not None:
        columns.append(("Dask (recorded)", recorded.ratios()))
    now = None
    if args.with_dask:
        try:
            now = measure_dask(dict(trace.meta), args.dask_repeat)
        except ImportError as err:
            print(f"error: --with-dask needs the bench extra (pip install -e '.[bench]'): {err}")
            return 1
        if now is not None:
            columns.append(("Dask (now)", now.ratios()))
    rows = [[label, *(fmt(values.get(key)) for _, values in columns)] for key, label in ROWS]
    print()
    print(
        render_table(["AMM on / AMM off", *(name for name, _ in columns)], rows, right=range(1, 9))
    )
    print()
    reference = now or recorded
    verdicts = {}
    managed = amm["peak_managed"]
    if reference is not None and managed is not None:
        theirs = reference.ratios()["peak_managed"]
        verdicts["peak_managed_at_least_as_good_as_dask"] = managed <= theirs
        print(
            f"target: amm's peak managed ratio <= Dask's ({reference.source}): "
            f"{'met' if managed <= theirs else 'MISSED'} ({managed:.3f} vs {theirs:.3f})"
        )
    wall = amm["wall"]
    if wall is not None:
        verdicts["wall_within_5_percent"] = abs(wall - 1) <= WALL_TOLERANCE
        print(
            f"target: amm's wall time within 5% of AMM off: "
            f"{'met' if abs(wall - 1) <= WALL_TOLERANCE else 'MISSED'} ({wall - 1:+.1%})"
        )
    if args.json is not None:
        document = {
            "trace": args.trace.name,
            "time_scale": args.time_scale,
            "byte_scale": args.byte_scale,
            "amm_ratios": amm,
            "amm_repeats": ours,
            "dask_recorded": recorded.ratios() if recorded else None,
            "dask_now": now.ratios() if now else None,
            "targets": verdicts,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

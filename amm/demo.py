"""``python -m amm.demo`` (``make demo``): the headline result, made the way Dask's announcement
made it: cluster-wide memory over time while ``(A @ A.T).sum()`` runs, AMM off against AMM on.

It replays the trace committed at ``benchmarks/traces/dot-8000.json.gz`` (recorded from Dask on
8 single-threaded workers by ``benchmarks/record_dask_trace.py``) on 8 local agent processes,
once with the AMM off and once with it on, prints the table (peak managed and process memory,
wall time, bytes transferred, and the ratios, next to Dask's own) and writes
``demo-memory.png``. It is ``amm replay`` with settings that fit a 2-core machine in well under
3 minutes: times as recorded, sizes scaled by 1/16 (a recorded 8 MB chunk is put as 500 KB),
since moving the recorded 10 GB through Python agents on two cores would fall behind the
recorded schedule and change the very memory curve being measured.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from amm.cluster import ClusterError
from amm.errors import AmmError
from amm.replay.command import ReplayOptions, run_replay
from amm.replay.report import headline
from amm.replay.runner import ReplayError
from amm.replay.trace import TraceError

TRACE = Path(__file__).resolve().parent.parent / "benchmarks" / "traces" / "dot-8000.json.gz"
TIME_SCALE = 1.0
BYTE_SCALE = 1 / 16
PLOT = Path("demo-memory.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m amm.demo",
        description="Replay the committed Dask trace with the AMM off, then on; print the "
        "table and write the memory plot.",
    )
    parser.add_argument("--trace", type=Path, default=TRACE, metavar="PATH")
    parser.add_argument("--time-scale", type=float, default=TIME_SCALE, metavar="X")
    parser.add_argument("--byte-scale", type=float, default=BYTE_SCALE, metavar="X")
    parser.add_argument("--plot", type=Path, default=PLOT, metavar="PATH")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.trace.exists():
        print(
            f"demo failed: no trace at {args.trace}; run the demo from a clone of the "
            "repository (make demo), or give one with --trace",
            file=sys.stderr,
        )
        return 1
    options = ReplayOptions(
        trace=args.trace,
        modes=(False, True),
        time_scale=args.time_scale,
        byte_scale=args.byte_scale,
        plot=args.plot,
        progress=not args.no_progress,
    )
    started = time.monotonic()
    # Ctrl-C stops the demo even where SIGINT came ignored (``make demo &`` in a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        outcome = run_replay(options)
    except AmmError as err:
        print(f"\ndemo failed: {err.status.name}: {err.message}", file=sys.stderr)
        return 1
    except (TraceError, ReplayError, ClusterError, ImportError, ValueError) as err:
        print(f"\ndemo failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a demo: its local cluster is stopped on the way out, and a
        # traceback of the event loop's cancellation would only hide that.
        print("\ndemo interrupted; its cluster is stopped", file=sys.stderr)
        return 130
    summary = headline(outcome.runs, outcome.dask)
    if summary:
        print(f"\n{summary}")
    print(f"The demo took {time.monotonic() - started:.0f} s.")
    if not outcome.ok:
        print("demo failed: an end-state check failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m amm.demo`` (``make demo``): the headline result, made the way Dask's announcement
made it: cluster-wide memory over time while ``(A @ A.T).sum()`` runs, AMM off against AMM on.

It replays the trace committed at ``benchmarks/traces/dot-8000.json.gz`` (recorded from Dask on
8 single-threaded workers by ``benchmarks/record_dask_trace.py``) on 8 local agent processes,
once with the AMM stopped and once with it started, both on the same cluster, whose dashboard
(http://127.0.0.1:8787/, or another free port) shows it happen: the URL is printed first. The
first run's keys are forgotten, and the agents left to settle, before the second begins. Then it
prints the table (peak managed and process memory, wall time, bytes transferred, and the ratios,
next to Dask's own) and writes ``demo-memory.png``. It is ``amm replay`` with settings that fit
a 2-core machine in about a minute: times as recorded, sizes scaled by 1/4 (a recorded 8 MB
chunk is put as 2 MB), since moving the recorded 10 GB through Python agents on two cores
would fall behind the recorded schedule and change the very memory curve being measured. Run
in a terminal, it keeps the cluster and its dashboard up until Enter is pressed.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from amm.cluster import ClusterError, LocalCluster
from amm.errors import AmmError
from amm.replay.command import (
    ReplayOptions,
    ReplayOutcome,
    begin_replay,
    finish_replay,
    local_cluster,
    run_modes,
)
from amm.replay.report import headline
from amm.replay.runner import ReplayError
from amm.replay.trace import TraceError

TRACE = Path(__file__).resolve().parent.parent / "benchmarks" / "traces" / "dot-8000.json.gz"
TIME_SCALE = 1.0
BYTE_SCALE = 1 / 4
PLOT = Path("demo-memory.png")
#: The dashboard's port, as Dask's, when it is free.
DASHBOARD_PORT = 8787


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
    parser.add_argument(
        "--dashboard",
        default=None,
        metavar="HOST:PORT",
        help=f"serve the dashboard there (default: 127.0.0.1:{DASHBOARD_PORT} if free, else any "
        "free port; 'off' for none)",
    )
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="stop the cluster and its dashboard as soon as the results are printed (the "
        "default when not run in a terminal)",
    )
    return parser


def _summary(outcome: ReplayOutcome, started: float) -> None:
    summary = headline(outcome.runs, outcome.dask)
    if summary:
        print(f"\n{summary}")
    print(f"The demo took {time.monotonic() - started:.0f} s.", flush=True)


def _hold(cluster: LocalCluster) -> None:
    """Keep the cluster up, its dashboard showing both runs, until Enter (or Ctrl-C, or EOF)."""
    print(
        f"\nThe cluster and its dashboard (http://{cluster.dashboard}/) stay up: press Enter "
        "to stop them.",
        flush=True,
    )
    with contextlib.suppress(EOFError, KeyboardInterrupt):
        input()


def dashboard_listen(port: int = DASHBOARD_PORT) -> str:
    """``127.0.0.1:port`` if nothing holds that port, else ``127.0.0.1:0`` (any free one)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return "127.0.0.1:0"
    return f"127.0.0.1:{port}"


def _replay(args: argparse.Namespace, options: ReplayOptions, started: float) -> ReplayOutcome:
    """Both runs on one cluster with its dashboard; the cluster stays up while the user looks."""
    outcome = begin_replay(options, sys.stdout)
    listen = args.dashboard or dashboard_listen()
    dashboard = None if listen == "off" else listen
    with local_cluster(options, outcome.trace, dashboard=dashboard) as cluster:
        if cluster.dashboard is not None:
            print(
                f"\nDashboard: http://{cluster.dashboard}/  (open it now to watch the cluster's "
                "memory, the AMM off, then on)\n",
                flush=True,
            )
        run_modes(options, outcome, cluster=cluster)
        finish_replay(options, outcome, sys.stdout)
        _summary(outcome, started)
        interactive = sys.stdin.isatty() and sys.stdout.isatty()
        if cluster.dashboard is not None and interactive and not args.no_wait:
            _hold(cluster)
    return outcome


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
        outcome = _replay(args, options, started)
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
    if not outcome.ok:
        print("demo failed: an end-state check failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long a worker leaving with many keys holds the AMM's loop: its keys removed one at a time
(as before) against a ``Departure`` worked out in steps and taken in at once.

    PYTHONPATH=$PWD python benchmarks/bench_unregister.py [--keys 100000] [--holders 2] [--runs 5]

Prints, per way, the median CPU milliseconds of the longest stretch the loop is held (the one
call before; the taking in now) and of the longest step. The heap is frozen as the AMM keeps it,
and the collector paused as ``gc_paused`` does. CPU time: on a loaded machine wall time is
mostly other processes'.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

from amm_service.decisions.view import (
    ClusterState,
    Key,
    KeyReport,
    Memory,
    WorkerId,
    WorkerStatus,
)
from amm_service.runtime.workers.membership import DEPART_STEP


class OneAtATime(ClusterState):
    """The removal as it was."""

    def _forget_holdings(self, worker: WorkerId, departure: object = None) -> None:
        for key in self.held_by(worker):
            self._remove_holding(worker, key)


def build(state: ClusterState, nkeys: int, holders: int, nworkers: int = 4) -> WorkerId:
    """``nkeys`` keys on ``holders`` of ``nworkers`` workers each, one in 7 pinned; the worker
    that leaves holds ``nkeys * holders / nworkers``."""
    workers = [WorkerId(f"tcp://w{i}:1") for i in range(nworkers)]
    reports: dict[WorkerId, list[KeyReport]] = {w: [] for w in workers}
    for k in range(nkeys):
        for j in range(holders):
            worker = workers[(k + j) % nworkers]
            reports[worker].append(KeyReport(Key(f"k{k}"), 10, "c", pinned=k % 7 == 0))
    for worker in workers:
        state.register(worker, worker, "i", 0.0)
        state.apply_poll(
            worker,
            incarnation="i",
            version=1,
            full=True,
            keys=reports[worker],
            removed=[],
            memory=Memory(),
            status=WorkerStatus.RUNNING,
            name=worker,
            now=1.0,
        )
    state.snapshot()
    return workers[0]


def one_run(nkeys: int, holders: int, paced: bool) -> tuple[float, float, int]:
    """(longest hold, longest step, keys of the leaver), CPU milliseconds."""
    state = ClusterState(track_changes=True) if paced else OneAtATime(track_changes=True)
    leaver = build(state, nkeys, holders)
    held = len(state.held_by(leaver))
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        step = 0.0
        departure = None
        if paced:
            departure = state.depart(leaver)
            done = False
            while not done:
                start = time.process_time()
                done = state.prepare(departure, DEPART_STEP)
                step = max(step, time.process_time() - start)
        start = time.process_time()
        state.unregister(leaver, departure)
        hold = time.process_time() - start
    finally:
        gc.enable()
        gc.unfreeze()
    return hold * 1000, step * 1000, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--holders", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for _ in range(args.runs):  # alternating, so that load falls on both alike
        for paced in (False, True):
            results[paced].append(one_run(args.keys, args.holders, paced))
    print(f"{'way':<26}{'leaver keys':>12}{'hold ms':>10}{'step ms':>10}")
    for paced, runs in results.items():
        way = "departure (now)" if paced else "one key at a time (before)"
        hold = statistics.median(r[0] for r in runs)
        step = statistics.median(r[1] for r in runs)
        steps = f"{step:>10.1f}" if paced else f"{'-':>10}"
        print(f"{way:<26}{runs[0][2]:>12}{hold:>10.1f}{steps}")
    with open("/proc/loadavg") as f:
        print("load:", f.read().split()[:3])


if __name__ == "__main__":
    main()

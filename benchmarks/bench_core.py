"""How long one AMM cycle's decision takes: snapshot + plan with ReduceReplicas.

Dask's AMM takes about 35 µs per replicated key (3.5 s for 100k keys with 4 replicas each); the
target here is at least 10x cheaper. This measures the pure part of the cycle (no network):
building the frozen view from the cluster state, then planning every drop. ``again`` is the
next cycle's plan, CPU seconds: the same policy, every drop in flight and nothing changed (it
looks at no key, and does not walk the ledger). ``peak`` is the most Python memory traced
(``tracemalloc``) from the first poll merged to every directive of the first plan in the ledger,
in bytes per key: the state, a snapshot and the directives in flight (not the interpreter, gRPC,
or the messages on the wire; ``bench_cluster.py`` reports the AMM's RSS).

    python benchmarks/bench_core.py                    # the default sizes
    python benchmarks/bench_core.py --keys 100000 --replicas 4 --workers 100 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

from amm_service.decisions.core import PlanConfig, plan
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus
from amm_service.policies.reduce_replicas import ReduceReplicas


def build(keys: int, replicas: int, workers: int) -> ClusterState:
    state = ClusterState()
    ids = [WorkerId(f"10.0.{w // 250}.{w % 250}:7000") for w in range(workers)]
    held: dict[WorkerId, list[KeyReport]] = {w: [] for w in ids}
    for k in range(keys):
        report = KeyReport(Key(f"key-{k}"), 1000 + k % 977, f"{k:064x}")
        for r in range(replicas):
            held[ids[(k + r * 7) % workers]].append(report)
    for n, w in enumerate(ids):
        state.register(w, str(w), "i", now=0.0)
        mem = 1_000_000 * (n + 1)
        state.apply_poll(
            w,
            incarnation="i",
            version=1,
            full=True,
            keys=held[w],
            removed=(),
            memory=Memory(mem, mem, 0, mem, 0),
            status=WorkerStatus.RUNNING,
            name=str(w),
            now=1.0,
        )
    return state


def _ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: str(next(counter))


def traced_peak(keys: int, replicas: int, workers: int) -> int:
    """The most memory traced while the state is built, snapshotted and planned on, and the
    plan's directives are entered in a ledger (what a first cycle holds at once), in bytes."""
    tracemalloc.start()
    try:
        state = build(keys, replicas, workers)
        ledger = Ledger()
        result = plan(
            state.snapshot(), [ReduceReplicas()], ledger, PlanConfig("optimistic", 1), _ids()
        )
        for directive in result.directives:
            ledger.add(directive, 0.0)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def measure(keys: int, replicas: int, workers: int, repeat: int) -> dict[str, float]:
    peak = traced_peak(keys, replicas, workers)
    state = build(keys, replicas, workers)
    best_snapshot = best_plan = float("inf")
    directives = 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        view = state.snapshot()
        t1 = time.perf_counter()
        result = plan(
            view,
            [ReduceReplicas()],
            Ledger(),
            PlanConfig("optimistic", 1),
            _ids(),
        )
        t2 = time.perf_counter()
        best_snapshot, best_plan = min(best_snapshot, t1 - t0), min(best_plan, t2 - t1)
        directives = len(result.directives)
    policy, ledger = ReduceReplicas(), Ledger()
    first = plan(state.snapshot(), [policy], ledger, PlanConfig("optimistic", 1), _ids())
    for directive in first.directives:
        ledger.add(directive, 0.0)
    best_again = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        again = plan(state.snapshot(), [policy], ledger, PlanConfig("optimistic", 1), _ids())
        best_again = min(best_again, time.process_time() - c0)
        assert not again.directives, "nothing changed: nothing to plan"
    total = best_snapshot + best_plan
    return {
        "keys": keys,
        "replicas": replicas,
        "workers": workers,
        "directives": directives,
        "snapshot_s": best_snapshot,
        "plan_s": best_plan,
        "cycle_s": total,
        "again_cpu_s": best_again,
        "us_per_replicated_key": total / keys * 1e6,
        "dask_us_per_replicated_key": 35.0,
        "speedup_vs_dask": 35.0 / (total / keys * 1e6),
        "peak_traced_bytes": peak,
        "peak_traced_bytes_per_key": peak / keys,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = [measure(k, args.replicas, args.workers, args.repeat) for k in args.keys]
    print(
        f"{'keys':>8} {'replicas':>8} {'workers':>7} {'drops':>8} {'snapshot':>10} "
        f"{'plan':>10} {'µs/key':>8} {'vs Dask':>8} {'again':>10} {'peak':>10} {'B/key':>6}"
    )
    for r in rows:
        print(
            f"{r['keys']:>8} {r['replicas']:>8} {r['workers']:>7} {r['directives']:>8} "
            f"{r['snapshot_s'] * 1e3:>8.1f}ms {r['plan_s'] * 1e3:>8.1f}ms "
            f"{r['us_per_replicated_key']:>8.2f} {r['speedup_vs_dask']:>7.1f}x "
            f"{r['again_cpu_s'] * 1e3:>6.1f}ms cpu "
            f"{r['peak_traced_bytes'] / 2**20:>6.1f}MiB {r['peak_traced_bytes_per_key']:>6.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Record a Dask computation as a trace that ``amm replay`` plays back on an amm cluster.

Runs the workload on a Dask ``LocalCluster`` twice in one process: first with Dask's Active Memory
Manager off (the trace is taken from this run), then with it on. Both runs sample cluster-wide
memory with Dask's own ``distributed.diagnostics.MemorySampler`` (managed and process), so the
trace carries Dask's AMM on/off figures measured in the same recording, next to the versions and
the cluster's shape.

For every task the trace holds: its key, the worker it ran on, when the scheduler sent it to that
worker (``queued``), when it started and stopped computing, its input keys and its output size.
Times are seconds from the moment the computation was submitted.

Needs the ``bench`` extra (``pip install -e '.[bench]'``)::

    python benchmarks/record_dask_trace.py                       # dot product, 8 workers
    python benchmarks/record_dask_trace.py --size 4000 --chunk 1000 -o /tmp/dot-4000.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import dask
    import dask.array as da
    import distributed
    import numpy
    from distributed import Client, LocalCluster
    from distributed.diagnostics import MemorySampler
    from distributed.diagnostics.plugin import SchedulerPlugin
except ImportError as missing:  # pragma: no cover - depends on the environment
    sys.exit(f"{missing}: install the bench extra first: pip install -e '.[bench]'")

DEFAULT_OUTPUT = Path(__file__).parent / "traces" / "dot-8000.json.gz"
TRACE_FORMAT = "amm-trace/1"
PLUGIN_NAME = "amm-trace-recorder"


class TraceRecorder(SchedulerPlugin):  # type: ignore[misc]
    """Scheduler plugin: when each task was sent to a worker, and what it reported when done.

    Runs inside the scheduler (shipped there by value, as this module is ``__main__``), so it only
    collects plain values; ``collect`` is called through ``run_on_scheduler``.
    """

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.queued: dict[str, float] = {}
        self.tasks: list[dict[str, Any]] = []
        self.scheduler: Any = None

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        name = str(key)
        if finish == "processing":
            self.queued[name] = time.time()
        elif start == "processing" and finish == "memory":
            ts = self.scheduler.tasks[key]
            compute = [s for s in kwargs.get("startstops", ()) if s["action"] == "compute"]
            worker = kwargs["worker"]
            self.tasks.append(
                {
                    "key": name,
                    "worker": self.scheduler.workers[worker].name,
                    "queued": self.queued.get(name),
                    "start": compute[0]["start"] if compute else None,
                    "stop": compute[-1]["stop"] if compute else None,
                    "inputs": sorted(str(dep.key) for dep in ts.dependencies),
                    "nbytes": int(kwargs.get("nbytes") or ts.nbytes or 0),
                }
            )


def collect(dask_scheduler: Any) -> list[dict[str, Any]]:
    plugin: TraceRecorder = dask_scheduler.plugins[PLUGIN_NAME]
    tasks, plugin.tasks, plugin.queued = plugin.tasks, [], {}
    return tasks


def dot_workload(size: int, chunk: int) -> Callable[[], Any]:
    """``(A @ A.T).sum()``, A a ``size`` x ``size`` random array in ``chunk`` x ``chunk`` chunks."""

    def build() -> Any:
        a = da.random.random((size, size), chunks=(chunk, chunk))
        return (a @ a.T).sum()

    return build


def incoming_bytes(dask_worker: Any) -> int:
    """Bytes this worker fetched from peers, from its transfer log."""
    return sum(int(entry["total"]) for entry in dask_worker.transfer_incoming_log)


def run_once(
    build: Callable[[], Any], *, amm: bool, workers: int, memory_limit: str, interval: float
) -> dict[str, Any]:
    """One run on a fresh cluster: the tasks it ran, its wall time, peak memory, transfers."""
    config = {
        "distributed.scheduler.active-memory-manager.start": amm,
        "distributed.scheduler.active-memory-manager.interval": "2s",
        # Keep every transfer in the workers' logs, to add up the bytes they moved.
        "distributed.admin.low-level-log-length": 1_000_000,
    }
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(TraceRecorder())
        collection = build()
        managed, process = MemorySampler(), MemorySampler()
        with (
            managed.sample("managed", measure="managed", interval=interval),
            process.sample("process", measure="process", interval=interval),
        ):
            submitted = time.time()
            result = client.compute(collection)
            value = result.result()
            wall = time.time() - submitted
            output_keys = [str(result.key)]
        tasks = client.run_on_scheduler(collect)
        transferred = sum(client.run(incoming_bytes).values())
        del result
    return {
        "amm": amm,
        "wall_seconds": wall,
        "submitted": submitted,
        "peak_managed_bytes": max(v for _, v in managed.samples["managed"]),
        "peak_process_bytes": max(v for _, v in process.samples["process"]),
        "start_process_bytes": process.samples["process"][0][1],
        "bytes_transferred": transferred,
        "memory_samples": {
            "managed": [(t - submitted, v) for t, v in managed.samples["managed"]],
            "process": [(t - submitted, v) for t, v in process.samples["process"]],
        },
        "tasks": tasks,
        "outputs": output_keys,
        "result": float(value),
    }


def _summary(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "wall_seconds": round(run["wall_seconds"], 3),
        "peak_managed_bytes": run["peak_managed_bytes"],
        "peak_process_bytes": run["peak_process_bytes"],
        "start_process_bytes": run["start_process_bytes"],
        "bytes_transferred": run["bytes_transferred"],
        "tasks": len(run["tasks"]),
    }


def _mode(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A mode's figures: medians over its runs, each run, and the first run's memory curves."""
    summaries = [_summary(run) for run in runs]
    medians = {
        field: statistics.median(s[field] for s in summaries)
        for field in (
            "wall_seconds",
            "peak_managed_bytes",
            "peak_process_bytes",
            "start_process_bytes",
            "bytes_transferred",
        )
    }
    samples = {
        measure: [[round(t, 3), v] for t, v in series]
        for measure, series in runs[0]["memory_samples"].items()
    }
    return {**medians, "runs": summaries, "memory_samples": samples}


def to_trace(
    off: list[dict[str, Any]], on: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
    """The trace document: the first AMM-off run's tasks, times relative to its submission."""
    first = off[0]
    t0 = first["submitted"]

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t0, 6)

    tasks = [
        {
            **task,
            "queued": rel(task["queued"]),
            "start": rel(task["start"]),
            "stop": rel(task["stop"]),
        }
        for task in sorted(first["tasks"], key=lambda t: (t["start"], t["key"]))
    ]
    return {
        "format": TRACE_FORMAT,
        "meta": {**meta, "dask": {"amm_off": _mode(off), "amm_on": _mode(on)}},
        "outputs": first["outputs"],
        "tasks": tasks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8_000, help="A is SIZE x SIZE")
    parser.add_argument("--chunk", type=int, default=1_000, help="chunks are CHUNK x CHUNK")
    parser.add_argument("--workers", type=int, default=8, help="single-threaded Dask workers")
    parser.add_argument("--memory-limit", default="2GiB", help="per Dask worker")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling, seconds")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per mode; the figures are medians"
    )
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    runs = record(
        args.size, args.chunk, args.workers, args.memory_limit, args.interval, args.repeat
    )
    meta = {
        "workload": f"(A @ A.T).sum(), A = da.random.random(({args.size}, {args.size}), "
        f"chunks=({args.chunk}, {args.chunk}))",
        "workload_args": {"size": args.size, "chunk": args.chunk},
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cluster": {
            "workers": args.workers,
            "threads_per_worker": 1,
            "memory_limit": args.memory_limit,
            "processes": True,
            "cpu_count": os.cpu_count(),
        },
        "dask_amm": {"policy": "ReduceReplicas (default)", "interval": "2s"},
        "memory_sampler": {"measures": ["managed", "process"], "interval": args.interval},
        "repeats": args.repeat,
        "versions": versions(),
        "note": "tasks are from the first AMM-off run; times are seconds since the computation "
        "was submitted; worker is the Dask worker's name; Dask's figures are medians over the "
        "runs of each mode, which alternated (off, on, on, off, ...)",
    }
    trace = to_trace(runs[False], runs[True], meta)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.output, "wt", encoding="utf-8", compresslevel=9) as out:
        json.dump(trace, out, separators=(",", ":"))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} kB)")
    ratios = dask_ratios(trace["meta"]["dask"])
    print("Dask AMM on/off (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    return 0


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": numpy.__version__,
    }


def record(
    size: int, chunk: int, workers: int, memory_limit: str, interval: float, repeat: int
) -> dict[bool, list[dict[str, Any]]]:
    """Run the dot product ``repeat`` times per mode, alternating which mode goes first."""
    build = dot_workload(size, chunk)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for i in range(repeat):
        for amm in (False, True) if i % 2 == 0 else (True, False):
            label = "on" if amm else "off"
            print(f"run {i + 1}/{repeat}: (A @ A.T).sum() with Dask's AMM {label} ...", flush=True)
            run = run_once(
                build, amm=amm, workers=workers, memory_limit=memory_limit, interval=interval
            )
            runs[amm].append(run)
            print(
                f"  {len(run['tasks'])} tasks in {run['wall_seconds']:.1f} s, peak managed "
                f"{run['peak_managed_bytes'] / 2**30:.2f} GiB, process "
                f"{run['peak_process_bytes'] / 2**30:.2f} GiB, transferred "
                f"{run['bytes_transferred'] / 2**30:.2f} GiB",
                flush=True,
            )
    return runs


def dask_ratios(dask_meta: dict[str, Any]) -> dict[str, float]:
    off, on = dask_meta["amm_off"], dask_meta["amm_on"]
    fields = ("peak_managed_bytes", "peak_process_bytes", "wall_seconds", "bytes_transferred")
    return {field: on[field] / off[field] for field in fields if off.get(field)}


if __name__ == "__main__":
    sys.exit(main())

"""What the dashboard's history costs the AMM: one sample per cycle, and a full read of it.

In process, no servers: ``History.record`` for a cluster of W workers (the hook that runs at the
end of every cycle, which encodes the sample's JSON), and the JSON of the full history that
``/api/history?after=0`` answers (what a page that just opened asks for), for several W. Times
are medians of ``--repeat``.

    python benchmarks/bench_dashboard.py                   # W = 10, 100, 1000
    python benchmarks/bench_dashboard.py --workers 10 5000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from amm.tables import render_table
from amm_service.decisions.view import Memory, WorkerId, WorkerStatus, WorkerView
from amm_service.runtime.observe.history import History
from amm_service.runtime.records.outcomes import Totals


def workers(n: int) -> list[WorkerView]:
    return [
        WorkerView(
            address=WorkerId(f"10.0.{i // 250}.{i % 250}:50061"),
            name=f"w{i}",
            status=WorkerStatus.RUNNING,
            memory=Memory(process=2 << 30, managed=1 << 30, limit=4 << 30),
        )
        for i in range(n)
    ]


def measure(n: int, repeat: int) -> dict[str, Any]:
    views, totals = workers(n), Totals()
    history = History()
    record_s: list[float] = []
    cycle = 0

    def record() -> None:
        """One cycle's sample of the same ``n`` workers."""
        nonlocal cycle
        cycle += 1
        history.record(
            at=float(cycle),
            cycle=cycle,
            running=True,
            workers=views,
            totals=totals,
            rejected=0,
            keys=0,
            replicas=0,
            lost=0,
            goals=(0, 0),
        )

    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(100):
            record()
        record_s.append((time.perf_counter() - t0) / 100)
    while len(history) < 2_700 and (len(history) + 1) * n <= 100_000:
        record()
    read_s, size = [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        body = history.json_after(0)
        read_s.append(time.perf_counter() - t0)
        size = len(body)
    return {
        "workers": n,
        "record_us": statistics.median(record_s) * 1e6,
        "samples_kept": len(history),
        "full_read_ms": statistics.median(read_s) * 1e3,
        "full_read_bytes": size,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    rows = [measure(n, args.repeat) for n in args.workers]
    print(
        render_table(
            ("WORKERS", "RECORD/CYCLE", "SAMPLES KEPT", "FULL READ", "JSON"),
            [
                (
                    str(r["workers"]),
                    f"{r['record_us']:.0f} µs",
                    str(r["samples_kept"]),
                    f"{r['full_read_ms']:.0f} ms",
                    f"{r['full_read_bytes'] / 1e6:.1f} MB",
                )
                for r in rows
            ],
        )
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

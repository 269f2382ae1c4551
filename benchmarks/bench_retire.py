"""Retiring a worker holding 1 GiB, timed as a user sees it, several times: the median says more
than one run on a shared machine.

Each run starts a fresh ``LocalCluster`` (N agent processes, the AMM running), puts 16 distinct
values (``--bytes`` in all) on the last worker, and times ``client.retire_workers([it])`` (the
client's default: close its agent at the end) until it returns. This is ``bench_cluster.py``'s
retire phase alone, without the rest of that benchmark's set-up, so that two checkouts can be
compared run for run:

    python benchmarks/bench_retire.py --runs 5
    PYTHONPATH=/other/checkout python /other/checkout/../bench_retire.py --runs 5 --json b.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from amm import AsyncClient, LocalCluster
from amm.base.units import format_bytes, parse_size
from amm.tables import render_table

#: How many values make up the bytes retired (as in ``bench_cluster.py``).
VALUES = 16


def make_values(total: int) -> dict[str, bytes]:
    """``VALUES`` distinct values of ``total`` bytes in all (one random body, numbered)."""
    size = max(8, total // VALUES)
    body = os.urandom(size - 8)
    return {f"retire-{i:02}": i.to_bytes(8, "little") + body for i in range(VALUES)}


async def _one(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncClient(cluster.address, timeout=max(60.0, args.timeout)) as client:
        *_, last = sorted((await client.has_what()).keys())
        values = make_values(args.bytes)
        await client.put_many(values, workers=last)
        await client.who_has(list(values), fresh=True)  # the AMM knows what it holds
        await client.amm.start()
        started = time.perf_counter()
        (result,) = await client.retire_workers([last], timeout=args.timeout)
        seconds = time.perf_counter() - started
        placement = await client.who_has(list(values), fresh=True)
        moved = all(placement.get(key) and last not in placement[key] for key in values)
        return {
            "retire_s": seconds,
            "gb_s": sum(map(len, values.values())) / seconds / 1e9,
            "retired": result.retired,
            "closed": result.closed,
            "moved": moved,
            "reason": result.reason,
        }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for number in range(1, args.runs + 1):
        with LocalCluster(args.workers, interval=args.interval, start=False) as cluster:
            figures = asyncio.run(_one(cluster, args))
        figures["loadavg"] = os.getloadavg()[0]
        runs.append(figures)
        print(
            f"run {number}: {figures['retire_s']:.2f} s"
            + ("" if figures["retired"] and figures["moved"] else f" ({figures['reason']})"),
            flush=True,
        )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh clusters, one retirement each")
    parser.add_argument("--workers", type=int, default=4, help="agent processes (>= 2)")
    parser.add_argument("--bytes", type=parse_size, default=parse_size("1GiB"), help="bytes held")
    parser.add_argument("--interval", type=float, default=0.5, help="the AMM's interval, s")
    parser.add_argument("--timeout", type=float, default=120.0, help="the retirement's, s")
    parser.add_argument("--json", type=Path, help="write every run's figures there")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2 (a retirement needs somewhere to go)")
    print(
        f"retire a worker holding {format_bytes(args.bytes)} in {VALUES} values, "
        f"{args.workers} agents, interval {args.interval:g} s, {args.runs} runs",
        flush=True,
    )
    runs = run(args)
    times = [r["retire_s"] for r in runs]
    ok = all(r["retired"] and r["moved"] for r in runs)
    rows = [
        ("median", f"{statistics.median(times):.2f} s"),
        ("min / max", f"{min(times):.2f} / {max(times):.2f} s"),
        ("median throughput", f"{statistics.median(r['gb_s'] for r in runs):.2f} GB/s"),
        ("every run retired, keys moved", "yes" if ok else "NO"),
        ("load average (1 min) during runs", " ".join(f"{r['loadavg']:.1f}" for r in runs)),
    ]
    print(render_table(("figure", "value"), rows))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2)
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

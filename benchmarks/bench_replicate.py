"""Replicating 1 GiB to n=2, traced from the agents' side, several times: where the time goes.

Each run starts a fresh ``LocalCluster`` (N agent processes), puts 16 distinct values (``--bytes``
in all) on the first worker, starts the AMM and sets the ``replicate`` goal n=2, as
``bench_cluster.py``'s replicate phase does; done is when a fresh ``who_has`` (every agent asked)
shows 2 copies of every value, its figure. Meanwhile each agent is asked directly for the values
(HoldsKeys, one call at a time, every ``--probe-every`` s), which says

- when the copies landed on each agent (first and last, seconds after the goal was set), and
- how long an agent took to answer a control call while receiving (p50 and max): an event loop
  held by a transfer shows here first;

and the agents' CPU seconds for the whole replication. Two checkouts compare run for run:

    python benchmarks/bench_replicate.py --runs 5
    PYTHONPATH=/other/checkout python /other/checkout/benchmarks/bench_replicate.py --runs 5
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

import grpc
import psutil

from amm import AsyncClient, LocalCluster
from amm.base.units import format_bytes, parse_size
from amm.tables import render_table
from amm.v1 import agent_pb2, agent_pb2_grpc

#: How many values make up the bytes replicated (as in ``bench_cluster.py``).
VALUES = 16
#: Seconds between two reads of ``who_has(fresh=True)`` (``bench_cluster.py``'s ``CHECK_EVERY``).
CHECK_EVERY = 0.1


def make_values(total: int) -> dict[str, bytes]:
    """``VALUES`` distinct values of ``total`` bytes in all (one random body, numbered)."""
    size = max(8, total // VALUES)
    body = os.urandom(size - 8)
    return {f"replicate-{i:02}": i.to_bytes(8, "little") + body for i in range(VALUES)}


async def _probe(
    address: str, keys: list[str], every: float, started: float, stop: asyncio.Event
) -> list[tuple[float, float, int]]:
    """(seconds since ``started`` the answer came, its latency, values held) per call."""
    answers = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.WorkerAgentStub(channel)
        request = agent_pb2.HoldsKeysRequest(keys=keys)
        while not stop.is_set():
            sent = time.perf_counter()
            answer = await stub.HoldsKeys(request, timeout=60)
            came = time.perf_counter()
            answers.append((came - started, came - sent, len(answer.keys)))
            await asyncio.sleep(every)
    return answers


async def _one(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    async with AsyncClient(cluster.address, timeout=max(60.0, args.timeout)) as client:
        first, *others = sorted((await client.has_what()).keys())
        values = make_values(args.bytes)
        keys = list(values)
        await client.put_many(values, workers=first)
        await client.who_has(keys, fresh=True)  # the AMM knows the keys: a goal needs it
        await client.amm.start()
        agents = [psutil.Process(pid) for pid in cluster.worker_pids.values()]
        cpu_before = sum(sum(p.cpu_times()[:2]) for p in agents)
        stop = asyncio.Event()
        started = time.perf_counter()
        probes = [
            asyncio.create_task(_probe(w, keys, args.probe_every, started, stop)) for w in others
        ]
        await client.replicate(keys, n=2)
        done: float | None = None
        while time.perf_counter() - started < args.timeout:
            holders = await client.who_has(keys, fresh=True)
            if all(len(holders.get(key, ())) >= 2 for key in keys):
                done = time.perf_counter() - started
                break
            await asyncio.sleep(CHECK_EVERY)
        stop.set()
        answers = await asyncio.gather(*probes)
        cpu = sum(sum(p.cpu_times()[:2]) for p in agents) - cpu_before
        await client.replicate(keys, n=1)
    latencies = sorted(latency for per_agent in answers for _, latency, _ in per_agent)
    landed = [came for per_agent in answers for came, _, held in per_agent if held]
    return {
        "replicate_s": done,
        "gb_s": None if done is None else sum(map(len, values.values())) / done / 1e9,
        "first_copy_seen_s": min(landed, default=None),
        "agent_call_p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "agent_call_max_ms": 1000 * latencies[-1] if latencies else None,
        "agents_cpu_s": cpu,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for number in range(1, args.runs + 1):
        with LocalCluster(args.workers, interval=args.interval, start=False) as cluster:
            figures = asyncio.run(_one(cluster, args))
        figures["loadavg"] = os.getloadavg()[0]
        runs.append(figures)
        took = figures["replicate_s"]
        print(
            f"run {number}: "
            + (f"{took:.2f} s" if took is not None else f"not done in {args.timeout:g} s")
            + f", agents answered in {figures['agent_call_max_ms']:.0f} ms at worst",
            flush=True,
        )
    return runs


def _median(runs: list[dict[str, Any]], name: str) -> float:
    return float(statistics.median(r[name] for r in runs if r[name] is not None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh clusters, one replication each")
    parser.add_argument("--workers", type=int, default=4, help="agent processes (>= 2)")
    parser.add_argument(
        "--bytes", type=parse_size, default=parse_size("1GiB"), help="bytes replicated"
    )
    parser.add_argument("--interval", type=float, default=0.5, help="the AMM's interval, s")
    parser.add_argument("--timeout", type=float, default=120.0, help="each replication's, s")
    parser.add_argument(
        "--probe-every", type=float, default=0.01, help="s between two HoldsKeys of an agent"
    )
    parser.add_argument("--json", type=Path, help="write every run's figures there")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be at least 2 (a copy needs somewhere to go)")
    print(
        f"replicate {format_bytes(args.bytes)} in {VALUES} values to n=2, {args.workers} agents, "
        f"interval {args.interval:g} s, {args.runs} runs",
        flush=True,
    )
    runs = run(args)
    ok = all(r["replicate_s"] is not None for r in runs)
    rows = [
        (
            "goal set -> every copy seen (fresh who_has), median",
            f"{_median(runs, 'replicate_s'):.2f} s",
        ),
        ("  throughput, median", f"{_median(runs, 'gb_s'):.3f} GB/s"),
        ("first copy seen on an agent, median", f"{_median(runs, 'first_copy_seen_s'):.2f} s"),
        ("agents' HoldsKeys while receiving, p50", f"{_median(runs, 'agent_call_p50_ms'):.1f} ms"),
        ("  max (median of the runs' max)", f"{_median(runs, 'agent_call_max_ms'):.0f} ms"),
        ("agents' CPU, median", f"{_median(runs, 'agents_cpu_s'):.2f} s"),
        ("every run done", "yes" if ok else "NO"),
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

"""How promptly an agent answers while it drops a large batch: the agent's part of a fresh WhoHas.

Two real agent processes (``python -m worker_agent``, standalone, no AMM) each hold ``--keys``
keys; this script plays the AMM and sends agent A a DROP of every key, ``--per-message`` per
Directives message as the AMM sends them, naming B as the keeper. Meanwhile it asks A, one call
at a time, which of one key it holds (``HoldsKeys``, what the AMM asks for a fresh WhoHas) and
for its inventory changes (an incremental ``Poll``, what a cycle asks). It prints the latency of
both (p50/p99/max), how long the batch took, the CPU seconds agent A and B spent, and the load
average: wall times on a shared machine stretch with its load, CPU seconds do not.

    python benchmarks/bench_agent_latency.py                     # 100,000 keys, 5,000 per message
    python benchmarks/bench_agent_latency.py --keys 20000 --json agent.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.cluster import AGENT_READY, LocalProcess
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2

STOP_TIMEOUT = 10.0


def _agent(name: str) -> LocalProcess:
    argv = [sys.executable, "-m", "worker_agent", "--listen", "127.0.0.1:0", "--name", name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return LocalProcess(name, argv, AGENT_READY, env, None)


def _quantiles(values: list[float]) -> dict[str, float | None]:
    ordered = sorted(values)

    def at(q: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

    return {"p50_ms": _ms(at(0.5)), "p99_ms": _ms(at(0.99)), "max_ms": _ms(at(1.0))}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _put_messages(keys: list[str], data: bytes) -> Iterator[agent_pb2.PutManyRequest]:
    for start in range(0, len(keys), 10_000):
        items = [agent_pb2.PutItem(key=k, data=data) for k in keys[start : start + 10_000]]
        yield agent_pb2.PutManyRequest(items=items)


async def _probe(
    stub: agent_pb2_grpc.WorkerAgentAsyncStub,
    key: str,
    stop: asyncio.Event,
    lookups: list[float],
    polls: list[float],
) -> None:
    version = (await stub.Poll(agent_pb2.PollRequest(max_keys=1))).version
    incarnation = (await stub.Poll(agent_pb2.PollRequest(max_keys=1))).incarnation
    while not stop.is_set():
        started = time.perf_counter()
        await stub.HoldsKeys(agent_pb2.HoldsKeysRequest(keys=[key]), timeout=60)
        lookups.append(time.perf_counter() - started)
        started = time.perf_counter()
        # Since the version last seen, as a cycle polls: a page of the drops applied since.
        answer = await stub.Poll(
            agent_pb2.PollRequest(since_version=version, incarnation=incarnation), timeout=60
        )
        polls.append(time.perf_counter() - started)
        version = answer.version
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.02)


async def measure(args: argparse.Namespace, a: LocalProcess, b: LocalProcess) -> dict[str, Any]:
    data = b"x" * args.value_bytes
    digest = checksum(data)
    keys = [f"key-{i:07d}" for i in range(args.keys)]
    async with (
        grpc.aio.insecure_channel(a.address, options=CHANNEL_OPTIONS) as channel_a,
        grpc.aio.insecure_channel(b.address, options=CHANNEL_OPTIONS) as channel_b,
    ):
        stub_a = agent_pb2_grpc.WorkerAgentStub(channel_a)
        stub_b = agent_pb2_grpc.WorkerAgentStub(channel_b)
        for stub in (stub_a, stub_b):
            await stub.PutMany(_put_messages(keys, data))
        messages = [
            agent_pb2.DirectivesRequest(
                batch=[
                    types_pb2.Directive(
                        id=f"drop-{key}",
                        op=types_pb2.DIRECTIVE_OP_DROP,
                        key=key,
                        checksum=digest,
                        holders=[b.address],
                    )
                    for key in keys[start : start + args.per_message]
                ]
            )
            for start in range(0, len(keys), args.per_message)
        ]
        processes = [psutil.Process(a.popen.pid), psutil.Process(b.popen.pid)]
        cpu0 = [sum(p.cpu_times()[:2]) for p in processes]
        lookups: list[float] = []
        polls: list[float] = []
        stop = asyncio.Event()
        probe = asyncio.create_task(_probe(stub_a, keys[-1], stop, lookups, polls))

        async def requests() -> AsyncIterator[agent_pb2.DirectivesRequest]:
            for message in messages:
                yield message
            await stop.wait()  # the stream stays open until every outcome is in

        started = time.perf_counter()
        outcomes: dict[int, int] = {}
        call = stub_a.Directives(requests())
        async for response in call:
            for outcome in response.batch:
                outcomes[outcome.status] = outcomes.get(outcome.status, 0) + 1
            if sum(outcomes.values()) >= len(keys):
                break
        elapsed = time.perf_counter() - started
        stop.set()
        call.cancel()
        await probe
        cpu = [sum(p.cpu_times()[:2]) - c for p, c in zip(processes, cpu0, strict=True)]
        left = len((await stub_a.HoldsKeys(agent_pb2.HoldsKeysRequest(keys=keys[:10_000]))).keys)
    return {
        "batch_s": elapsed,
        "applied": outcomes.get(types_pb2.OUTCOME_STATUS_APPLIED, 0),
        "not_applied": len(keys) - outcomes.get(types_pb2.OUTCOME_STATUS_APPLIED, 0),
        "left_of_first_10k": left,
        "cpu_dropper_s": cpu[0],
        "cpu_keeper_s": cpu[1],
        "holds_keys": {"calls": len(lookups), **_quantiles(lookups)},
        "poll": {"calls": len(polls), **_quantiles(polls)},
    }


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=5_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_start = os.getloadavg()
    agents = [_agent("dropper"), _agent("keeper")]
    try:
        deadline = time.monotonic() + 60
        for agent in agents:
            agent.wait_ready(deadline)
        figures = asyncio.run(measure(args, *agents))
    finally:
        for agent in agents:
            agent.signal(signal.SIGTERM)
        for agent in agents:
            agent.wait(STOP_TIMEOUT)
    load_end = os.getloadavg()
    lookups, polls = figures["holds_keys"], figures["poll"]
    print(f"{args.keys:,} drops on one agent, {args.per_message:,} per message, keeper on another")
    print(f"  batch                      {figures['batch_s']:.2f} s")
    print(f"  applied / not applied      {figures['applied']:,} / {figures['not_applied']:,}")
    print(f"  CPU dropper / keeper       {figures['cpu_dropper_s']:.2f} / ", end="")
    print(f"{figures['cpu_keeper_s']:.2f} s")
    for name, row in (("HoldsKeys([1 key])", lookups), ("Poll (incremental)", polls)):
        print(
            f"  {name:<26} p50 {_fmt(row['p50_ms'])} ms, p99 {_fmt(row['p99_ms'])} ms, "
            f"max {_fmt(row['max_ms'])} ms ({row['calls']} calls)"
        )
    print(
        "load average at start "
        + " ".join(f"{x:.2f}" for x in load_start)
        + ", at end "
        + " ".join(f"{x:.2f}" for x in load_end)
    )
    if args.json is not None:
        document: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "json"}}
        document |= {"load_average": {"start": load_start, "end": load_end}, **figures}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

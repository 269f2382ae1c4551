"""Peak memory of an agent with a memory limit under data in flight (issue 10).

One standalone agent (``python -m worker_agent --memory-limit LIMIT``) runs as a process; its
resident set size is sampled every 5 ms while

- ``puts``: N Puts of S bytes each (``amm.AsyncClient.put``, distinct keys) start at once; the
  table counts those stored, those refused RESOURCE_EXHAUSTED and any other status (before the
  fix: ``INTERNAL: Internal error from Core`` for some);
- ``unread``: one value of S bytes is stored, then N Gets of it are opened and read no further
  than their header, for ``--hold`` seconds, then cancelled.

The figure is the peak RSS above the RSS before the scenario. Run it against another checkout
by pointing PYTHONPATH at it (the agent process inherits it).

    python benchmarks/bench_in_flight.py                    # 64MiB limit, 8MiB values, N=40/100
    python benchmarks/bench_in_flight.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import psutil

from amm import AsyncClient
from amm.base.checksum import checksum
from amm.base.serving import CHANNEL_OPTIONS
from amm.base.units import parse_size
from amm.cluster import AGENT_MODULE, AGENT_READY, LocalProcess
from amm.errors import AmmError
from amm.v1 import agent_pb2, agent_pb2_grpc

CHUNK = 4 * 1024 * 1024
#: The client's AMM: never dialled, since every Put names its worker.
UNUSED_AMM = "127.0.0.1:1"


@contextlib.contextmanager
def agent_process(limit: int) -> Iterator[tuple[str, psutil.Process]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        AGENT_MODULE,
        "--log-level",
        "ERROR",
        "--memory-limit",
        str(limit),
    ]
    process = LocalProcess("agent", argv, AGENT_READY, env, None)
    try:
        address = process.wait_ready(time.monotonic() + 30)
        yield address, psutil.Process(process.popen.pid)
    finally:
        process.signal(15)
        process.wait(10)


class Sampler:
    """The peak RSS of a process, sampled every 5 ms while running."""

    def __init__(self, process: psutil.Process) -> None:
        self._process = process
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            await asyncio.sleep(0.005)

    def __enter__(self) -> Sampler:
        self.peak = self._process.memory_info().rss
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


async def put(stub: Any, key: str, data: bytes) -> None:
    async def messages() -> AsyncIterator[agent_pb2.PutRequest]:
        header = agent_pb2.PutHeader(key=key, size=len(data), checksum=checksum(data))
        yield agent_pb2.PutRequest(header=header)
        for start in range(0, len(data), CHUNK):
            yield agent_pb2.PutRequest(chunk=data[start : start + CHUNK])

    await stub.Put(messages(), timeout=120)


async def puts(address: str, process: psutil.Process, n: int, size: int) -> dict[str, Any]:
    data = os.urandom(size)
    async with AsyncClient(UNUSED_AMM, timeout=120) as client:
        base = process.memory_info().rss
        with Sampler(process) as sampler:
            results = await asyncio.gather(
                *(client.put(f"put-{i}", data, workers=address) for i in range(n)),
                return_exceptions=True,
            )
            await asyncio.sleep(0.2)
    outcomes: Counter[str] = Counter()
    for result in results:
        if isinstance(result, AmmError):
            outcomes[result.status.name] += 1
        elif isinstance(result, BaseException):
            outcomes[type(result).__name__] += 1
        else:
            outcomes["stored"] += 1
    return {"peak_above_base": sampler.peak - base, "outcomes": dict(outcomes)}


async def unread(
    address: str, process: psutil.Process, n: int, size: int, hold: float
) -> dict[str, Any]:
    data = os.urandom(size)
    async with (
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel,
        grpc.aio.insecure_channel(
            address, options=[*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        ) as readers,
    ):
        stub = agent_pb2_grpc.WorkerAgentStub(channel)
        await put(stub, "unread", data)
        reader = agent_pb2_grpc.WorkerAgentStub(readers)
        base = process.memory_info().rss
        calls = []
        with Sampler(process) as sampler:
            for _ in range(n):
                calls.append(reader.Get(agent_pb2.GetRequest(key="unread"), timeout=hold + 60))
            await asyncio.sleep(hold)  # the readers read nothing: what is buffered stays
            for call in calls:
                call.cancel()
            await asyncio.sleep(0.2)
    return {"peak_above_base": sampler.peak - base}


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with agent_process(args.limit) as (address, process):
        result = await puts(address, process, args.puts, args.size)
        rows.append({"scenario": f"puts x{args.puts}", **result})
    with agent_process(args.limit) as (address, process):
        result = await unread(address, process, args.reads, args.size, args.hold)
        rows.append({"scenario": f"unread gets x{args.reads}", **result})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--size", type=parse_size, default=parse_size("8MiB"))
    parser.add_argument("--puts", type=int, default=40)
    parser.add_argument("--reads", type=int, default=100)
    parser.add_argument("--hold", type=float, default=3.0, help="seconds the reads stay unread")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    mib = 1024 * 1024
    print(f"agent memory limit {args.limit / mib:.0f} MiB, values of {args.size / mib:.0f} MiB")
    print(f"{'scenario':<20} {'peak RSS above base':>20}  outcomes")
    for row in rows:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(row.get("outcomes", {}).items()))
        print(f"{row['scenario']:<20} {row['peak_above_base'] / mib:>16.0f} MiB  {outcomes}")
    print("load average: " + " ".join(f"{load:.2f}" for load in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()

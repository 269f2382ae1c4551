"""Throughput of the data plane between two agent processes on this machine.

Two standalone agents (``python -m worker_agent``, no AMM) run as processes, A and B. For each
size, N values of S random bytes are measured three ways:

- ``peer``: B carries out one REPLICATE directive per value, sourced from A, over a Directives
  stream as the AMM sends them: B fetches each value from A, verifies size and SHA-256 and keeps
  the replica. The timing ends with the last outcome, so it covers the whole transfer;
- ``get``: the client (``amm.AsyncClient.get``) reads them from A and verifies them;
- ``put``: the client (``AsyncClient.put``) stores them on A, which verifies them.

Each is repeated ``--repeat`` times (what a repeat stored is deleted before the next) and the
table shows the median in GB/s (10^9 bytes per second), with the CPU time each process spent
per GB moved (medians too): on a machine shared with other work, wall time says what a user
sees and CPU time what the code costs, which the neighbours' load barely changes. At most
``--concurrency`` values are in flight at once. The load average is printed with the table.

``--tls both`` runs a second pair of agents on mutual TLS (a throwaway CA; the client presents
the operator's certificate, the Directives and Deletes the AMM's) and alternates the two pairs
repeat by repeat, so that the machine's load weighs on both alike; the rows say ``plain`` or
``tls``, and the last lines give each TLS median as a fraction of the plaintext one.

    python benchmarks/bench_transfer.py                      # 64MiBx16 1MiBx256 10KiBx10000
    python benchmarks/bench_transfer.py --sizes 64MiBx16 --ops peer --repeat 5 --json out.json
    python benchmarks/bench_transfer.py --sizes 64MiBx16 --ops peer --tls both   # TLS's cost
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil

from amm.base.checksum import checksum
from amm.base.security import Role, Security
from amm.base.serving import open_channel
from amm.base.units import parse_size
from amm.client import AsyncClient
from amm.cluster import AGENT_MODULE, AGENT_READY, TLS_VARIABLES, LocalProcess
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2

if TYPE_CHECKING:
    from amm.v1.agent_pb2_grpc import WorkerAgentAsyncStub

DEFAULT_SIZES = ["64MiBx16", "1MiBx256", "10KiBx10000"]
OPS = ("peer", "get", "put")
#: The processes whose CPU time is reported: the agents and this client.
ROLES = ("A", "B", "client")
#: Deadline of one call; generous, since a loaded machine is slow.
CALL_TIMEOUT = 300.0
#: Directive ids must never repeat on an agent (it remembers them for idempotency).
_directive_ids = itertools.count()

Job = Callable[[], Awaitable[object]]


@dataclass(slots=True)
class Row:
    op: str
    size: int
    count: int
    concurrency: int
    #: Whether the agents ran on mutual TLS.
    tls: bool = False
    seconds: list[float] = field(default_factory=list)
    #: CPU seconds of each role per repeat.
    cpu: dict[str, list[float]] = field(default_factory=lambda: {r: [] for r in ROLES})
    #: Minor page faults of each role per repeat (first touches of new memory; Linux only).
    faults: dict[str, list[int]] = field(default_factory=lambda: {r: [] for r in ROLES})

    @property
    def total_bytes(self) -> int:
        return self.size * self.count

    @property
    def median_gbps(self) -> float:
        return self.total_bytes / statistics.median(self.seconds) / 1e9

    def cpu_per_gb(self, role: str) -> float:
        return statistics.median(self.cpu[role]) / (self.total_bytes / 1e9)

    def as_json(self) -> dict[str, object]:
        return {
            "op": self.op,
            "size": self.size,
            "count": self.count,
            "concurrency": self.concurrency,
            "tls": self.tls,
            "seconds": self.seconds,
            "gbps": [self.total_bytes / s / 1e9 for s in self.seconds],
            "median_gbps": self.median_gbps,
            "cpu_seconds": self.cpu,
            "cpu_s_per_gb": {role: self.cpu_per_gb(role) for role in ROLES},
            "minor_faults": self.faults,
        }


def label(size: int) -> str:
    """``67108864`` -> ``64MiB``."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_shape(text: str) -> tuple[int, int]:
    """``64MiBx16`` -> (67108864, 16)."""
    size, sep, count = text.rpartition("x")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected SIZExCOUNT such as 64MiBx16, got {text!r}")
    try:
        return parse_size(size), int(count)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


@dataclass(frozen=True, slots=True)
class Agents:
    a: str
    b: str
    processes: dict[str, psutil.Process]
    #: The operator's TLS material (the client's); None for plaintext agents.
    security: Security | None = None

    @property
    def amm(self) -> Security | None:
        """What the bench presents when it plays the AMM (Directives, Delete)."""
        return self.security.as_identity("amm") if self.security is not None else None

    def cpu(self) -> dict[str, float]:
        """CPU seconds (user + system, all threads) of each role so far."""
        times = {role: p.cpu_times() for role, p in self.processes.items()}
        return {role: t.user + t.system for role, t in times.items()}

    def faults(self) -> dict[str, int]:
        """Minor page faults of each role so far; 0 where /proc does not tell."""
        return {role: minor_faults(p.pid) for role, p in self.processes.items()}


def minor_faults(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The fields after the command name, which may hold spaces: minflt is the 8th.
    return int(stat.rpartition(")")[2].split()[7])


@contextlib.contextmanager
def agent_processes(
    agent_args: Sequence[str], security: Security | None = None
) -> Iterator[Agents]:
    """Agents A and B as standalone processes, on TLS with ``security``'s folder (the shared
    agent identity). SIGTERM, then SIGKILL, at exit."""
    inherited = {k: v for k, v in os.environ.items() if k not in TLS_VARIABLES}
    env = {**inherited, "PYTHONUNBUFFERED": "1"}
    tls = ["--tls", str(security.directory)] if security is not None else []
    processes: list[LocalProcess] = []
    try:
        for name in ("A", "B"):
            argv = [sys.executable, "-m", AGENT_MODULE, "--log-level", "WARNING", *tls, *agent_args]
            label = f"agent-{name}{'-tls' if security else ''}"
            processes.append(LocalProcess(label, argv, AGENT_READY, env, None))
        deadline = time.monotonic() + 30
        a, b = (process.wait_ready(deadline) for process in processes)
        yield Agents(
            a,
            b,
            {
                "A": psutil.Process(processes[0].popen.pid),
                "B": psutil.Process(processes[1].popen.pid),
                "client": psutil.Process(),
            },
            security,
        )
    finally:
        for process in processes:
            process.signal(15)
        for process in processes:
            process.wait(10)


async def bounded(concurrency: int, jobs: Sequence[Job]) -> None:
    """Run ``jobs`` with at most ``concurrency`` at once."""
    slots = asyncio.Semaphore(concurrency)

    async def run(job: Job) -> None:
        async with slots:
            await job()

    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(run(job))


async def timed(row: Row, agents: Agents, concurrency: int, jobs: Sequence[Job]) -> None:
    """One repeat of a measure, recorded in ``row``."""
    cpu, faults = agents.cpu(), agents.faults()
    start = time.perf_counter()
    await bounded(concurrency, jobs)
    row.seconds.append(time.perf_counter() - start)
    cpu_after, faults_after = agents.cpu(), agents.faults()
    for role in ROLES:
        row.cpu[role].append(cpu_after[role] - cpu[role])
        row.faults[role].append(faults_after[role] - faults[role])


class Replicator:
    """The AMM's side of a Directives stream to one agent: REPLICATE directives, outcomes back."""

    def __init__(self, stub: WorkerAgentAsyncStub) -> None:
        self._requests: asyncio.Queue[agent_pb2.DirectivesRequest | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[types_pb2.DirectiveOutcome]] = {}
        self._call = stub.Directives(self._iterate())
        self._reader = asyncio.create_task(self._read(), name="bench outcomes reader")

    async def _iterate(self) -> AsyncIterator[agent_pb2.DirectivesRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for response in self._call:
            self._waiting.pop(response.outcome.directive_id).set_result(response.outcome)

    async def replicate(self, key: str, size: int, digest: str, source: str) -> None:
        directive_id = f"bench-{next(_directive_ids)}"
        done = asyncio.get_running_loop().create_future()
        self._waiting[directive_id] = done
        directive = types_pb2.Directive(
            id=directive_id,
            op=types_pb2.DIRECTIVE_OP_REPLICATE,
            key=key,
            size=size,
            checksum=digest,
            sources=[source],
        )
        self._requests.put_nowait(agent_pb2.DirectivesRequest(directive=directive))
        outcome = await done
        if outcome.status != types_pb2.OUTCOME_STATUS_APPLIED:
            raise RuntimeError(f"REPLICATE {key!r} was not applied: {outcome}")

    async def close(self) -> None:
        self._requests.put_nowait(None)
        self._call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await self._reader


async def delete_all(stub: WorkerAgentAsyncStub, keys: Sequence[str]) -> None:
    for key in keys:
        await stub.Delete(agent_pb2.DeleteRequest(key=key), timeout=CALL_TIMEOUT)


async def measure_shape(
    agents: Agents,
    values: Sequence[bytes],
    concurrency: int,
    repeat: int,
    ops: Sequence[str],
) -> list[Row]:
    size, count = len(values[0]), len(values)
    digests = [checksum(v) for v in values]
    keys = [f"v-{i}" for i in range(count)]
    tls = agents.security is not None
    rows = {op: Row(op, size, count, concurrency, tls) for op in OPS if op in ops}

    def progress(op: str) -> None:
        print(
            f"  {op} {label(size)} x {count} c={concurrency} {'tls' if tls else 'plain'}...",
            file=sys.stderr,
            flush=True,
        )

    async with contextlib.AsyncExitStack() as stack:
        # The client's AMM address is never dialled: put and get name the worker.
        client = await stack.enter_async_context(
            AsyncClient("127.0.0.1:1", timeout=CALL_TIMEOUT, security=agents.security)
        )
        stubs: list[WorkerAgentAsyncStub] = []
        for address in (agents.a, agents.b):
            channel = open_channel(address, agents.amm, expect=Role.AGENT)
            await stack.enter_async_context(channel)
            stubs.append(agent_pb2_grpc.WorkerAgentStub(channel))
        stub_a, stub_b = stubs

        def put_jobs(names: Sequence[str]) -> list[Job]:
            return [
                lambda k=k, v=v: client.put(k, v, workers=[agents.a])  # type: ignore[misc]
                for k, v in zip(names, values, strict=True)
            ]

        if "put" in rows:
            progress("put")
            for r in range(repeat):
                names = [f"put-{r}-{i}" for i in range(count)]
                await timed(rows["put"], agents, concurrency, put_jobs(names))
                await delete_all(stub_a, names)
        await bounded(concurrency, put_jobs(keys))

        if "get" in rows:
            progress("get")

            async def get_one(key: str, value: bytes) -> None:
                if await client.get(key, worker=agents.a) != value:
                    raise RuntimeError(f"get {key!r}: other bytes than were put")

            jobs: list[Job] = [
                lambda k=k, v=v: get_one(k, v)  # type: ignore[misc]
                for k, v in zip(keys, values, strict=True)
            ]
            for _ in range(repeat):
                await timed(rows["get"], agents, concurrency, jobs)

        if "peer" in rows:
            progress("peer")
            replicator = Replicator(stub_b)
            try:
                for _ in range(repeat):
                    jobs = [
                        lambda k=k, d=d: replicator.replicate(  # type: ignore[misc]
                            k, size, d, agents.a
                        )
                        for k, d in zip(keys, digests, strict=True)
                    ]
                    await timed(rows["peer"], agents, concurrency, jobs)
                    await delete_all(stub_b, keys)
            finally:
                await replicator.close()
        await delete_all(stub_a, keys)
    return list(rows.values())


def format_row(row: Row) -> str:
    rates = sorted(row.total_bytes / s / 1e9 for s in row.seconds)
    cpu = " ".join(f"{row.cpu_per_gb(role):>6.2f}" for role in ROLES)
    return (
        f"{row.op:<5} {label(row.size):>6} x {row.count:<6} {row.concurrency:>4} "
        f"{'tls' if row.tls else 'plain':<5} "
        f"{row.median_gbps:>7.3f} {rates[0]:>7.3f} {rates[-1]:>7.3f}   {cpu}"
    )


HEADER = (
    f"{'op':<5} {'value':>6} x {'count':<6} {'conc':>4} {'':<5} {'median':>7} {'min':>7} "
    f"{'max':>7}   "
    + " ".join(f"{role:>6}" for role in ROLES)
    + "\n"
    + f"{'':<36}{'GB/s':^23}   {'CPU s per GB':^20}"
)


def merge(into: dict[tuple[object, ...], Row], rows: Sequence[Row]) -> None:
    """Add one repeat's measures to the rows of the same shape, op and transport."""
    for row in rows:
        key = (row.op, row.size, row.count, row.concurrency, row.tls)
        kept = into.setdefault(key, Row(row.op, row.size, row.count, row.concurrency, row.tls))
        kept.seconds += row.seconds
        for role in ROLES:
            kept.cpu[role] += row.cpu[role]
            kept.faults[role] += row.faults[role]


async def run(args: argparse.Namespace, pairs: Sequence[Agents]) -> list[Row]:
    """Each shape on each pair of agents, the pairs taking turns repeat by repeat."""
    rows: dict[tuple[object, ...], Row] = {}
    for size, count in args.sizes:
        values = [os.urandom(size) for _ in range(count)]
        for concurrency in args.concurrency:
            for _ in range(args.repeat):
                for agents in pairs:
                    merge(rows, await measure_shape(agents, values, concurrency, 1, args.ops))
            for row in rows.values():
                if (row.size, row.count, row.concurrency) == (size, count, concurrency):
                    print(format_row(row), file=sys.stderr, flush=True)
    return list(rows.values())


def tls_ratios(rows: Sequence[Row]) -> list[str]:
    """Each TLS median as a fraction of the plaintext one of the same shape and op."""
    plain = {(r.op, r.size, r.count, r.concurrency): r for r in rows if not r.tls}
    lines = []
    for row in rows:
        base = plain.get((row.op, row.size, row.count, row.concurrency))
        if row.tls and base is not None:
            lines.append(
                f"tls/plain {row.op} {label(row.size)} x {row.count} c={row.concurrency}: "
                f"{row.median_gbps / base.median_gbps:.2f} of the throughput "
                f"({row.median_gbps:.3f} vs {base.median_gbps:.3f} GB/s); CPU s/GB "
                f"A {row.cpu_per_gb('A'):.2f} vs {base.cpu_per_gb('A'):.2f}, "
                f"B {row.cpu_per_gb('B'):.2f} vs {base.cpu_per_gb('B'):.2f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=parse_shape,
        nargs="+",
        default=[parse_shape(s) for s in DEFAULT_SIZES],
        metavar="SIZExCOUNT",
        help=f"values to move (default: {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1], help="values in flight (default 1)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        help="passed to both agents (repeatable), e.g. --agent-arg=--log-level=INFO",
    )
    parser.add_argument(
        "--tls",
        choices=("off", "on", "both"),
        default="off",
        help="agents on plaintext (off), mutual TLS (on), or both, alternating (default off)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        pairs = []
        if args.tls in ("off", "both"):
            pairs.append(stack.enter_context(agent_processes(args.agent_arg)))
        if args.tls in ("on", "both"):
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-certs-"))
            security = Security.temporary(folder)
            pairs.append(stack.enter_context(agent_processes(args.agent_arg, security)))
        rows = asyncio.run(run(args, pairs))
    load_after = os.getloadavg()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for line in tls_ratios(rows):
        print(line)
    print(
        f"load average (1, 5, 15 min): before {' '.join(f'{x:.2f}' for x in load_before)}, "
        f"after {' '.join(f'{x:.2f}' for x in load_after)}; {os.cpu_count()} CPUs"
    )
    if args.json:
        report = {
            "rows": [row.as_json() for row in rows],
            "load_before": load_before,
            "load_after": load_after,
            "agent_args": args.agent_arg,
            "tls": args.tls,
            "repeat": args.repeat,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

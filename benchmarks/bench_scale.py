"""One AMM steering many agents: cycle time, CPU, memory, liveness and control latency.

The AMM runs as its own process (``python -m amm_service``, cycling every ``--interval`` from
boot, state in memory). The agents are the real ``worker_agent.Agent`` (its ``Node``, its gRPC
server on its own loopback port, its registration loop and memory sampler), ``--agents-per-process``
of them sharing one asyncio loop in each host process this script starts of itself. What is not
as in production, and said again in the output:

1. Each agent's keys (``--keys-per-agent``, ``--value-bytes`` each) are put with ``Node.put``,
   what the Put RPC calls once a value has arrived, not through the RPC, and all of them share
   one bytes object: the AMM sees real inventories at a fraction of the memory.
2. Agents of one host share a process, so each reports an equal share of the host's RSS as its
   process memory (a ``MemoryProbe``); the real probe would report the whole host's.
3. Keys are not replicated, so the policies find nothing to do: this measures the poll and the
   bookkeeping of a cycle, not planning (``bench_core.py`` measures that).

For each agent count it waits until the AMM lists every agent, then follows ``--cycles`` cycles
that start after that, sampling ``GetStatus`` (cycle durations, unreachable and stale workers),
the AMM process (CPU, RSS) and the latency of a ``running()`` call every ``--probe-interval``.
The first of them polls most agents for the first time (a new connection and a full inventory
each), so it is the longest. Then every agent stops at once (each unregisters as it stops), and
the AMM says how many it still lists once they exited, and how long until it listed none.
Agents share the machine's cores with the AMM here, which a deployment would not do: the AMM's
CPU per cycle is the figure that travels.

    python benchmarks/bench_scale.py                          # 100, 500 and 1000 agents
    python benchmarks/bench_scale.py --agents 100 --cycles 5 --json scale.json
    python benchmarks/bench_scale.py --agents 1000 --amm-state file    # a SQLite state, as deployed

Every wait has a deadline; the processes started are stopped at the end, on an error and on
Ctrl-C, and a host process stops by itself when this script is gone or after ``--max-run``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from amm.base.checksum import checksum
from amm.base.serving import stop_on_signals
from amm.client import AsyncClient
from amm.cluster import SERVICE_READY, LocalProcess, format_interval
from amm.errors import AmmError
from worker_agent.agent import Agent
from worker_agent.config import AgentConfig
from worker_agent.store import Key

HOST_READY = "bench-agents ready"
STOP_TIMEOUT = 15.0
#: How long after the SIGTERM to every host the AMM is watched for the last worker to go.
UNREGISTER_WAIT = 15.0
TARGET_CYCLE_S = 1.0
SLOW_CALL_S = 0.1
SIMULATED = (
    "agents are the real worker_agent.Agent, {per} per host process in one asyncio loop, each "
    "on its own 127.0.0.1 port; keys put with Node.put (what the Put RPC calls), sharing one "
    "bytes object; each agent reports 1/{per} of its host's RSS as process memory; keys are not "
    "replicated, so no directives are planned"
)

log = logging.getLogger("bench_scale")


# -- the agent host (a child process) ---------------------------------------------------------


class ShareOfProcess:
    """A ``MemoryProbe`` for agents sharing a process: an equal share of the process's RSS,
    measured at most every ``every`` seconds for all of them."""

    def __init__(self, agents: int, every: float = 0.5) -> None:
        self._process = psutil.Process()
        self._agents = max(1, agents)
        self._every = every
        self._at = -math.inf
        self._value = 0

    def process_bytes(self) -> int:
        now = time.monotonic()
        if now - self._at >= self._every:
            self._at = now
            self._value = int(self._process.memory_info().rss) // self._agents
        return self._value


def fill(agent: Agent, index: int, keys: int, value: bytes, digest: str) -> None:
    for k in range(keys):
        agent.node.put(Key(f"bench-{index}-{k}"), value, digest)


async def _parent_gone(parent: int, stop: asyncio.Event) -> None:
    """Set ``stop`` once the process that started us is gone (we were re-parented)."""
    while True:
        if os.getppid() != parent:
            stop.set()
            return
        await asyncio.sleep(1.0)


async def host(
    amm: str, first: int, count: int, keys: int, value_bytes: int, max_run: float
) -> int:
    """Run ``count`` agents until SIGTERM/SIGINT, the parent's exit or ``max_run`` seconds."""
    probe = ShareOfProcess(count)
    value = b"x" * value_bytes
    digest = checksum(value)
    # No bulk ports: nothing is replicated here, and a thousand agents need no second port each.
    agents = [
        Agent(
            AgentConfig(amm=amm, listen="127.0.0.1:0", name=f"bench-{first + i}", bulk=False),
            probe=probe,
        )
        for i in range(count)
    ]
    for i, agent in enumerate(agents):
        fill(agent, first + i, keys, value, digest)
    stop = asyncio.Event()
    watch = asyncio.create_task(_parent_gone(os.getppid(), stop), name="bench parent watch")
    try:
        with stop_on_signals(stop):
            await asyncio.gather(*(agent.start() for agent in agents))
            print(f"{HOST_READY} address={','.join(a.address for a in agents)}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max_run)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        try:
            await asyncio.wait_for(
                asyncio.gather(*(agent.stop() for agent in agents), return_exceptions=True),
                STOP_TIMEOUT,
            )
        except TimeoutError:
            print("bench-agents: not every agent stopped in time", file=sys.stderr)
    return 0


# -- the driver ---------------------------------------------------------------------------------


@dataclass
class Row:
    """The figures of one agent count; times in seconds, sizes in bytes."""

    agents: int
    hosts: int
    registered: int = 0
    ready_s: float | None = None
    """From starting the host processes until every agent served (and had begun registering)."""
    registered_s: float | None = None
    """From starting the host processes until the AMM listed every agent."""
    cycles: int = 0
    cycle_p50_s: float | None = None
    cycle_max_s: float | None = None
    plan_max_s: float | None = None
    cycle_durations_s: list[float] = field(default_factory=list)
    cycle_starts: list[float] = field(default_factory=list)
    """When each measured cycle started (Unix time), to set against ``running_slow``."""
    cpu_s_per_cycle: float | None = None
    cpu_percent: float | None = None
    """AMM CPU over the measured cycles, in % of one core."""
    agents_cpu_percent: float | None = None
    """CPU of all agent host processes over the measured cycles, in % of one core."""
    rss_bytes: int = 0
    unreachable_max: int = 0
    """Most workers a single measured cycle could not poll."""
    cycle_unreachable: list[int] = field(default_factory=list)
    """Workers each measured cycle could not poll."""
    unreachable_registering: int = 0
    """Most workers a cycle could not poll while the agents registered (first contact)."""
    unreachable_distinct: int = 0
    """Workers that missed at least one poll during the measured cycles."""
    stale_max: int = 0
    stale_events: int = 0
    """``worker-stale`` events since the AMM started (every agent was alive all along)."""
    dead_events: int = 0
    missed_polls_at_end: int = 0
    """Workers with missed polls in ``ListWorkers`` at the end."""
    running_calls: int = 0
    running_p50_s: float | None = None
    running_p99_s: float | None = None
    running_max_s: float | None = None
    running_errors: int = 0
    running_slow: list[tuple[float, float]] = field(default_factory=list)
    """(Unix time sent, latency) of every running() call slower than 100 ms."""
    stop_s: float | None = None
    """From SIGTERM to every host process until the last one exited (its agents stopped)."""
    left_registered: int | None = None
    """Workers the AMM still listed once every host had exited (every agent had stopped, and
    its UnregisterWorker call had been answered or given up on)."""
    unregistered_s: float | None = None
    """From SIGTERM to every host process until the AMM listed no worker (None: not within
    ``UNREGISTER_WAIT``)."""
    left_at_end: int | None = None
    """Workers the AMM still listed ``UNREGISTER_WAIT`` after the SIGTERM, or once it listed
    none: ghosts, whose keys only the liveness rules would take out."""
    load_before: float = 0.0
    load_after: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def meets_target(self) -> bool:
        return (
            self.registered == self.agents
            and self.cycle_max_s is not None
            and self.cycle_max_s < TARGET_CYCLE_S
            and self.stale_events == 0
            and self.stale_max == 0
            and self.left_at_end == 0
        )


def _quantile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


class Processes:
    """The processes of one run: stopped together (SIGTERM, SIGKILL after a deadline)."""

    def __init__(self) -> None:
        self.service: LocalProcess | None = None
        self.hosts: list[LocalProcess] = []

    def stop_hosts(self) -> None:
        _stop([self.hosts])

    def stop(self) -> None:
        """Hosts first (their agents unregister), then the AMM."""
        _stop([self.hosts, [self.service] if self.service else []])


def _stop(groups: Sequence[Sequence[LocalProcess]]) -> None:
    """SIGTERM each group in turn and wait for it; an interrupt kills everything left."""
    try:
        for group in groups:
            for process in group:
                process.signal(signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            for process in group:
                process.wait(deadline - time.monotonic())
    except BaseException:
        for group in groups:
            for process in group:
                process.signal(signal.SIGKILL)
        raise


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


#: ``python -m amm_service``, asking Linux first to SIGTERM it should this script die without
#: stopping it (SIGKILL): the AMM has no parent watch of its own, unlike the agent hosts.
RUN_SERVICE = (
    "import ctypes, runpy, signal\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "runpy.run_module('amm_service', run_name='__main__', alter_sys=True)\n"
)


def start_service(interval: float, log_level: str, state: str) -> LocalProcess:
    argv = [
        sys.executable,
        "-c",
        RUN_SERVICE,
        "--listen",
        "127.0.0.1:0",
        "--interval",
        format_interval(interval),
        "--state",
        state,
        "--start",
        "--log-level",
        log_level,
    ]
    return LocalProcess("amm-service", argv, SERVICE_READY, _env(), None)


def start_host(amm: str, first: int, count: int, args: argparse.Namespace) -> LocalProcess:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--host",
        amm,
        "--first",
        str(first),
        "--count",
        str(count),
        "--keys-per-agent",
        str(args.keys_per_agent),
        "--value-bytes",
        str(args.value_bytes),
        "--max-run",
        str(args.max_run),
    ]
    return LocalProcess(f"agents-{first}", argv, HOST_READY, _env(), None)


async def _wait_ready(process: LocalProcess, deadline: float) -> str:
    return await asyncio.to_thread(process.wait_ready, deadline)


async def _probe_running(
    client: AsyncClient, every: float, stop: asyncio.Event, row: Row, latencies: list[float]
) -> None:
    while not stop.is_set():
        sent, t0 = time.time(), time.perf_counter()
        try:
            await client.amm.running()
        except AmmError as err:
            row.running_errors += 1
            log.debug("running() failed: %s", err)
        else:
            latency = time.perf_counter() - t0
            latencies.append(latency)
            if latency > SLOW_CALL_S:
                row.running_slow.append((sent, latency))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def _wait_registered(client: AsyncClient, row: Row, t0: float, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            status = await client.status()
        except AmmError as err:
            row.errors.append(f"GetStatus while registering: {err}")
            await asyncio.sleep(0.5)
            continue
        row.registered = status.totals.workers
        if status.last_cycle is not None:
            unreachable = len(status.last_cycle.unreachable_workers)
            row.unreachable_registering = max(row.unreachable_registering, unreachable)
        if row.registered >= row.agents:
            row.registered_s = time.monotonic() - t0
            return
        await asyncio.sleep(0.25)
    row.errors.append(f"only {row.registered} of {row.agents} agents registered in time")


def _cpu(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def _follow_cycles(
    client: AsyncClient,
    service: psutil.Process,
    hosts: Sequence[psutil.Process],
    row: Row,
    cycles: int,
    interval: float,
) -> None:
    """Sample GetStatus until ``cycles`` cycles that started from now on have ended."""
    first = (await client.status()).cycles + 1
    last = first + cycles - 1
    durations: dict[int, float] = {}
    starts: dict[int, float] = {}
    plans: list[float] = []
    unreachable: set[str] = set()
    cpu0, hosts0, t0 = _cpu([service]), _cpu(hosts), time.monotonic()
    deadline = t0 + cycles * interval * 5 + 60
    while time.monotonic() < deadline:
        try:
            status = await client.status()
        except AmmError as err:
            row.errors.append(f"GetStatus: {err}")
            await asyncio.sleep(0.5)
            continue
        row.rss_bytes = max(row.rss_bytes, int(service.memory_info().rss))
        row.stale_max = max(row.stale_max, status.totals.stale_workers)
        cycle = status.last_cycle
        if cycle is not None and first <= cycle.number <= last and cycle.number not in durations:
            durations[cycle.number] = cycle.duration
            if cycle.started_at is not None:
                starts[cycle.number] = cycle.started_at.timestamp()
            plans.append(cycle.plan_duration)
            unreachable.update(cycle.unreachable_workers)
            row.cycle_unreachable.append(len(cycle.unreachable_workers))
            row.unreachable_max = max(row.unreachable_max, len(cycle.unreachable_workers))
        if cycle is not None and cycle.number >= last:
            break
        await asyncio.sleep(min(0.25, interval / 4))
    else:
        row.errors.append(f"only {len(durations)} of {cycles} cycles ended in time")
    cpu, wall = _cpu([service]) - cpu0, time.monotonic() - t0
    row.agents_cpu_percent = 100 * (_cpu(hosts) - hosts0) / wall if wall else None
    ended = max(durations, default=first - 1) - first + 1
    row.cycles = len(durations)
    row.cycle_durations_s = [durations[n] for n in sorted(durations)]
    row.cycle_starts = [starts[n] for n in sorted(starts)]
    row.cycle_p50_s = statistics.median(row.cycle_durations_s) if durations else None
    row.cycle_max_s = max(row.cycle_durations_s, default=None)
    row.plan_max_s = max(plans, default=None)
    row.cpu_s_per_cycle = cpu / ended if ended else None
    row.cpu_percent = 100 * cpu / wall if wall else None
    row.unreachable_distinct = len(unreachable)


async def _liveness_at_end(client: AsyncClient, row: Row) -> None:
    status = await client.status()
    row.stale_max = max(row.stale_max, status.totals.stale_workers)
    kinds = [event.kind for event in status.recent_events]
    row.stale_events = kinds.count("worker-stale")
    row.dead_events = kinds.count("worker-dead")
    workers = await client.workers()
    row.registered = len(workers)
    row.missed_polls_at_end = sum(1 for w in workers if w.missed_polls > 0)


async def measure(n: int, args: argparse.Namespace, procs: Processes, state: str) -> Row:
    """Start the AMM and the agents, measure, and leave the processes to ``procs.stop``."""
    per = max(1, args.agents_per_process)
    counts = [min(per, n - first) for first in range(0, n, per)]
    row = Row(agents=n, hosts=len(counts), load_before=os.getloadavg()[0])
    deadline = time.monotonic() + args.start_timeout
    procs.service = start_service(args.interval, args.amm_log_level, state)
    amm = await _wait_ready(procs.service, deadline)
    service = psutil.Process(procs.service.popen.pid)
    t0 = time.monotonic()
    for first, count in zip(range(0, n, per), counts, strict=True):
        procs.hosts.append(start_host(amm, first, count, args))
    for process in procs.hosts:
        await _wait_ready(process, deadline + args.register_timeout)
    row.ready_s = time.monotonic() - t0
    async with AsyncClient(amm, timeout=args.rpc_timeout) as client:
        await _wait_registered(client, row, t0, t0 + args.register_timeout)
        if row.registered_s is None:
            return row
        stop = asyncio.Event()
        latencies: list[float] = []
        probe = asyncio.create_task(
            _probe_running(client, args.probe_interval, stop, row, latencies),
            name="bench running() probe",
        )
        try:
            hosts = [psutil.Process(process.popen.pid) for process in procs.hosts]
            await _follow_cycles(client, service, hosts, row, args.cycles, args.interval)
        finally:
            stop.set()
            await probe
        row.running_calls = len(latencies)
        row.running_p50_s = _quantile(latencies, 0.5)
        row.running_p99_s = _quantile(latencies, 0.99)
        row.running_max_s = max(latencies, default=None)
        await _liveness_at_end(client, row)
        row.load_after = os.getloadavg()[0]
        await _stop_and_watch(client, procs, row)
    return row


async def _stop_and_watch(client: AsyncClient, procs: Processes, row: Row) -> None:
    """Stop every agent at once (each unregisters, under the agent's own deadline) and follow
    the AMM's list meanwhile: how many it lists once the hosts exited, and when it lists none."""
    t0 = time.monotonic()
    deadline = t0 + UNREGISTER_WAIT
    stopping = asyncio.create_task(asyncio.to_thread(procs.stop_hosts), name="bench stop hosts")
    listed: int | None = None
    while True:
        try:
            listed = (await client.status()).totals.workers
        except AmmError as err:
            row.errors.append(f"GetStatus while the agents stopped: {err}")
        if listed == 0 and row.unregistered_s is None:
            row.unregistered_s = time.monotonic() - t0
        if stopping.done() and row.stop_s is None:
            await stopping
            row.stop_s = time.monotonic() - t0
            row.left_registered = listed
        if row.stop_s is not None and (listed == 0 or time.monotonic() >= deadline):
            break
        await asyncio.sleep(0.05)
    row.left_at_end = listed
    if listed:
        row.errors.append(
            f"{listed} agents stopped cleanly but the AMM still listed them "
            f"{time.monotonic() - t0:.1f} s after the stop"
        )


def run_one(n: int, args: argparse.Namespace) -> Row:
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as folder:
        state = ":memory:" if args.amm_state == "memory" else str(Path(folder) / "state.sqlite3")
        try:
            return asyncio.run(measure(n, args, procs, state))
        finally:
            procs.stop()


# -- output -------------------------------------------------------------------------------------


def _s(value: float | None, unit: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value * unit:.{digits}f}"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(rows: Sequence[Row]) -> str:
    columns = (
        ("agents", 6),
        ("hosts", 5),
        ("registered", 14),
        ("cycles", 6),
        ("cycle p50/max", 13),
        ("AMM cpu/cycle", 13),
        ("AMM %", 5),
        ("agents %", 8),
        ("AMM RSS", 7),
        ("missed polls", 12),
        ("stale", 5),
        ("running() ms", 18),
        ("left/ghosts", 11),
        ("unreg s", 7),
        ("load", 9),
        ("target", 6),
    )
    lines = [" ".join(f"{name:>{width}}" for name, width in columns)]
    for r in rows:
        cells = (
            str(r.agents),
            str(r.hosts),
            f"{r.registered}/{r.agents} {_s(r.registered_s, digits=1)}s",
            str(r.cycles),
            f"{_s(r.cycle_p50_s)}/{_s(r.cycle_max_s)}s",
            f"{_s(r.cpu_s_per_cycle)}s",
            _s(r.cpu_percent, digits=0),
            _s(r.agents_cpu_percent, digits=0),
            f"{r.rss_bytes / 2**20:.0f}MiB",
            f"{r.unreachable_max}/{r.unreachable_distinct}/{r.unreachable_registering}",
            str(max(r.stale_max, r.stale_events)),
            f"{_s(r.running_p50_s, 1e3, 0)}/{_s(r.running_p99_s, 1e3, 0)}/"
            f"{_s(r.running_max_s, 1e3, 0)}",
            f"{_n(r.left_registered)}/{_n(r.left_at_end)}",
            _s(r.unregistered_s),
            f"{r.load_before:.1f}>{r.load_after:.1f}",
            "met" if r.meets_target else "MISSED",
        )
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, columns, strict=True)))
    return "\n".join(lines)


NOTES = """\
registered: agents the AMM listed / agents started, and seconds from starting the host processes
  until it listed them all. cycle: the duration GetStatus reports for each measured cycle.
  AMM cpu/cycle: CPU seconds of the AMM process over the measured cycles, per cycle (it also
  served this script's calls); AMM %, agents %: CPU over them in % of one core (the agents' hosts
  together). missed polls: most workers one measured cycle could not poll / workers that missed
  any poll in them / most one cycle could not poll while the agents registered. stale: most
  workers flagged STALE at once, or worker-stale events, whichever is larger. running(): latency
  of a running() call every {probe:g} s during the measured cycles, p50/p99/max. left/ghosts:
  workers the AMM still listed once every agent had stopped at once (each unregisters as it
  stops) and the host processes had exited / {wait:g} s after the stop (their unregistration
  was lost). unreg s: seconds from the stop until the AMM listed no worker.
  load: 1-minute load average before and after. target: every agent registered, every measured
  cycle under {target:g} s, no worker marked stale, no ghost."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--agents-per-process", type=int, default=250)
    parser.add_argument("--keys-per-agent", type=int, default=100)
    parser.add_argument("--value-bytes", type=int, default=1024)
    parser.add_argument("--interval", type=float, default=2.0, help="AMM interval, seconds")
    parser.add_argument("--cycles", type=int, default=10, help="cycles measured per row")
    parser.add_argument("--probe-interval", type=float, default=0.1, help="between running()s")
    parser.add_argument("--rpc-timeout", type=float, default=10.0)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    parser.add_argument("--register-timeout", type=float, default=120.0)
    parser.add_argument("--amm-log-level", default="INFO")
    parser.add_argument(
        "--amm-state",
        choices=("memory", "file"),
        default="memory",
        help="the AMM's state: in memory (as LocalCluster), or a SQLite file (as deployed)",
    )
    parser.add_argument(
        "--max-run", type=float, default=1800.0, help="a host process stops itself after this"
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    # The agent host, started by this script itself.
    parser.add_argument("--host", metavar="AMM", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return asyncio.run(
            host(
                args.host,
                args.first,
                args.count,
                args.keys_per_agent,
                args.value_bytes,
                args.max_run,
            )
        )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    rows = []
    try:
        for n in args.agents:
            print(f"-- {n} agents ...", file=sys.stderr, flush=True)
            rows.append(run_one(n, args))
            for error in rows[-1].errors:
                print(f"   {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130
    if args.json:
        report = {
            "interval_s": args.interval,
            "agents_per_process": args.agents_per_process,
            "keys_per_agent": args.keys_per_agent,
            "value_bytes": args.value_bytes,
            "cpus": os.cpu_count(),
            "simulated": SIMULATED.format(per=args.agents_per_process),
            "rows": [{**asdict(r), "meets_target": r.meets_target} for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2))
    print(render(rows))
    print(NOTES.format(target=TARGET_CYCLE_S, probe=args.probe_interval, wait=UNREGISTER_WAIT))
    print("simulated: " + SIMULATED.format(per=args.agents_per_process))
    return 0


if __name__ == "__main__":
    sys.exit(main())

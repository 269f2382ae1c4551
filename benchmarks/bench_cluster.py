"""A whole cluster, measured: K keys x R replicas on N agent processes, and how the AMM cleans up.

For amm and, when the ``bench`` extra is installed, for Dask in the same run, on the same shapes:

1. build: put K small keys on R workers (amm: ``put_many`` broadcast; Dask:
   ``scatter(broadcast=True)``), with the AMM stopped;
2. converge: start the AMM and time until the workers really hold one replica of each key, with
   the cycles, the directives and the AMM's CPU, peak RSS and control-call latency meanwhile;
3. replicate: 16 values (1 GiB in all by default) on one worker, copied to n=2 (amm: the
   ``replicate`` goal; Dask: ``Client.replicate``);
4. retire: retire a worker holding 16 unique values (1 GiB in all by default).

Each shape gets a fresh cluster per system, and the throughput phases one more. Every phase has a
deadline (``--timeout``) and reports what it saw when it passes, rather than hang.

    python benchmarks/bench_cluster.py --quick                   # a small run, about a minute
    python benchmarks/bench_cluster.py                           # 10k, 100k keys x 4 on 4 workers
    python benchmarks/bench_cluster.py --keys 10000 --skip-dask --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from amm import AmmError, AsyncClient, LocalCluster
from amm.base.serving import CHANNEL_OPTIONS
from amm.base.units import format_bytes, parse_size
from amm.tables import render_table
from amm.v1 import agent_pb2, agent_pb2_grpc

#: Seconds between two reads of the manager's belief (amm: ListWorkers; Dask: the scheduler's
#: worker states) while waiting for convergence, for both systems alike.
CHECK_EVERY = 0.1
#: Most keys asked of an agent in one HoldsKeys call (``worker_agent.servicer.MAX_HOLDS_KEYS``).
HOLDS_CHUNK = 10_000
#: Seconds between two RSS samples of the measured process.
RSS_EVERY = 0.05
#: Seconds the latency probe rests between two rounds of control calls.
PROBE_PAUSE = 0.1
#: How many values make up the bytes of the throughput phases.
BIG_VALUES = 16
#: The AMM's loop probe is on when this names a file (``amm_service.runtime.loop.loop_probe.ENV``;
#: not imported, so that the script also measures checkouts without the probe).
LOOP_PROBE_ENV = "AMM_LOOP_PROBE"
#: Most characters of a text cell of the table.
TEXT_CELL = 48
#: Milliseconds between two beats of the loop probe when on time (``loop_probe.BEAT``).
LOOP_BEAT_MS = 5.0
#: Control calls whose latency is measured while the AMM converges.
#: ``who_has`` is fresh (the client's default: the AMM asks every agent); ``who_has_view`` is
#: the wire's default (``fresh`` unset: answered from the AMM's view, what grpcurl gets). Added
#: last, so that the older figures keep their names and places.
PROBES = ("running", "status", "who_has", "holds_keys", "who_has_view")

Figures = dict[str, Any]


# -- measuring -------------------------------------------------------------------------------------


class ProcessMeter:
    """CPU seconds and peak RSS of one process between ``start`` and ``stop``, RSS sampled every
    ``RSS_EVERY`` seconds from a thread (so that a busy event loop does not skip samples)."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss sampler", daemon=True)
        self.peak_rss = 0
        self.cpu_seconds = 0.0
        self._cpu_start = 0.0

    def _cpu(self) -> float:
        times = self._process.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            self._done.wait(RSS_EVERY)

    def start(self) -> None:
        self._cpu_start = self._cpu()
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(psutil.Error):
            self.cpu_seconds = self._cpu() - self._cpu_start


@dataclass
class Latencies:
    """Seconds each control call took, by call; calls that failed are counted apart."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PROBES})
    #: The CPU seconds the serving loop's thread ran while each call was in flight (the AMM's;
    #: for ``holds_keys``, the busiest agent's), where Linux says (``LoopCpu``).
    loop_cpu: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PROBES})
    failures: int = 0

    def add(self, name: str, seconds: float, loop_cpu: float | None = None) -> None:
        self.samples[name].append(seconds)
        if loop_cpu is not None:
            self.loop_cpu[name].append(loop_cpu)

    def figures(self) -> Figures:
        result: Figures = {"probe_failures": self.failures}
        for name, values in self.samples.items():
            result[f"{name}_calls"] = len(values)
            # Each call's, for the record: a run makes about a hundred calls, whose p99 is
            # their max; the p99 of several runs' calls together says more.
            result[f"{name}_samples_ms"] = [round(v * 1e3, 2) for v in values]
            for label, value in _percentiles(values).items():
                result[f"{name}_{label}_ms"] = None if value is None else value * 1e3
            cpu = self.loop_cpu[name]
            if cpu:
                result[f"{name}_loop_cpu_samples_ms"] = [round(v * 1e3, 3) for v in cpu]
                for label, value in _percentiles(cpu).items():
                    result[f"{name}_loop_cpu_{label}_ms"] = None if value is None else value * 1e3
        return result


class LoopCpu:
    """CPU seconds the main threads of some processes (their event loops) have run so far, read
    from ``/proc/PID/task/PID/schedstat`` (nanoseconds). A call's latency in wall time on a
    loaded 2-core machine mostly counts the kernel's run queue; the CPU the serving loop ran
    while the call was in flight counts what the call waited behind in that loop (bulk work
    not paced, or paced too coarsely), whatever the load."""

    def __init__(self, pids: list[int]) -> None:
        self._paths = [f"/proc/{pid}/task/{pid}/schedstat" for pid in pids]

    def read(self) -> list[float] | None:
        """Each process's so far; None where Linux does not say (the figure is left out)."""
        try:
            values = []
            for path in self._paths:
                with open(path, encoding="ascii") as f:
                    values.append(int(f.read().split()[0]) / 1e9)
            return values
        except (OSError, IndexError, ValueError):
            return None


def _most_spent(before: list[float] | None, after: list[float] | None) -> float | None:
    if before is None or after is None:
        return None
    return max(b - a for a, b in zip(before, after, strict=True))


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    return {"p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


def make_keys(count: int, value_bytes: int) -> dict[str, bytes]:
    """``count`` distinct small values: the key's number, then filler."""
    filler = b"x" * max(0, value_bytes - 8)
    return {f"key-{i:07}": i.to_bytes(8, "little")[:value_bytes] + filler for i in range(count)}


def make_big(prefix: str, total: int) -> dict[str, bytes]:
    """``BIG_VALUES`` distinct values of ``total`` bytes in all (one random body, numbered)."""
    size = max(8, total // BIG_VALUES)
    body = os.urandom(size - 8)
    return {f"{prefix}-{i:02}": i.to_bytes(8, "little") + body for i in range(BIG_VALUES)}


def not_done(what: str, seconds: float, detail: str = "") -> str:
    return f"not {what} after {seconds:g} s" + (f" ({detail})" if detail else "")


# -- amm -------------------------------------------------------------------------------------------


async def _amm_probe(
    address: str,
    agents: list[str],
    key: str,
    stop: asyncio.Event,
    lat: Latencies,
    pause: float = PROBE_PAUSE,
    loops: tuple[LoopCpu, LoopCpu] | None = None,
) -> None:
    """Control calls in a loop, one at a time, on a channel of their own. ``who_has`` is the
    client's default, fresh: the AMM asks every agent for the key before it answers;
    ``who_has_view`` is the wire's default, answered from the AMM's view of the cluster.
    ``holds_keys`` asks every agent at once directly (HoldsKeys, no AMM): the agents' share of
    a fresh ``who_has``. ``loops`` (the AMM's, the agents') also measure the loop CPU each
    call was in flight for: the AMM's, or the busiest agent's for ``holds_keys``."""
    channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in agents]
    stubs = [agent_pb2_grpc.WorkerAgentStub(channel) for channel in channels]
    request = agent_pb2.HoldsKeysRequest(keys=[key])

    async def holds_keys() -> None:
        await asyncio.gather(*(stub.HoldsKeys(request, timeout=30) for stub in stubs))

    async with contextlib.AsyncExitStack() as stack:
        for channel in channels:
            stack.push_async_callback(channel.close, None)
        client = await stack.enter_async_context(AsyncClient(address, timeout=30))
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "running": client.amm.running,
            "status": client.status,
            "who_has": lambda: client.who_has([key]),
            "holds_keys": holds_keys,
            "who_has_view": lambda: client.who_has([key], fresh=False),
        }
        while not stop.is_set():
            for name, call in calls.items():
                loop = None if loops is None else loops[name == "holds_keys"]
                cpu = None if loop is None else loop.read()
                started = time.perf_counter()
                try:
                    await call()
                except (AmmError, grpc.aio.AioRpcError):
                    lat.failures += 1
                    continue
                seconds = time.perf_counter() - started
                lat.add(name, seconds, _most_spent(cpu, None if loop is None else loop.read()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def _amm_build_and_converge(
    cluster: LocalCluster, args: argparse.Namespace, keys: int
) -> Figures:
    data = make_keys(keys, args.value_bytes)
    probe_key = next(iter(data))
    figures: Figures = {"directives_needed": keys * (args.replicas - 1)}
    async with AsyncClient(cluster.address, timeout=max(60.0, args.timeout)) as client:
        await client.amm.stop()
        targets = list(await client.has_what())[: args.replicas]
        started = time.perf_counter()
        try:
            async with asyncio.timeout(args.timeout):
                result = await client.put_many(data, workers=targets)
        except TimeoutError:
            figures["build_s"] = not_done("built", args.timeout)
            return figures
        figures["build_s"] = time.perf_counter() - started
        figures["build_created"] = result.created

        before = await client.status()
        meter = ProcessMeter(cluster.service_pid)
        agent_meters = [ProcessMeter(pid) for pid in cluster.worker_pids.values()]
        lat = Latencies()
        stop = asyncio.Event()
        for one in (meter, *agent_meters):
            one.start()
        spy = _py_spy(args.py_spy, cluster.service_pid, keys)
        agent_spies = [
            _py_spy(args.py_spy_agents, pid, keys, f"-agent{n}")
            for n, pid in enumerate(cluster.worker_pids.values())
        ]
        window = time.time()
        started = time.perf_counter()
        await client.amm.start()
        probe = asyncio.create_task(
            _amm_probe(
                cluster.address,
                targets,
                probe_key,
                stop,
                lat,
                args.probe_pause,
                (LoopCpu([cluster.service_pid]), LoopCpu(list(cluster.worker_pids.values()))),
            ),
            name="latency probe",
        )
        converged: float | None = None
        last = before
        verified = 0
        try:
            deadline = started + args.timeout
            while time.perf_counter() < deadline:
                await asyncio.sleep(CHECK_EVERY)
                # The AMM's belief first, as Dask's scheduler's below: cheap (ListWorkers, not
                # GetStatus, whose report of the last cycle is built again as it progresses),
                # and optimistic (a drop in flight may be counted as done).
                try:
                    held = sum(w.key_count for w in await client.workers())
                    if args.trace:
                        last = await client.status()
                        t = last.totals
                        print(
                            f"  {time.perf_counter() - started:6.2f} s: cycle {last.cycles}, "
                            f"{t.replicas:,} replicas, {t.directives_in_flight:,} in flight, "
                            f"{t.directives_applied:,} applied",
                            flush=True,
                        )
                except AmmError as err:
                    print(f"  convergence check failed: {err}", flush=True)
                    continue
                if held != keys:
                    continue
                # Then the agents' own stores, asked directly (HoldsKeys, every key): converged
                # when they hold every key exactly once, counted when that answer is in.
                verified += 1
                asked = time.perf_counter()
                if await _agents_hold_once(targets, list(data)):
                    converged = time.perf_counter() - started
                    figures["verify_s"] = time.perf_counter() - asked
                    break
        finally:
            stop.set()
            for one in (meter, *agent_meters):
                one.stop()
            for one in (spy, *agent_spies):
                _py_spy_stop(one)
            with contextlib.suppress(TimeoutError):  # then wait_for cancelled a stuck call
                await asyncio.wait_for(probe, 10)
            await client.amm.stop()
            with contextlib.suppress(AmmError):
                last = await client.status()
        totals, base = last.totals, before.totals
        figures["converge_s"] = (
            converged if converged is not None else not_done("converged", args.timeout)
        )
        figures["replicas_at_end"] = totals.replicas
        figures["verifications"] = verified
        figures["cycles"] = last.cycles - before.cycles
        figures["directives_sent"] = totals.directives_sent - base.directives_sent
        figures["directives_applied"] = totals.directives_applied - base.directives_applied
        figures["directives_refused"] = totals.directives_refused - base.directives_refused
        figures["directives_failed"] = totals.directives_failed - base.directives_failed
        reasons = collections.Counter(r.reason for r in last.recent_refusals)
        figures["recent_refusals"] = ", ".join(f"{r} {n}" for r, n in reasons.most_common(3))
        if args.loop_probe is not None:
            figures.update(_loop_holds(args.loop_probe, window, time.time()))
        figures["cpu_s"] = meter.cpu_seconds
        figures["peak_rss_bytes"] = meter.peak_rss
        figures["workers_cpu_s"] = sum(m.cpu_seconds for m in agent_meters)
        figures.update(lat.figures())
    return figures


async def _agents_hold_once(agents: list[str], keys: list[str]) -> bool:
    """Whether the agents' stores hold each of ``keys`` exactly once between them, asked of each
    agent directly (HoldsKeys, read-only: no poll state or epoch of the AMM's is touched)."""
    counts: collections.Counter[str] = collections.Counter()

    async def ask(address: str) -> None:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = agent_pb2_grpc.WorkerAgentStub(channel)
            for start in range(0, len(keys), HOLDS_CHUNK):
                request = agent_pb2.HoldsKeysRequest(keys=keys[start : start + HOLDS_CHUNK])
                answer = await stub.HoldsKeys(request, timeout=60)
                counts.update(info.key for info in answer.keys)

    try:
        await asyncio.gather(*(ask(address) for address in agents))
    except grpc.aio.AioRpcError as err:
        print(f"  verification failed: {err.code().name}", flush=True)
        return False
    return len(counts) == len(keys) and all(n == 1 for n in counts.values())


def _loop_holds(path: Path, start: float, end: float) -> Figures:
    """What the AMM's loop probe (``amm_service.runtime.loop.loop_probe``) wrote between ``start``
    and ``end``: how many holds of the loop over its threshold, the longest, and where the
    longest ones were."""
    holds, collections_ms, lags = [], [], []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if not start <= record["at"] <= end:
                continue
            if "gc_ms" in record:  # a garbage collection, noted on its own
                collections_ms.append(record["gc_ms"])
            elif "lag_ms" in record:  # a beat that came late, and why
                lags.append(record)
            else:
                holds.append(record)
    holds.sort(key=lambda r: -r["cpu_ms"])
    where = collections.Counter(" < ".join(reversed(r["stack"][-2:])) for r in holds)
    return {
        "loop_holds": len(holds),
        "loop_hold_max_ms": holds[0]["cpu_ms"] if holds else 0.0,
        "loop_hold_sites": "; ".join(f"{n} x {site}" for site, n in where.most_common(4)),
        "loop_gcs": len(collections_ms),
        "loop_gc_max_ms": max(collections_ms, default=0.0),
        "loop_holds_longest": holds[:10],
        **_loop_lags(lags),
    }


def _loop_lags(lags: list[dict[str, Any]]) -> Figures:
    """How late the AMM loop's beats came (a control call waits as long for the loop), p99 over
    every beat, and what the loop's thread did from the beat before to each late one (20 ms
    late or more): ran (CPU: its own work), waited for a core (run queue: the machine is busy),
    or neither (blocked: the GIL held by another of the AMM's threads, or asleep)."""
    beats = sum(r["beats"] for r in lags)
    late = sorted(r["lag_ms"] for r in lags)
    on_time = max(0, beats - len(late))
    rank = max(0, math.ceil(0.99 * beats) - 1 - on_time)
    long = [r for r in lags if r["lag_ms"] >= 20]
    spans = sum(r["lag_ms"] + LOOP_BEAT_MS for r in long) or 1.0
    return {
        "loop_beats": beats,
        "loop_lag_p99_ms": (late[rank] if rank < len(late) else None) if beats else None,
        "loop_lag_max_ms": late[-1] if late else 0.0,
        "loop_lags_20ms": len(long),
        "loop_lag_cpu_share": sum(r["cpu_ms"] for r in long) / spans,
        "loop_lag_runq_share": sum(r["runq_ms"] for r in long) / spans,
    }


def _py_spy(path: Path | None, pid: int, keys: int, suffix: str = "") -> Any:
    """py-spy recording a process (the AMM, ``--py-spy``; each agent, ``--py-spy-agents``)
    while the AMM converges, or None."""
    if path is None:
        return None
    out = path.with_name(f"{path.stem}-{keys}{suffix}{path.suffix or '.txt'}")
    beside = Path(sys.executable).with_name("py-spy")  # the venv's, when not on the PATH
    command = [str(beside) if beside.exists() else "py-spy", "record", "--pid", str(pid)]
    command += ["--rate", "200", "--format", "raw", "--nonblocking"]
    if os.environ.get("BENCH_PY_SPY_NATIVE"):
        command.append("--native")
    return subprocess.Popen([*command, "--output", str(out)], stdout=subprocess.DEVNULL)


def _py_spy_stop(spy: Any) -> None:
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)


async def _amm_throughput(cluster: LocalCluster, args: argparse.Namespace) -> Figures:
    figures: Figures = {}
    total = args.replicate_bytes
    async with AsyncClient(cluster.address, timeout=max(60.0, args.timeout)) as client:
        first, *_, last = sorted((await client.has_what()).keys())
        big = make_big("replicate", total)
        await client.put_many(big, workers=first)
        await client.who_has(list(big), fresh=True)  # the AMM knows the keys: a goal needs it
        await client.amm.start()
        started = time.perf_counter()
        await client.replicate(list(big), n=2)
        elapsed = await _until(
            lambda: _all_copies(client, list(big), 2), started, args.timeout, "replicated"
        )
        figures["replicate_s"] = elapsed
        if isinstance(elapsed, float):
            figures["replicate_gb_s"] = sum(map(len, big.values())) / elapsed / 1e9
        await client.replicate(list(big), n=1)
        await client.forget(list(big))

        big = make_big("retire", total)
        await client.put_many(big, workers=last)
        await client.who_has(list(big), fresh=True)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(args.timeout):
                (outcome,) = await client.retire_workers([last], timeout=args.timeout)
        except TimeoutError:
            figures["retire_s"] = not_done("retired", args.timeout)
        else:
            seconds = time.perf_counter() - started
            if outcome.retired:
                figures["retire_s"] = seconds
                figures["retire_gb_s"] = sum(map(len, big.values())) / seconds / 1e9
            else:
                figures["retire_s"] = f"abandoned after {seconds:.1f} s: {outcome.reason}"
        await client.amm.stop()
    return figures


async def _all_copies(client: AsyncClient, keys: list[str], n: int) -> bool:
    holders = await client.who_has(keys, fresh=True)
    return all(len(holders.get(key, ())) >= n for key in keys)


async def _until(
    check: Callable[[], Awaitable[bool]], started: float, limit: float, what: str
) -> float | str:
    while time.perf_counter() - started < limit:
        if await check():
            return time.perf_counter() - started
        await asyncio.sleep(CHECK_EVERY)
    return not_done(what, limit)


def run_amm(args: argparse.Namespace) -> Figures:
    results: Figures = {}

    def shape(keys: int) -> Figures:
        if args.loop_probe is not None:
            os.environ[LOOP_PROBE_ENV] = str(args.loop_probe)
        with LocalCluster(args.workers, interval=args.interval, start=False) as cluster:
            return asyncio.run(_amm_build_and_converge(cluster, args, keys))

    def throughput() -> Figures:
        with LocalCluster(args.workers, interval=args.interval, start=False) as cluster:
            return asyncio.run(_amm_throughput(cluster, args))

    for keys in args.keys:
        print(f"amm: {keys:,} keys x {args.replicas} on {args.workers} agents ...", flush=True)
        results[str(keys)] = _guarded("amm", functools.partial(shape, keys))
    if not args.skip_throughput:
        print(f"amm: replicate and retire {format_bytes(args.replicate_bytes)} ...", flush=True)
        results["throughput"] = _guarded("amm", throughput)
    return results


def _guarded(system: str, phase: Callable[[], Figures]) -> Figures:
    """The phase's figures, or its failure as a figure: one failed phase leaves the others."""
    try:
        return phase()
    except Exception as err:
        print(f"  {system}: failed: {type(err).__name__}: {err}", flush=True)
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"}


# -- Dask ------------------------------------------------------------------------------------------


def _scheduler_replicas(dask_scheduler: Any) -> int:
    """The replicas the scheduler believes its workers hold, in all: a sum over the workers,
    not a scan of every task (which, every ``CHECK_EVERY`` s, held the scheduler's loop)."""
    return sum(len(ws.has_what) for ws in dask_scheduler.workers.values())


def _worker_keys(dask_worker: Any) -> int:
    return len(dask_worker.data)


def _timed(call: Callable[[], Any], timeout: float, what: str) -> tuple[float | str, Any]:
    """Seconds ``call`` took and what it returned, run in a thread so that it gets a deadline;
    on the deadline the call is left to end with the cluster."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dask call")
    started = time.perf_counter()
    try:
        result = pool.submit(call).result(timeout=timeout)
        return time.perf_counter() - started, result
    except concurrent.futures.TimeoutError:
        return not_done(what, timeout), None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _dask_cluster(args: argparse.Namespace) -> Iterator[Any]:
    # Dask logs every connection it closes at INFO, here and in its worker processes, which
    # read their logging configuration from the environment.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    import dask
    import distributed

    logging.getLogger("distributed").setLevel(logging.WARNING)
    config = {
        "distributed.scheduler.active-memory-manager.start": False,
        "distributed.scheduler.active-memory-manager.interval": f"{args.dask_interval}s",
    }
    with dask.config.set(config):
        cluster = distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
        try:
            client = distributed.Client(cluster)
            try:
                yield client
            finally:
                # A call left running past its deadline can make closing time out.
                with contextlib.suppress(Exception):
                    client.close(timeout=10)
        finally:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)
            end_children()


def end_children(grace: float = 5.0) -> None:
    """Terminate, then kill, the processes this script started that are still running (Dask's
    nannies and workers when closing failed; multiprocessing's resource tracker is left)."""
    children = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(child.cmdline()):
                children.append(child)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _dask_probe(
    client: Any, key: str, stop: threading.Event, lat: Latencies, pause: float = PROBE_PAUSE
) -> None:
    calls: dict[str, Callable[[], object]] = {
        "running": client.amm.running,
        "status": client.scheduler_info,
        "who_has": lambda: client.who_has([key]),
    }
    while not stop.is_set():
        for name, call in calls.items():
            started = time.perf_counter()
            try:
                call()
            except Exception:
                lat.failures += 1
                continue
            lat.add(name, time.perf_counter() - started)
        stop.wait(pause)


def _dask_build_and_converge(args: argparse.Namespace, keys: int) -> Figures:
    figures: Figures = {"directives_needed": keys * (args.replicas - 1)}
    data = make_keys(keys, args.value_bytes)
    probe_key = next(iter(data))
    with _dask_cluster(args) as client:
        targets = sorted(client.scheduler_info()["workers"])[: args.replicas]
        figures["build_s"], futures = _timed(
            lambda: client.scatter(data, workers=targets, broadcast=True), args.timeout, "built"
        )
        if futures is None:
            return figures

        # The scheduler is in this process (LocalCluster), with this script's client and
        # threads: its CPU and RSS are this process's.
        meter = ProcessMeter(os.getpid())
        worker_meters = [ProcessMeter(pid) for pid in client.run(os.getpid).values()]
        lat = Latencies()
        stop = threading.Event()
        prober = threading.Thread(
            target=_dask_probe, args=(client, probe_key, stop, lat, args.probe_pause), daemon=True
        )
        for one in (meter, *worker_meters):
            one.start()
        started = time.perf_counter()
        client.amm.start()
        prober.start()
        converged: float | None = None
        nreplicas = held = verified = 0
        try:
            while time.perf_counter() - started < args.timeout:
                time.sleep(CHECK_EVERY)
                # The scheduler forgets a replica as soon as it asks a worker to drop it, so its
                # who_has alone is optimistic: the workers' own stores must agree.
                nreplicas = client.run_on_scheduler(_scheduler_replicas)
                if nreplicas == keys:
                    verified += 1
                    asked = time.perf_counter()
                    held = sum(client.run(_worker_keys).values())
                    if held == keys:
                        converged = time.perf_counter() - started
                        figures["verify_s"] = time.perf_counter() - asked
                        break
        finally:
            stop.set()
            for one in (meter, *worker_meters):
                one.stop()
            prober.join(timeout=30)
            client.amm.stop()
        figures["converge_s"] = (
            converged if converged is not None else not_done("converged", args.timeout)
        )
        figures["replicas_at_end"] = nreplicas  # the scheduler's count
        figures["verifications"] = verified
        figures["cpu_s"] = meter.cpu_seconds
        figures["peak_rss_bytes"] = meter.peak_rss
        figures["workers_cpu_s"] = sum(m.cpu_seconds for m in worker_meters)
        figures.update(lat.figures())
        client.cancel(list(futures.values()))
    return figures


def _dask_throughput(args: argparse.Namespace) -> Figures:
    figures: Figures = {}
    total = args.replicate_bytes
    with _dask_cluster(args) as client:
        first, *_, last = sorted(client.scheduler_info()["workers"])
        big = make_big("replicate", total)
        futures = client.scatter(big, workers=[first])
        # Dask's AMM stays off here: its ReduceReplicas would undo the replication.
        elapsed, _ = _timed(
            lambda: client.replicate(list(futures.values()), n=2), args.timeout, "replicated"
        )
        if isinstance(elapsed, float):
            copies = client.who_has(list(futures.values()))
            if all(len(w) >= 2 for w in copies.values()):
                figures["replicate_gb_s"] = sum(map(len, big.values())) / elapsed / 1e9
            else:
                elapsed = f"returned after {elapsed:.1f} s with fewer than 2 copies"
        figures["replicate_s"] = elapsed
        client.cancel(list(futures.values()))

        big = make_big("retire", total)
        futures = client.scatter(big, workers=[last])
        elapsed, _ = _timed(lambda: client.retire_workers([last]), args.timeout, "retired")
        figures["retire_s"] = elapsed
        if isinstance(elapsed, float):
            held = client.who_has(list(futures.values()))
            if all(w and last not in w for w in held.values()):
                figures["retire_gb_s"] = sum(map(len, big.values())) / elapsed / 1e9
            else:
                figures["retire_s"] = f"returned after {elapsed:.1f} s with keys left behind"
    return figures


def run_dask(args: argparse.Namespace) -> Figures:
    results: Figures = {}
    for keys in args.keys:
        print(f"Dask: {keys:,} keys x {args.replicas} on {args.workers} workers ...", flush=True)
        results[str(keys)] = _guarded(
            "Dask", functools.partial(_dask_build_and_converge, args, keys)
        )
    if not args.skip_throughput:
        print(f"Dask: replicate and retire {format_bytes(args.replicate_bytes)} ...", flush=True)
        results["throughput"] = _guarded("Dask", lambda: _dask_throughput(args))
    return results


# -- the table -------------------------------------------------------------------------------------


def _rows_for_shape() -> list[tuple[str, str, str]]:
    """(figure, label, format) of each row of a shape's block."""
    rows = [
        ("build_s", "build: put K keys on R workers", "s"),
        ("converge_s", "converge: until 1 replica per key", "s"),
        ("replicas_at_end", "  replicas at the last check", "n"),
        ("verifications", "  checks of the workers' stores", "n"),
        ("verify_s", "  the last check took (counted in converge)", "s"),
        ("cycles", "  AMM cycles", "n"),
        ("directives_needed", "  directives needed, K x (R-1)", "n"),
        ("directives_sent", "  directives sent", "n"),
        ("directives_applied", "  directives applied", "n"),
        ("directives_refused", "  directives refused", "n"),
        ("directives_failed", "  directives failed", "n"),
        ("recent_refusals", "  reasons of the last refusals kept", "t"),
        ("cpu_s", "  AMM CPU while converging", "s"),
        ("peak_rss_bytes", "  AMM peak RSS while converging", "b"),
        ("workers_cpu_s", "  workers' CPU while converging, all", "s"),
        ("loop_holds", "  AMM loop held > 20 ms of CPU (--loop-probe)", "n"),
        ("loop_hold_max_ms", "  longest hold, CPU", "ms"),
        ("loop_hold_sites", "  where, most often", "t"),
        ("loop_gcs", "  garbage collections in the loop > 5 ms of CPU", "n"),
        ("loop_gc_max_ms", "  longest collection, CPU", "ms"),
        ("loop_lag_p99_ms", "  AMM loop: beats late by, p99 (--loop-probe)", "ms"),
        ("loop_lag_max_ms", "  beats late by, at most", "ms"),
        ("loop_lags_20ms", "  beats 20 ms late or more", "n"),
        ("loop_lag_cpu_share", "  before those: the loop ran its own work", "pct"),
        ("loop_lag_runq_share", "  before those: it waited for a core (run queue)", "pct"),
    ]
    for probe in PROBES:
        for stat in ("p50", "p99", "max"):
            rows.append((f"{probe}_{stat}_ms", f"  {probe}() latency {stat}", "ms"))
        whose = "busiest agent's" if probe == "holds_keys" else "AMM's"
        for stat in ("p50", "p99"):
            rows.append(
                (f"{probe}_loop_cpu_{stat}_ms", f"    {whose} loop CPU meanwhile, {stat}", "ms")
            )
    return rows


THROUGHPUT_ROWS = [
    ("replicate_s", "replicate to n=2", "s"),
    ("replicate_gb_s", "  throughput", "gb"),
    ("retire_s", "retire a worker", "s"),
    ("retire_gb_s", "  throughput", "gb"),
]


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # long ones in full in --json: here, not wider than the table
        return value if len(value) <= TEXT_CELL else value[: TEXT_CELL - 3] + "..."
    if kind == "s":
        return f"{value:.2f} s"
    if kind == "ms":
        return f"{value:.1f} ms"
    if kind == "b":
        return format_bytes(value)
    if kind == "gb":
        return f"{value:.3f} GB/s"
    if kind == "pct":
        return f"{value:.0%}"
    return f"{value:,}"


def _ratio(ours: Any, theirs: Any) -> str:
    numbers = (int, float)
    if not isinstance(ours, numbers) or not isinstance(theirs, numbers) or not theirs:
        return "-"
    return f"{ours / theirs:.2f}"


def render(args: argparse.Namespace, amm: Figures, dask: Figures | None) -> str:
    headers = ["", "amm", "Dask", "amm / Dask"] if dask is not None else ["", "amm"]
    rows: list[list[str]] = []

    def block(title: str, part: str, spec: list[tuple[str, str, str]]) -> None:
        rows.append([title, *([""] * (len(headers) - 1))])
        ours, theirs = amm.get(part, {}), (dask or {}).get(part, {})
        if "error" in ours or "error" in theirs:
            spec = [("error", "  failed", "t"), *spec]
        for key, label, kind in spec:
            row = [label, _cell(ours.get(key), kind)]
            if dask is not None:
                row += [_cell(theirs.get(key), kind), _ratio(ours.get(key), theirs.get(key))]
            rows.append(row)

    for keys in args.keys:
        block(f"{keys:,} keys x {args.replicas} replicas", str(keys), _rows_for_shape())
    if not args.skip_throughput:
        block(
            f"{format_bytes(args.replicate_bytes)} in {BIG_VALUES} values",
            "throughput",
            THROUGHPUT_ROWS,
        )
    return render_table(headers, rows, right=range(1, len(headers)))


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--keys", type=int, nargs="+", default=None, help="10000 100000")
    parser.add_argument("--replicas", type=int, default=4, help="replicas put of each key")
    parser.add_argument("--workers", type=int, default=4, help="agent (worker) processes")
    parser.add_argument("--value-bytes", type=int, default=100, help="size of each small value")
    parser.add_argument(
        "--replicate-bytes",
        type=parse_size,
        default=None,
        help=f"bytes replicated, and held by the retired worker, in {BIG_VALUES} values (1GiB)",
    )
    parser.add_argument("--interval", type=float, default=0.5, help="amm's AMM interval, s")
    parser.add_argument(
        "--dask-interval", type=float, default=2.0, help="Dask's AMM interval, s (its default)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each phase, s")
    parser.add_argument("--skip-dask", action="store_true", help="measure amm alone")
    parser.add_argument(
        "--skip-throughput",
        action="store_true",
        help="measure only the shapes (no replicate, retire)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small run: 2,000 keys, 64 MiB replicated"
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument(
        "--probe-pause",
        type=float,
        default=PROBE_PAUSE,
        metavar="SECONDS",
        help="rest between two rounds of control calls while converging; less makes more calls\n"
        "(a p99 of 50 calls is their max; pool runs with benchmarks/pool_latency.py)",
    )
    parser.add_argument(
        "--loop-probe",
        type=Path,
        default=None,
        metavar="PATH",
        help="have the AMM note each hold of its event loop over 20 ms of CPU in PATH, and\n"
        "count them in the table (amm_service.runtime.loop.loop_probe)",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="PATH",
        help="record the AMM with py-spy while it converges (raw, collapsed stacks; PATH-KEYS)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="print the AMM's totals at each convergence check"
    )
    parser.add_argument(
        "--py-spy-agents",
        type=Path,
        default=None,
        metavar="PATH",
        help="record each agent with py-spy while the AMM converges (PATH-KEYS-agentN)",
    )
    args = parser.parse_args(argv)
    if args.keys is None:
        args.keys = [2_000] if args.quick else [10_000, 100_000]
    if args.replicate_bytes is None:
        args.replicate_bytes = 64 * 2**20 if args.quick else 2**30
    if not 1 <= args.replicas <= args.workers:
        parser.error("--replicas must be between 1 and --workers")
    if args.workers < 2:
        parser.error("--workers must be at least 2 (a retirement needs somewhere to go)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM stops the run as Ctrl-C does, so that the clusters are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    load_start = os.getloadavg()
    print(
        f"{args.workers} workers, {args.replicas} replicas, values of {args.value_bytes} B; "
        f"amm interval {args.interval:g} s, Dask interval {args.dask_interval:g} s; "
        f"deadline {args.timeout:g} s per phase; load average {_load(load_start)}",
        flush=True,
    )
    dask: Figures | None = None
    dask_note = ""
    if not args.skip_dask and importlib.util.find_spec("distributed") is None:
        dask_note = "Dask skipped: the bench extra is not installed (pip install -e '.[bench]')"
    try:
        amm = run_amm(args)
        if not args.skip_dask and not dask_note:
            dask = run_dask(args)
    finally:
        end_children()
    load_end = os.getloadavg()
    print()
    print(render(args, amm, dask))
    print()
    for note in _notes(args, dask_note):
        print(textwrap.fill(note, width=100, subsequent_indent="  "))
    print(f"load average at start {_load(load_start)}, at end {_load(load_end)}")
    if args.json is not None:
        document = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "load_average": {"start": load_start, "end": load_end},
            "cpus": os.cpu_count(),
            "amm": amm,
            "dask": dask,
        }
        args.json.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


def _load(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def _notes(args: argparse.Namespace, dask_note: str) -> list[str]:
    notes = [
        f"converged: both systems alike, every {CHECK_EVERY:g} s the manager's belief is read "
        "(amm: the keys of each worker, ListWorkers; Dask: the keys of each worker state, "
        "has_what), and once it counts K replicas in all the workers' own stores are asked "
        "(amm: HoldsKeys of every key on every agent, "
        "directly, each key must be held exactly once; Dask: client.run, the workers' data must "
        "hold K keys in all); converged is the time that answer came in, else the belief is "
        "read again.",
        "amm's AMM runs in its own process; Dask's scheduler runs in this one (LocalCluster), so "
        "its CPU and RSS include this script's client and threads.",
        "latency: one call at a time in a loop while converging; who_has is fresh (amm asks "
        "every agent for the key first), who_has_view is not (the wire's default: amm answers "
        "from what it knows); Dask's status() is scheduler_info(). Dask counts no "
        "cycles or directives.",
        "replicate: amm sets a goal n=2 that its running AMM carries out; Dask's "
        "Client.replicate copies with its AMM off (its ReduceReplicas would undo it).",
    ]
    if dask_note:
        notes.append(dask_note)
    return notes


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every process this run started is stopped", file=sys.stderr)
        sys.exit(130)

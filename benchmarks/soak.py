"""Churn for a while, forget everything, settle: has the AMM or an agent kept memory it should not?

A ``LocalCluster`` (an AMM and ``--workers`` agents) is churned for ``--minutes``: each round
puts ``--batch`` keys on random workers, gives half of them a goal of two copies, reads some
through other workers (which makes replicas), and forgets the keys of the round ``--window``
rounds back. The resident memory (RSS) of every process is taken

1. at start: once the cluster is up and warm, then a forget of all and ``--settle`` seconds.
   Warm means that it has been through a full window of rounds (the working set was reached
   once: the start figure includes what the allocators keep after a peak), and that the
   bounded structures that only fill up are full: the AMM's event log (the last 1,000 events,
   each listing up to 100 keys: a few MiB) has wrapped. A full ring is not a leak, and measured
   from an empty one it reads as growth. ``cold`` is before any data, and the growth from it
   is reported too, labelled as such: it includes that one-time warm-up (first puts and
   copies, gRPC's buffers, the event log filling);
2. during the churn: the peak;
3. at the end: after a forget of everything, once the agents hold nothing, and ``--settle``
   seconds of cycles after that: by default until the agents' tombstones of the last forgets
   have expired (``--agent-tombstone-ttl`` and 30 s), since what a Forget leaves is kept for a
   bounded time by design (tombstones in the AMM and the agents, the agents' directive
   outcomes), and the question is what stays after that.

The goal is under 5% growth from the warm start to the end, per process.

A leak and a high-water mark both read as growth from start to end; their shapes differ. The
churn runs at a steady pace (``--rate`` rounds a minute: the same work every minute, however
loaded the machine), RSS is sampled every ``--sample-every`` seconds, and the slope (MiB per
minute, least squares) of the first half of the churn is set against the second's: a leak keeps
its slope, a high-water mark flattens. ``--heap`` turns on the processes' memory probe
(``amm.base.memdebug``: tracemalloc and gc, slower) and splits each figure into the Python heap
(bytes of objects alive) and the native rest (RSS minus that: the C allocator's free-but-resident
memory, gRPC's buffers), and lists the containers and allocation sites that grew. Tracemalloc's
own allocations swell the C heap (the AMM's held 29 MiB after 10 minutes with it, 12 without),
so for RSS figures add
``--no-trace``: the Python heap is then CPython's small-object arenas, which it reports only
without tracemalloc.

    python benchmarks/soak.py --minutes 30 --json soak.json
    python benchmarks/soak.py --minutes 3 --tombstone-ttl 30s --agent-tombstone-ttl 45s
    python benchmarks/soak.py --minutes 10 --heap              # allocation sites, containers
    python benchmarks/soak.py --minutes 30 --heap --no-trace   # RSS, split, unperturbed
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from amm import EventGap
from amm.base.memdebug import rss
from amm.base.units import parse_duration
from amm.client import Client
from amm.cluster import LocalCluster
from amm.errors import AmmError


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as every benchmark reads them."""
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def sample(pids: dict[str, int]) -> dict[str, int]:
    return {name: rss(pid) for name, pid in pids.items()}


def wait_empty(client: Client, within: float) -> float:
    """Seconds until the AMM (asking every agent afresh) sees no key anywhere."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if not client.who_has(fresh=True):
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"keys still held {within:.0f}s after forgetting everything")


def event_log(client: Client) -> tuple[int, int]:
    """(events the AMM retains, events it has recorded since it started)."""
    retained = missed = 0
    for item in client.events(after=0):
        if isinstance(item, EventGap):
            missed += item.missed
        else:
            retained += 1
    return retained, retained + missed


def warm_up(churn: Churn, client: Client, limit: float) -> tuple[int, tuple[int, int]]:
    """Rounds until a full window went by and the AMM's event log has wrapped (at most ``limit``
    seconds); (rounds, ``event_log`` at the end)."""
    began = time.monotonic()
    rounds = 0
    log = event_log(client)
    while rounds <= churn.args.window or (log[0] == log[1] and time.monotonic() - began < limit):
        churn.round()
        rounds += 1
        if rounds > churn.args.window:
            log = event_log(client)
    return rounds, log


class Churn:
    def __init__(self, client: Client, workers: list[str], args: argparse.Namespace) -> None:
        self.client = client
        self.workers = workers
        self.args = args
        self.rng = random.Random(args.seed)
        self.rounds: list[list[str]] = []
        self.forgotten = 0  # rounds[:forgotten] are forgotten
        self.counts = {"rounds": 0, "puts": 0, "bytes put": 0, "reads": 0, "forgets": 0}
        self.errors = 0

    def round(self) -> None:
        """Put a batch, set goals on half, read some elsewhere, forget an old batch."""
        n = len(self.rounds)
        keys = [f"soak-{n}-{i}" for i in range(self.args.batch)]
        for key in keys:
            value = self.rng.randbytes(self.rng.randrange(1_000, self.args.max_value))
            worker = self.rng.choice(self.workers)
            self.call(functools.partial(self.client.put, key, value, workers=worker))
            self.counts["puts"] += 1
            self.counts["bytes put"] += len(value)
        self.call(lambda: self.client.replicate(keys[: len(keys) // 2], n=2))
        for key in self.rng.sample(keys, len(keys) // 4):
            self.call(functools.partial(self.client.get, key, self.rng.choice(self.workers)))
            self.counts["reads"] += 1
        self.rounds.append(keys)
        self.counts["rounds"] += 1
        self.forget_upto(max(0, len(self.rounds) - self.args.window))

    def forget_upto(self, end: int) -> None:
        """Forget the rounds before ``end`` not forgotten yet."""
        keys = [key for keys in self.rounds[self.forgotten : end] for key in keys]
        self.forgotten = max(self.forgotten, end)
        if keys:
            self.call(lambda: self.client.forget(keys))
            self.counts["forgets"] += len(keys)

    def forget_all(self) -> None:
        self.forget_upto(len(self.rounds))

    def call(self, what: Callable[[], object]) -> None:
        """``what()``; a failure is counted and printed, and the churn goes on."""
        try:
            what()
        except AmmError as err:
            self.errors += 1
            print(f"  error: {err}", file=sys.stderr)


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


class Probe:
    """The lines the processes' memory probes (``amm.base.memdebug``) write, by pid."""

    def __init__(
        self, directory: str | None, every: float, trim: bool = False, trace: bool = True
    ) -> None:
        self.directory = directory
        self.every = every
        self.trim = trim
        self.trace = trace

    def env(self) -> dict[str, str]:
        if self.directory is None:
            return {}
        env = {"AMM_MEMDEBUG": self.directory, "AMM_MEMDEBUG_EVERY": f"{self.every:g}"}
        if self.trim:
            env["AMM_MEMDEBUG_TRIM"] = "1"
        if not self.trace:
            env["AMM_MEMDEBUG_TRACE"] = "0"
        return env

    def last(self, pid: int) -> dict[str, object] | None:
        """The probe's latest line of ``pid`` (None when it has none or is off)."""
        if self.directory is None:
            return None
        try:
            with open(os.path.join(self.directory, f"{pid}.jsonl"), "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            try:
                parsed: dict[str, object] = json.loads(line)
                return parsed
            except ValueError:
                continue  # being written
        return None

    def fresh(self, pids: dict[str, int]) -> dict[str, dict[str, object] | None]:
        """A line of each process written from now on (waits a probe's period or two)."""
        if self.directory is None:
            return dict.fromkeys(pids)
        asked = time.time()
        deadline = time.monotonic() + 5 * self.every + 30
        lines: dict[str, dict[str, object] | None] = {}
        while time.monotonic() < deadline:
            lines = {name: self.last(pid) for name, pid in pids.items()}
            if all(
                line is not None and float(line["time"]) >= asked  # type: ignore[arg-type]
                for line in lines.values()
            ):
                break
            time.sleep(0.5)
        return lines


def split(rss_bytes: int, line: dict[str, object] | None) -> tuple[float, float] | None:
    """(Python heap, native rest) in bytes from a probe line; None without one. With
    tracemalloc, the Python heap is the objects alive and the native rest is RSS less them and
    tracemalloc's own bookkeeping; without (``--no-trace``), the Python heap is CPython's
    small-object arenas (objects over 512 bytes are in the C heap, counted as native)."""
    if line is None:
        return None
    if "traced" in line:
        traced = float(line["traced"])  # type: ignore[arg-type]
        overhead = float(line["tracemalloc_overhead"])  # type: ignore[arg-type]
        return traced, rss_bytes - traced - overhead
    if "py_arenas" in line:
        arenas = float(line["py_arenas"])  # type: ignore[arg-type]
        return arenas, rss_bytes - arenas
    return None


#: The probe's figures the soak breaks RSS into, start -> end (bytes).
BREAKDOWN = (
    ("traced", "Python objects alive (tracemalloc)"),
    ("py_arenas", "CPython small-object arenas mapped"),
    ("py_blocks_in_use", "  of which blocks in use"),
    ("py_blocks_free", "  of which free blocks"),
    ("malloc_in_use", "C heap in use (mallinfo2)"),
    ("malloc_free", "C heap free, kept"),
    ("rss_by.file", "RSS: files (code, libraries)"),
    ("rss_by.brk_heap", "RSS: glibc main arena"),
    ("rss_by.thread_arenas", "RSS: glibc thread arenas"),
    ("rss_by.thread_stacks", "RSS: thread stacks"),
    ("rss_by.other_anon", "RSS: other anonymous (py arenas, big mallocs, gRPC)"),
    ("threads", "threads (count, not MiB)"),
)


def figure(line: dict[str, Any] | None, field: str) -> float | None:
    """``field`` (``a.b`` reaches into a dict) of a probe line, in MiB; None if absent."""
    value: Any = line
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if field == "threads" else float(value) / 2**20


def malloc_free(line: dict[str, object] | None) -> float | None:
    """MiB the C allocator holds free (``mallinfo2``), from a probe line."""
    if line is None or "malloc_free" not in line:
        return None
    return float(line["malloc_free"]) / 2**20  # type: ignore[arg-type]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minutes, bytes) points, in MiB a minute (0 for fewer than 2)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / var / 2**20


def halves(series: list[tuple[float, float]], minutes: float) -> tuple[float, float]:
    """Slopes (MiB/min) over the first and the second half of the churn."""
    mid = minutes / 2
    return (
        slope([p for p in series if p[0] <= mid]),
        slope([p for p in series if p[0] >= mid]),
    )


def grown(
    start: dict[str, object] | None, end: dict[str, object] | None, field: str
) -> list[tuple[str, float, float]]:
    """(name, at start, at end) of what grew most between two probe lines' ``field``:
    ``containers`` (by owner, lengths) or ``sites`` (bytes)."""
    if start is None or end is None:
        return []

    def table(line: dict[str, object]) -> dict[str, float]:
        if field == "containers":
            out: dict[str, float] = {}
            for c in line.get("containers", []):  # type: ignore[attr-defined]
                name = f"{c['owner']} ({c['type']})"
                out[name] = max(out.get(name, 0), c["len"])
            return out
        return {k: float(v) for k, v in line.get(field, {}).items()}  # type: ignore[attr-defined]

    a, b = table(start), table(end)
    rows = [(k, a.get(k, 0.0), v) for k, v in b.items() if v > a.get(k, 0.0)]
    rows.sort(key=lambda r: r[2] - r[1], reverse=True)
    return rows[:8]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=40, help="keys put per round")
    parser.add_argument("--window", type=int, default=5, help="rounds a key lives")
    parser.add_argument("--max-value", type=int, default=200_000, help="bytes, at most")
    parser.add_argument("--interval", default="200ms")
    parser.add_argument(
        "--rate",
        type=float,
        default=40.0,
        help="rounds a minute, paced (0: as fast as they go; default: 40, which a loaded 2-core"
        " machine keeps up with)",
    )
    parser.add_argument(
        "--sample-every", type=float, default=20.0, help="seconds between RSS samples"
    )
    parser.add_argument(
        "--heap",
        action="store_true",
        help="run the processes' memory probe (tracemalloc and gc: slower) and split each"
        " figure into Python heap and native",
    )
    parser.add_argument(
        "--no-trace",
        action="store_true",
        help="with --heap: no tracemalloc, whose own allocations swell the C heap (the AMM's"
        " held 29 MiB after 10 minutes with it, 12 without): the Python heap is then CPython's"
        " small-object arenas, and no allocation sites are listed",
    )
    parser.add_argument(
        "--trim",
        action="store_true",
        help="with --heap: the probe calls malloc_trim before each line (an experiment: is the"
        " growth free memory the C allocator keeps?)",
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the AMM and agents (e.g. MALLOC_ARENA_MAX=1)",
    )
    parser.add_argument("--tombstone-ttl", default="2m", help="the AMM's (its default: 2m)")
    parser.add_argument(
        "--agent-tombstone-ttl", default="3m", help="the agents' (their default: 3m)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        help="seconds of cycles at the end (default: the agents' tombstone TTL and 30 s)",
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=10.0,
        help="minutes of rounds at most until the AMM's event log is full (default: 10)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.settle is None:
        args.settle = parse_duration(args.agent_tombstone_ttl) + 30.0
    pace = f"{args.rate:g} rounds/min" if args.rate > 0 else "unpaced"
    print(
        f"soak: {args.minutes:g} min of churn ({pace}), {args.workers} agents, tombstones kept"
        f" {args.tombstone_ttl} (AMM) and {args.agent_tombstone_ttl} (agents); RSS at the end"
        f" after {args.settle:.0f} s of settling"
        f"{'; memory probe on' if args.heap else ''}{' (trimming)' if args.trim else ''}"
        f"{' (no tracemalloc)' if args.heap and args.no_trace else ''};"
        f" load average {loadavg()}",
        flush=True,
    )

    with tempfile.TemporaryDirectory(prefix="amm-soak-") as scratch:
        probe_dir = os.path.join(scratch, "memdebug") if args.heap else None
        if probe_dir:
            os.mkdir(probe_dir)
        probe = Probe(probe_dir, min(10.0, args.sample_every), args.trim, not args.no_trace)
        with LocalCluster(
            args.workers,
            interval=args.interval,
            start=True,
            state=os.path.join(scratch, "state.db"),
            service_args=["--tombstone-ttl", args.tombstone_ttl],
            agent_args=["--tombstone-ttl", args.agent_tombstone_ttl],
            env={**dict(e.split("=", 1) for e in args.env), **probe.env()},
        ) as cluster:
            result = soak(cluster, args, probe)
    return report(result, args)


def soak(cluster: LocalCluster, args: argparse.Namespace, probe: Probe) -> dict[str, object]:
    """Warm up, settle, churn at the pace asked while sampling, forget all, settle; the
    figures, for ``report``."""
    pids = {"amm": cluster.service_pid}
    pids.update({f"agent {i}": pid for i, pid in enumerate(cluster.worker_pids.values())})
    with Client(cluster.address, timeout=30) as client:
        churn = Churn(client, cluster.workers, args)
        cold = sample(pids)
        warm_rounds, events = warm_up(churn, client, args.warm_up * 60)
        full = events[0] < events[1]
        print(
            f"warm-up: {warm_rounds} rounds; the AMM's event log holds {events[0]} of the"
            f" {events[1]} events recorded"
            + ("" if full else " (not full yet: its filling will read as growth)"),
            flush=True,
        )
        churn.forget_all()
        wait_empty(client, 120)
        time.sleep(args.settle)
        start = sample(pids)
        heap_start = probe.fresh(pids)
        load_start = loadavg()
        peak = dict(start)
        # (minutes into the churn, rss, probe line) per process
        series: dict[str, list[tuple[float, int, dict[str, object] | None]]] = {
            name: [(0.0, start[name], heap_start[name])] for name in pids
        }
        began = time.monotonic()
        next_sample = began + args.sample_every
        next_report = began + 60
        late = 0  # times the rounds fell behind their pace and it slipped
        skew = 0.0
        rounds_before = churn.counts["rounds"]  # the warm-up's
        rounds_at: list[tuple[float, int]] = [(0.0, 0)]
        period = 60.0 / args.rate if args.rate > 0 else 0.0
        while time.monotonic() - began < args.minutes * 60:
            due = began + skew + (churn.counts["rounds"] - rounds_before) * period
            ahead = due - time.monotonic()
            if ahead > 0:
                time.sleep(max(0.0, min(ahead, next_sample - time.monotonic())))
            else:
                if -ahead > 2 * period > 0:  # too far behind to catch up: the pace slips
                    skew -= ahead
                    late += 1
                churn.round()
            now = sample(pids)
            peak = {name: max(peak[name], now[name]) for name in pids}
            if time.monotonic() >= next_sample:
                next_sample += args.sample_every
                minute = (time.monotonic() - began) / 60
                for name, pid in pids.items():
                    series[name].append((minute, now[name], probe.last(pid)))
                rounds_at.append((minute, churn.counts["rounds"] - rounds_before))
            if time.monotonic() >= next_report:
                next_report += 60
                minute = (time.monotonic() - began) / 60
                line = " ".join(f"{name}={mib(v)}" for name, v in now.items())
                print(
                    f"{minute:5.1f} min  rounds={churn.counts['rounds']}  {line} MiB"
                    f"  load {loadavg()}",
                    flush=True,
                )
        churned = time.monotonic() - began
        churn.forget_all()
        emptied = wait_empty(client, 300)
        time.sleep(args.settle)
        end = sample(pids)
        heap_end = probe.fresh(pids)
        load_end = loadavg()
        exited = cluster.exited()
    return {
        "pids": pids,
        "churn": churn,
        "cold": cold,
        "start": start,
        "peak": peak,
        "end": end,
        "heap_start": heap_start,
        "heap_end": heap_end,
        "series": series,
        "churned": churned,
        "late": late,
        "rounds_at": rounds_at,
        "rounds": churn.counts["rounds"] - rounds_before,
        "emptied": emptied,
        "warm_rounds": warm_rounds,
        "events": events,
        "full": full,
        "load": (load_start, load_end),
        "exited": exited,
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> int:
    """Print the table (and write ``--json``); 0 when no process exited and no call failed."""
    pids: dict[str, int] = r["pids"]
    churn: Churn = r["churn"]
    cold, start, peak, end = r["cold"], r["start"], r["peak"], r["end"]
    minutes = r["churned"] / 60
    rows = []

    def growth(since: dict[str, int], name: str) -> float:
        return (end[name] - since[name]) / since[name] * 100 if since[name] else 0.0

    for name in pids:
        series = r["series"][name]
        rss_first, rss_second = halves([(m, float(v)) for m, v, _ in series], minutes)
        row: dict[str, Any] = {
            "process": name,
            "cold_mib": cold[name] / 2**20,
            "start_mib": start[name] / 2**20,
            "peak_mib": peak[name] / 2**20,
            "end_mib": end[name] / 2**20,
            "growth_pct": growth(start, name),
            "growth_from_cold_pct": growth(cold, name),
            "slope_first_mib_min": rss_first,
            "slope_second_mib_min": rss_second,
        }
        a, b = split(start[name], r["heap_start"][name]), split(end[name], r["heap_end"][name])
        if a and b:
            py = [(m, p[0]) for m, v, line in series if (p := split(v, line))]
            native = [(m, p[1]) for m, v, line in series if (p := split(v, line))]
            row.update(
                {
                    "python_start_mib": a[0] / 2**20,
                    "python_end_mib": b[0] / 2**20,
                    "native_start_mib": a[1] / 2**20,
                    "native_end_mib": b[1] / 2**20,
                    "breakdown_mib": {
                        field: (
                            figure(r["heap_start"][name], field),
                            figure(r["heap_end"][name], field),
                        )
                        for field, _ in BREAKDOWN
                    },
                    "malloc_free_start_mib": malloc_free(r["heap_start"][name]),
                    "malloc_free_end_mib": malloc_free(r["heap_end"][name]),
                    "python_slopes_mib_min": halves(py, minutes),
                    "native_slopes_mib_min": halves(native, minutes),
                    "containers_grown": grown(
                        r["heap_start"][name], r["heap_end"][name], "containers"
                    ),
                    "sites_grown": grown(r["heap_start"][name], r["heap_end"][name], "sites"),
                }
            )
        rows.append(row)
    rate = r["rounds"] / minutes if minutes else 0.0
    mid = [n for m, n in r["rounds_at"] if m <= minutes / 2][-1]
    rates = (mid / (minutes / 2), (r["rounds"] - mid) / (minutes / 2))
    print(
        f"\nchurned {minutes:.1f} min: {r['rounds']} rounds, {rate:.0f} a minute"
        f" ({rates[0]:.0f} in the first half, {rates[1]:.0f} in the second; the pace slipped"
        f" {r['late']} times); with the"
        " warm-up: "
        + ", ".join(f"{v} {k}" for k, v in churn.counts.items())
        + f", {churn.errors} errors; empty {r['emptied']:.1f}s after the last forget,"
        f" then {args.settle:.0f}s of settling"
    )
    print(
        f"{'process':<10} {'cold':>7} {'start':>7} {'peak':>7} {'end':>7}"
        f" {'growth':>7} {'vs cold':>8} {'slope 1st':>10} {'slope 2nd':>10}"
        "  (MiB; slopes of RSS during the churn in MiB/min)"
    )
    for row in rows:
        print(
            f"{row['process']:<10} {row['cold_mib']:>7.1f} {row['start_mib']:>7.1f}"
            f" {row['peak_mib']:>7.1f} {row['end_mib']:>7.1f} {row['growth_pct']:>6.1f}%"
            f" {row['growth_from_cold_pct']:>7.1f}% {row['slope_first_mib_min']:>10.3f}"
            f" {row['slope_second_mib_min']:>10.3f}"
        )
    if any("python_start_mib" in row for row in rows):
        print(
            f"\n{'process':<10} {'python':>15} {'native':>15} {'of it malloc free':>18}"
            f" {'py slopes':>16} {'native slopes':>16}  (MiB start->end; MiB/min 1st/2nd half)"
        )
        for row in rows:
            if "python_start_mib" not in row:
                continue
            ps, ns = row["python_slopes_mib_min"], row["native_slopes_mib_min"]
            py0, py1 = row["python_start_mib"], row["python_end_mib"]
            free0, free1 = row["malloc_free_start_mib"] or 0, row["malloc_free_end_mib"] or 0
            print(
                f"{row['process']:<10} {py0:>6.1f}->{py1:<6.1f}"
                f"   {row['native_start_mib']:>6.1f}->{row['native_end_mib']:<6.1f}"
                f"      {free0:>6.1f}->{free1:<6.1f}"
                f"   {ps[0]:>7.3f}/{ps[1]:<7.3f} {ns[0]:>7.3f}/{ns[1]:<7.3f}"
            )
        named = [row for row in rows if "breakdown_mib" in row]
        print(f"\n{'MiB, start -> end':<52}" + "".join(f" {row['process']:>15}" for row in named))
        for field, label in BREAKDOWN:
            cells = []
            for row in named:
                a, b = row["breakdown_mib"][field]
                cells.append(" " * 15 if a is None or b is None else f" {a:>6.1f} -> {b:<5.1f}")
            print(f"{label:<52}" + "".join(cells))
        for row in rows:
            for field, unit in (("containers_grown", "entries"), ("sites_grown", "bytes")):
                if row.get(field):
                    print(f"{row['process']}: grew most ({unit}, start -> end):")
                    for what, a, b in row[field]:
                        print(f"    {a:>12,.0f} -> {b:<12,.0f} {what}")
    print(
        "growth: from the warm start to the end (the goal: under 5%); vs cold: from before any"
        " data, which includes the one-time warm-up (first puts and copies, gRPC's buffers, the"
        f" AMM's event log filling: {'full' if r['full'] else 'NOT full'} at the warm start)."
        " A leak keeps its slope in the second half; a high-water mark flattens."
    )
    load_start, load_end = r["load"]
    print(f"load average: {load_start} at the start, {load_end} at the end")
    if r["exited"]:
        print(f"processes that exited: {r['exited']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "args": vars(args),
                    "minutes": minutes,
                    "rounds": r["rounds"],
                    "rounds_per_minute": rate,
                    "rounds_per_minute_halves": rates,
                    "pace_slipped": r["late"],
                    "counts": churn.counts,
                    "warm_up_rounds": r["warm_rounds"],
                    "event_log_at_start": {
                        "retained": r["events"][0],
                        "recorded": r["events"][1],
                    },
                    "errors": churn.errors,
                    "rss": rows,
                    "samples": {
                        name: [(m, v) for m, v, _ in series] for name, series in r["series"].items()
                    },
                    "loadavg": {"start": load_start, "end": load_end},
                },
                out,
                indent=2,
            )
    return 0 if not r["exited"] and not churn.errors else 1


if __name__ == "__main__":
    sys.exit(main())

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

    python benchmarks/soak.py --minutes 30 --json soak.json
    python benchmarks/soak.py --minutes 3 --tombstone-ttl 30s --agent-tombstone-ttl 45s
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

from amm import EventGap
from amm.base.units import parse_duration
from amm.client import Client
from amm.cluster import LocalCluster
from amm.errors import AmmError


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as ``/proc/loadavg`` has them."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


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


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=40, help="keys put per round")
    parser.add_argument("--window", type=int, default=5, help="rounds a key lives")
    parser.add_argument("--max-value", type=int, default=200_000, help="bytes, at most")
    parser.add_argument("--interval", default="200ms")
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
    print(
        f"soak: {args.minutes:g} min of churn, {args.workers} agents, tombstones kept"
        f" {args.tombstone_ttl} (AMM) and {args.agent_tombstone_ttl} (agents); RSS at the end"
        f" after {args.settle:.0f} s of settling; load average {loadavg()}",
        flush=True,
    )

    with (
        tempfile.TemporaryDirectory(prefix="amm-soak-") as scratch,
        LocalCluster(
            args.workers,
            interval=args.interval,
            start=True,
            state=os.path.join(scratch, "state.db"),
            service_args=["--tombstone-ttl", args.tombstone_ttl],
            agent_args=["--tombstone-ttl", args.agent_tombstone_ttl],
        ) as cluster,
    ):
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
            load_start = loadavg()
            peak = dict(start)
            began = time.monotonic()
            next_report = began + 60
            while time.monotonic() - began < args.minutes * 60:
                churn.round()
                now = sample(pids)
                peak = {name: max(peak[name], now[name]) for name in pids}
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
            load_end = loadavg()
            exited = cluster.exited()
    rows = []

    def growth(since: dict[str, int], name: str) -> float:
        return (end[name] - since[name]) / since[name] * 100 if since[name] else 0.0

    for name in pids:
        rows.append(
            {
                "process": name,
                "cold_mib": cold[name] / 2**20,
                "start_mib": start[name] / 2**20,
                "peak_mib": peak[name] / 2**20,
                "end_mib": end[name] / 2**20,
                "growth_pct": growth(start, name),
                "growth_from_cold_pct": growth(cold, name),
            }
        )
    print(
        f"\nchurned {churned / 60:.1f} min: "
        + ", ".join(f"{v} {k}" for k, v in churn.counts.items())
        + f", {churn.errors} errors; empty {emptied:.1f}s after the last forget,"
        f" then {args.settle:.0f}s of settling"
    )
    print(
        f"{'process':<10} {'cold':>8} {'start':>8} {'peak':>8} {'end':>8}"
        f" {'growth':>8} {'vs cold':>8}  (MiB)"
    )
    for row in rows:
        print(
            f"{row['process']:<10} {row['cold_mib']:>8.1f} {row['start_mib']:>8.1f}"
            f" {row['peak_mib']:>8.1f} {row['end_mib']:>8.1f} {row['growth_pct']:>7.1f}%"
            f" {row['growth_from_cold_pct']:>7.1f}%"
        )
    print(
        "growth: from the warm start to the end (the goal: under 5%); vs cold: from before any"
        " data, which includes the one-time warm-up (first puts and copies, gRPC's buffers, the"
        f" AMM's event log filling: {'full' if full else 'NOT full'} at the warm start)"
    )
    print(f"load average: {load_start} at the start, {load_end} at the end")
    if exited:
        print(f"processes that exited: {exited}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "args": vars(args),
                    "minutes": churned / 60,
                    "counts": churn.counts,
                    "warm_up_rounds": warm_rounds,
                    "event_log_at_start": {"retained": events[0], "recorded": events[1]},
                    "errors": churn.errors,
                    "rss": rows,
                    "loadavg": {"start": load_start, "end": load_end},
                },
                out,
                indent=2,
            )
    return 0 if not exited and not churn.errors else 1


if __name__ == "__main__":
    sys.exit(main())

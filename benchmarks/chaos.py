"""Seeded random fault episodes against a real AMM and real agents, checking what must survive.

Each episode starts a fresh ``LocalCluster`` (short intervals, a state file, a short
``--dead-after``), puts small keys, sets replication goals, and lets loose a random sequence of
faults between further puts, goals and reads:

- ``kill``: an agent SIGKILLed, possibly mid-transfer (its data goes with it);
- ``restart``: an agent SIGKILLed and started again, empty, on the same address;
- ``term``: an agent SIGTERMed, which drains (asks the AMM to retire it) before it exits;
- ``amm``: the AMM SIGKILLed and started again on the same address and state file;
- ``freeze``: an agent SIGSTOPped past ``--dead-after``, then SIGCONTed;
- ``forget``: keys forgotten while copies of them are under way.

Then the cluster settles (every running agent registered with the AMM since it last started, and
the lost-key list caught up) and the invariant is checked against the agents' own inventories (asked
directly, not through the AMM):

1. every acknowledged, unforgotten key that a surviving agent holds is readable with its bytes,
   and not reported lost;
2. every other acknowledged, unforgotten key is reported lost (``lost_keys``); it counts as
   lost *wrongly* unless an agent destroyed by a fault held it just before (kill, restart, a
   drain that ran out of time);
3. no forgotten key is held anywhere again.

A put or forget whose outcome is unknown (the call failed) is left out of the checks. The
episode's faults are seeded, their timing against the AMM's cycles is not: a seed names the
sequence, not an exact interleaving.

    python benchmarks/chaos.py --episodes 200 --seed 1 --json out.json
    python benchmarks/chaos.py --episodes 200 --jobs 2 --minutes 25   # two clusters at a time
    python benchmarks/chaos.py --seed 1 --first 17 --episodes 1 -v     # rerun episode 17
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc

from amm.base.serving import CHANNEL_OPTIONS
from amm.client import Client
from amm.cluster import LocalCluster
from amm.errors import AmmError
from amm.v1 import agent_pb2, agent_pb2_grpc

T = TypeVar("T")

FAULTS = ("kill", "restart", "term", "amm", "freeze", "forget")
#: Statuses a call gets while the AMM restarts or an agent is gone: retried until a deadline.
TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
INTERVAL = 0.1
DEAD_AFTER = 1.0


@dataclasses.dataclass
class Figures:
    """What a run saw; ``failures`` says which episode broke which rule, and how."""

    episodes: int = 0
    faults: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    keys_checked: int = 0
    readable: int = 0
    lost_wrongly: int = 0
    really_lost: int = 0
    reported_lost: int = 0
    reported_but_held: int = 0
    lost_in_drains: int = 0
    forgotten: int = 0
    forgotten_back: int = 0
    uncertain: int = 0
    wrong_bytes: int = 0
    seconds: float = 0.0
    failures: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Figures) -> None:
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, collections.Counter):
                mine.update(theirs)
            elif isinstance(mine, list):
                mine.extend(theirs)
            else:
                setattr(self, field.name, mine + theirs)

    @property
    def ok(self) -> bool:
        return not (
            self.lost_wrongly
            or self.reported_lost < self.really_lost
            or self.reported_but_held
            or self.forgotten_back
            or self.wrong_bytes
        )

    def as_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["faults"] = dict(sorted(self.faults.items()))
        out["ok"] = self.ok
        return out


def inventory(address: str) -> set[str] | None:
    """The keys the agent at ``address`` holds, asked of it directly; None if it cannot say."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.WorkerAgentStub(channel)
        keys: set[str] = set()
        cursor = ""
        try:
            while True:
                reply = stub.Poll(agent_pb2.PollRequest(full=True, cursor=cursor), timeout=5)
                keys.update(k.key for k in reply.keys)
                if not reply.next_cursor:
                    return keys
                cursor = reply.next_cursor
        except grpc.RpcError:
            return None


def retrying(
    call: Callable[[], T], within: float = 20.0, also: tuple[grpc.StatusCode, ...] = ()
) -> T:
    """``call()``, again while it fails transiently (the AMM restarting), or with a status of
    ``also``, until ``within``."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except AmmError as err:
            if err.status not in (*TRANSIENT, *also) or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


class Episode:
    """One cluster, one seeded sequence of operations and faults, one check."""

    def __init__(self, seed: str, faults: int | Sequence[str] = 3, verbose: bool = False) -> None:
        self.name = seed
        self.rng = random.Random(seed)
        #: The faults to play in order, or None: ``faults`` of them drawn as the episode goes.
        self.schedule = None if isinstance(faults, int) else list(faults)
        self.n_faults = faults if isinstance(faults, int) else len(self.schedule or ())
        self.verbose = verbose
        self.figures = Figures(episodes=1)
        self.values: dict[str, bytes] = {}
        self.forgotten: set[str] = set()
        self.uncertain: set[str] = set()
        #: Keys an agent destroyed by a fault held just before: they may be really lost.
        self.destroyed: set[str] = set()
        #: Of those, keys only a draining agent (SIGTERM) held.
        self.drained: set[str] = set()
        self.count = 0
        #: When the episode last started an agent, by address (wall clock, as the AMM's).
        self.started: dict[str, float] = {}

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[{self.name}] {message}", file=sys.stderr, flush=True)

    def fail(self, message: str) -> None:
        self.figures.failures.append(f"episode {self.name}: {message}")
        self.log(f"FAIL {message}")

    def run(self) -> Figures:
        start = time.monotonic()
        with self.cluster() as cluster, Client(cluster.address, timeout=10) as client:
            self.play(cluster, client)
            self.check(cluster, client)
        self.figures.seconds = time.monotonic() - start
        return self.figures

    @contextlib.contextmanager
    def cluster(self) -> Iterator[LocalCluster]:
        """Three agents, short intervals, and a state file the AMM restarts from."""
        with tempfile.TemporaryDirectory(prefix="amm-chaos-") as scratch:
            state = os.path.join(scratch, "state.db")
            with LocalCluster(
                3,
                interval=INTERVAL,
                start=True,
                state=state,
                service_args=[
                    "--dead-after",
                    f"{DEAD_AFTER}s",
                    "--startup-grace",
                    "1s",
                    "--poll-timeout",
                    "500ms",
                    "--directive-timeout",
                    "5s",
                ],
                agent_args=["--drain-grace", "5s", "--lease", "1s"],
                timeout=60,
            ) as cluster:
                yield cluster

    # -- operations -------------------------------------------------------------------------

    def put(self, cluster: LocalCluster, client: Client, n: int) -> None:
        for _ in range(n):
            key = f"k{self.count}"
            self.count += 1
            value = self.rng.randbytes(self.rng.choice((100, 4_000, 60_000, 300_000)))
            worker = self.rng.choice(cluster.workers)
            try:  # the same bytes again are a no-op: safe to retry
                retrying(functools.partial(client.put, key, value, workers=worker))
            except AmmError as err:
                self.log(f"put {key} on {worker} failed: {err}")
                self.uncertain.add(key)
                continue
            self.values[key] = value

    def live_keys(self) -> list[str]:
        """Acknowledged keys, neither forgotten nor in doubt, in the order they were put."""
        return [k for k in self.values if k not in self.forgotten and k not in self.uncertain]

    def replicate(self, client: Client, keys: list[str], n: int) -> None:
        for key in keys:  # one by one: a key lost meanwhile is NOT_FOUND, and only it
            try:
                retrying(functools.partial(client.replicate, key, n=n))
            except AmmError as err:
                self.log(f"replicate {key} n={n}: {err}")

    def read(self, client: Client, key: str) -> None:
        try:
            data = client.get(key)
        except AmmError:
            return  # its holders may be gone: checked at the end
        if data != self.values[key]:
            self.figures.wrong_bytes += 1
            self.fail(f"read of {key} returned other bytes")

    def forget(self, client: Client, keys: list[str]) -> None:
        try:
            retrying(lambda: client.forget(keys))
        except AmmError as err:
            self.log(f"forget {keys}: {err}")
            self.uncertain.update(keys)
            return
        self.forgotten.update(keys)

    def pause(self) -> None:
        time.sleep(self.rng.choice((0.0, 0.05, 0.15, 0.3)))

    def snapshot(self, address: str, drain: bool = False) -> None:
        """Note what ``address`` holds before a fault destroys it (or it drains)."""
        held = inventory(address)
        if held is None:  # cannot tell: anything it may have held may be lost
            held = set(self.values)
        if drain:
            self.drained.update(held - self.destroyed)
        else:
            self.drained -= held
        self.destroyed.update(held)

    def ensure_workers(self, cluster: LocalCluster, n: int = 3) -> None:
        while len(cluster.workers) < n:
            began = time.time()  # before: add_worker returns once the AMM lists it
            self.started[cluster.add_worker()] = began

    def play(self, cluster: LocalCluster, client: Client) -> None:
        self.put(cluster, client, 8)
        live = self.live_keys()
        self.replicate(client, self.rng.sample(live, 4), 2)
        for i in range(self.n_faults):
            self.ensure_workers(cluster)
            kind = self.rng.choice(FAULTS) if self.schedule is None else self.schedule[i]
            self.figures.faults[kind] += 1
            live = self.live_keys()
            if live and self.rng.random() < 0.7:  # copies under way when the fault lands
                self.replicate(client, self.rng.sample(live, min(3, len(live))), 3)
            self.pause()
            self.fault(kind, cluster, client)
            self.put(cluster, client, 2)
            live = self.live_keys()
            if live:
                self.read(client, self.rng.choice(live))
        self.ensure_workers(cluster, 2)

    def fault(self, kind: str, cluster: LocalCluster, client: Client) -> None:
        victim = self.rng.choice(cluster.workers)
        self.log(f"fault {kind} on {victim if kind != 'amm' else cluster.address}")
        if kind == "kill":
            self.snapshot(victim)
            cluster.stop_worker(victim, signal.SIGKILL)
        elif kind == "restart":
            self.snapshot(victim)
            cluster.stop_worker(victim, signal.SIGKILL)
            self.started[victim] = time.time()
            cluster.add_worker(listen=victim)
        elif kind == "term":
            self.snapshot(victim, drain=True)  # a drain out of time loses what it did not move
            cluster.stop_worker(victim, signal.SIGTERM, timeout=15)
        elif kind == "amm":
            cluster.restart_service(signal.SIGKILL)
        elif kind == "freeze":
            cluster.signal_worker(victim, signal.SIGSTOP)
            try:
                time.sleep(DEAD_AFTER + 0.5)
            finally:
                cluster.signal_worker(victim, signal.SIGCONT)
        elif kind == "forget":
            live = self.live_keys()
            if live:
                keys = self.rng.sample(live, min(len(live), self.rng.choice((1, 2, 3))))
                self.replicate(client, keys, 3)
                self.pause()
                self.forget(client, keys)

    # -- the check --------------------------------------------------------------------------

    def truth(self, cluster: LocalCluster) -> dict[str, set[str]] | None:
        """Holders of each key, by the agents' own word; None while an agent cannot answer."""
        holders: dict[str, set[str]] = collections.defaultdict(set)
        for address in cluster.workers:
            held = inventory(address)
            if held is None:
                return None
            for key in held:
                holders[key].add(address)
        return holders

    def registered(self, cluster: LocalCluster, client: Client) -> bool:
        """Whether the AMM lists every running agent as registered since the episode last
        started it: an agent that is up but not (yet) registered, just restarted, declared dead
        while frozen or backing off while the AMM restarted, holds keys the AMM cannot know of.
        Settling includes its registration."""
        try:
            listed = {w.address: w for w in client.workers()}
        except AmmError:
            return False
        for address in cluster.workers:
            worker = listed.get(address)
            if worker is None or worker.unconfirmed or worker.registered_at is None:
                return False
            if worker.registered_at.timestamp() < self.started.get(address, 0.0):
                return False
        return True

    def check(self, cluster: LocalCluster, client: Client, within: float = 30.0) -> None:
        tracked = self.live_keys()
        deadline = time.monotonic() + within
        while True:
            holders = self.truth(cluster)
            try:
                reported = {lost.key for lost in client.lost_keys()}
            except AmmError:
                reported = None
            if holders is not None and reported is not None:
                held = {k for k in tracked if holders.get(k)}
                gone = set(tracked) - held
                back = {k for k in self.forgotten if holders.get(k)}
                settled = (
                    gone <= reported
                    and not (held & reported)
                    and not back
                    and self.registered(cluster, client)
                )
                if settled or time.monotonic() > deadline:
                    break
            elif time.monotonic() > deadline:
                self.fail("the cluster did not answer in time")
                return
            time.sleep(0.2)
        figures = self.figures
        figures.keys_checked += len(tracked)
        figures.forgotten += len(self.forgotten)
        figures.uncertain += len(self.uncertain)
        for key in sorted(held):
            holder = sorted(holders[key])[0]
            try:
                ok = client.get(key, worker=holder) == self.values[key]
                # Through the AMM's fresh who_has: an agent that does not answer it in time (one
                # just restarted, on a loaded machine) makes it UNAVAILABLE, retried; NOT_FOUND
                # for a key an agent holds is a wrong answer and fails the check.
                ok = ok and retrying(functools.partial(client.get, key)) == self.values[key]
            except AmmError as err:
                self.fail(f"{key} is held by {sorted(holders[key])} but unreadable: {err}")
                figures.lost_wrongly += 1
                continue
            if not ok:
                figures.wrong_bytes += 1
                self.fail(f"{key} read back other bytes")
                continue
            figures.readable += 1
            if key in reported:
                figures.reported_but_held += 1
                self.fail(f"{key} is reported lost but {sorted(holders[key])} hold it")
        for key in sorted(gone):
            figures.really_lost += 1
            if key in reported:
                figures.reported_lost += 1
            else:
                self.fail(f"{key} is lost but not reported lost")
            if key in self.drained:
                figures.lost_in_drains += 1
                self.log(f"{key} was lost with a draining agent")
            if key not in self.destroyed:
                figures.lost_wrongly += 1
                self.fail(f"{key} is lost though no destroyed agent held it")
        for key in sorted(back):
            figures.forgotten_back += 1
            self.fail(f"forgotten {key} is back on {sorted(holders[key])}")


def run(
    episodes: int,
    seed: int,
    *,
    first: int = 0,
    faults: int = 3,
    jobs: int = 1,
    budget: float | None = None,
    verbose: bool = False,
    progress: Callable[[int, Figures, Figures], None] | None = None,
) -> Figures:
    """Episodes ``first`` .. ``first + episodes - 1`` of run ``seed``, ``jobs`` at a time (each
    its own cluster); the figures of all. None starts once ``budget`` seconds have passed."""
    total = Figures()
    lock = threading.Lock()
    deadline = None if budget is None else time.monotonic() + budget

    def one(i: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            return
        figures = Episode(f"{seed}:{i}", faults, verbose).run()
        with lock:
            total.add(figures)
            if progress is not None:
                progress(i, figures, total)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, i) for i in range(first, first + episodes)]:
            future.result()
    return total


def table(figures: Figures) -> str:
    rows = [
        ("episodes", figures.episodes),
        *((f"faults: {kind}", figures.faults.get(kind, 0)) for kind in FAULTS),
        ("keys checked", figures.keys_checked),
        ("readable with the right bytes", figures.readable),
        ("lost wrongly", figures.lost_wrongly),
        ("reported lost / really lost", f"{figures.reported_lost} / {figures.really_lost}"),
        ("reported lost but held", figures.reported_but_held),
        ("lost with a draining agent (SIGTERM)", figures.lost_in_drains),
        ("wrong bytes read", figures.wrong_bytes),
        ("forgotten", figures.forgotten),
        ("forgotten that came back", figures.forgotten_back),
        ("left out (outcome unknown)", figures.uncertain),
        ("episode seconds, summed", f"{figures.seconds:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--first", type=int, default=0, help="index of the first episode")
    parser.add_argument("--faults", type=int, default=3, help="faults per episode")
    parser.add_argument("--jobs", type=int, default=1, help="episodes at a time")
    parser.add_argument(
        "--minutes",
        type=float,
        help="start no episode after this long (the table says how many ran)",
    )
    parser.add_argument("--json", help="write the figures here (rewritten after each episode)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    began = time.monotonic()

    def save(figures: Figures) -> None:
        if args.json:
            with open(args.json, "w") as out:
                figures_json = figures.as_dict()
                wall = time.monotonic() - began
                json.dump(
                    {"seed": args.seed, "first": args.first, "wall_seconds": wall, **figures_json},
                    out,
                    indent=2,
                )

    def progress(i: int, figures: Figures, total: Figures) -> None:
        status = "ok" if figures.ok else "FAILED"
        kinds = ",".join(sorted(figures.faults.elements()))
        print(f"episode {args.seed}:{i} {status} {figures.seconds:.1f}s [{kinds}]", flush=True)
        for failure in figures.failures:
            print(f"  {failure}", flush=True)
        save(total)

    figures = run(
        args.episodes,
        args.seed,
        first=args.first,
        faults=args.faults,
        jobs=args.jobs,
        budget=None if args.minutes is None else args.minutes * 60,
        verbose=args.verbose,
        progress=progress,
    )
    print(table(figures))
    print(f"wall seconds: {time.monotonic() - began:.0f}, {args.jobs} at a time")
    save(figures)
    return 0 if figures.ok else 1


if __name__ == "__main__":
    sys.exit(main())

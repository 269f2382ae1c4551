"""The AMM's memory for a big convergence, without a network: peak RSS and what makes it up.

``bench_cluster.py`` samples the AMM's RSS while K keys x R replicas converge to one replica
each. This replays the AMM's side of that in one process, through the AMM's own code (the
poller, the core with ReduceReplicas, the ledger, the dispatcher's streams, the outcome records),
with agents that answer as real ones do, each message built only when it is asked for (so that
what the fake agents hold does not count):

1. ``snapshot``: the first poll of every agent, a full snapshot of K keys in pages;
2. ``sent``: one cycle plans the K x (R - 1) drops and sends them (``cycling.Cycles._run``'s
   steps: slices sent as ``SEND_STEP`` or, to agents short of work, ``FEED_STEP`` are planned,
   each through the ledger, then the dispatcher; no further planned while every agent the last
   slice went to has ``FEED`` in hand, unless ``--no-window``); each agent reads its directive
   stream and answers every batch APPLIED, a batch of outcomes per batch of directives, each
   saying at which version the key was gone (the view takes them in, and the ledger settles
   them, at once);
3. ``removed``: the next poll of every agent, naming the keys it dropped, and the ledger
   settling what that poll shows (``Ledger.observing``);
4. ``next cycle``: the snapshot and plan of the following cycle (nothing left to do).

It prints the RSS after each phase and the peak (``VmHWM``), as MiB and as bytes per key above
the RSS before the first poll, and the CPU seconds each phase took (``time.process_time``: this
process), and of that, what the fake agents took to build their answers (``agents``) and the
garbage collector (``gc``): the rest is the AMM's (with the protobuf parsing and the event
loop's own), for A/B of its CPU per directive. As the AMM does, the heap is frozen after each
poll round (``pacing.HeapFreezer``), and the ledger entered with the collector paused.

With ``--attribute`` (slower: tracemalloc), it also prints the Python memory held after each
phase by the structures that hold it, and the lines that allocated the most of it, then and at
the highest the phase was seen to hold (what it leaves is not what it peaked with: the ``sent``
phase peaks with the directives planned and not answered yet, and the cycle's own tables).

    python benchmarks/bench_memory.py                      # 100k keys x 4 on 4 agents
    python benchmarks/bench_memory.py --keys 10000 --attribute
    python benchmarks/bench_memory.py --no-window          # the whole plan sent ahead
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from amm.base import malloc
from amm.v1 import agent_pb2, types_pb2
from amm_service.decisions import core
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, ClusterView, WorkerId
from amm_service.policies.reduce_replicas import ReduceReplicas
from amm_service.runtime.cycles.cycling import FEED, FEED_STEP, LEDGER_STEP, SEND_STEP
from amm_service.runtime.links.dispatcher import Dispatcher
from amm_service.runtime.links.poller import PAGE_KEYS, Poller
from amm_service.runtime.loop.pacing import HeapFreezer, gc_paused
from amm_service.runtime.records.cycle import CycleRecord
from amm_service.runtime.records.outcomes import Outcomes

INCARNATION = "inc"
EPOCH = 1_234_567_890
"""An epoch of the size a fresh state begins with (random), as it shows in directive ids."""
RUN = "9f3c2a1b"
"""A run token of the size ``EpochFence`` makes (``secrets.token_hex(4)``)."""
MiB = 1 << 20
_agents_cpu = [0.0]
"""CPU seconds the fake agents took building answers: not the AMM's."""
_gc_cpu = [0.0, 0.0]
"""CPU seconds in garbage collections, and when the one under way began."""


def _collecting(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_cpu[1] = time.process_time()
    else:
        _gc_cpu[0] += time.process_time() - _gc_cpu[1]


@contextmanager
def _agents_time() -> Iterator[None]:
    """Counts the CPU taken meanwhile in ``_agents_cpu``: the fake agents', not the AMM's."""
    began = time.process_time()
    try:
        yield
    finally:
        _agents_cpu[0] += time.process_time() - began


def _status(field: str) -> int:
    """A figure of ``/proc/self/status`` in bytes (``VmRSS``: now; ``VmHWM``: the peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class _Agent:
    """One agent's side of the AMM's links: polls answered from its inventory (snapshot pages
    built as they are asked for, then what it dropped), directives answered APPLIED."""

    def __init__(self, number: int, keys: list[str], canonical: dict[str, str]) -> None:
        self.name = f"w{number}"
        self.keys = keys
        self.canonical = canonical
        """Each key's one string object: what an agent keeps is not the AMM's memory."""
        self.version = len(keys)
        self.removed: list[str] = []
        self.polled_removed = False

    def _page(self, n: int) -> agent_pb2.PollResponse:
        start = n * PAGE_KEYS
        resp = agent_pb2.PollResponse(
            incarnation=INCARNATION,
            version=len(self.keys),
            full=True,
            status=types_pb2.WORKER_STATUS_RUNNING,
            name=self.name,
            features=["directive-batches"],
        )
        add = resp.keys.add
        for key in self.keys[start : start + PAGE_KEYS]:
            add(key=key, size=100, checksum=f"{hash(key) & 0xFFFFFFFF:064x}")
        if start + PAGE_KEYS < len(self.keys):
            resp.next_cursor = str(n + 1)
        return resp

    async def Poll(self, request: agent_pb2.PollRequest, **_: Any) -> agent_pb2.PollResponse:
        with _agents_time():
            return self._answer(request)

    def _answer(self, request: agent_pb2.PollRequest) -> agent_pb2.PollResponse:
        if request.cursor:
            return self._page(int(request.cursor))
        if request.since_version == 0:
            return self._page(0)
        # Changes since a version, a page at a time (``max_keys``), as the agent's store
        # answers: the first drop is version len(keys) + 1.
        start = max(0, request.since_version - len(self.keys))
        removed = self.removed[start : start + request.max_keys]
        return agent_pb2.PollResponse(
            incarnation=INCARNATION,
            version=len(self.keys) + start + len(removed),
            removed=removed,
            more=start + len(removed) < len(self.removed),
            status=types_pb2.WORKER_STATUS_RUNNING,
            features=["directive-batches"],
        )

    def Directives(self, requests: AsyncIterator[agent_pb2.DirectivesRequest]) -> _Call:
        return _Call(self, requests)

    def apply(self, request: agent_pb2.DirectivesRequest) -> agent_pb2.DirectivesResponse:
        with _agents_time():
            return self._apply(request)

    def _apply(self, request: agent_pb2.DirectivesRequest) -> agent_pb2.DirectivesResponse:
        resp = agent_pb2.DirectivesResponse(incarnation=INCARNATION)
        add = resp.batch.add
        for directive in request.batch:
            self.version += 1
            self.removed.append(self.canonical[directive.key])
            add(
                directive_id=directive.id,
                status=types_pb2.OUTCOME_STATUS_APPLIED,
                inventory_version=self.version,
                dropped_version=self.version,  # as an agent says when the key was gone
            )
        if request.HasField("drops"):  # "drop-columns": applied drops answered in columns
            ids = request.drops.ids
            first = self.version + 1
            self.version += len(ids)
            self.removed += map(self.canonical.__getitem__, request.drops.keys)
            versions = range(first, self.version + 1)
            resp.applied.ids.extend(ids)
            resp.applied.inventory_versions.extend(versions)
            resp.applied.dropped_versions.extend(versions)
        return resp


class _Call:
    """A directive stream: each batch read is answered with a batch of outcomes."""

    def __init__(self, agent: _Agent, requests: AsyncIterator[agent_pb2.DirectivesRequest]):
        self._agent = agent
        self._requests = requests

    def __aiter__(self) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        return self._answers()

    async def _answers(self) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        async for request in self._requests:
            yield self._agent.apply(request)

    def cancel(self) -> None:
        pass


class _Links:
    def __init__(self, agents: dict[WorkerId, _Agent]) -> None:
        self._agents = agents

    def stub(self, worker: WorkerId) -> _Agent:
        return self._agents[worker]


class _Ids:
    """Directive ids as ``EpochFence.new_id`` makes them: ``e<epoch>.<run>.<n>``."""

    def __init__(self) -> None:
        self._n = 0

    def __call__(self) -> str:
        self._n += 1
        return f"e{EPOCH}.{RUN}.{self._n}"


class _Probe:
    """RSS after each phase, and (``--attribute``) the Python memory held then."""

    def __init__(self, nkeys: int, attribute: bool, top: int) -> None:
        self.nkeys = nkeys
        self.attribute = attribute
        self.top = top
        self.base = _status("VmRSS")
        self.cpu = time.process_time()
        self.rows: list[tuple[str, int, int]] = []
        self._highest: tuple[int, tracemalloc.Snapshot] | None = None
        if attribute:
            tracemalloc.start()

    async def watch(self) -> None:
        """With ``--attribute``, a snapshot of the Python memory held whenever it is 4 MiB over
        the highest seen yet in the phase (run as a task: it looks each time the loop turns),
        so that what a phase holds at its highest is told as well as what it leaves."""
        while self.attribute:
            traced = tracemalloc.get_traced_memory()[0]
            if self._highest is None or traced > self._highest[0] + 4 * MiB:
                self._highest = (traced, tracemalloc.take_snapshot())
            await asyncio.sleep(0)

    def phase(self, name: str, holders: dict[str, Callable[[], object]]) -> None:
        cpu, self.cpu = time.process_time() - self.cpu, time.process_time()
        agents, _agents_cpu[0] = _agents_cpu[0], 0.0
        collecting, _gc_cpu[0] = _gc_cpu[0], 0.0
        rss = _status("VmRSS")
        self.rows.append((name, rss, _status("VmHWM")))
        print(
            f"{name:12} RSS {rss / MiB:7.1f} MiB  ({(rss - self.base) / self.nkeys:6.0f} B/key)"
            f"  CPU {cpu:6.2f} s (agents {agents:5.2f}, gc {collecting:5.2f})"
        )
        if self.attribute:
            self._attribute(holders)
        self.cpu = time.process_time()  # what --attribute takes is no phase's
        _agents_cpu[0] = _gc_cpu[0] = 0.0

    def _attribute(self, holders: dict[str, Callable[[], object]]) -> None:
        traced, peak = tracemalloc.get_traced_memory()
        print(f"  traced now {traced / MiB:.1f} MiB, peak {peak / MiB:.1f} MiB")
        for what, get in holders.items():
            size = _deep_size(get())
            print(f"  {what:34} {size / MiB:7.1f} MiB  {size / self.nkeys:6.0f} B/key")
        self._sites(tracemalloc.take_snapshot())
        if self._highest is not None:
            print(f"  at the phase's highest seen, {self._highest[0] / MiB:.1f} MiB:")
            self._sites(self._highest[1])
            self._highest = None
        tracemalloc.reset_peak()

    def _sites(self, snap: tracemalloc.Snapshot) -> None:
        snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        for stat in snap.statistics("lineno")[: self.top]:
            frame = stat.traceback[0]
            where = frame.filename.split("/amm_service/")[-1].split("/site-packages/")[-1]
            print(f"    {stat.size / MiB:6.1f} MiB {stat.count:8} blocks  {where}:{frame.lineno}")


def _deep_size(root: object) -> int:
    """Bytes of ``root`` and everything it reaches that is not a module, class or function,
    each object counted once (objects shared with others count in the first that reaches
    them: call in the order of ownership)."""
    seen: set[int] = _deep_size.seen  # type: ignore[attr-defined]
    size = 0
    stack = [root]
    skip = (type, type(sys), type(_deep_size), type(print))
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return size


_deep_size.seen = set()  # type: ignore[attr-defined]


async def _run(
    nkeys: int, replicas: int, attribute: bool, top: int, window: bool, columns: bool = False
) -> int:
    """Replays the convergence; returns the RSS before it began (the fake agents' data made)."""
    workers = [WorkerId(f"10.0.0.{n}:7000") for n in range(replicas)]
    keys = [f"key-{i:07}" for i in range(nkeys)]
    canonical = {key: key for key in keys}
    agents = {w: _Agent(n, keys, canonical) for n, w in enumerate(workers)}
    probe = _Probe(nkeys, attribute, top)
    links: Any = _Links(agents)
    state = ClusterState(track_changes=True)
    for w in workers:
        state.register(w, str(w), INCARNATION, 0.0)
    poller = Poller(state, links, epoch=1, timeout=10.0, on_restart=lambda worker: None)
    ledger = Ledger()
    records = Outcomes(state, ledger, max_refusals=100, clock=lambda: 0.0)
    dispatcher = Dispatcher(
        links,
        records.on_outcomes,
        takes_batches=lambda worker: True,
        takes_columns=lambda worker: columns,
    )
    policy = ReduceReplicas()
    views: list[ClusterView] = []

    def holders() -> dict[str, Callable[[], object]]:
        _deep_size.seen = set(map(id, keys)) | {id(canonical)}  # type: ignore[attr-defined]
        streams = dispatcher._streams
        return {
            "state: key records": lambda: state._keys,
            "state: holding sets": lambda: state._held,
            "state: journal": lambda: state.journal,
            "view (a cycle's snapshot)": lambda: views,
            "ledger: entries by id": lambda: ledger._entries,
            "ledger: by key": lambda: ledger._by_key,
            "ledger: applied": lambda: (ledger._applied, ledger._versions),
            "ledger: journal": lambda: ledger.journal,
            "dispatcher: unanswered ids": lambda: [s.unanswered for s in streams.values()],
            "outcomes: records, refusals": lambda: records,
            "policy": lambda: policy.__dict__,
        }

    def plan(number: int) -> Iterator[tuple[core.Plan | tuple[Any, ...], CycleRecord]]:
        record = CycleRecord(number, 0.0)
        view = state.snapshot()
        views[:] = [view]
        ledger.viewing(number)  # as ``Cycles.run`` does, until the cycle ends
        records.track(record)
        steps = core.planning(
            view,
            [policy],
            ledger,
            core.PlanConfig("managed", EPOCH),
            _Ids(),
            stream=True,
            keep_streamed=False,
        )
        while not isinstance(out := core.step(steps), core.Plan):
            yield out, record
        yield out, record

    async def send(record: CycleRecord, directives: list[Any]) -> None:
        record.sending(directives, 0.0)
        for start in range(0, len(directives), SEND_STEP):
            chunk = directives[start : start + SEND_STEP]
            for first in range(0, len(chunk), LEDGER_STEP):
                some = chunk[first : first + LEDGER_STEP]
                with gc_paused():
                    records.totals.sending(some)
                    ledger.add_many(some, 0.0, record.number)
            await dispatcher.send(chunk)
            await asyncio.sleep(0)

    freezer = HeapFreezer()
    gc.callbacks.append(_collecting)
    probe.phase("start", holders())
    watching = asyncio.create_task(probe.watch())
    await poller.poll_all()
    state.take_changes()
    freezer.freeze()  # after each poll round, as the AMM does with a big state
    probe.phase("snapshot", holders())

    ready: list[Any] = []
    bound: set[WorkerId] = set()
    record: CycleRecord | None = None
    for out, record in plan(1):
        if isinstance(out, core.Plan):
            ready += out.directives
            break
        ready += out
        bound.update([d.worker for d in out])
        short = any(dispatcher.in_hand(w) < FEED for w in bound)
        if len(ready) >= SEND_STEP or (window and len(ready) >= FEED_STEP and short):
            await send(record, ready)
            if window:
                await dispatcher.ran_short(bound, FEED)
                malloc.trim()  # as ``Cycles._run`` does after each wait for the agents
            ready, bound = [], set()
    assert record is not None
    await send(record, ready)
    del ready
    records.all_sent(record)
    ledger.viewed()  # the cycle ends: its outcomes keep coming
    drops = nkeys * (replicas - 1)
    for _ in range(60_000):  # the agents answer as the streams read what was sent (10 min)
        if record.applied >= drops:
            break
        await asyncio.sleep(0.01)
    assert record.applied == drops, (record.applied, drops)
    probe.phase("sent", holders())

    freezer.freeze()  # the cycle ended
    await poller.poll_all()
    freezer.freeze()
    for _ in ledger.observing(lambda worker: v.version if (v := state.worker(worker)) else None):
        pass
    probe.phase("removed", holders())
    for out, _ in plan(2):
        if isinstance(out, core.Plan):
            assert not out.directives, len(out.directives)
    ledger.viewed()
    probe.phase("next cycle", holders())
    assert state.nreplicas == nkeys, state.nreplicas
    assert len(ledger) == 0, len(ledger)
    await dispatcher.close()
    watching.cancel()
    return probe.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--attribute", action="store_true", help="what holds it (tracemalloc)")
    parser.add_argument("--top", type=int, default=12, help="lines listed with --attribute")
    parser.add_argument(
        "--no-window",
        action="store_true",
        help="plan and send the whole cycle ahead of the agents (as before cycling.FEED's window)",
    )
    parser.add_argument(
        "--columns", action="store_true", help="drops sent in columns (feature drop-columns)"
    )
    args = parser.parse_args()
    print(f"{args.keys:,} keys x {args.replicas} replicas on {args.replicas} agents")
    base = asyncio.run(
        _run(
            args.keys,
            args.replicas,
            args.attribute,
            args.top,
            window=not args.no_window,
            columns=args.columns,
        )
    )
    peak = _status("VmHWM")
    print(
        f"peak RSS {peak / MiB:.1f} MiB: {(peak - base) / MiB:.1f} MiB above the start, "
        f"{(peak - base) / args.keys:.0f} B/key"
        + (" (tracemalloc's own memory included)" if args.attribute else "")
    )


if __name__ == "__main__":
    main()

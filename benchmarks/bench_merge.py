"""The AMM's CPU for taking in a big convergence's polls and outcomes, without a network.

``bench_cluster.py`` times a whole convergence: K keys x R replicas on R agents, one cycle that
drops K x (R - 1) replicas, and the polls that show it. This replays the AMM's side of it in one
process, through the poller's and the dispatcher's own reading code, with the agents' answers
built beforehand (protobuf messages as they come off the wire):

1. ``snapshot``: the first poll of every agent, a full snapshot of K keys in pages;
2. ``outcomes``: the K x (R - 1) APPLIED drop outcomes, in batches, settled in the ledger;
3. ``removed``: the next poll of every agent, an incremental answer naming the keys it dropped;
4. ``persist``: the keys the first round found (``LostBook.save_held``, into a state file).

Each figure is CPU seconds (``time.process_time``), the best of ``--repeat`` runs.

    python benchmarks/bench_merge.py                       # 100k keys x 4 on 4 agents
    python benchmarks/bench_merge.py --keys 10000 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from amm.v1 import agent_pb2, types_pb2
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.runtime.links.dispatcher import _Stream
from amm_service.runtime.links.poller import PAGE_KEYS, Poller
from amm_service.runtime.records.lost import LostBook
from amm_service.runtime.records.outcomes import Outcomes
from amm_service.runtime.records.state import StateStore

INCARNATION = "inc"


class _Call:
    """A directive stream's answers, as the dispatcher reads them."""

    def __init__(self, responses: list[agent_pb2.DirectivesResponse]) -> None:
        self._responses = responses

    def __aiter__(self) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        for response in self._responses:
            yield response

    def cancel(self) -> None:
        pass


class _Stub:
    """One agent's answers, prepared: its poll answers in order, its directive stream's."""

    def __init__(
        self, polls: list[agent_pb2.PollResponse], outcomes: list[agent_pb2.DirectivesResponse]
    ) -> None:
        self._polls = polls
        self._outcomes = outcomes

    async def Poll(self, request: agent_pb2.PollRequest, **_: Any) -> Any:
        if request.cursor:
            return self._polls[int(request.cursor)]
        first = self._polls[0]
        if request.since_version >= first.version:  # nothing new
            return agent_pb2.PollResponse(incarnation=INCARNATION, version=request.since_version)
        return first

    def Directives(self, requests: Any) -> _Call:
        requests.aclose  # noqa: B018 (never consumed: nothing is sent here)
        return _Call(self._outcomes)


class _Links:
    def __init__(self, stubs: dict[WorkerId, _Stub]) -> None:
        self._stubs = stubs

    def stub(self, worker: WorkerId) -> _Stub:
        return self._stubs[worker]


def _snapshot_pages(keys: list[str], worker: int) -> list[agent_pb2.PollResponse]:
    pages = []
    for n, start in enumerate(range(0, len(keys), PAGE_KEYS)):
        resp = agent_pb2.PollResponse(
            incarnation=INCARNATION,
            version=len(keys),
            full=True,
            status=types_pb2.WORKER_STATUS_RUNNING,
            name=f"w{worker}",
            features=["directive-batches"],
        )
        add = resp.keys.add
        for key in keys[start : start + PAGE_KEYS]:
            add(key=key, size=100, checksum=f"{hash(key) & 0xFFFFFFFF:064x}")
        if start + PAGE_KEYS < len(keys):
            resp.next_cursor = str(n + 1)
        pages.append(resp)
    return pages


def _removed(keys: list[str], version: int) -> agent_pb2.PollResponse:
    return agent_pb2.PollResponse(
        incarnation=INCARNATION,
        version=version,
        removed=keys,
        status=types_pb2.WORKER_STATUS_RUNNING,
        features=["directive-batches"],
    )


def _outcomes(ids: list[str], first_version: int) -> list[agent_pb2.DirectivesResponse]:
    responses = []
    for start in range(0, len(ids), 5_000):
        resp = agent_pb2.DirectivesResponse()
        add = resp.batch.add
        for n, directive_id in enumerate(ids[start : start + 5_000], start):
            add(
                directive_id=directive_id,
                status=types_pb2.OUTCOME_STATUS_APPLIED,
                inventory_version=first_version + n + 1,
            )
        responses.append(resp)
    return responses


async def _run(nkeys: int, replicas: int, figures: dict[str, float], state_dir: Path) -> None:
    workers = [WorkerId(f"10.0.0.{w}:7000") for w in range(replicas)]
    keys = [f"key-{i:07}" for i in range(nkeys)]
    # Worker w keeps the keys i % replicas == w and drops the others.
    dropped = {
        w: [k for i, k in enumerate(keys) if i % replicas != n] for n, w in enumerate(workers)
    }
    ids = {w: [f"1-{n}-{i}" for i in range(len(dropped[w]))] for n, w in enumerate(workers)}
    snap = {w: _snapshot_pages(keys, n) for n, w in enumerate(workers)}
    incremental = {w: _removed(dropped[w], 2 * nkeys) for w in workers}
    outcomes = {w: _outcomes(ids[w], nkeys) for w in workers}

    state = ClusterState(track_changes=True)
    for w in workers:
        state.register(w, str(w), INCARNATION, 0.0)
    stubs = {w: _Stub(snap[w], outcomes[w]) for w in workers}
    links: Any = _Links(stubs)
    poller = Poller(state, links, epoch=1, timeout=10.0, on_restart=lambda worker: None)
    store = StateStore(str(state_dir / "state.db"))
    book = LostBook(store, clock=time.time)
    ledger = Ledger()
    records = Outcomes(state, ledger, max_refusals=100, clock=time.time)

    async def timed(name: str, work: Callable[[], Any]) -> None:
        gc.collect()
        started = time.process_time()
        await work()
        figures[name] = min(figures.get(name, 1e9), time.process_time() - started)

    await timed("snapshot", lambda: poller.poll_all())
    born, gone = state.take_changes()
    await timed("persist", lambda: book.save_held(born, gone))
    for w in workers:
        for key, directive_id in zip(dropped[w], ids[w], strict=True):
            kv = state.keys[Key(key)]
            ledger.add(Directive(directive_id, 1, Op.DROP, kv.key, w, kv.size, kv.checksum), 0.0, 1)

    async def settle() -> None:
        streams = [_Stream(w, links, records.on_outcomes) for w in workers]
        await asyncio.gather(*(s.task for s in streams))

    await timed("outcomes", settle)
    for w in workers:
        stubs[w]._polls = [incremental[w]]
    await timed("removed", lambda: poller.poll_all())
    assert state.nkeys == nkeys, state.nkeys
    assert state.nreplicas == nkeys, state.nreplicas
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, float] = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_run(args.keys, args.replicas, figures, Path(tmp)))
    print(f"{args.keys:,} keys x {args.replicas} (CPU s, best of {args.repeat})")
    for name in ("snapshot", "persist", "outcomes", "removed"):
        print(f"  {name:10} {figures[name]:7.3f}")
    print(f"  {'all':10} {sum(figures.values()):7.3f}")


if __name__ == "__main__":
    main()

"""The poller against real grpc.aio servers: how many Poll calls it has under way at once, and
paged snapshots from a real agent.

One server listens on several ports, each port a worker to the AMM, and counts the polls it is
serving; so many agents sharing one busy host is what it plays (as ``benchmarks/bench_scale.py``
runs them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from amm.base.checksum import checksum
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from amm_service import wire
from amm_service.decisions.view import ClusterState, KeyReport, WorkerId
from amm_service.decisions.view import Key as ViewKey
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.links.poller import MERGE_STEP, Poller
from amm_service.runtime.loop import pacing
from tests.support.agent import running_agent
from worker_agent.store import Key


class _BusyHost(agent_pb2_grpc.WorkerAgentServicer):
    """Answers polls after ``delay`` seconds, ``capacity`` at a time (the rest queue), and
    records the most polls it had under way at once."""

    def __init__(self, delay: float, capacity: int) -> None:
        self._delay = delay
        self._capacity = asyncio.Semaphore(capacity)
        self.under_way = 0
        self.most = 0

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        self.under_way += 1
        self.most = max(self.most, self.under_way)
        try:
            async with self._capacity:
                await asyncio.sleep(self._delay)
        finally:
            self.under_way -= 1
        return agent_pb2.PollResponse(
            incarnation="i", version=1, full=True, status=types_pb2.WORKER_STATUS_RUNNING
        )


@asynccontextmanager
async def _workers(
    host: agent_pb2_grpc.WorkerAgentServicer, n: int
) -> AsyncIterator[list[WorkerId]]:
    """``n`` worker addresses, all served by ``host``."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_WorkerAgentServicer_to_server(host, server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(n)]
    await server.start()
    try:
        yield [WorkerId(f"127.0.0.1:{port}") for port in ports]
    finally:
        await server.stop(None)


@asynccontextmanager
async def _polling(
    state: ClusterState, workers: list[WorkerId], *, poll_timeout: float = 5.0, **kwargs: Any
) -> AsyncIterator[Poller]:
    """A poller of ``workers``, registered in ``state`` first; its links closed at the end."""
    for worker in workers:
        state.register(worker, worker, "i", now=0.0)
    links = AgentLinks()
    try:
        yield Poller(
            state, links, epoch=1, timeout=poll_timeout, on_restart=lambda worker: None, **kwargs
        )
    finally:
        await links.close_all()


async def _poll_all(
    workers: list[WorkerId], *, poll_timeout: float, **kwargs: Any
) -> list[WorkerId]:
    async with _polling(ClusterState(), workers, poll_timeout=poll_timeout, **kwargs) as poller:
        return await poller.poll_all()


async def test_at_most_max_in_flight_polls_are_under_way() -> None:
    host = _BusyHost(delay=0.05, capacity=100)  # type: ignore[abstract]
    async with _workers(host, 12) as workers:
        missed = await _poll_all(workers, poll_timeout=5.0, max_in_flight=3)
    assert missed == []
    assert host.most == 3


async def test_polls_queued_in_the_amm_do_not_spend_their_deadline_there() -> None:
    """A host that answers two polls at a time, 0.1 s each. Sent all at once (as before the
    bound), eight polls queue there and the last two cannot be answered within their 0.35 s
    deadline; two at a time, each is answered within 0.2 s of being sent, and every worker
    counts as reachable."""
    host = _BusyHost(delay=0.1, capacity=2)  # type: ignore[abstract]
    async with _workers(host, 8) as workers:
        all_at_once = await _poll_all(workers, poll_timeout=0.35, max_in_flight=len(workers))
        two_at_a_time = await _poll_all(workers, poll_timeout=0.35, max_in_flight=2)
    assert len(all_at_once) >= 2
    assert two_at_a_time == []


async def test_a_paged_snapshot_is_merged_page_by_page_and_caught_up() -> None:
    """25,000 keys in pages of 10,000: every page merged, then what changed while paging; then
    incremental answers as the agent drops and adds keys."""
    async with running_agent() as agent:
        data = b"v"
        digest = checksum(data)
        agent.store.add_many((Key(f"k{i:05d}"), data, digest) for i in range(25_000))
        worker = WorkerId(agent.address)
        state = ClusterState()
        state.register(worker, "a", agent.incarnation, now=0.0)
        links = AgentLinks()
        poller = Poller(
            state, links, epoch=1, timeout=5.0, on_restart=lambda worker: None, page=10_000
        )
        try:
            assert await poller.poll_all() == []
            assert len(state.held_by(worker)) == 25_000
            for i in range(5_000):
                agent.store.remove(Key(f"k{i:05d}"))
            agent.store.add_many((Key(f"new{i}"), data, digest) for i in range(3_000))
            assert await poller.poll_all() == []
        finally:
            await links.close_all()
        held = state.held_by(worker)
        assert len(held) == 23_000
        assert "k00000" not in held
        assert "new2999" in held
        assert state.worker(worker) is not None
        assert state.snapshot().workers[worker].version == agent.store.version


class _FailsMidSnapshot(agent_pb2_grpc.WorkerAgentServicer):
    """First a whole inventory of three keys; then, asked again, a snapshot whose second page
    never comes (the agent dies half-way)."""

    def __init__(self) -> None:
        self.polls = 0

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        self.polls += 1
        if request.cursor:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone half-way")
        keys = [types_pb2.KeyInfo(key=f"k{i}", size=1, checksum="c" * 64) for i in range(3)]
        if self.polls == 1:
            return agent_pb2.PollResponse(
                incarnation="i",
                version=3,
                full=True,
                keys=keys,
                status=types_pb2.WORKER_STATUS_RUNNING,
            )
        return agent_pb2.PollResponse(
            incarnation="i",
            version=9,
            full=True,
            keys=keys[:1],
            next_cursor="k0",
            status=types_pb2.WORKER_STATUS_RUNNING,
        )


async def test_a_snapshot_that_fails_half_way_leaves_what_was_known_whole() -> None:
    host = _FailsMidSnapshot()  # type: ignore[abstract]
    state = ClusterState()
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:
        assert await poller.poll_all() == []
        assert len(state.held_by(worker)) == 3
        assert await poller.poll_all() == [worker]
    assert len(state.held_by(worker)) == 3, "half a snapshot must not replace a whole one"
    known = state.worker(worker)
    assert known is not None
    assert known.version == 3


class _ManyChanges(agent_pb2_grpc.WorkerAgentServicer):
    """A whole inventory of ``n`` keys at version 3; then, asked since 3, all of them removed
    and 1,000 new ones at version 9, in one answer."""

    def __init__(self, n: int) -> None:
        self.n = n

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        running = types_pb2.WORKER_STATUS_RUNNING
        if request.since_version != 3:
            keys = [
                types_pb2.KeyInfo(key=f"k{i}", size=1, checksum="c" * 64) for i in range(self.n)
            ]
            return agent_pb2.PollResponse(
                incarnation="i", version=3, full=True, keys=keys, status=running
            )
        new = [types_pb2.KeyInfo(key=f"n{i}", size=1, checksum="c" * 64) for i in range(1_000)]
        removed = [f"k{i}" for i in range(self.n)]
        return agent_pb2.PollResponse(
            incarnation="i", version=9, keys=new, removed=removed, status=running
        )


async def test_a_big_incremental_answer_is_merged_in_steps_and_its_version_comes_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop runs between the steps of a big merge (control calls are answered meanwhile),
    and the worker's version, by which the ledger settles applied directives, moves to the
    answer's only once all of it is merged."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every step, however fast
    n = 4 * MERGE_STEP
    host = _ManyChanges(n)  # type: ignore[abstract]
    state = ClusterState()
    seen: list[tuple[int, int]] = []
    done = asyncio.Event()
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:

        async def watch() -> None:
            while not done.is_set():
                known = state.worker(worker)
                assert known is not None
                seen.append((known.version, len(state.held_by(worker))))
                await asyncio.sleep(0)

        assert await poller.poll_all() == []
        assert len(state.held_by(worker)) == n
        watcher = asyncio.create_task(watch())
        assert await poller.poll_all() == []
        done.set()
        await watcher
    assert state.held_by(worker) == {f"n{i}" for i in range(1_000)}
    assert state.worker(worker).version == 9  # type: ignore[union-attr]
    partial = {held for version, held in seen if held not in (n, 1_000)}
    assert len(partial) >= 3, f"merged in one go: the loop saw only {sorted(set(seen))}"
    assert all(held == 1_000 for version, held in seen if version == 9), seen


class _Unmerged(ClusterState):
    """A cluster state that notes, at each merge, how many reports were read from answers and
    not merged yet besides those it is given (``read`` counts what ``wire.key_reports`` built)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = self.merged = 0
        self.ahead: list[int] = []
        self.versions: list[int] = []

    def apply_poll(self, address: WorkerId, *, keys: Iterable[KeyReport], **rest: Any) -> None:
        keys = list(keys)
        self.ahead.append(self.read - self.merged - len(keys))
        self.versions.append(rest["version"])
        self.merged += len(keys)
        super().apply_poll(address, keys=keys, **rest)


@pytest.fixture
def unmerged(monkeypatch: pytest.MonkeyPatch) -> _Unmerged:
    """An ``_Unmerged`` state whose ``read`` counts every key report ``wire.key_reports`` builds."""
    state = _Unmerged()
    key_reports = wire.key_reports

    def counting(keys: Any, *shared: Any) -> list[KeyReport]:
        reports = key_reports(keys, *shared)
        state.read += len(reports)
        return reports

    monkeypatch.setattr(wire, "key_reports", counting)
    return state


async def test_a_big_incremental_answer_is_read_as_it_is_merged(unmerged: _Unmerged) -> None:
    """Each step of a big incremental answer's merge reads its own keys: 4 agents' pages of
    50,000 keys, read whole first, held 200,000 reports at once (35 MB of the AMM's peak)."""
    state = unmerged
    host = _ManyChanges(0)  # type: ignore[abstract]
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:
        assert await poller.poll_all() == []  # the (empty) snapshot
        assert await poller.poll_all() == []  # 1,000 new keys: two steps
    assert state.held_by(worker) == {f"n{i}" for i in range(1_000)}
    assert state.merged == state.read == 1_000
    assert len(state.ahead) >= 3, state.ahead  # the snapshot, then two steps
    assert max(state.ahead) == 0, state.ahead


class _SameInventory(agent_pb2_grpc.WorkerAgentServicer):
    """Every worker it serves holds the same six keys, sent in two pages of three; the first
    pages are answered once every worker asked for one, so that the snapshots are read at once
    (as every agent's is when the AMM starts)."""

    def __init__(self, workers: int) -> None:
        self._all_asked = asyncio.Barrier(workers)

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        keys = [types_pb2.KeyInfo(key=f"k{i}", size=1, checksum="c" * 64) for i in range(6)]
        running = types_pb2.WORKER_STATUS_RUNNING
        if request.cursor:
            return agent_pb2.PollResponse(
                incarnation="i", version=1, full=True, keys=keys[3:], status=running
            )
        if request.since_version:  # nothing changed since
            return agent_pb2.PollResponse(incarnation="i", version=1, status=running)
        await self._all_asked.wait()
        return agent_pb2.PollResponse(
            incarnation="i", version=1, full=True, keys=keys[:3], next_cursor="k2", status=running
        )


class _Recording(ClusterState):
    """A cluster state that keeps every key report merged into it."""

    def __init__(self) -> None:
        super().__init__()
        self.reports: list[KeyReport] = []

    def apply_poll(self, address: WorkerId, *, keys: Iterable[KeyReport], **rest: Any) -> None:
        keys = list(keys)
        self.reports += keys
        super().apply_poll(address, keys=keys, **rest)


def _known_to_hold(state: ClusterState, workers: list[WorkerId], key: str) -> None:
    """``state`` holds ``key`` on each of ``workers`` (registered as ``_polling`` does): their
    full snapshots then replace what is known, and are read whole before they are merged."""
    for worker in workers:
        state.apply_lookup(
            worker, incarnation="i", held=[KeyReport(ViewKey(key), 1, "c" * 64)], absent=[]
        )


async def test_snapshots_read_at_once_share_one_report_per_key() -> None:
    """A snapshot that replaces what the view holds of a worker is merged only when all its
    pages are in, and several can come at once (agents restarted together): the reports of keys
    that several agents hold are one object each, not one per agent (400k reports, 97 MiB,
    with 100k keys on 4 agents)."""
    state = _Recording()
    host = _SameInventory(3)  # type: ignore[abstract]
    async with _workers(host, 3) as workers, _polling(state, workers) as poller:
        _known_to_hold(state, workers, "old")
        assert await poller.poll_all() == []
    assert len(state.reports) == 18
    assert len({id(report) for report in state.reports}) == 6
    assert all(len(state.held_by(worker)) == 6 for worker in workers)


class _PagedSnapshot(agent_pb2_grpc.WorkerAgentServicer):
    """A snapshot of ``pages`` pages of ``per_page`` keys (then nothing changed since); notes,
    as each page is asked for, how many key reports ``state`` says were read."""

    def __init__(self, pages: int, per_page: int, state: _Unmerged) -> None:
        self._pages = pages
        self._per_page = per_page
        self._state = state
        self.read_when_asked: list[int] = []

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        running = types_pb2.WORKER_STATUS_RUNNING
        if request.since_version:
            return agent_pb2.PollResponse(incarnation="i", version=1, status=running)
        self.read_when_asked.append(self._state.read)
        page = int(request.cursor or 0)
        first = page * self._per_page
        keys = [
            types_pb2.KeyInfo(key=f"k{i:06d}", size=1, checksum="c" * 64)
            for i in range(first, first + self._per_page)
        ]
        last = page + 1 == self._pages
        return agent_pb2.PollResponse(
            incarnation="i",
            version=1,
            full=True,
            keys=keys,
            next_cursor="" if last else str(page + 1),
            status=running,
        )


async def test_the_next_page_of_a_snapshot_is_asked_for_while_this_one_is_read(
    unmerged: _Unmerged, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent builds a snapshot's next page while the AMM reads the last one: a cold 100k-key
    snapshot of 4 agents read page after page, each side waiting on the other, left the AMM half
    idle. Still nothing is merged before every page is in when the snapshot replaces what the
    view holds of the worker."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every step of reading
    state = unmerged
    per_page = 20 * MERGE_STEP
    host = _PagedSnapshot(3, per_page, state)  # type: ignore[abstract]
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:
        _known_to_hold(state, [worker], "old")
        assert await poller.poll_all() == []
    assert len(state.held_by(worker)) == 3 * per_page
    asked = host.read_when_asked
    assert len(asked) == 3, asked
    assert asked[1] < per_page, f"asked for page by page: {asked}"
    assert asked[2] < 2 * per_page, f"asked for page by page: {asked}"
    assert state.ahead[0] == 3 * per_page - MERGE_STEP, "merged before every page was in"


class _HangsOnSecondPage(agent_pb2_grpc.WorkerAgentServicer):
    """A snapshot's first page of 3 keys; the next is never answered: the call hangs until it
    is cancelled, which ``ended`` tells."""

    def __init__(self) -> None:
        self.asked_next = asyncio.Event()
        self.ended = asyncio.Event()

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        running = types_pb2.WORKER_STATUS_RUNNING
        if not request.cursor:
            keys = [types_pb2.KeyInfo(key=f"k{i}", size=1, checksum="c" * 64) for i in range(3)]
            return agent_pb2.PollResponse(
                incarnation="i", version=1, full=True, keys=keys, next_cursor="k2", status=running
            )
        self.asked_next.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.ended.set()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("cold", [False, True])
async def test_a_snapshot_read_cut_short_ends_the_page_call_under_way(cold: bool) -> None:
    """Cancelled while a page it asked for ahead is under way, a poll ends that call too (the
    next poll of the agent is not raced by it). A snapshot that replaces what was known merges
    nothing; a cold one (merged as read) leaves the worker at version 0, so that the next poll
    asks for a whole snapshot again."""
    host = _HangsOnSecondPage()  # type: ignore[abstract]
    state = ClusterState()
    async with (
        _workers(host, 1) as [worker],
        _polling(state, [worker], poll_timeout=30.0) as poller,
    ):
        if not cold:
            _known_to_hold(state, [worker], "old")
        polling = asyncio.create_task(poller.poll_all())
        await asyncio.wait_for(host.asked_next.wait(), 10)
        polling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await polling
        await asyncio.wait_for(host.ended.wait(), 10)
    known = state.worker(worker)
    assert known is not None
    assert known.version == 0
    assert state.held_by(worker) == ({"k0", "k1", "k2"} if cold else {"old"})


async def test_a_cold_snapshot_is_merged_as_it_is_read(
    unmerged: _Unmerged, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot of a worker the view holds nothing of is merged a step at a time as its pages
    are read: read whole first, the cold snapshots of 4 agents of 100k keys held a report per
    key besides the state they were building (17 MiB of the AMM's peak). The next page is still
    asked for while this one is read, and the worker's version is the snapshot's only once
    every step is merged."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)
    state = unmerged
    per_page = 4 * MERGE_STEP
    host = _PagedSnapshot(3, per_page, state)  # type: ignore[abstract]
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:
        assert await poller.poll_all() == []
    assert len(state.held_by(worker)) == 3 * per_page
    assert max(state.ahead) == 0, f"reports read and not merged: {state.ahead}"
    assert host.read_when_asked[1] < per_page, host.read_when_asked
    assert state.versions[:12] == [0] * 11 + [1], state.versions  # then the catch-up poll
    known = state.worker(worker)
    assert known is not None
    assert known.version == 1


class _FailsMidColdSnapshot(agent_pb2_grpc.WorkerAgentServicer):
    """A snapshot whose second page never comes (the agent fails half-way); asked again, a
    whole inventory of other keys in one page."""

    def __init__(self) -> None:
        self.polls = 0

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        self.polls += 1
        if request.cursor:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone half-way")
        running = types_pb2.WORKER_STATUS_RUNNING
        first = self.polls == 1
        keys = [
            types_pb2.KeyInfo(key=f"{'a' if first else 'b'}{i}", size=1, checksum="c" * 64)
            for i in range(3)
        ]
        return agent_pb2.PollResponse(
            incarnation="i",
            version=9,
            full=True,
            keys=keys,
            next_cursor="a2" if first else "",
            status=running,
        )


async def test_a_cold_snapshot_that_fails_half_way_is_asked_for_whole_again() -> None:
    """What a cold snapshot merged before it failed stays (it is what the worker held), at
    version 0: the next poll asks for a whole snapshot, which replaces it."""
    host = _FailsMidColdSnapshot()  # type: ignore[abstract]
    state = ClusterState()
    async with _workers(host, 1) as [worker], _polling(state, [worker]) as poller:
        assert await poller.poll_all() == [worker]
        known = state.worker(worker)
        assert known is not None
        assert known.version == 0
        assert state.held_by(worker) == {"a0", "a1", "a2"}
        assert await poller.poll_all() == []
    assert state.held_by(worker) == {"b0", "b1", "b2"}
    known = state.worker(worker)
    assert known is not None
    assert known.version == 9


class _RestartsWhilePaged(agent_pb2_grpc.WorkerAgentServicer):
    """A snapshot's first page from incarnation ``i``; asked for the next one, the agent has
    restarted: its answer is the whole (one-page) snapshot of incarnation ``j``."""

    async def Poll(self, request: Any, context: Any) -> agent_pb2.PollResponse:
        running = types_pb2.WORKER_STATUS_RUNNING
        if request.since_version:  # nothing changed since
            return agent_pb2.PollResponse(incarnation="j", version=5, status=running)
        restarted = bool(request.cursor)
        keys = [
            types_pb2.KeyInfo(key=f"{'b' if restarted else 'a'}{i}", size=1, checksum="c" * 64)
            for i in range(3)
        ]
        return agent_pb2.PollResponse(
            incarnation="j" if restarted else "i",
            version=5 if restarted else 3,
            full=True,
            keys=keys,
            next_cursor="" if restarted else "a2",
            status=running,
        )


async def test_a_cold_snapshot_cut_by_a_restart_is_replaced_by_the_new_one() -> None:
    """The agent restarts while its cold snapshot is paged: the new process's snapshot
    replaces what was merged of the old one's, which ``on_replaced`` is told of (to find the
    keys lost with it)."""
    host = _RestartsWhilePaged()  # type: ignore[abstract]
    state = ClusterState()
    replaced: list[tuple[WorkerId, frozenset[str]]] = []
    async with (
        _workers(host, 1) as [worker],
        _polling(state, [worker], on_replaced=lambda w, held: replaced.append((w, held))) as poller,
    ):
        assert await poller.poll_all() == []
    assert state.held_by(worker) == {"b0", "b1", "b2"}
    known = state.worker(worker)
    assert known is not None
    assert (known.incarnation, known.version) == ("j", 5)
    assert replaced == [(worker, frozenset({"a0", "a1", "a2"}))]

"""Polling the agents: each one's inventory changes and memory, merged into the cluster state.

All agents are polled concurrently, each under its own deadline, so one slow agent delays a cycle
by at most ``timeout``. At most ``max_in_flight`` Poll calls are under way at once, over every
caller (cycles and fresh queries): a call's deadline starts when the call is made, and launching a
thousand at once spent the deadline of the last ones in the AMM's own queue and in a burst of
connection set-ups, so that live agents were counted as missing polls. Polls are incremental (the
agent returns what changed since the version we saw) and paged (at most ``page`` keys an answer,
so no inventory outgrows a gRPC message), and serialised per agent, so that two overlapping polls
(a cycle and a fresh query) never apply an older answer after a newer one. A poll also tells the
agent the AMM's epoch (which the agent confirms with the AMM it is configured with before taking
it) and its membership version, and tells us the newest epoch the agent has confirmed. After
every round of polls, ``on_round`` runs (the AMM takes what the round changed), then
``after_round`` (the slower bookkeeping no planning reads: notes of keys being stored, the keys
held written to the state file); a cycle lets ``after_round`` run while it plans
(``poll_all(later=True)``) and awaits it before it ends (``caught_up``).

Failure modes handled:

1. The agent does not answer: its missed-poll count goes up (the core stops counting on it).
2. The agent restarted (new incarnation) without re-registering yet: what was in flight to the
   old process is moot (``on_restart``), and the full snapshot replaces what we knew; once it is
   merged, ``on_replaced`` gets what the old process held, to find the keys lost with it.
3. The agent re-registered while our poll was under way: the answer belongs to the old
   registration and is dropped. Re-registering closes the old channel, which cancels the call
   under way: that poll ends as answered (there is nothing to say about a registration that is
   gone), never as a cancellation escaping into the cycle or the query that awaited it.
4. A full snapshot spans several pages while the inventory keeps changing: pages are merged,
   then everything since the first page's version is fetched incrementally.

A poll also carries the tombstones of forgotten keys the agent has not taken yet, and tells the
tombstone book what came of them (``tombstones``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator

import grpc

from amm.base.validation import MAX_ADOPTED_EPOCH
from amm.v1 import agent_pb2, types_pb2
from amm_service import wire
from amm_service.decisions.view import ClusterState, Key, KeyReport, WorkerId
from amm_service.runtime.links.agents import AgentLinks, channel_closed
from amm_service.runtime.loop.pacing import Budget, gc_paused
from amm_service.runtime.records.tombstones import NOTHING, Push, TombstoneBook

log = logging.getLogger(__name__)

#: Keys asked for in one poll answer. The agent builds a page in one step of its event loop: pages
#: of 10,000 held it for about 20 ms of CPU each (a loop probe in the agents while the AMM read
#: their 100k-key snapshots), what a HoldsKeys (a fresh who_has) then waited for.
PAGE_KEYS = 4_000
#: Keys (reported or removed) decoded or merged into the state in one slice; the event loop is
#: let in once a slice ends ``pacing.BUDGET`` after the last breath. 2,500 at a time held the
#: loop for 40-120 ms of CPU during a 100k-key cycle on a busy machine (``loop_probe``).
MERGE_STEP = 500
MAX_PAGES = 10_000
#: Poll calls under way at once, at most. Polling 1,000 agents on loopback on 2 busy cores
#: (``benchmarks/bench_scale.py``, and the same polls in a loop): all at once, hundreds of live
#: agents missed their deadline on first contact and now and then under load, and the event loop
#: (which serves every control call) stalled for 0.3-1 s; 128 at a time, none missed in any run
#: and the loop stalled for 0.05-0.25 s, for 10-20% more CPU and time per round of polls when
#: nothing is amiss. 256 saved half of that cost but missed again once, and stalled longer.
#: Past 128 agents that hang rather than refuse, a cycle's polls take longer than one timeout.
MAX_IN_FLIGHT = 128


class _Gone(Exception):
    """The worker left or re-registered while we polled it."""


class _Tombstoned:
    """What one poll saw of tombstoned keys: reported (``seen``) and removed (``gone``)."""

    def __init__(self, book: TombstoneBook | None) -> None:
        self.book = book
        self.seen: list[Key] = []
        self.gone: list[Key] = []

    def note(self, keys: list[KeyReport], removed: list[Key]) -> None:
        book = self.book
        if book:
            self.seen += [r.key for r in keys if r.key in book]
            self.gone += [k for k in removed if k in book]


class Poller:
    """Polls agents and feeds the cluster state."""

    def __init__(
        self,
        state: ClusterState,
        links: AgentLinks,
        *,
        epoch: int,
        timeout: float,
        on_restart: Callable[[WorkerId], None],
        on_replaced: Callable[[WorkerId, frozenset[Key]], None] = lambda worker, held: None,
        on_round: Callable[[], Awaitable[None]] | None = None,
        after_round: Callable[[], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
        page: int = PAGE_KEYS,
        max_in_flight: int = MAX_IN_FLIGHT,
        tombstones: TombstoneBook | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self._state = state
        self._links = links
        self.epoch = epoch
        self._timeout = timeout
        self._on_restart = on_restart
        self._on_replaced = on_replaced
        self._on_round = on_round
        self._after_round = after_round
        #: The ``after_round`` of rounds left running (``poll_all(later=True)``).
        self._after: set[asyncio.Task[None]] = set()
        self._clock = clock
        self._page = page
        self._locks: dict[WorkerId, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tombstones = tombstones
        self._shared = SharedReports()
        self.newest_agent_epoch = 0
        #: The AMM's membership version, told to every agent polled (``Membership``).
        self.membership_version = 0

    async def poll_all(
        self, workers: Iterable[WorkerId] | None = None, *, later: bool = False
    ) -> list[WorkerId]:
        """Poll ``workers`` (default: all registered); returns those that did not answer.

        With ``later``, the round's ``after_round`` is left running when this returns (the
        caller awaits ``caught_up`` before it relies on it): the first cycle after a 100k-key
        put on 4 agents judged 400k notes of keys being stored and wrote 100k keys to the
        state file, 0.6-0.8 s of its loop, before it could plan a single drop."""
        targets = list(self._state.worker_ids if workers is None else workers)
        answered = await asyncio.gather(*(self.poll(w) for w in targets))
        if self._on_round is not None:
            await self._on_round()
        if self._after_round is not None:
            if later:
                task = asyncio.ensure_future(_logged(self._after_round()))
                self._after.add(task)
                task.add_done_callback(self._after.discard)
            else:
                await self._after_round()
        return [w for w, ok in zip(targets, answered, strict=True) if not ok]

    async def caught_up(self) -> None:
        """Once the ``after_round`` of every round so far has run (left running, it goes on
        should the caller be cancelled)."""
        while self._after:
            await asyncio.shield(asyncio.gather(*self._after, return_exceptions=True))

    def forget(self, worker: WorkerId) -> None:
        self._locks.pop(worker, None)

    async def poll(self, worker: WorkerId) -> bool:
        lock = self._locks.setdefault(worker, asyncio.Lock())
        async with lock:
            known = self._state.worker(worker)
            if known is None:
                return True
            book = self._tombstones
            push = NOTHING
            if book is not None:
                push = book.pending(worker, known.incarnation, known.features)
            seen = _Tombstoned(book)
            try:
                await self._poll(worker, known.incarnation, known.version, push, seen)
            except _Gone:
                return True
            except grpc.aio.AioRpcError as err:
                log.debug("poll of %s failed: %s", worker, err.code().name)
                self._state.missed_poll(worker)
                return False
            except asyncio.CancelledError:
                if not channel_closed():
                    raise
                now = self._state.worker(worker)
                if now is None or now.incarnation != known.incarnation:
                    return True  # it left or registered again: its channel went with the old one
                log.debug("poll of %s cut short: its channel was closed", worker)
                self._state.missed_poll(worker)
                return False
            if book is not None:
                book.polled(worker, push, self._state, seen.seen, seen.gone)
            return True

    async def _poll(
        self, worker: WorkerId, incarnation: str, since: int, push: Push, seen: _Tombstoned
    ) -> None:
        """Follow the agent's answers until its whole inventory is merged (bounded); the first
        call carries the tombstones of ``push``."""
        resp = await self._call(worker, incarnation, since_version=since, push=push)
        for _ in range(MAX_PAGES):
            if resp.incarnation != incarnation:
                self._on_restart(worker)
            if resp.full and self._cold(worker, resp):
                first, last = await self._stream(worker, incarnation, resp, seen)
                incarnation = first.incarnation
                if last is first:
                    return
                resp = await self._call(worker, incarnation, since_version=first.version)
                continue
            if resp.full:
                with self._shared.reading():
                    first, last, keys = await self._snapshot(worker, resp)
                    restarted = first.incarnation != incarnation
                    before = self._state.held_by(worker) if restarted else frozenset()
                    await self._apply_snapshot(worker, incarnation, first, last, keys, seen)
                del keys
                if before:
                    self._on_replaced(worker, before)
                incarnation = first.incarnation
                if last is first:
                    return
                # Paged: catch what changed while the pages were read.
                resp = await self._call(worker, incarnation, since_version=first.version)
                continue
            await self._apply_changes(worker, incarnation, resp, seen)
            if not resp.more:
                return
            resp = await self._call(worker, incarnation, since_version=resp.version)
        log.warning("poll of %s stopped after %d answers", worker, MAX_PAGES)

    def _cold(self, worker: WorkerId, first: agent_pb2.PollResponse) -> bool:
        """Whether the full snapshot that ``first`` begins can be merged page by page as it is
        read (``_stream``): the view holds nothing of the worker, so that half of it merged
        replaces nothing, and the agent is the process it knows (not a restart, whose
        snapshot replaces what the old one held as a whole)."""
        known = self._state.worker(worker)
        return (
            known is not None
            and known.incarnation == first.incarnation
            and not self._state.holding(worker)
        )

    async def _stream(
        self,
        worker: WorkerId,
        incarnation: str,
        first: agent_pb2.PollResponse,
        seen: _Tombstoned,
    ) -> tuple[agent_pb2.PollResponse, agent_pb2.PollResponse]:
        """Merge the full snapshot ``first`` begins page by page, ``MERGE_STEP`` keys at a
        time as they are read, for a worker the view holds nothing of (``_cold``); (first
        page, last page).

        Read whole before any of it was merged (``_snapshot``), the cold snapshots of 4 agents
        of 100k keys held a report per key, the table that shared them between agents and a
        list of them per agent besides the state they were building: 17 MiB of the AMM's peak
        RSS. Merged as read, one step of reports is alive at a time. Until its last step the
        worker's version is 0 (nothing known yet), and only then the snapshot's: should the
        poll fail half-way, the view holds part of what the worker holds (as it does while any
        snapshot is merged), and the next poll's full snapshot replaces it whole.

        The next page is asked for before this one is merged, as ``_snapshot`` does. If the
        agent restarts while we page, its answer is the first page of a new snapshot: it
        replaces what was merged of the old one (``full``), and ``on_replaced`` gets that once
        the new one is merged."""
        resp, full, before = first, True, frozenset[Key]()
        ahead = self._ahead(worker, first.incarnation, first)
        try:
            for _ in range(MAX_PAGES):
                await self._merge_page(
                    worker, incarnation, first, resp, full=full, last=ahead is None, seen=seen
                )
                incarnation, full = first.incarnation, False
                if ahead is None:
                    break
                resp = await ahead
                if resp.incarnation != first.incarnation:
                    before = before | self._state.held_by(worker)
                    first, full = resp, True
                ahead = self._ahead(worker, first.incarnation, resp)
        finally:
            await _end(ahead)
        if before:
            self._on_replaced(worker, before)
        return first, resp

    async def _merge_page(
        self,
        worker: WorkerId,
        incarnation: str,
        first: agent_pb2.PollResponse,
        page: agent_pb2.PollResponse,
        *,
        full: bool,
        last: bool,
        seen: _Tombstoned,
    ) -> None:
        """Read and merge one page of the snapshot ``first`` begins, a step at a time (see
        ``_stream``); ``full``: the first step replaces what the view held of the worker;
        ``last``: the last step moves the worker's version to the snapshot's."""
        pb = page.keys
        starts = range(0, max(len(pb), 1), MERGE_STEP)
        pace = Budget()
        for start in starts:
            if start:
                await pace()
            self._apply(
                worker,
                incarnation,
                first,
                full=full and not start,
                keys=_read(pb[start : start + MERGE_STEP]),
                answer=page,
                seen=seen,
                version=None if last and start == starts[-1] else 0,
            )
            incarnation = first.incarnation

    async def _snapshot(
        self, worker: WorkerId, first: agent_pb2.PollResponse
    ) -> tuple[agent_pb2.PollResponse, agent_pb2.PollResponse, list[KeyReport]]:
        """Read every page of a full snapshot: (first page, last page, all keys). Nothing is
        merged until every page is in: a poll that fails half-way must leave what we knew
        whole, not replace it with half an inventory (a snapshot of a worker the view holds
        nothing of replaces nothing: it is merged as read, ``_stream``).

        If the agent restarts while we page, its answer is the first page of a new snapshot:
        start over from it.

        The next page is asked for before this one is read (``_ahead``): the agent builds it
        while the AMM decodes, instead of each side waiting on the other page after page (a
        cold 100k-key snapshot of 4 agents kept the AMM about half idle while it was read).
        """
        read = self._shared.read
        resp = first
        ahead = self._ahead(worker, first.incarnation, first)
        try:
            keys = await _reports(first, read)
            for _ in range(MAX_PAGES):
                if ahead is None:
                    break
                resp = await ahead
                if resp.incarnation != first.incarnation:
                    first, keys = resp, []
                ahead = self._ahead(worker, first.incarnation, resp)
                keys.extend(await _reports(resp, read))
        finally:
            await _end(ahead)
        return first, resp, keys

    def _ahead(
        self, worker: WorkerId, incarnation: str, resp: agent_pb2.PollResponse
    ) -> asyncio.Task[agent_pb2.PollResponse] | None:
        """The call for the page after ``resp``, under way; None after the last page."""
        if not resp.next_cursor:
            return None
        return asyncio.ensure_future(self._call(worker, incarnation, cursor=resp.next_cursor))

    async def _apply_changes(
        self, worker: WorkerId, incarnation: str, resp: agent_pb2.PollResponse, seen: _Tombstoned
    ) -> None:
        """Merge an incremental answer, ``MERGE_STEP`` keys at a time with the loop let in
        between (``pacing.Budget``). The worker's version moves to the answer's only with the
        last step: until then the state does not claim to show what the agent had at that
        version (the ledger settles applied directives by it).

        Each step reads only its own keys: a page of 50,000 keys from each of 4 agents, read
        whole before merging, held 200,000 reports at once (35 MB of the AMM's peak while a
        100k-key put was polled); merged, they are let go."""
        pb = resp.keys
        removed = wire.poll_keys_removed(resp)
        if len(pb) + len(removed) <= MERGE_STEP:
            self._apply(
                worker,
                incarnation,
                resp,
                full=False,
                keys=_read(pb),
                removed=removed,
                seen=seen,
            )
            return
        # Slices of the answer's keys (read when merged), then of the keys it removed.
        steps: list[tuple[slice | None, list[Key]]] = [
            (slice(start, start + MERGE_STEP), []) for start in range(0, len(pb), MERGE_STEP)
        ]
        steps += [
            (None, removed[start : start + MERGE_STEP])
            for start in range(0, len(removed), MERGE_STEP)
        ]
        pace = Budget()
        for n, (some, some_removed) in enumerate(steps):
            if n:
                await pace()
            some_keys = [] if some is None else _read(pb[some])
            last = n == len(steps) - 1
            known = self._state.worker(worker)
            self._apply(
                worker,
                incarnation,
                resp,
                full=False,
                keys=some_keys,
                removed=some_removed,
                seen=seen,
                version=None if last or known is None else known.version,
            )

    async def _apply_snapshot(
        self,
        worker: WorkerId,
        incarnation: str,
        first: agent_pb2.PollResponse,
        last: agent_pb2.PollResponse,
        keys: list[KeyReport],
        seen: _Tombstoned,
    ) -> None:
        """Merge a whole snapshot, ``MERGE_STEP`` keys at a time with the loop let in between
        (``pacing.Budget``):
        merging a million keys in one go held it for seconds. Meanwhile the state shows part of
        the worker's inventory, as it would a worker still filling up; no call is made in
        between, so the merge cannot stop half-way."""
        self._apply(
            worker, incarnation, first, full=True, keys=keys[:MERGE_STEP], answer=last, seen=seen
        )
        incarnation = first.incarnation
        pace = Budget()
        for start in range(MERGE_STEP, len(keys), MERGE_STEP):
            await pace()
            chunk = keys[start : start + MERGE_STEP]
            self._apply(worker, incarnation, first, full=False, keys=chunk, answer=last, seen=seen)

    async def _call(
        self,
        worker: WorkerId,
        incarnation: str,
        *,
        since_version: int = 0,
        cursor: str = "",
        push: Push = NOTHING,
    ) -> agent_pb2.PollResponse:
        request = agent_pb2.PollRequest(
            since_version=since_version,
            incarnation=incarnation,
            epoch=self.epoch,
            max_keys=self._page,
            cursor=cursor,
            membership_version=self.membership_version,
        )
        add = request.forgotten.add
        for key, tombstone, put_again in push.items:
            add(key=key, tombstone=tombstone, put_again=put_again)
        async with self._slots:  # the deadline starts once a slot is ours
            resp = await self._links.stub(worker).Poll(request, timeout=self._timeout)
        if resp.epoch <= MAX_ADOPTED_EPOCH:  # beyond: no AMM issued it, and nothing moves past it
            self.newest_agent_epoch = max(self.newest_agent_epoch, resp.epoch)
        return resp

    def _apply(
        self,
        worker: WorkerId,
        incarnation: str,
        resp: agent_pb2.PollResponse,
        *,
        full: bool,
        keys: list[KeyReport],
        answer: agent_pb2.PollResponse | None = None,
        seen: _Tombstoned | None = None,
        removed: list[Key] | None = None,
        version: int | None = None,
    ) -> None:
        """Merge one answer (or the part of it in ``keys`` and ``removed``; at ``version``, by
        default the answer's), unless the worker re-registered meanwhile (then raise _Gone)."""
        known = self._state.worker(worker)
        if known is None or known.incarnation != incarnation:
            raise _Gone
        last = answer or resp
        if removed is None:
            removed = wire.poll_keys_removed(resp)
        if seen is not None:
            seen.note(keys, removed)
        with gc_paused():  # a step of up to MERGE_STEP keys (see ``pacing``)
            self._state.apply_poll(
                worker,
                incarnation=resp.incarnation,
                version=resp.version if version is None else version,
                full=full,
                keys=keys,
                removed=removed,
                memory=wire.memory_from_pb(last.memory),
                status=wire.status_from_pb(last.status),
                name=last.name,
                zone=last.zone,
                features=frozenset(last.features),
                now=self._clock(),
            )


class SharedReports:
    """One ``KeyReport`` object for each key reported alike by the full snapshots read at once.

    A snapshot is merged only once all its pages are in, and at start-up every agent sends its
    whole inventory at the same time: with 100k keys on 4 agents, 400k reports (a tuple and two
    strings each, 250 bytes) were held at once, 97 MiB on top of the state being built. Shared,
    the keys held by several agents cost one report and a list slot per agent. The table lives
    while any snapshot is read or merged, and is emptied when the last one is done."""

    __slots__ = ("_readers", "_table")

    def __init__(self) -> None:
        self._table: dict[Key, KeyReport] = {}
        self._readers = 0

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """While a snapshot is read and merged (what it shares stays shared until then)."""
        self._readers += 1
        try:
            yield
        finally:
            self._readers -= 1
            if not self._readers:
                self._table = {}

    def read(self, pb: Iterable[types_pb2.KeyInfo]) -> list[KeyReport]:
        """The reports of ``pb`` (as ``_read``), each key reported alike before being that
        report, not a new one (only while ``reading``): a snapshot's keys that another agent
        reported already cost no report of their own, not even for a moment."""
        with gc_paused():
            return wire.key_reports(pb, self._table if self._readers else None)


async def _logged(work: Awaitable[None]) -> None:
    """``work`` left running: a failure is logged (nobody awaits it to see it raise)."""
    try:
        await work
    except Exception:
        log.exception("the bookkeeping after a round of polls failed")


async def _end(ahead: asyncio.Task[agent_pb2.PollResponse] | None) -> None:
    """The page call ``ahead`` ended (cancelled if under way) before the next poll of the agent,
    its outcome taken: nobody reads that page now."""
    if ahead is None:
        return
    if not ahead.done():
        ahead.cancel()
        await asyncio.wait([ahead])
    if not ahead.cancelled():
        ahead.exception()


async def _reports(
    resp: agent_pb2.PollResponse,
    read: Callable[[Iterable[types_pb2.KeyInfo]], list[KeyReport]],
) -> list[KeyReport]:
    """The keys of an answer, ``read`` ``MERGE_STEP`` at a time with the loop let in between
    (``pacing.Budget``; a page of 10,000 took 15-20 ms to read in one go)."""
    pb = resp.keys
    if len(pb) <= MERGE_STEP:
        return read(pb)
    keys: list[KeyReport] = []
    pace = Budget()
    for start in range(0, len(pb), MERGE_STEP):
        if start:
            await pace()
        keys += read(pb[start : start + MERGE_STEP])
    return keys


def _read(pb: Iterable[types_pb2.KeyInfo]) -> list[KeyReport]:
    """Reports of ``pb`` (one step of keys at most), what they leave alive frozen with a big
    heap (``gc_paused``)."""
    with gc_paused():
        return wire.key_reports(pb)

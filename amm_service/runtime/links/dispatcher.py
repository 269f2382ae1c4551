"""Sending directives: one long-lived bidirectional stream per agent.

Directives go out on the worker's stream as soon as the core picks them, in batches of up to
``BATCH`` per message to agents that take batches (feature "directive-batches"), one per message
to the others. To agents that also take drops in columns (feature "drop-columns") the drops of a
batch go column by column (``wire.DropColumnsWriter``), which costs both sides a fraction of a
message per drop, and the applied ones are answered in columns too. Outcomes come back in
completion order (single, batched or in columns) and are handed to ``on_outcomes``. When a
stream ends, every directive sent on it without an answer is reported FAILED at once (the agent
may or may not have applied it; the next poll tells), so nobody waits for the directive timeout
on a dead worker. A broken stream is reopened on the next send;
directives are idempotent and agents enforce integrity themselves, so a lost one costs time,
never data.

Building the messages of a big cycle takes a while, so ``send`` yields to the event loop between
messages: control calls stay answered while hundreds of thousands of directives go out. A cycle
sends in small slices while an agent runs short of work (``in_hand``); slices queued behind a
message the agent has not taken yet go out joined, up to ``BATCH``. A cycle that has given
every agent concerned enough to do waits (``ran_short``) until one of them has fewer than a mark
in hand before it plans more: what is planned ahead of the agents is held in the ledger and the
queues, and a big cycle planned far faster than they carry it out.

The dispatcher owns one task per stream and ends them itself on ``close`` (a server shutting down
does not end client streams for us: grpc/grpc#37239).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import operator
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from itertools import repeat
from typing import TypeVar

import grpc

from amm.v1 import agent_pb2, types_pb2
from amm_service import wire
from amm_service.decisions.directive import Directive, Outcome, OutcomeStatus
from amm_service.decisions.view import WorkerId
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.loop.pacing import Budget, gc_paused

log = logging.getLogger(__name__)

OutcomesHandler = Callable[[WorkerId, Sequence[Outcome]], None]
_CLOSE = None
#: Directives in one batch message (about 200 bytes each, far below the message cap).
BATCH = 5_000
#: Directives put in a batch message, and outcomes of one taken in, in one slice: the event loop
#: is let in once a slice ends ``pacing.BUDGET`` after the last breath.
BUILD_STEP = 250
OUTCOME_STEP = 250
#: Drops written into a message's columns in one slice (each a few C-level passes).
COLUMN_STEP = 2_500
_ID = operator.attrgetter("id")
"""A directive's id (through ``map``: no Python call per directive)."""
_T = TypeVar("_T")
_OUTCOME_ID = operator.itemgetter(0)
"""An outcome's ``directive_id`` (its first field)."""


class _Watch:
    """Who waits for an agent to run short: the workers watched, the mark, and the event set
    when a watched stream's unanswered count falls below it (or the stream ends)."""

    def __init__(self) -> None:
        self.workers: Collection[WorkerId] = ()
        self.mark = 0  # nobody waits
        self.event = asyncio.Event()

    def note(self, worker: WorkerId, left: int) -> None:
        if left < self.mark and worker in self.workers:
            self.event.set()


class _Stream:
    """The directive stream to one agent, with the task that reads its outcomes."""

    def __init__(
        self,
        worker: WorkerId,
        links: AgentLinks,
        on_outcomes: OutcomesHandler,
        watch: _Watch | None = None,
    ) -> None:
        self.worker = worker
        self._watch = watch or _Watch()
        # (directives, in one batch message, drops in columns); None ends the stream.
        self._queue: deque[tuple[Sequence[Directive], bool, bool] | None] = deque()
        self._queued = asyncio.Event()
        self.unanswered: dict[str, None] = {}
        self._on_outcomes = on_outcomes
        self._call = links.stub(worker).Directives(self._requests())
        self.task = asyncio.create_task(self._read(), name=f"amm-directives-{worker}")

    async def _requests(self) -> AsyncIterator[agent_pb2.DirectivesRequest]:
        """The messages, each built only when gRPC asks for the next one: a message costs about
        400 bytes per directive, and a big cycle queues its 300,000 drops far faster than the
        agent reads them (built at ``send``, they held 110 MiB at once; the directives
        themselves are held by the ledger anyway)."""
        queue = self._queue
        while True:
            while not queue:
                self._queued.clear()
                await self._queued.wait()
            item = queue.popleft()
            if item is _CLOSE:
                return
            directives, batch, columns = item
            if not batch:
                for directive in directives:
                    message = wire.directive_to_pb(directive)
                    yield agent_pb2.DirectivesRequest(directive=message)
                continue
            directives = self._joined(directives, columns)
            request = agent_pb2.DirectivesRequest()
            drops: Sequence[Directive] = ()
            if columns:
                drops, directives = wire.split_drops(directives)
            pace = Budget()
            for start in range(0, len(directives), BUILD_STEP):
                if start:
                    await pace()
                with gc_paused():
                    wire.directives_request(directives[start : start + BUILD_STEP], request)
            if drops:
                writer = wire.DropColumnsWriter(request.drops)
                for start in range(0, len(drops), COLUMN_STEP):
                    if start or directives:
                        await pace()
                    with gc_paused():
                        writer.add(drops[start : start + COLUMN_STEP])
                del writer  # it holds the message (through its columns)
            yield request
            del request  # not kept while the next one waits in the queue

    def _joined(self, directives: Sequence[Directive], columns: bool) -> Sequence[Directive]:
        """``directives`` with the batches queued right after them, up to ``BATCH`` in all:
        what piled up while the agent had its hands full goes out as one message, not one per
        slice sent (each message costs the agent a task, and a promise asked of each keeper)."""
        queue = self._queue
        joined: list[Directive] | None = None
        size = len(directives)
        while queue and (item := queue[0]) is not _CLOSE:
            more, batch, in_columns = item
            if not batch or in_columns is not columns or size + len(more) > BATCH:
                break
            queue.popleft()
            if joined is None:
                joined = list(directives)
            joined += more
            size += len(more)
        return directives if joined is None else joined

    def send(self, directives: Sequence[Directive], batch: bool, columns: bool = False) -> None:
        """Queue ``directives`` for one batch message (built ``BUILD_STEP`` at a time, the loop
        let in between, when the stream takes it), its drops in columns with ``columns``, or
        one message each."""
        self.unanswered.update(dict.fromkeys(map(_ID, directives)))
        self._put((directives, batch, columns))

    def _put(self, item: tuple[Sequence[Directive], bool, bool] | None) -> None:
        self._queue.append(item)
        self._queued.set()

    async def _read(self) -> None:
        why = "the agent ended the directive stream"
        try:
            async for response in self._call:
                incarnation = response.incarnation
                items = response.batch
                if response.HasField("applied"):  # applied drops in columns, after the batch
                    await self._take_all(items, incarnation)
                    await self._take_applied(response.applied, incarnation)
                    continue
                if not items:
                    self._take([wire.outcome_from_pb(response.outcome, incarnation)])
                    continue
                await self._take_all(items, incarnation)
        except grpc.aio.AioRpcError as err:
            why = f"directive stream broke: {err.code().name}"
            if err.code() != grpc.StatusCode.CANCELLED:
                log.info("directive stream to %s ended: %s", self.worker, err.code().name)
        except Exception:
            why = "directive stream failed"
            log.exception("directive stream to %s failed", self.worker)
        finally:
            lost, self.unanswered = list(self.unanswered), {}
            self._on_outcomes(
                self.worker,
                [Outcome(directive_id, OutcomeStatus.FAILED, message=why) for directive_id in lost],
            )
            self._watch.note(self.worker, 0)

    async def _take_all(
        self, items: Sequence[types_pb2.DirectiveOutcome], incarnation: str
    ) -> None:
        """Take a batch of outcomes in, ``OUTCOME_STEP`` at a time (``_take_in_slices``)."""
        read = functools.partial(wire.outcomes_from_pb, incarnation=incarnation)
        await self._take_in_slices(items, read)

    async def _take_applied(self, applied: agent_pb2.AppliedDrops, incarnation: str) -> None:
        """Take applied drops in columns in (``_take_in_slices``). Their outcomes are made at
        once, in C, and let go of on return: left alive until the next message, the last ones
        of a big cycle held on to the allocator's arenas they were scattered over (20 MiB of
        RSS kept after a 100k-key cycle, ``bench_memory.py --columns``)."""
        with gc_paused():  # hundreds of tuples, made in C: no collection for them
            outcomes = wire.outcomes_from_applied(applied, incarnation)
        await self._take_in_slices(outcomes, list)

    async def _take_in_slices(
        self, items: Sequence[_T], outcomes: Callable[[Sequence[_T]], list[Outcome]]
    ) -> None:
        """Take ``outcomes`` of ``items`` in, ``OUTCOME_STEP`` at a time, with the collector
        paused and control calls let in between."""
        pace = Budget()
        for start in range(0, len(items), OUTCOME_STEP):
            with gc_paused():
                self._take(outcomes(items[start : start + OUTCOME_STEP]))
            await pace()

    def _take(self, outcomes: list[Outcome]) -> None:
        unanswered = self.unanswered
        # ``unanswered.pop(id, None)`` of each, without a Python step each (300,000 of them).
        deque(map(unanswered.pop, map(_OUTCOME_ID, outcomes), repeat(None)), 0)
        if not unanswered:
            self.unanswered = {}  # an emptied dict keeps the table of its peak (2 MB for 75k)
        self._on_outcomes(self.worker, outcomes)
        self._watch.note(self.worker, len(unanswered))

    @property
    def open(self) -> bool:
        return not self.task.done()

    async def close(self) -> None:
        self._put(_CLOSE)
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=1.0)
        except TimeoutError:
            self._call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class Dispatcher:
    """Sends directives to agents and reports their outcomes."""

    def __init__(
        self,
        links: AgentLinks,
        on_outcomes: OutcomesHandler,
        takes_batches: Callable[[WorkerId], bool] = lambda worker: False,
        takes_columns: Callable[[WorkerId], bool] = lambda worker: False,
    ) -> None:
        self._links = links
        self._on_outcomes = on_outcomes
        self._takes_batches = takes_batches
        #: Whether a worker takes drops in columns (``DirectivesRequest.drops``): asked only of
        #: workers that take batches.
        self._takes_columns = takes_columns
        self._streams: dict[WorkerId, _Stream] = {}
        self._closed = False
        self._watch = _Watch()

    async def send(self, directives: Sequence[Directive]) -> None:
        """Send ``directives`` on their workers' streams, yielding to the loop between
        messages."""
        by_worker: dict[WorkerId, list[Directive]] = {}
        for directive in directives:
            by_worker.setdefault(directive.worker, []).append(directive)
        pace = Budget()
        for worker, group in by_worker.items():
            batch = self._takes_batches(worker)
            columns = batch and self._takes_columns(worker)
            size = BATCH if batch else 100
            for start in range(0, len(group), size):
                if self._closed:
                    raise RuntimeError("dispatcher is closed")
                self._stream(worker).send(group[start : start + size], batch, columns)
                await pace()

    def _stream(self, worker: WorkerId) -> _Stream:
        stream = self._streams.get(worker)
        if stream is None or not stream.open:
            stream = self._streams[worker] = _Stream(
                worker, self._links, self._on_outcomes, self._watch
            )
        return stream

    def in_hand(self, worker: WorkerId) -> int:
        """Directives sent or queued for ``worker`` and not answered yet (0 without a stream):
        what it has to do before it waits for more."""
        stream = self._streams.get(worker)
        return len(stream.unanswered) if stream is not None and stream.open else 0

    def short(self, workers: Collection[WorkerId], mark: int) -> bool:
        """Whether one of ``workers`` has fewer than ``mark`` directives in hand."""
        return any(self.in_hand(worker) < mark for worker in workers)

    async def ran_short(self, workers: Collection[WorkerId], mark: int) -> None:
        """Wait until one of ``workers`` has fewer than ``mark`` directives in hand (its stream
        ended, or never opened), the dispatcher closes or ``wake`` is called. One waiter at a
        time (the cycle, under its lock); woken by the outcomes as they are taken in, not by
        polling."""
        watch = self._watch
        watch.event.clear()
        if self._closed or self.short(workers, mark):
            return
        watch.workers, watch.mark = workers, mark
        try:
            await watch.event.wait()
        finally:
            watch.workers, watch.mark = (), 0

    def wake(self) -> None:
        """End the wait of ``ran_short`` now (the cycle has been asked to hurry)."""
        self._watch.event.set()

    def is_open(self, worker: WorkerId) -> bool:
        """Whether a directive stream to ``worker`` is open (what was sent on it will be
        answered, or failed when it breaks)."""
        stream = self._streams.get(worker)
        return stream is not None and stream.open

    async def close_worker(self, worker: WorkerId) -> None:
        stream = self._streams.pop(worker, None)
        if stream is not None:
            await stream.close()

    async def close(self) -> None:
        """End every stream; idempotent."""
        self._closed = True
        self._watch.event.set()
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(s.close() for s in streams))

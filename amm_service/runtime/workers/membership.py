"""The AMM's registry of workers: who is registered, how they come and go, and the membership
version agents confirm their peers with (``GetMembership``).

However a worker goes away (dead, unregistered, restarted as a new process, closed), the keys it
held alone are recorded as lost (``Losses``): no path takes a last copy away without a
``key-lost`` record. The workers the previous run knew are taken back at start-up (``restore``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable

from amm.base.validation import (
    MAX_ADOPTED_EPOCH,
    epoch_problem,
    incarnation_problem,
    name_problem,
    zone_problem,
)
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.view import ClusterState, Departure, Key, WorkerId, WorkerView
from amm_service.errors import InvalidArgument
from amm_service.runtime.links.addresses import check_address
from amm_service.runtime.links.reach import Links
from amm_service.runtime.loop.pacing import Budget, gc_paused
from amm_service.runtime.records.kept import Records
from amm_service.runtime.workers.retirement import Retirements

log = logging.getLogger(__name__)

#: Keys of a leaving worker whose new records are worked out in one step, the loop let in
#: between (``ClusterState.prepare``: 1-4 ms of CPU on this machine).
DEPART_STEP = 2_000
#: Records it replaced freed in one step once it is gone (``Departure.release``).
RELEASE_STEP = 20_000
#: Most of the loop the passes over every key that begin departures take while workers keep
#: leaving (``Departing``): after a pass of d seconds, the next waits ``d / share - d``, and the
#: workers that came meanwhile share it.
DEPART_PASS_SHARE = 0.25


class Departing:
    """Begins the departures of workers leaving together with one pass over every key
    (``ClusterState.depart_each``), not one per worker: a thousand agents that stopped at once
    each cost two passes over 100k keys, 15-30 s of the AMM's loop in all, so that most of their
    UnregisterWorker calls were not even taken in before the agents gave up and exited, and
    stayed listed as live (``benchmarks/bench_scale.py``). A worker alone leaves at once."""

    def __init__(self, state: ClusterState, share: float = DEPART_PASS_SHARE) -> None:
        self._state = state
        self._share = share
        self._waiting: dict[WorkerId, asyncio.Future[Departure]] = {}
        self._passes: asyncio.Task[None] | None = None

    async def begin(self, worker: WorkerId) -> Departure:
        """The departure of ``worker``, begun with those of the others that wait for one."""
        waiting = self._waiting.get(worker)
        if waiting is None:
            waiting = self._waiting[worker] = asyncio.get_running_loop().create_future()
        if self._passes is None:
            self._passes = asyncio.create_task(self._pass_while_waited(), name="departures")
        return await asyncio.shield(waiting)

    async def close(self) -> None:
        """End the passes' task (after the removals that wait on it: a pass then only rests)."""
        task = self._passes
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pass_while_waited(self) -> None:
        try:
            await asyncio.sleep(0)  # those asking in this turn of the loop come along
            while self._waiting:
                waiting, self._waiting = self._waiting, {}
                started = time.perf_counter()
                try:
                    with gc_paused():
                        departures = self._state.depart_each(waiting)
                except Exception as err:  # a bug: the removals waiting fail with it, not hang
                    for future in waiting.values():
                        if not future.done():
                            future.set_exception(err)
                    continue
                took = time.perf_counter() - started
                for worker, future in waiting.items():
                    if not future.done():
                        future.set_result(departures[worker])
                await asyncio.sleep(took / self._share - took)
        except BaseException:
            for future in self._waiting.values():
                future.cancel()
            self._waiting.clear()
            raise
        finally:
            self._passes = None


class Membership:
    """Registers and removes workers, and owns the removals of agents that unregistered (tasks
    that outlive their call; ``close`` awaits them). ``check_open`` raises while the AMM is not
    open; ``fence`` holds our epoch, and moves it past one an agent confirmed."""

    def __init__(
        self,
        records: Records,
        links: Links,
        retirements: Retirements,
        *,
        fence: EpochFence,
        clock: Callable[[], float],
        check_open: Callable[[], None],
    ) -> None:
        self._state = records.state
        self._departing = Departing(records.state)
        self._store = records.store
        self._outcomes = records.outcomes
        self._tombstones = records.tombstones
        self._storing = records.storing
        self._events = records.events
        self._losses = records.losses
        self._poller = links.poller
        self._dispatcher = links.dispatcher
        self._links = links.agents
        self._retirements = retirements
        self._fence = fence
        self._clock = clock
        self._check_open = check_open
        self._replacing: dict[WorkerId, frozenset[Key]] = {}
        """What workers that registered again as a new process held before, until the new
        process has reported (it may have some of it back) or left."""
        self._leaving: dict[WorkerId, asyncio.Task[tuple[bool, list[Key]]]] = {}
        self._turns: weakref.WeakValueDictionary[WorkerId, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        """One lock per worker that a registration or removal is under way for (``_turn``)."""
        """Removals of workers whose agents unregistered; they outlive the call (``unregister``)."""
        #: Changes whenever the set of registered workers does (``membership``); polls carry it.
        self.version = 0

    async def restore(self) -> tuple[list[WorkerId], list[WorkerId]]:
        """Register the workers the previous run knew and poll each once: (those workers, those
        that have not answered)."""
        now = self._clock()
        records = self._store.known_workers()
        known = [WorkerId(record.address) for record in records]
        for record in records:
            self._state.register(WorkerId(record.address), record.name, "", now)
        self._losses.awaiting(known)
        self._changed()
        silent = await self._poller.poll_all(known)  # then ``_polled``
        return known, silent

    async def close(self) -> None:
        """Removals under way finish first (each bounded by a poll deadline): their agents left."""
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)
        await self._departing.close()

    def polled(self) -> None:
        """After every round of polls: what is lost now that workers registered again as new
        processes have reported."""
        for worker in list(self._replacing):
            ws = self._state.worker(worker)
            if ws is not None and ws.last_poll is not None:
                held = self._replacing.pop(worker)
                self._losses.losing(worker, held, "restarted (registered again as a new process)")

    async def register(
        self, address: str, name: str, incarnation: str, epoch: int = 0, zone: str = ""
    ) -> None:
        """Register (or refresh) a worker. Every field is judged by the rules an agent's own
        flags follow (``amm.base.validation``); ``epoch``, the newest the agent confirmed, may
        not exceed ``MAX_ADOPTED_EPOCH``: a fresh AMM moves past it, and no AMM issued more."""
        self._check_open()
        worker = check_address(address)
        problem = (
            incarnation_problem(incarnation)
            or (name_problem(name) if name else None)
            or zone_problem(zone)
            or epoch_problem("epoch", epoch, most=MAX_ADOPTED_EPOCH)
        )
        if problem is not None:
            raise InvalidArgument(problem)
        async with self._turn(worker):
            await self._register(worker, name, incarnation, epoch, zone)

    async def _register(
        self, worker: WorkerId, name: str, incarnation: str, epoch: int, zone: str
    ) -> None:
        known = self._state.worker(worker)
        departure = None
        if known is not None and known.incarnation != incarnation:
            departure = await self._depart(worker)  # the old process's keys go
            self._check_open()
            known = self._state.worker(worker)
        held = frozenset[Key]()
        if known is not None and known.incarnation != incarnation:
            held = self._held(worker, departure) | self._storing.take(  # by the process before
                worker, incarnation=known.incarnation
            )
        if self._state.register(
            worker, name, incarnation, self._clock(), zone=zone, departure=departure
        ):
            self._changed()
            self._outcomes.forget_in_flight(worker)
            await self._dispatcher.close_worker(worker)
            # A channel that failed to reach the old process may be backing off for minutes:
            # the new one gets a fresh connection.
            await self._links.close(worker)
            self._store.remember_worker(worker, name or worker)
            self._retirements.apply_flags()
            log.info("worker %s registered (%s)", worker, name or worker)
            if held:  # judged once the new process has reported: it may have some of it back
                self._replacing[worker] = held | self._replacing.get(worker, frozenset())
            # Its status, memory and keys now, not at the next cycle: until then a new worker
            # showed as unspecified, 0 B and never polled (and an AMM that is stopped has none).
            await self._poller.poll(worker)
        self._fence.adopt_newer(epoch)
        if departure is not None:
            await _release(departure)

    async def unregister(self, address: str) -> tuple[bool, list[Key]]:
        """Remove a worker whose agent is leaving: (whether it was registered, the keys lost
        with it). It is polled once more first, so what it holds at the call is what counts.

        The removal goes on if the caller stops waiting (its deadline passed, its channel was
        closed): when many agents stop at once, the last poll of each waits its turn, and a
        removal given up with the call left hundreds of agents that had said goodbye listed
        as live until declared dead (``benchmarks/bench_scale.py``, "left").
        """
        self._check_open()
        worker = WorkerId(address)
        leaving = self._leaving.get(worker)
        if leaving is None:
            meant = self._state.worker(worker)
            leaving = asyncio.create_task(
                self._unregister(worker, meant), name=f"unregister {worker}"
            )
            self._leaving[worker] = leaving
            leaving.add_done_callback(functools.partial(self._left, worker))
        return await asyncio.shield(leaving)

    def _left(self, worker: WorkerId, task: asyncio.Task[tuple[bool, list[Key]]]) -> None:
        """A removal ended: forget it, and log a failure (its caller may have stopped waiting)."""
        if self._leaving.get(worker) is task:
            del self._leaving[worker]
        if not task.cancelled() and (err := task.exception()) is not None:
            log.warning("unregistering ended with %s: %s", type(err).__name__, err)

    async def _unregister(
        self, worker: WorkerId, meant: WorkerView | None
    ) -> tuple[bool, list[Key]]:
        async with self._turn(worker):
            known = self._state.worker(worker)
            if known is None or _replaced(meant, known):
                return False, []
            if known.reachable:
                await self._poller.poll(worker)
            lost = await self._remove(worker, "unregistered")
        self._events.record(
            "worker-unregistered",
            f"its agent left; {len(lost)} key(s) had no copy elsewhere"
            if lost
            else "its agent left; every key it held has a copy elsewhere",
            worker=worker,
        )
        return True, lost

    def membership(self, epoch: int, version: int) -> tuple[int, int, list[WorkerId] | None]:
        """Our epoch, the membership version and the registered workers' addresses; None for
        the addresses when the caller's ``epoch`` and ``version`` are current. Agents confirm
        epochs and peers with it (``GetMembership``)."""
        self._check_open()
        ours = self._fence.epoch
        if (epoch, version) == (ours, self.version):
            return ours, self.version, None
        return ours, self.version, self._state.worker_ids

    def _changed(self) -> None:
        self.version += 1
        self._poller.membership_version = self.version

    def _turn(self, worker: WorkerId) -> asyncio.Lock:
        """The lock that puts the registrations and removals of ``worker`` one after another.

        A removal works out its keys' records in steps, the loop let in between: a worker that
        registers again meanwhile (an agent restarted, one declared dead that answers again)
        must register after the removal, not be taken out by it a moment later."""
        lock = self._turns.get(worker)
        if lock is None:
            lock = self._turns[worker] = asyncio.Lock()
        return lock

    async def remove(self, worker: WorkerId, cause: str = "was removed") -> list[Key]:
        """Take ``worker`` out of the registry; the keys lost with it (recorded and reported:
        no path takes a last copy away without a ``key-lost`` record).

        The records its keys will have without it are worked out first, in steps, and taken in
        at once: until then it is listed, with all it holds, as before."""
        meant = self._state.worker(worker)
        async with self._turn(worker):
            if _replaced(meant, self._state.worker(worker)):
                return []
            return await self._remove(worker, cause)

    async def _remove(self, worker: WorkerId, cause: str) -> list[Key]:
        departure = await self._depart(worker)
        held = self._state.held_through(departure)
        more = self._replacing.pop(worker, frozenset()) | self._storing.take(worker)
        if more:  # as a rule nothing: no second copy of 100k keys
            held |= more
        removed = self._state.unregister(worker, departure)
        if removed:
            self._changed()
        self._retirements.left(worker)
        self._outcomes.forget_in_flight(worker)
        self._poller.forget(worker)
        self._tombstones.forget_worker(worker)
        self._store.forget_worker(worker)
        await self._dispatcher.close_worker(worker)
        await self._links.close(worker)
        lost = self._losses.losing(worker, held, cause) if removed else []
        await _release(departure)
        return lost

    async def _depart(self, worker: WorkerId) -> Departure:
        """The records the keys of ``worker`` will have without it (``ClusterState.depart``),
        worked out in steps: at once, 100k keys held the loop for 0.15-0.7 s."""
        departure = await self._departing.begin(worker)
        pace = Budget()
        while True:
            with gc_paused():
                if self._state.prepare(departure, DEPART_STEP):
                    return departure
            await pace()

    def _held(self, worker: WorkerId, departure: Departure | None) -> frozenset[Key]:
        if departure is None:
            return self._state.held_by(worker)
        return self._state.held_through(departure)


def _replaced(meant: WorkerView | None, now: WorkerView | None) -> bool:
    """Whether a new process of the worker a removal was asked for registered while the removal
    waited its turn: the removal was meant for the process before."""
    return meant is not None and now is not None and now.incarnation != meant.incarnation


async def _release(departure: Departure) -> None:
    """Free the records a departure replaced in steps (freeing 100k at once took 10-30 ms)."""
    pace = Budget()
    while not departure.release(RELEASE_STEP):
        await pace()

"""The Active Memory Manager: the cycle loop and the cycles, wired to the worker registry.

It wires the pure parts (cluster state, ledger, core, policies, liveness, start-up grace, epoch) to
the I/O parts (poller, dispatcher), and starts and stops the cycle loop (``cycle_loop``, which owns
its task) that runs the cycles (``cycling``). A cycle is: expire stale ledger entries, poll every
agent, judge liveness (flag STALE workers, remove DEAD ones and report the keys lost with them),
snapshot, plan, send, supervise retirements. A dry run polls and plans only. However a worker goes
away (dead, unregistered, restarted as a new process, closed), the keys it held alone are recorded
as lost (``lost``); so are keys no worker holds any more after an AMM restart. Cycles never
overlap: the loop and ``run_once`` share a lock. The running flag and the epoch persist in the
state store, so a restarted AMM resumes as it was, under a new epoch that makes agents ignore the
old one, and issues no drops until the workers it knew have reported. With ``poll-while-stopped``
or the dashboard on, a stopped AMM still polls every agent once an interval, without planning or
judging liveness, so its view is current when asked (``sampling``, which also samples the
cluster's memory for the dashboard). What becomes of sent
directives is ``outcomes``; operators' questions, ``queries``; RetireWorkers, DrainWorker and
their driver task, ``retirement_driver``; what retirements do between cycles as outcomes arrive,
``handover``; registering and removing workers, ``membership``; recording and reporting lost
keys, ``lost`` (``Losses``); judging silent workers stale or dead, ``liveness``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

from amm.base.security import Security
from amm_service.config import AmmConfig
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.events import EventLog
from amm_service.decisions.grace import StartupGrace
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.errors import FailedPrecondition, Unavailable
from amm_service.policies import Policy
from amm_service.runtime.cycles.cycle_lock import CycleLock
from amm_service.runtime.cycles.cycle_loop import CycleLoop
from amm_service.runtime.cycles.cycling import CycleHooks, Cycles, Judges
from amm_service.runtime.links.agents import AgentLinks
from amm_service.runtime.links.dispatcher import Dispatcher
from amm_service.runtime.links.poller import Poller
from amm_service.runtime.links.reach import Links
from amm_service.runtime.loop.pacing import HeapFreezer
from amm_service.runtime.observe.event_feed import EventFeed
from amm_service.runtime.observe.history import History
from amm_service.runtime.observe.queries import Queries
from amm_service.runtime.observe.sampling import Sampler
from amm_service.runtime.records.cycle import CycleRecord, CycleStats
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.kept import Records
from amm_service.runtime.records.lost import Losses, LostBook
from amm_service.runtime.records.outcomes import Outcomes
from amm_service.runtime.records.state import StateStore
from amm_service.runtime.records.storing import Storing
from amm_service.runtime.records.tombstones import TombstoneBook
from amm_service.runtime.workers.handover import Handover
from amm_service.runtime.workers.liveness import LivenessJudge
from amm_service.runtime.workers.membership import Membership
from amm_service.runtime.workers.retirement import Retirements
from amm_service.runtime.workers.retirement_driver import RetirementDriver

log = logging.getLogger(__name__)

#: Keys plus directives in flight from which the AMM freezes its heap after each poll round and
#: cycle (``pacing.HeapFreezer``): below, full collections are short.
FREEZE_FROM = 10_000


class ActiveMemoryManager:
    """The AMM's domain object; servicers call one method of it, or of its ``queries`` or
    ``retirement_driver``, per RPC."""

    def __init__(
        self,
        config: AmmConfig,
        policies: Sequence[Policy],
        store: StateStore,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.policies = tuple(policies)
        self._store = store
        self._clock = clock
        self._monotonic = monotonic
        self.state = ClusterState(track_changes=True)
        self.ledger = Ledger()
        self.events = EventLog(clock=clock)
        self.outcomes = Outcomes(
            self.state,
            self.ledger,
            max_refusals=config.max_refusals_kept,
            clock=clock,
            events=self.events,
        )
        self._links = AgentLinks(security)
        self.tombstones = TombstoneBook(store, ttl=config.tombstone_ttl, clock=clock)
        self.goals = GoalBook(store)
        self._lost = LostBook(store, clock=clock)
        #: What rounds of polls changed (keys that appeared, keys that left), not saved yet.
        self._unsaved_rounds: deque[tuple[set[Key], set[Key]]] = deque()
        #: Keys agents are storing for a Put that no poll listed yet (``LookupKeys.storing``).
        self.storing = Storing(clock)
        self._losses = Losses(self._lost, self.state, self.events, self.goals, self.storing)
        self._dispatcher = Dispatcher(
            self._links,
            self.outcomes.on_outcomes,
            takes_batches=self._takes_batches,
            takes_columns=self._takes_columns,
        )
        self._poller = Poller(
            self.state,
            self._links,
            epoch=0,
            timeout=config.poll_timeout,
            on_restart=self.outcomes.forget_in_flight,
            on_replaced=self._losses.replaced,
            on_round=self._polled,
            after_round=self._keep_books,
            clock=clock,
            tombstones=self.tombstones,
        )
        records = Records(
            state=self.state,
            ledger=self.ledger,
            events=self.events,
            store=store,
            outcomes=self.outcomes,
            goals=self.goals,
            tombstones=self.tombstones,
            storing=self.storing,
            lost=self._lost,
            losses=self._losses,
        )
        links = Links(agents=self._links, poller=self._poller, dispatcher=self._dispatcher)
        self._fence = EpochFence(store, self._poller)
        self._cycle_lock = CycleLock()
        self._loop = CycleLoop(
            interval=config.interval,
            run_cycle=self.run_cycle,
            settled=self.outcomes.wait,
            fenced=lambda: self.fenced,
            monotonic=monotonic,
        )
        #: Durations and counts of every cycle run (not dry runs), for the metrics.
        self.cycle_stats = CycleStats()
        #: One sample per cycle run (and per interval while stopped), for the dashboard; kept
        #: only when it is served. The sampler also polls while the AMM is stopped.
        self.history = History() if config.dashboard_listen else None
        self._sampler = Sampler(
            self.history,
            self.state,
            self.outcomes,
            self.goals,
            self._lost,
            poll_all=self._poller.poll_all,
            running=lambda: self.running,
            busy=self._cycle_lock.locked,
            cycles=lambda: self._cycles.count,
            interval=config.interval,
            clock=clock,
            monotonic=monotonic,
            poll_while_stopped=config.poll_while_stopped,
            heard=lambda: self._liveness.heard(),
            fenced=lambda: self.fenced,
        )
        #: The events pushed to watchers (``WatchEvents``).
        self.event_feed = EventFeed(self.events)
        self._heap = HeapFreezer()
        self.queries = Queries(
            records,
            links,
            poll_timeout=config.poll_timeout,
            check_open=self._check_open,
            wake=self.wake,
            cycle_lock=self._cycle_lock,
        )
        self._grace = StartupGrace((), until=0.0)
        self.retirements = Retirements(self.state, store, self.events, self.policies, clock=clock)
        self._members = Membership(
            records,
            links,
            self.retirements,
            fence=self._fence,
            clock=clock,
            check_open=self._check_open,
        )
        self._liveness = LivenessJudge(
            self.state,
            self.ledger,
            self.events,
            stale_after=config.stale_seconds,
            dead_after=config.dead_after,
            is_open=self._dispatcher.is_open,
            remove=self._members.remove,
            clock=clock,
            monotonic=monotonic,
        )
        self.retirement_driver = RetirementDriver(
            self.retirements,
            self.state,
            self._links,
            self.ledger,
            poll_timeout=config.poll_timeout,
            check_open=self._check_open,
            refresh=self.queries.refresh,
            running=lambda: self.running,
            run_cycles=self._loop.every_interval,
            remove=self._members.remove,
            wake=self.wake,
        )
        self._cycles = Cycles(
            config,
            self.policies,
            records,
            links,
            Judges(
                fence=self._fence,
                liveness=self._liveness,
                fenced=lambda: self.fenced,
                in_startup_grace=self.in_startup_grace,
            ),
            self.retirement_driver,
            CycleHooks(
                clock=clock,
                monotonic=monotonic,
                stats=self.cycle_stats,
                sample=self._sampler.sample,
                freeze_heap=self._freeze_heap,
            ),
        )
        self._cycle_lock.on_wanted = self._cycles.hurry
        #: Drops from retiring workers as soon as agents confirm the copies (``handover``).
        self.handover = Handover(
            self.state,
            self.ledger,
            retiring=lambda: self.retirements.active,
            may_drop=lambda: not self.fenced and not self.in_startup_grace(),
            epoch=lambda: self.epoch,
            new_id=self._fence.new_id,
            enter=self._cycles.enter_between_cycles,
            dispatch=self._dispatcher.send,
            finish=self._finish_retirement,
            throttled=lambda: self.retirements.throttled,
            wake=self.wake,
            policy=min(self.retirements.retirers, default="RetireWorker"),
        )
        self.outcomes.watcher = self.handover
        self._opened = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Begin a new epoch, take back known workers, resume cycling if we were running."""
        if self._opened:
            return
        self._opened = True
        self._fence.begin()
        self.goals.load()
        self.tombstones.load()
        if self.config.directive_timeout < 2 * self.config.interval:
            log.warning(
                "directive-timeout (%.1f s) is under two intervals (%.1f s): directives may be "
                "forgotten before their effect can show",
                self.config.directive_timeout,
                2 * self.config.interval,
            )
        if self.config.dead_after <= self.config.stale_seconds:
            log.warning(
                "dead-after (%.1f s) is not above stale-after (%.1f s): silent workers are "
                "declared dead without ever being stale",
                self.config.dead_after,
                self.config.stale_seconds,
            )
        self.retirements.load()
        self._lost.load()
        await self._restore_workers()
        self.retirements.apply_flags()
        # An operator's Start or Stop persists and wins; the start setting decides until then.
        chosen = self._store.running_choice
        if self.config.start if chosen is None else chosen:
            self._loop.start()
        self._sampler.start()

    async def _restore_workers(self) -> None:
        """Take back the workers the previous run knew, and hold drops until they report.

        One poll each, under the poll deadline: those that answer are in the view before the
        first cycle. Those that do not stay registered, unreported: their agents re-register by
        themselves once they notice nobody polls them, or the liveness rules declare them dead.
        Until every one has answered or the start-up grace has passed, no drop is issued, so a
        replica whose other copies sit on a worker we cannot see yet is never counted out.
        """
        known, silent = await self._members.restore()
        self._liveness.observe()
        self._grace = StartupGrace(known, until=self._monotonic() + self.config.startup_grace)
        if known:
            log.info(
                "took back %d known workers; %d have not answered yet%s",
                len(known),
                len(silent),
                f": no drops for up to {self.config.startup_grace:g} s" if silent else "",
            )
        self.in_startup_grace()
        self._fence.adopt_newer(self._poller.newest_agent_epoch)

    def in_startup_grace(self) -> bool:
        """Whether drops are held back because a worker known before the restart has not
        reported yet (and the grace period has not passed)."""
        ended = self._grace.update(self.state.workers, self._monotonic())
        if ended is not None:
            self.events.record("startup-grace-ended", f"drops allowed again: {ended}")
        return self._grace.active

    async def close(self) -> None:
        """Stop the loop (without changing the persisted flag) and end every stream; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._members.close()
        self.event_feed.close()
        await self._sampler.close()
        await self._loop.stop()
        await self._poller.caught_up()
        await self._lost.save_held(*self.state.take_changes())
        await self.retirement_driver.close()
        await self.handover.close()
        self.retirements.close()
        self.outcomes.close()
        await self._dispatcher.close()
        await self._links.close_all()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the AMM is shutting down")
        if not self._opened:
            raise Unavailable("the AMM is starting")

    @property
    def epoch(self) -> int:
        """The epoch this AMM runs as (``EpochFence``)."""
        return self._fence.epoch

    @property
    def running(self) -> bool:
        return self._loop.running

    @property
    def fenced(self) -> bool:
        """Whether agents reported a newer epoch than ours: another AMM took over, and this one
        no longer cycles (``EpochFence.check_fenced``)."""
        return self._fence.fenced_by > 0

    @property
    def fenced_by_epoch(self) -> int:
        """The newer epoch that fenced this AMM off; 0 while it is not."""
        return self._fence.fenced_by

    async def start(self) -> None:
        """Run cycles, and from now on at every start of the AMM (until a ``stop``)."""
        self._check_open()
        if self.fenced:
            raise FailedPrecondition(
                f"fenced off: agents have seen AMM epoch {self._fence.fenced_by}, newer than "
                f"ours ({self.epoch}); another AMM is in charge until this one is restarted"
            )
        self._store.set_running(True)
        self._loop.start()

    async def stop(self) -> None:
        """Stop cycling, and from now on at every start of the AMM (until a ``start``)."""
        self._check_open()
        self._store.set_running(False)
        await self._loop.stop()
        if self.retirements.waiting and self.retirements.active:
            self.retirement_driver.drive()  # a RetireWorkers call begun while we ran waits

    def wake(self) -> None:
        """Run the next cycle now, not at the end of the interval: work arrived that a cycle
        should act on (a retirement began, a goal was set; ``CycleLoop.wake``)."""
        self._loop.wake()

    # -- cycles ----------------------------------------------------------------------------

    async def run_cycle(
        self, *, wait: bool = False, wait_limit: float | None = None, dry_run: bool = False
    ) -> CycleRecord:
        """Run one cycle; with ``wait``, return once its directives have outcomes, or after
        ``wait_limit`` seconds (at most the directive timeout).

        A ``dry_run`` polls and plans, and returns the directives the policies would produce
        (each with its policy and reason) without sending them: nothing enters the ledger, no
        worker is declared stale or dead, it does not count as having acted, and it plans on
        copies of the policies, so what a policy remembers across cycles (Rebalance's moves and
        senders) is as it was.
        """
        self._check_open()
        async with self._cycle_lock:
            record = await self._cycles.run(wait, dry_run)
        if dry_run:
            return record
        limit = self.config.directive_timeout
        if wait_limit is not None:
            limit = max(0.0, min(limit, wait_limit))
        if wait:
            await self.outcomes.wait(record, limit)
        return record

    async def _finish_retirement(self, worker: WorkerId) -> None:
        """Poll a retiring worker the handover emptied and, if it holds nothing, end its
        retirement now rather than at the next cycle; under the cycle lock, as a cycle would."""
        async with self._cycle_lock:
            if self._closed or worker not in self.retirements.active:
                return
            if not await self._poller.poll(worker):
                return
            seen = self._cycles.version_of(worker)
            for _ in self.ledger.observing(lambda w: seen if w == worker else None):
                pass
            await self.retirement_driver.finish_emptied(worker)

    def _takes_batches(self, worker: WorkerId) -> bool:
        known = self.state.worker(worker)
        return known is not None and "directive-batches" in known.features

    def _takes_columns(self, worker: WorkerId) -> bool:
        """Whether ``worker``'s agent takes drops in columns (``DirectivesRequest.drops``)."""
        known = self.state.worker(worker)
        return known is not None and "drop-columns" in known.features

    # -- lost keys -------------------------------------------------------------------------

    async def _polled(self) -> None:
        """After every round of polls: what is lost now that workers registered again as new
        processes have reported, and lost keys held again; what the round changed is kept for
        ``_keep_books``."""
        self._members.polled()
        born, gone = self.state.take_changes()
        self._losses.recovered(born)
        self._losses.settle()
        self._unsaved_rounds.append((born, gone))
        # Now, not once the books are kept: what the planning that follows leaves is frozen
        # step by step only while the heap is (``pacing.gc_paused``).
        self._freeze_heap()

    async def _keep_books(self) -> None:
        """After ``_polled`` (a cycle's planning goes on meanwhile): notes of keys being stored
        that polls listed or that did not come (``Storing``), and the keys the cluster holds
        recorded (``LostBook``). However many of these run at once, the rounds' changes are
        taken in order and wait for the file in that order (``save_held`` saves one at a
        time, first come first served), so that the file ends as the state did."""
        await self.storing.polled(self.state)
        while self._unsaved_rounds:
            born, gone = self._unsaved_rounds.popleft()
            await self._lost.save_held(born, gone)
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Keep a big state out of full garbage collections (``pacing.HeapFreezer``)."""
        self._heap.freeze(big=self.state.nkeys + len(self.ledger) >= FREEZE_FROM)

    @property
    def lost_keys(self) -> int:
        """Keys lost and not seen since."""
        return self._lost.count()

    @property
    def lost(self) -> LostBook:
        """The lost keys (``ListLost``)."""
        return self._lost

    @property
    def last_cycle(self) -> CycleRecord | None:
        return self._cycles.last

    @property
    def cycles(self) -> int:
        return self._cycles.count

    # -- registry (``membership``) ----------------------------------------------------------

    async def register(
        self, address: str, name: str, incarnation: str, epoch: int = 0, zone: str = ""
    ) -> None:
        """Register (or refresh) a worker (``Membership.register``)."""
        await self._members.register(address, name, incarnation, epoch, zone)

    async def unregister(self, address: str) -> tuple[bool, list[Key]]:
        """Remove a worker whose agent is leaving (``Membership.unregister``): (whether it was
        registered, the keys lost with it)."""
        return await self._members.unregister(address)

    def membership(self, epoch: int, version: int) -> tuple[int, int, list[WorkerId] | None]:
        """Our epoch, the membership version and the registered workers' addresses
        (``Membership.membership``, ``GetMembership``)."""
        return self._members.membership(epoch, version)

    @property
    def membership_version(self) -> int:
        """Changes whenever the set of registered workers does; polls carry it."""
        return self._members.version

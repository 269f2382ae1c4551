"""The Active Memory Manager: the cycle loop and the cycles, wired to the worker registry.

It wires the pure parts (cluster state, ledger, core, policies, liveness, start-up grace, epoch)
to the I/O parts (poller, dispatcher) and starts and stops the cycle loop (``cycle_loop``, which
owns its task). A cycle is: expire stale
ledger entries, poll every agent, judge liveness (flag STALE workers, remove DEAD ones and
report the keys lost with them), snapshot, plan, send, supervise retirements. A dry run polls
and plans only. However a worker goes away (dead, unregistered, restarted as a new process,
closed), the keys it held alone are recorded as lost (``lost``); so are keys no worker holds any
more after an AMM restart. Cycles never overlap: the loop and ``run_once`` share a lock. The
running flag and the epoch persist in the state store, so a restarted AMM resumes as it was,
under a new epoch that makes agents ignore the old one, and issues no drops until the workers it
knew have reported. With the dashboard on, a stopped AMM still polls every interval and samples
the cluster's memory for it, without planning (``sampling``). What becomes of sent
directives is ``outcomes``; operators' questions, ``queries``; RetireWorkers, DrainWorker and
their driver task, ``retirement_driver``; what retirements do between cycles as outcomes
arrive, ``handover``; registering and removing workers, ``membership``; recording and reporting
lost keys, ``lost`` (``Losses``); judging silent workers stale or dead, ``liveness``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Sequence

from amm.base.security import Security
from amm_service.config import AmmConfig
from amm_service.decisions import core
from amm_service.decisions.directive import Directive
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.events import EventLog
from amm_service.decisions.grace import StartupGrace
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.errors import FailedPrecondition, Unavailable
from amm_service.policies import Policy
from amm_service.runtime.agents import AgentLinks
from amm_service.runtime.cycle import CycleRecord, CycleStats
from amm_service.runtime.cycle_loop import CycleLoop
from amm_service.runtime.dispatcher import Dispatcher
from amm_service.runtime.event_feed import EventFeed
from amm_service.runtime.goals import GoalBook
from amm_service.runtime.handover import Handover
from amm_service.runtime.history import History
from amm_service.runtime.liveness import LivenessJudge
from amm_service.runtime.lost import Losses, LostBook
from amm_service.runtime.membership import Membership
from amm_service.runtime.outcomes import Outcomes
from amm_service.runtime.pacing import Budget, HeapFreezer, gc_paused
from amm_service.runtime.poller import Poller
from amm_service.runtime.queries import Queries
from amm_service.runtime.retirement import Retirements
from amm_service.runtime.retirement_driver import RetirementDriver
from amm_service.runtime.sampling import Sampler
from amm_service.runtime.state import StateStore
from amm_service.runtime.storing import Storing
from amm_service.runtime.tombstones import TombstoneBook

log = logging.getLogger(__name__)


def _copies(policies: Sequence[Policy]) -> list[Policy]:
    """Deep copies of ``policies`` for a dry run; a policy that cannot be copied (it holds a
    lock or a connection) plans as itself, and is warned about."""
    copies = []
    for policy in policies:
        try:
            copies.append(copy.deepcopy(policy))
        except Exception as err:
            log.warning(
                "dry run: policy %s cannot be copied (%s: %s); it plans as itself, and may "
                "remember what it planned",
                policy.name,
                type(err).__name__,
                err,
            )
            copies.append(policy)
    return copies


#: Directives entered in the ledger and handed to the dispatcher at a time.
SEND_STEP = 20_000
#: Directives entered in the ledger in one slice (``pacing.Budget`` breathes between slices).
LEDGER_STEP = 500
#: Keys plus directives in flight from which the AMM freezes its heap after each poll round and
#: cycle (``pacing.HeapFreezer``): below, full collections are short.
FREEZE_FROM = 10_000


def _planned(steps: core.Steps) -> core.Plan | tuple[Directive, ...]:
    """One step of planning (``core.step``), what it leaves alive frozen with a big heap."""
    with gc_paused():
        return core.step(steps)


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
        #: Keys agents are storing for a Put that no poll listed yet (``LookupKeys.storing``).
        self.storing = Storing(clock)
        self._losses = Losses(self._lost, self.state, self.events, self.goals, self.storing)
        self._dispatcher = Dispatcher(
            self._links, self.outcomes.on_outcomes, takes_batches=self._takes_batches
        )
        self._poller = Poller(
            self.state,
            self._links,
            epoch=0,
            timeout=config.poll_timeout,
            on_restart=self.outcomes.forget_in_flight,
            on_replaced=self._losses.replaced,
            on_round=self._polled,
            clock=clock,
            tombstones=self.tombstones,
        )
        self._fence = EpochFence(store, self._poller)
        self._cycle_lock = asyncio.Lock()
        self._loop = CycleLoop(
            interval=config.interval,
            run_cycle=self.run_cycle,
            settled=self.outcomes.wait,
            fenced=lambda: self.fenced,
            monotonic=monotonic,
        )
        self._cycles = 0
        self._last: CycleRecord | None = None
        #: Durations and counts of every cycle run (not dry runs), for the metrics.
        self.cycle_stats = CycleStats()
        #: One sample per cycle run (and per interval while stopped), for the dashboard; kept
        #: only when it is served.
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
            cycles=lambda: self._cycles,
            interval=config.interval,
            clock=clock,
            monotonic=monotonic,
        )
        #: The events pushed to watchers (``WatchEvents``).
        self.event_feed = EventFeed(self.events)
        self._heap = HeapFreezer()
        self.queries = Queries(
            self.state,
            self._poller,
            self._links,
            self.goals,
            self._lost,
            self.events,
            poll_timeout=config.poll_timeout,
            check_open=self._check_open,
            wake=self.wake,
            tombstones=self.tombstones,
            cycle_lock=self._cycle_lock,
        )
        self._grace = StartupGrace((), until=0.0)
        self.retirements = Retirements(self.state, store, self.events, self.policies, clock=clock)
        self._members = Membership(
            self.state,
            store,
            poller=self._poller,
            dispatcher=self._dispatcher,
            links=self._links,
            outcomes=self.outcomes,
            retirements=self.retirements,
            tombstones=self.tombstones,
            storing=self.storing,
            events=self.events,
            losses=self._losses,
            clock=clock,
            check_open=self._check_open,
            adopt_epoch=self._fence.adopt_newer,
            epoch=lambda: self.epoch,
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
        #: Drops from retiring workers as soon as agents confirm the copies (``handover``).
        self.handover = Handover(
            self.state,
            self.ledger,
            retiring=lambda: self.retirements.active,
            may_drop=lambda: not self.fenced and not self.in_startup_grace(),
            epoch=lambda: self.epoch,
            new_id=self._fence.new_id,
            enter=self._enter_between_cycles,
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
            record = await self._cycle(wait, dry_run)
        if dry_run:
            return record
        limit = self.config.directive_timeout
        if wait_limit is not None:
            limit = max(0.0, min(limit, wait_limit))
        if wait:
            await self.outcomes.wait(record, limit)
        return record

    async def _cycle(self, wait: bool, dry_run: bool = False) -> CycleRecord:
        self._cycles += 1
        started, t0 = self._clock(), time.perf_counter()
        record = CycleRecord(self._cycles, started, dry_run=dry_run)
        if not dry_run:
            overdue = self.outcomes.expire(
                self._monotonic(), self.config.directive_timeout, self._liveness.answering
            )
            if overdue:
                log.info("sending %d overdue directives again, under the same ids", len(overdue))
                self.outcomes.totals.sending(overdue)
                await self._dispatcher.send(overdue)
        record.unreachable = tuple(await self._poller.poll_all())
        polled = time.perf_counter()
        newer = self._fence.check_fenced()
        if newer is not None:
            self.events.record(
                "epoch-fenced",
                f"agents have seen AMM epoch {newer}, newer than ours ({self.epoch}): another "
                "AMM is in charge; this one stops cycling until it is restarted",
            )
        if self.fenced and not dry_run:
            record.duration = time.perf_counter() - t0
            record.poll_duration = polled - t0
            return record  # its directives would be refused: send none, judge nothing
        if not dry_run:
            await self._liveness.judge()
            self._losses.settle()
        record.startup_grace = self.in_startup_grace()
        self.retirements.apply_flags()
        pace = Budget()
        self._liveness.forget_copies_on_gone_workers()
        for _ in self.ledger.observing(self._version_of, step=LEDGER_STEP):
            await pace()
        self.tombstones.expire()
        view = self.state.snapshot(
            goals=self.goals.mapping, now=self._clock(), forgotten=self.tombstones.live
        )
        t1 = time.perf_counter()
        steps = core.planning(
            view,
            _copies(self.policies) if dry_run else self.policies,
            self.ledger,
            core.PlanConfig(
                self.config.measure,
                self.epoch,
                allow_drops=not record.startup_grace,
                max_incoming=self.config.max_incoming_transfers,
                max_outgoing=self.config.max_outgoing_transfers,
            ),
            self._fence.new_id,
            stream=not dry_run,
        )
        if not dry_run:
            self.outcomes.track(record)
        sending, released = 0.0, 0
        ready: list[Directive] = []
        pace = Budget()
        while not isinstance(out := _planned(steps), core.Plan):
            ready += out
            released += len(out)
            if len(ready) >= SEND_STEP:  # send what is decided while the rest is planned
                started_sending = time.perf_counter()
                await self._send(record, ready)
                sending += time.perf_counter() - started_sending
                ready = []
            else:
                await pace()  # control calls are answered while a big cycle plans
        plan = out
        record.plan_duration = time.perf_counter() - t1 - sending
        record.planned(plan)
        if dry_run:
            record.sending(plan.directives, self._clock())
            record.duration = time.perf_counter() - t0
            log.info(
                "dry run %d: %d suggestions, %d directives (not sent), %d rejected",
                record.number,
                plan.suggestions,
                len(plan.directives),
                len(plan.rejections),
            )
            return record
        started_sending = time.perf_counter()
        await self._send(record, [*ready, *plan.directives[released:]])
        sending += time.perf_counter() - started_sending
        self.outcomes.all_sent(record)
        for error in plan.policy_errors:
            log.error("%s", error)
        await self.retirement_driver.supervise(view, plan)
        record.duration = time.perf_counter() - t0
        record.poll_duration, record.send_duration = polled - t0, sending
        self.cycle_stats.observe(record)
        self._sampler.sample(record.number, record.rejected)
        self._last = record
        self._freeze_heap()
        if plan.directives or plan.rejections:
            log.info(
                "cycle %d: %d suggestions, %d directives, %d rejected; poll %.0f ms, plan %.0f "
                "ms, send %.0f ms (elapsed, the loop serving calls in between)",
                record.number,
                plan.suggestions,
                len(plan.directives),
                len(plan.rejections),
                (polled - t0) * 1e3,
                record.plan_duration * 1e3,
                sending * 1e3,
            )
        return record

    async def _send(self, record: CycleRecord, directives: Sequence[Directive]) -> None:
        """Enter ``directives`` of ``record``'s cycle in the ledger and send them."""
        if not directives:
            return
        self._fence.acted(True)
        now, number = self._monotonic(), record.number
        record.sending(directives, self._clock())
        pace = Budget()
        for start in range(0, len(directives), SEND_STEP):
            chunk = directives[start : start + SEND_STEP]
            for first in range(0, len(chunk), LEDGER_STEP):
                if first:
                    await pace()
                with gc_paused():
                    some = chunk[first : first + LEDGER_STEP]
                    self.outcomes.totals.sending(some)
                    for directive in some:
                        self.ledger.add(directive, now, number)
            await self._dispatcher.send(chunk)

    def _enter_between_cycles(self, directives: Sequence[Directive]) -> None:
        """Enter ``directives`` made between cycles (``handover``) in the ledger, under no
        cycle's record; the caller sends them."""
        self._fence.acted(True)
        now = self._monotonic()
        self.outcomes.totals.sending(directives)
        for directive in directives:
            self.ledger.add(directive, now)

    async def _finish_retirement(self, worker: WorkerId) -> None:
        """Poll a retiring worker the handover emptied and, if it holds nothing, end its
        retirement now rather than at the next cycle; under the cycle lock, as a cycle would."""
        async with self._cycle_lock:
            if self._closed or worker not in self.retirements.active:
                return
            if not await self._poller.poll(worker):
                return
            seen = self._version_of(worker)
            for _ in self.ledger.observing(lambda w: seen if w == worker else None):
                pass
            await self.retirement_driver.finish_emptied(worker)

    def _version_of(self, worker: WorkerId) -> int | None:
        known = self.state.worker(worker)
        return known.version if known is not None else None

    def _takes_batches(self, worker: WorkerId) -> bool:
        known = self.state.worker(worker)
        return known is not None and "directive-batches" in known.features

    # -- lost keys -------------------------------------------------------------------------

    async def _polled(self) -> None:
        """After every round of polls: what is lost now that workers registered again as new
        processes have reported, lost keys held again, and the keys the cluster holds recorded
        (``LostBook``)."""
        self._members.polled()
        await self.storing.polled(self.state)
        born, gone = self.state.take_changes()
        self._losses.recovered(born)
        self._losses.settle()
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
        return self._last

    @property
    def cycles(self) -> int:
        return self._cycles

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

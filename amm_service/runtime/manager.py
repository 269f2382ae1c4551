"""The Active Memory Manager: the cycle loop, the cycles and the worker registry.

It wires the pure parts (cluster state, ledger, core, policies, liveness, start-up grace, epoch)
to the I/O parts (poller, dispatcher) and owns the cycle loop task. A cycle is: expire stale
ledger entries, poll every agent, judge liveness (flag STALE workers, remove DEAD ones and
report the keys lost with them), snapshot, plan, send, supervise retirements. A dry run polls
and plans only. However a worker goes away (dead, unregistered, restarted as a new process,
closed), the keys it held alone are recorded as lost (``lost``); so are keys no worker holds any
more after an AMM restart. Cycles never overlap: the loop and ``run_once`` share a lock. The
running flag and the epoch persist in the state store, so a restarted AMM resumes as it was,
under a new epoch that makes agents ignore the old one, and issues no drops until the workers it
knew have reported. With the dashboard on, a stopped AMM still polls every interval and samples
the cluster's memory for it, without planning (``_sample_while_stopped``). What becomes of sent
directives is ``outcomes``; operators' questions, ``queries``; RetireWorkers, DrainWorker and
their driver task, ``retirement_driver``; what retirements do between cycles as outcomes
arrive, ``handover``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import time
from collections.abc import Callable, Sequence

from amm.base.security import Security
from amm.base.validation import (
    MAX_ADOPTED_EPOCH,
    epoch_problem,
    incarnation_problem,
    name_problem,
    zone_problem,
)
from amm_service.config import AmmConfig
from amm_service.decisions import core
from amm_service.decisions.directive import Directive
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.events import EventLog
from amm_service.decisions.grace import StartupGrace
from amm_service.decisions.liveness import Liveness, lost_after_removal
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.errors import FailedPrecondition, InvalidArgument, Unavailable
from amm_service.policies import Policy
from amm_service.runtime.addresses import check_address
from amm_service.runtime.agents import AgentLinks
from amm_service.runtime.cycle import CycleRecord, CycleStats
from amm_service.runtime.dispatcher import Dispatcher
from amm_service.runtime.event_feed import EventFeed
from amm_service.runtime.goals import GoalBook
from amm_service.runtime.handover import Handover
from amm_service.runtime.history import History
from amm_service.runtime.lost import LostBook
from amm_service.runtime.outcomes import Outcomes
from amm_service.runtime.pacing import Budget, HeapFreezer, gc_paused
from amm_service.runtime.poller import Poller
from amm_service.runtime.queries import Queries
from amm_service.runtime.retirement import Retirements
from amm_service.runtime.retirement_driver import RetirementDriver
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
#: The least time between a cycle and the next when the next follows up on applied work, in
#: seconds (or a twentieth of the interval, if longer).
FOLLOW_UP = 0.05
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
        self._dispatcher = Dispatcher(
            self._links, self.outcomes.on_outcomes, takes_batches=self._takes_batches
        )
        self._poller = Poller(
            self.state,
            self._links,
            epoch=0,
            timeout=config.poll_timeout,
            on_restart=self.outcomes.forget_in_flight,
            on_replaced=self._replaced,
            on_round=self._polled,
            clock=clock,
            tombstones=self.tombstones,
        )
        self._fence = EpochFence(store, self._poller)
        self._cycle_lock = asyncio.Lock()
        self._loop_task: asyncio.Task[None] | None = None
        self._cycles = 0
        self._last: CycleRecord | None = None
        #: Durations and counts of every cycle run (not dry runs), for the metrics.
        self.cycle_stats = CycleStats()
        #: One sample per cycle run (and per interval while stopped), for the dashboard; kept
        #: only when it is served.
        self.history = History() if config.dashboard_listen else None
        self._idle_sampling: asyncio.Task[None] | None = None
        #: The events pushed to watchers (``WatchEvents``).
        self.event_feed = EventFeed(self.events)
        self.goals = GoalBook(store)
        self._liveness = Liveness(stale_after=config.stale_seconds, dead_after=config.dead_after)
        self._lost = LostBook(store, clock=clock)
        #: Keys agents are storing for a Put that no poll listed yet (``LookupKeys.storing``).
        self.storing = Storing(clock)
        self._heap = HeapFreezer()
        self._restored: set[WorkerId] = set()
        """Workers known from the state file that have neither reported nor left yet."""
        self._replacing: dict[WorkerId, frozenset[Key]] = {}
        """What workers that registered again as a new process held before, until the new
        process has reported (it may have some of it back) or left."""
        self._leaving: dict[WorkerId, asyncio.Task[tuple[bool, list[Key]]]] = {}
        """Removals of workers whose agents unregistered; they outlive the call (``unregister``)."""
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
        self.retirement_driver = RetirementDriver(
            self.retirements,
            self.state,
            self._links,
            self.ledger,
            poll_timeout=config.poll_timeout,
            check_open=self._check_open,
            refresh=self.queries.refresh,
            running=lambda: self.running,
            run_cycles=self._cycle_every_interval,
            remove=self._remove,
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
        self._woken = asyncio.Event()
        #: Changes whenever the set of registered workers does (``membership``); polls carry it.
        self.membership_version = 0
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
            self._start_loop()
        if self.history is not None:
            self._idle_sampling = asyncio.create_task(
                self._sample_while_stopped(), name="amm-sampling-while-stopped"
            )

    async def _restore_workers(self) -> None:
        """Take back the workers the previous run knew, and hold drops until they report.

        One poll each, under the poll deadline: those that answer are in the view before the
        first cycle. Those that do not stay registered, unreported: their agents re-register by
        themselves once they notice nobody polls them, or the liveness rules declare them dead.
        Until every one has answered or the start-up grace has passed, no drop is issued, so a
        replica whose other copies sit on a worker we cannot see yet is never counted out.
        """
        now = self._clock()
        records = self._store.known_workers()
        known = [WorkerId(record.address) for record in records]
        for record in records:
            self.state.register(WorkerId(record.address), record.name, "", now)
        self._restored = set(known)
        self._membership_changed()
        silent = await self._poller.poll_all(known)  # then ``_polled``
        self._liveness.observe(self.state.workers, self._monotonic())
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
        # Removals under way finish first (each bounded by a poll deadline): their agents left.
        await asyncio.gather(*self._leaving.values(), return_exceptions=True)
        self.event_feed.close()
        sampling, self._idle_sampling = self._idle_sampling, None
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        await self._stop_loop()
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
        return self._loop_task is not None and not self._loop_task.done() and not self.fenced

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
        self._start_loop()

    def _start_loop(self) -> None:
        if not self.running:
            self._loop_task = asyncio.create_task(self._loop(), name="amm-cycle-loop")

    async def stop(self) -> None:
        """Stop cycling, and from now on at every start of the AMM (until a ``start``)."""
        self._check_open()
        self._store.set_running(False)
        await self._stop_loop()
        if self.retirements.waiting and self.retirements.active:
            self.retirement_driver.drive()  # a RetireWorkers call begun while we ran waits

    async def _stop_loop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        await self._cycle_every_interval(lambda: True, "AMM cycle")

    async def _cycle_every_interval(self, go_on: Callable[[], bool], what: str) -> None:
        """Run cycles an interval apart while ``go_on()``; a failed cycle is logged, not fatal.

        Paced by the work in flight as well as by the clock: once every directive of a cycle
        has an answer and at least one was applied, the next cycle follows after
        ``follow_up`` instead of the rest of the interval, so a retirement or a repair moves
        on as fast as its transfers complete. A cycle that sent nothing, or whose directives
        were all refused, waits for the interval as usual, unless ``wake`` is called (which
        also cuts short the wait for a cycle's outcomes).

        The same holds for the last cycle that sent directives when a later one polled while
        some of them were still unanswered (a big cycle's directives take longer than the
        interval to carry out, and the cycles meanwhile plan nothing new): once they all have an
        answer and one was applied, the next cycle follows up, so the AMM's view catches up with
        what was done instead of an interval later.
        """
        interval = self.config.interval
        follow_up = min(interval, max(FOLLOW_UP, interval / 20))
        sent: CycleRecord | None = None  # the last cycle that sent directives
        while go_on() and not self.fenced:
            started = self._monotonic()
            self._woken.clear()
            # Some of its directives unanswered as this cycle polls: their effects may be missed.
            behind = sent is not None and sent.unsettled > 0
            record = None
            try:
                record = await self.run_cycle()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # A call awaited inside the cycle was cancelled (its channel closed), not us.
                log.exception("%s was cut short; the next one runs as usual", what)
            except Exception:
                log.exception("%s failed; the next one runs as usual", what)
            rest = max(0.0, interval - (self._monotonic() - started))
            if record is not None and record.planned_count:
                sent = record
            elif not behind:
                sent = None  # a poll after every answer saw their effects: nothing to follow
            if sent is not None:
                waited = self._monotonic()
                await self._settled_or_woken(sent, rest)
                rest = max(0.0, rest - (self._monotonic() - waited))
                if sent.unsettled == 0 and sent.applied:
                    rest = min(rest, max(0.0, follow_up - (self._monotonic() - started)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), rest)

    async def _settled_or_woken(self, record: CycleRecord, limit: float) -> None:
        """Until every directive of ``record`` has an outcome, ``wake`` is called (a
        retirement began, a transfer slot it waits for freed), or ``limit`` seconds."""
        settled = asyncio.ensure_future(self.outcomes.wait(record, limit))
        woken = asyncio.ensure_future(self._woken.wait())
        try:
            await asyncio.wait((settled, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (settled, woken):
                waiting.cancel()
            await asyncio.gather(settled, woken, return_exceptions=True)

    def wake(self) -> None:
        """Run the next cycle now, not at the end of the interval: work arrived that a cycle
        should act on (a retirement began, a goal was set)."""
        self._woken.set()

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
                self._monotonic(), self.config.directive_timeout, self._answering
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
            await self._judge_liveness()
            self._settle_lost()
        record.startup_grace = self.in_startup_grace()
        self.retirements.apply_flags()
        pace = Budget()
        self._forget_copies_on_gone_workers()
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
        self._sample(record.number, record.rejected)
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

    def _sample(self, cycle: int, rejected: int = 0) -> None:
        """Add what the AMM sees now to the dashboard's history, if it keeps one."""
        if self.history is not None:
            self.history.record(
                at=self._clock(),
                cycle=cycle,
                running=self.running,
                workers=self.state.workers,
                totals=self.outcomes.totals,
                rejected=rejected,
                keys=self.state.nkeys,
                replicas=self.state.nreplicas,
                lost=self.lost_keys,
                goals=self.goals.totals(self.state),
            )

    async def _sample_while_stopped(self) -> None:
        """With the dashboard on, while the AMM does not cycle: poll every agent once an
        interval and sample, so the memory chart has no gap where the AMM was off. No planning
        and no directives: a poll reads an agent (handing it the tombstones of keys an operator
        forgot, as every poll does), as a fresh query's polls do."""
        history = self.history
        if history is None:
            return
        interval = self.config.interval
        while True:
            started = self._monotonic()
            # Not while a cycle runs (RunOnce, a retirement's) or right after one: it samples.
            idle = not self.running and not self._cycle_lock.locked()
            if idle and history.newest <= self._clock() - interval / 2:
                try:
                    await self._poller.poll_all()
                    if not self.running:  # started meanwhile: its cycles sample
                        self._sample(self._cycles)
                except Exception:
                    log.exception("sampling for the dashboard failed; trying again")
            await asyncio.sleep(max(0.0, interval - (self._monotonic() - started)))

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

    def _forget_copies_on_gone_workers(self) -> None:
        """Copies applied on workers gone before a poll showed them (a failed poll and a broken
        directive stream: say, SIGKILLed) are no longer counted in flight (``pending``, 5). A
        slow agent missing a poll keeps its stream, and its copies stay counted."""

        def gone(worker: WorkerId) -> bool:
            known = self.state.worker(worker)
            return known is None or (not known.reachable and not self._dispatcher.is_open(worker))

        settled = self.ledger.forget_copies(gone)
        for worker in {entry.directive.worker for entry in settled}:
            keys = [e.directive.key for e in settled if e.directive.worker == worker]
            log.info(
                "%s is gone before a poll showed %d copy(ies) it applied (%s%s): no longer "
                "counted as copies in flight",
                worker,
                len(keys),
                ", ".join(keys[:3]),
                ", ..." if len(keys) > 3 else "",
            )

    def _answering(self, worker: WorkerId) -> bool:
        """Whether ``worker`` answers polls and its directive stream is open: what was sent to
        it will be answered (see ``pending``)."""
        known = self.state.worker(worker)
        return known is not None and known.reachable and self._dispatcher.is_open(worker)

    async def _judge_liveness(self) -> None:
        """Flag workers silent for ``stale-after`` STALE; remove those silent for
        ``dead-after`` and report the keys left without a copy as lost; notice lost keys that
        are back (their holder re-registered, or someone put them again)."""
        now, wall = self._monotonic(), self._clock()
        verdict = self._liveness.judge(self.state.workers, now)
        for worker in verdict.stale:
            self.state.set_flags(worker, wall, stale=True)
            self.events.record(
                "worker-stale",
                f"no answer to polls for {self._liveness.silent_for(worker, now):.1f} s: it gets "
                "no new replicas and its copies do not count as durable",
                worker=worker,
            )
        for worker, silent in verdict.dead:
            await self._declare_dead(worker, silent)

    async def _declare_dead(self, worker: WorkerId, silent: float) -> None:
        held = self.state.held_by(worker)
        self.events.record(
            "worker-dead",
            f"no answer to polls for {silent:.1f} s (dead-after {self.config.dead_after:g} s): "
            f"removed; it held {len(held)} key(s)",
            worker=worker,
            keys=held,
        )
        await self._remove(worker, f"died (no answer to polls for {silent:.1f} s)")
        self._liveness.forget(worker)

    # -- lost keys -------------------------------------------------------------------------

    def _losing(self, worker: WorkerId, held: frozenset[Key], cause: str) -> list[Key]:
        """``worker`` went away (``cause``) holding ``held``: record and report the keys no
        other worker holds as lost; returns them."""
        lost = lost_after_removal(held, self.state.keys)
        if lost:
            new = self._lost.add(
                lost, worker=worker, reason=f"{worker} {cause} before a copy was made elsewhere"
            )
            self._report_lost(new, f"had no copy left when {worker} {cause}", worker)
        return lost

    def _report_lost(self, keys: list[Key], how: str, worker: str = "") -> None:
        """The events of newly lost ``keys``: ``key-lost``, and ``goal-lost`` for those with a
        replication goal (recorded once, when they are lost)."""
        if not keys:
            return
        self.events.record("key-lost", f"{len(keys)} key(s) {how}", worker=worker, keys=keys)
        with_goal = [k for k in keys if k in self.goals]
        if with_goal:
            self.events.record(
                "goal-lost",
                f"{len(with_goal)} key(s) with a replication goal are lost: no copy is left to "
                "make copies from; the goals stay until the keys are put again or forgotten",
                keys=with_goal,
            )

    def _replaced(self, worker: WorkerId, held: frozenset[Key]) -> None:
        """A poll found ``worker`` restarted as a new process, which reported ``held`` no more."""
        ws = self.state.worker(worker)
        current = ws.incarnation if ws is not None else None
        storing = self.storing.take(worker, other_than=current)
        self._losing(worker, held | storing, "restarted (a poll found a new process)")

    async def _polled(self) -> None:
        """After every round of polls: what is lost now that workers registered again as new
        processes have reported, lost keys held again, and the keys the cluster holds recorded
        (``LostBook``)."""
        for worker in list(self._replacing):
            ws = self.state.worker(worker)
            if ws is not None and ws.last_poll is not None:
                held = self._replacing.pop(worker)
                self._losing(worker, held, "restarted (registered again as a new process)")
        await self.storing.polled(self.state)
        born, gone = self.state.take_changes()
        back = self._lost.recovered(born)
        if back:
            self.events.record(
                "key-recovered", f"{len(back)} lost key(s) are held again", keys=back
            )
        self._settle_lost()
        await self._lost.save_held(born, gone)
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Keep a big state out of full garbage collections (``pacing.HeapFreezer``)."""
        self._heap.freeze(big=self.state.nkeys + len(self.ledger) >= FREEZE_FROM)

    def _settle_lost(self) -> None:
        """After a restart: once every worker known from the state file has reported or left,
        the keys held before the restart that no worker holds now are lost."""
        if not self._lost.unseen:
            self._restored.clear()
            return
        self._restored = {
            w
            for w in self._restored
            if (ws := self.state.worker(w)) is not None and ws.last_poll is None
        }
        missing = self._lost.settle(self.state.keys, all_reported=not self._restored)
        self._report_lost(
            missing,
            "were held before the AMM restarted and no worker holds them now: the workers that "
            "held them came back without them or never came back",
        )

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

    # -- registry --------------------------------------------------------------------------

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
        known = self.state.worker(worker)
        held = frozenset[Key]()
        if known is not None and known.incarnation != incarnation:
            held = self.state.held_by(worker) | self.storing.take(  # by the process before
                worker, incarnation=known.incarnation
            )
        if self.state.register(worker, name, incarnation, self._clock(), zone=zone):
            self._membership_changed()
            self.outcomes.forget_in_flight(worker)
            await self._dispatcher.close_worker(worker)
            # A channel that failed to reach the old process may be backing off for minutes:
            # the new one gets a fresh connection.
            await self._links.close(worker)
            self._store.remember_worker(worker, name or worker)
            self.retirements.apply_flags()
            log.info("worker %s registered (%s)", worker, name or worker)
            if held:  # judged once the new process has reported: it may have some of it back
                self._replacing[worker] = held | self._replacing.get(worker, frozenset())
            # Its status, memory and keys now, not at the next cycle: until then a new worker
            # showed as unspecified, 0 B and never polled (and an AMM that is stopped has none).
            await self._poller.poll(worker)
        self._fence.adopt_newer(epoch)

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
            leaving = asyncio.create_task(self._unregister(worker), name=f"unregister {worker}")
            self._leaving[worker] = leaving
            leaving.add_done_callback(functools.partial(self._left, worker))
        return await asyncio.shield(leaving)

    def _left(self, worker: WorkerId, task: asyncio.Task[tuple[bool, list[Key]]]) -> None:
        """A removal ended: forget it, and log a failure (its caller may have stopped waiting)."""
        if self._leaving.get(worker) is task:
            del self._leaving[worker]
        if not task.cancelled() and (err := task.exception()) is not None:
            log.warning("unregistering ended with %s: %s", type(err).__name__, err)

    async def _unregister(self, worker: WorkerId) -> tuple[bool, list[Key]]:
        known = self.state.worker(worker)
        if known is None:
            return False, []
        if known.reachable:
            await self._poller.poll(worker)
        lost = await self._remove(worker, "unregistered")
        self.events.record(
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
        if (epoch, version) == (self.epoch, self.membership_version):
            return self.epoch, self.membership_version, None
        return self.epoch, self.membership_version, self.state.worker_ids

    def _membership_changed(self) -> None:
        self.membership_version += 1
        self._poller.membership_version = self.membership_version

    async def _remove(self, worker: WorkerId, cause: str = "was removed") -> list[Key]:
        """Take ``worker`` out of the registry; the keys lost with it (recorded and reported:
        no path takes a last copy away without a ``key-lost`` record)."""
        held = (
            self.state.held_by(worker)
            | self._replacing.pop(worker, frozenset())
            | self.storing.take(worker)
        )
        removed = self.state.unregister(worker)
        if removed:
            self._membership_changed()
        self.retirements.left(worker)
        self.outcomes.forget_in_flight(worker)
        self._poller.forget(worker)
        self.tombstones.forget_worker(worker)
        self._store.forget_worker(worker)
        await self._dispatcher.close_worker(worker)
        await self._links.close(worker)
        return self._losing(worker, held, cause) if removed else []

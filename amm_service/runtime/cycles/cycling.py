"""One AMM cycle: send overdue directives again, poll every agent, judge liveness (flag STALE
workers, remove DEAD ones and report the keys lost with them), settle lost keys, snapshot, plan
(in steps, sending what is decided while the rest is planned), send, supervise retirements. A
dry run polls and plans only, on copies of the policies. Also what enters directives made
between cycles (``handover``) in the ledger. The manager runs cycles under its cycle lock.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

from amm_service.config import AmmConfig
from amm_service.decisions import core
from amm_service.decisions.directive import Directive
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.events import EventLog
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, WorkerId
from amm_service.policies import Policy
from amm_service.runtime.links.dispatcher import Dispatcher
from amm_service.runtime.links.poller import Poller
from amm_service.runtime.loop.pacing import Budget, gc_paused
from amm_service.runtime.records.cycle import CycleRecord, CycleStats
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.lost import Losses
from amm_service.runtime.records.outcomes import Outcomes
from amm_service.runtime.records.tombstones import TombstoneBook
from amm_service.runtime.workers.liveness import LivenessJudge
from amm_service.runtime.workers.retirement import Retirements
from amm_service.runtime.workers.retirement_driver import RetirementDriver

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


def _planned(steps: core.Steps) -> core.Plan | tuple[Directive, ...]:
    """One step of planning (``core.step``), what it leaves alive frozen with a big heap."""
    with gc_paused():
        return core.step(steps)


class Cycles:
    """Runs the AMM's cycles and keeps their count and the last one run (not dry runs).
    ``fenced`` tells whether another AMM took over; ``in_startup_grace`` whether drops are held
    back; ``sample`` adds a cycle to the dashboard's history; ``freeze_heap`` keeps a big state
    out of full collections."""

    def __init__(
        self,
        config: AmmConfig,
        policies: Sequence[Policy],
        state: ClusterState,
        ledger: Ledger,
        events: EventLog,
        *,
        outcomes: Outcomes,
        poller: Poller,
        dispatcher: Dispatcher,
        fence: EpochFence,
        liveness: LivenessJudge,
        losses: Losses,
        goals: GoalBook,
        tombstones: TombstoneBook,
        retirements: Retirements,
        retirement_driver: RetirementDriver,
        stats: CycleStats,
        fenced: Callable[[], bool],
        in_startup_grace: Callable[[], bool],
        sample: Callable[[int, int], None],
        freeze_heap: Callable[[], None],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._config = config
        self._policies = policies
        self._state = state
        self._ledger = ledger
        self._events = events
        self._outcomes = outcomes
        self._poller = poller
        self._dispatcher = dispatcher
        self._fence = fence
        self._liveness = liveness
        self._losses = losses
        self._goals = goals
        self._tombstones = tombstones
        self._retirements = retirements
        self._retirement_driver = retirement_driver
        self._stats = stats
        self._fenced = fenced
        self._in_startup_grace = in_startup_grace
        self._sample = sample
        self._freeze_heap = freeze_heap
        self._clock = clock
        self._monotonic = monotonic
        self.count = 0
        self.last: CycleRecord | None = None

    async def run(self, wait: bool, dry_run: bool = False) -> CycleRecord:
        """One cycle (``ActiveMemoryManager.run_cycle``, under its cycle lock)."""
        self.count += 1
        started, t0 = self._clock(), time.perf_counter()
        record = CycleRecord(self.count, started, dry_run=dry_run)
        if not dry_run:
            overdue = self._outcomes.expire(
                self._monotonic(), self._config.directive_timeout, self._liveness.answering
            )
            if overdue:
                log.info("sending %d overdue directives again, under the same ids", len(overdue))
                self._outcomes.totals.sending(overdue)
                await self._dispatcher.send(overdue)
        record.unreachable = tuple(await self._poller.poll_all())
        polled = time.perf_counter()
        newer = self._fence.check_fenced()
        if newer is not None:
            self._events.record(
                "epoch-fenced",
                f"agents have seen AMM epoch {newer}, newer than ours ({self._fence.epoch}): "
                "another AMM is in charge; this one stops cycling until it is restarted",
            )
        if self._fenced() and not dry_run:
            record.duration = time.perf_counter() - t0
            record.poll_duration = polled - t0
            return record  # its directives would be refused: send none, judge nothing
        if not dry_run:
            await self._liveness.judge()
            self._losses.settle()
        record.startup_grace = self._in_startup_grace()
        self._retirements.apply_flags()
        pace = Budget()
        self._liveness.forget_copies_on_gone_workers()
        for _ in self._ledger.observing(self.version_of, step=LEDGER_STEP):
            await pace()
        self._tombstones.expire()
        view = self._state.snapshot(
            goals=self._goals.mapping, now=self._clock(), forgotten=self._tombstones.live
        )
        t1 = time.perf_counter()
        steps = core.planning(
            view,
            _copies(self._policies) if dry_run else self._policies,
            self._ledger,
            core.PlanConfig(
                self._config.measure,
                self._fence.epoch,
                allow_drops=not record.startup_grace,
                max_incoming=self._config.max_incoming_transfers,
                max_outgoing=self._config.max_outgoing_transfers,
            ),
            self._fence.new_id,
            stream=not dry_run,
            keep_streamed=False,  # what is sent is not held till the cycle ends
        )
        if not dry_run:
            self._outcomes.track(record)
        sending = 0.0
        ready: list[Directive] = []
        pace = Budget()
        while not isinstance(out := _planned(steps), core.Plan):
            ready += out
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
        rest, ready = [*ready, *plan.directives], []  # those not streamed yet
        await self._send(record, rest)
        del rest
        sending += time.perf_counter() - started_sending
        self._outcomes.all_sent(record)
        for error in plan.policy_errors:
            log.error("%s", error)
        await self._retirement_driver.supervise(view, plan)
        record.duration = time.perf_counter() - t0
        record.poll_duration, record.send_duration = polled - t0, sending
        self._stats.observe(record)
        self._sample(record.number, record.rejected)
        self.last = record
        self._freeze_heap()
        if record.planned_count or plan.rejections:
            log.info(
                "cycle %d: %d suggestions, %d directives, %d rejected; poll %.0f ms, plan %.0f "
                "ms, send %.0f ms (elapsed, the loop serving calls in between)",
                record.number,
                plan.suggestions,
                record.planned_count,
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
                    self._outcomes.totals.sending(some)
                    self._ledger.add_many(some, now, number)
            await self._dispatcher.send(chunk)

    def enter_between_cycles(self, directives: Sequence[Directive]) -> None:
        """Enter ``directives`` made between cycles (``handover``) in the ledger, under no
        cycle's record; the caller sends them."""
        self._fence.acted(True)
        now = self._monotonic()
        self._outcomes.totals.sending(directives)
        self._ledger.add_many(directives, now)

    def version_of(self, worker: WorkerId) -> int | None:
        known = self._state.worker(worker)
        return known.version if known is not None else None

"""One AMM cycle: send overdue directives again, poll every agent, judge liveness (flag STALE
workers, remove DEAD ones and report the keys lost with them), settle lost keys, snapshot, plan
(in steps, sending what is decided while the rest is planned, and no further ahead of the agents
than keeps them busy: ``FEED``), send, supervise retirements. A dry run polls and plans only, on
copies of the policies. Also what enters directives made between cycles (``handover``) in the
ledger. The manager runs cycles under its cycle lock (``cycle_lock``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from amm.base import malloc
from amm_service.config import AmmConfig
from amm_service.decisions import core
from amm_service.decisions.directive import Directive
from amm_service.decisions.epoch import EpochFence
from amm_service.decisions.view import WorkerId
from amm_service.policies import Policy
from amm_service.runtime.links.reach import Links
from amm_service.runtime.loop.pacing import Budget, gc_paused
from amm_service.runtime.records.cycle import CycleRecord, CycleStats
from amm_service.runtime.records.kept import Records
from amm_service.runtime.workers.liveness import LivenessJudge
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


#: Most directives planned and not sent yet: entered in the ledger and handed to the dispatcher
#: at once when every agent concerned has plenty in hand.
SEND_STEP = 20_000
#: Directives planned before they are sent when an agent they are for runs short (``FEED``): the
#: first of a big cycle go out as soon as this many are planned, not after ``SEND_STEP``.
FEED_STEP = 2_000
#: Directives sent to an agent and not answered yet below which it runs short. It is also the
#: window of a big cycle: the cycle plans no further while each agent its last slice went to
#: has this many in hand, and goes on as soon as one falls below it (``Dispatcher.ran_short``).
#: What is planned ahead is held in the ledger and the queues (~330 B a directive): a 100k-key
#: cycle planned its 300k drops in 2-3 s and held them all for the 10 s the agents took to carry
#: them out. Two batch messages (``BATCH``): one carried out while the next comes (an agent drops
#: about 7k keys a second; 20k at once left each one idle for a third of a big cycle).
FEED = 10_000
#: Directives entered in the ledger in one slice (``pacing.Budget`` breathes between slices).
LEDGER_STEP = 500


def _planned(steps: core.Steps) -> core.Plan | tuple[Directive, ...]:
    """One step of planning (``core.step``), what it leaves alive frozen with a big heap."""
    with gc_paused():
        return core.step(steps)


@dataclass(frozen=True, slots=True)
class Judges:
    """What decides whether a cycle may act, and on which workers."""

    #: Our epoch and the ids issued under it; whether agents have seen a newer one.
    fence: EpochFence
    #: Which silent workers are stale or dead.
    liveness: LivenessJudge
    #: Whether another AMM took over (no directives are sent).
    fenced: Callable[[], bool]
    #: Whether drops are held back until the workers known before a restart report.
    in_startup_grace: Callable[[], bool]


@dataclass(frozen=True, slots=True)
class CycleHooks:
    """The clocks a cycle reads, and what it tells once it has run."""

    #: Wall-clock time: the cycle's record and the snapshot.
    clock: Callable[[], float]
    #: Monotonic time: ledger entries and directive timeouts.
    monotonic: Callable[[], float]
    #: Durations and counts of every cycle run, for the metrics.
    stats: CycleStats
    #: Adds a cycle (its number, its rejections) to the dashboard's history.
    sample: Callable[[int, int], None]
    #: Keeps a big state out of full garbage collections.
    freeze_heap: Callable[[], None]


class Cycles:
    """Runs the AMM's cycles and keeps their count and the last one run (not dry runs). It
    plans with ``config`` and ``policies``, reads and writes ``records``, polls and sends
    through ``links``, asks ``judges`` whether and on whom to act, has ``retirement_driver``
    supervise retirements (``retirement_driver.retirements``) and tells ``hooks`` when done."""

    def __init__(
        self,
        config: AmmConfig,
        policies: Sequence[Policy],
        records: Records,
        links: Links,
        judges: Judges,
        retirement_driver: RetirementDriver,
        hooks: CycleHooks,
    ) -> None:
        self._config = config
        self._policies = policies
        self._state = records.state
        self._ledger = records.ledger
        self._events = records.events
        self._outcomes = records.outcomes
        self._losses = records.losses
        self._goals = records.goals
        self._tombstones = records.tombstones
        self._poller = links.poller
        self._dispatcher = links.dispatcher
        self._fence = judges.fence
        self._liveness = judges.liveness
        self._fenced = judges.fenced
        self._in_startup_grace = judges.in_startup_grace
        self._retirements = retirement_driver.retirements
        self._retirement_driver = retirement_driver
        self._stats = hooks.stats
        self._sample = hooks.sample
        self._freeze_heap = hooks.freeze_heap
        self._clock = hooks.clock
        self._monotonic = hooks.monotonic
        self.count = 0
        self.last: CycleRecord | None = None
        self._hurried = False

    def hurry(self) -> None:
        """Plan the rest of the running cycle without waiting for the agents (``FEED``):
        someone waits for the cycle lock, and should wait no longer than the planning."""
        self._hurried = True
        self._dispatcher.wake()

    async def run(self, wait: bool, dry_run: bool = False) -> CycleRecord:
        """One cycle (``ActiveMemoryManager.run_cycle``, under its cycle lock)."""
        try:
            return await self._run(wait, dry_run)
        finally:
            self._ledger.viewed()  # the cycle's snapshot is no longer read with the ledger
            await self._poller.caught_up()  # the round's bookkeeping, left to run as it planned

    async def _run(self, wait: bool, dry_run: bool) -> CycleRecord:
        self.count += 1
        self._hurried = False
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
        # The round's bookkeeping (``Poller.poll_all``) runs while this cycle goes on to plan.
        record.unreachable = tuple(await self._poller.poll_all(later=True))
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
        self._ledger.viewing(record.number)  # until the cycle ends (``Ledger.drops_shown``)
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
        sending = waiting = 0.0
        ready: list[Directive] = []
        bound: set[WorkerId] = set()  # the workers ``ready`` is for
        pace = Budget()
        while not isinstance(out := _planned(steps), core.Plan):
            if out:
                ready += out
                bound.update([d.worker for d in out])
            # Send what is decided while the rest is planned: at once when an agent it is for
            # runs short of work, else in bigger slices.
            if len(ready) >= SEND_STEP or (len(ready) >= FEED_STEP and self._short(bound)):
                started_sending = time.perf_counter()
                await self._send(record, ready)
                sending += time.perf_counter() - started_sending
                started_waiting = time.perf_counter()
                if await self._keep_ahead(bound):
                    # What the agents' answers and the batches sent to them freed (much of it
                    # gRPC's, in its threads' arenas) stays resident untrimmed; below chunks
                    # still in use it is not reused by the cycle's Python objects, and a 100k-key
                    # convergence peaked 10 MiB higher without (0.4 ms a trim, ~70 a cycle).
                    malloc.trim()
                waiting += time.perf_counter() - started_waiting
                ready, bound = [], set()
            else:
                await pace()  # control calls are answered while a big cycle plans
        plan = out
        record.plan_duration = time.perf_counter() - t1 - sending - waiting
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
                "ms, send %.0f ms, waited for the agents %.0f ms (elapsed, the loop serving "
                "calls in between)",
                record.number,
                plan.suggestions,
                record.planned_count,
                len(plan.rejections),
                (polled - t0) * 1e3,
                record.plan_duration * 1e3,
                sending * 1e3,
                waiting * 1e3,
            )
        return record

    def _short(self, workers: set[WorkerId]) -> bool:
        """Whether one of ``workers`` has fewer than ``FEED`` directives in hand: it would soon
        wait for work the AMM has planned and not sent."""
        return self._dispatcher.short(workers, FEED)

    async def _keep_ahead(self, workers: set[WorkerId]) -> bool:
        """Wait while each of ``workers`` (those a slice just sent went to) has ``FEED``
        directives in hand: planning further would only hold what is planned till they get to
        it. It ends when one of them runs low (it answered, or its stream broke and what it
        had failed), when the cycle is told to ``hurry``, or after the directive timeout: if
        none of them has answered enough by then (they are stuck, or only slow), the rest of
        the cycle is planned and sent at once, as without a window, so a cycle always ends.
        Dry runs send nothing and never wait. Whether it waited."""
        if self._hurried:
            return False
        timeout = self._config.directive_timeout
        try:
            async with asyncio.timeout(timeout):
                await self._dispatcher.ran_short(workers, FEED)
        except TimeoutError:
            log.warning(
                "cycle %d: %s still had %d directives or more in hand each after %.0f s; the "
                "rest of the cycle is sent without waiting for them",
                self.count,
                ", ".join(sorted(workers)),
                FEED,
                timeout,
            )
            self._hurried = True
        return True

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

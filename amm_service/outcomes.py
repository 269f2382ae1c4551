"""Where the outcomes of sent directives go, and what happens to directives that get none.

An outcome arriving from an agent (through the dispatcher) settles its ledger entry, fills in
the record of the cycle that sent it, is kept as a refusal when the agent did not apply it, and
releases a ``RunOnce(wait=True)`` caller waiting for it. A directive that will never be answered
(it expired in the ledger, or its worker left or restarted) is marked timed out in its record
and releases its waiter the same way, so no caller waits for the directive timeout in vain.

Only the most recent cycles' records are filled in. Not covered: sending (``dispatcher``), what
is in flight (``pending``), and how long to wait (the manager's ``run_cycle``).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from amm_service.cycle import CycleRecord
from amm_service.directive import Directive, Outcome, OutcomeStatus
from amm_service.pending import Entry, Ledger
from amm_service.view import ClusterState, WorkerId

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Totals:
    """Directives sent since the AMM started, and how they ended (``failed`` includes those
    that never got an answer)."""

    sent: int = 0
    applied: int = 0
    refused: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A directive an agent refused or failed."""

    directive: Directive
    outcome: Outcome
    at: float


class Outcomes:
    """Directive outcomes for the ledger, the cycle records, the refusals and the waiters.

    Used from the event loop only; ``clock`` is the wall clock stamped on refusals.
    """

    def __init__(
        self,
        state: ClusterState,
        ledger: Ledger,
        *,
        max_refusals: int,
        clock: Callable[[], float],
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._clock = clock
        self._records: deque[CycleRecord] = deque(maxlen=4)
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self.refusals: deque[Refusal] = deque(maxlen=max_refusals)
        """The most recent directives refused or failed, newest first."""
        self.totals = Totals()

    def track(self, record: CycleRecord) -> None:
        """Fill in ``record`` as its directives' outcomes arrive (while it is recent)."""
        self._records.append(record)

    def expect(self, directive_id: str) -> None:
        """A caller will wait (``wait``) for the outcome of ``directive_id``."""
        self._waiters[directive_id] = asyncio.get_running_loop().create_future()

    async def wait(self, record: CycleRecord, limit: float) -> None:
        """Until every expected directive of ``record`` has an outcome, or ``limit`` seconds."""
        waiters = [self._waiters[i] for i in record.directives if i in self._waiters]
        if waiters:
            await asyncio.wait(waiters, timeout=limit)
            self._release(list(record.directives))

    def on_outcome(self, worker: WorkerId, outcome: Outcome) -> None:
        known = self._state.worker(worker)
        entry = self._ledger.settle(outcome, known.version if known else 0)
        if entry is not None:
            self._count(outcome.status)
        for record in self._records:
            rec = record.directives.get(outcome.directive_id)
            if rec is not None:
                rec.outcome = outcome
        if entry is not None and outcome.status is not OutcomeStatus.APPLIED:
            self.refusals.appendleft(Refusal(entry.directive, outcome, self._clock()))
            log.info(
                "%s %s %s %s: %s %s",
                worker,
                outcome.status.value,
                entry.directive.op.value,
                entry.directive.key,
                outcome.reason,
                outcome.message,
            )
        self._release([outcome.directive_id])

    def expire(self, now: float, timeout: float) -> None:
        """Give up on directives in flight for longer than ``timeout`` (monotonic ``now``)."""
        self._settle_lost(self._ledger.expire(now, timeout))

    def forget_in_flight(self, worker: WorkerId) -> None:
        """The worker left or restarted: what was in flight to it will never be answered."""
        self._settle_lost(self._ledger.forget_worker(worker))

    def _count(self, status: OutcomeStatus) -> None:
        totals = self.totals
        if status is OutcomeStatus.APPLIED:
            totals.applied += 1
        elif status is OutcomeStatus.REFUSED:
            totals.refused += 1
        else:
            totals.failed += 1

    def _settle_lost(self, entries: list[Entry]) -> None:
        self.totals.failed += len(entries)
        ids = [e.directive.id for e in entries]
        for record in self._records:
            for directive_id in ids:
                rec = record.directives.get(directive_id)
                if rec is not None and rec.outcome is None:
                    rec.timed_out = True
        self._release(ids)

    def _release(self, ids: list[str]) -> None:
        for directive_id in ids:
            waiter = self._waiters.pop(directive_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Release every waiter: the AMM is shutting down."""
        self._release(list(self._waiters))

"""Where the outcomes of sent directives go, and what happens to directives that get none.

An outcome arriving from an agent (through the dispatcher) settles its ledger entry, counts in
the record of the cycle that sent it (which releases a ``RunOnce(wait=True)`` caller once every
directive of the cycle has one), and is kept as a refusal when the agent did not apply it. A
directive that will never be answered (it expired in the ledger, or its worker left or
restarted) is given up on in its record the same way, so no caller waits for the directive
timeout in vain. An applied DROP that says at which inventory version its key was gone is
taken into the cluster view at once (``ClusterState.apply_drops`` fences it against the polls),
so who holds what shows it before the next poll, and the ledger settles the drops the view shows
(``Ledger.drops_shown``) rather than keep them till that poll. Once a cycle's directives are all
settled (or its record is no longer kept), a cycle with refusals records one
``directives-refused`` event summing them up by reason: one per cycle, not one per refusal,
which would flood the event log.

Only the most recent cycles' records are filled in. Not covered: sending (``dispatcher``), what
is in flight (``pending``), and how long to wait (the manager's ``run_cycle``).
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, is_, itemgetter
from typing import Protocol

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.events import MAX_KEYS_LISTED, EventLog
from amm_service.decisions.pending import Entry, Ledger
from amm_service.decisions.view import ClusterState, WorkerId
from amm_service.runtime.records.cycle import CycleRecord

log = logging.getLogger(__name__)

#: Read once: an ``Op`` member is a lookup through ``EnumType``, and ``sending`` counts 300k
#: directives of a big cycle.
_DROP, _REPLICATE = Op.DROP, Op.REPLICATE
_op = attrgetter("op")
_FIRST, _SECOND = itemgetter(0), itemgetter(1)
_STATUS, _REASON, _INCARNATION, _DROPPED_VERSION = (
    attrgetter("status"),
    attrgetter("reason"),
    attrgetter("incarnation"),
    attrgetter("dropped_version"),
)
_CYCLE, _OP_OF, _KEY_OF = (
    attrgetter("cycle"),
    attrgetter("directive.op"),
    attrgetter("directive.key"),
)
"""Fields read through ``map``: no Python step per outcome of a batch."""

#: Cycle records kept and filled in.
RECORDS_KEPT = 4
#: The reason counted for a directive given up on: it expired, or its worker left or restarted.
UNANSWERED = "UNANSWERED"


@dataclass(slots=True)
class Totals:
    """Directives sent since the AMM started, and how they ended (``failed`` includes those
    that never got an answer)."""

    sent: int = 0
    applied: int = 0
    refused: int = 0
    failed: int = 0
    sent_by_op: Counter[Op] = field(default_factory=Counter)
    by_outcome: Counter[tuple[Op, OutcomeStatus, str]] = field(default_factory=Counter)
    """By (op, status, reason): the reason is the wire enum's name, empty when applied,
    ``UNANSWERED`` for a directive given up on (counted as failed)."""

    def sending(self, directives: Sequence[Directive]) -> None:
        """Count ``directives`` as sent (again, for an overdue one sent under its id)."""
        self.sent += len(directives)
        drops = list(map(_op, directives)).count(_DROP)
        self.sent_by_op[_DROP] += drops
        self.sent_by_op[_REPLICATE] += len(directives) - drops


@dataclass(frozen=True, slots=True)
class Refusal:
    """A directive an agent refused or failed."""

    directive: Directive
    outcome: Outcome
    at: float


class Watcher(Protocol):
    """Who acts on outcomes as they settle, between cycles (``handover.Handover``)."""

    @property
    def watching(self) -> bool:
        """Whether it wants outcomes now (collecting them costs a big cycle otherwise)."""

    def on_settled(self, worker: WorkerId, settled: Sequence[tuple[Directive, Outcome]]) -> None:
        """Outcomes from ``worker`` that settled a directive in flight, with the directive."""


def _one_kind(settled: list[tuple[Entry, Outcome]]) -> bool:
    """Whether ``settled`` are all applied, of one cycle, one op and one reason (checked in
    C passes: an ``Op`` or ``OutcomeStatus`` member's hash is a Python call, so no set)."""
    if not settled:
        return False
    entry, outcome = settled[0]
    if outcome.status is not OutcomeStatus.APPLIED:
        return False
    n, entries, answers = len(settled), list(map(_FIRST, settled)), list(map(_SECOND, settled))
    return (
        all(map(is_, map(_STATUS, answers), repeat(OutcomeStatus.APPLIED)))
        and all(map(is_, map(_OP_OF, entries), repeat(entry.directive.op)))
        and list(map(_CYCLE, entries)).count(entry.cycle) == n
        and list(map(_REASON, answers)).count(outcome.reason) == n
    )


class Outcomes:
    """Directive outcomes for the ledger, the cycle records, the refusals and the totals.

    Used from the event loop only; ``clock`` is the wall clock stamped on refusals.
    """

    def __init__(
        self,
        state: ClusterState,
        ledger: Ledger,
        *,
        max_refusals: int,
        clock: Callable[[], float],
        events: EventLog | None = None,
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._clock = clock
        self._events = events
        self._records: dict[int, CycleRecord] = {}
        self.refusals: deque[Refusal] = deque(maxlen=max_refusals)
        """The most recent directives refused or failed, newest first."""
        self.totals = Totals()
        #: Told of the outcomes that settle a directive in flight, while it is watching.
        self.watcher: Watcher | None = None

    def track(self, record: CycleRecord) -> None:
        """Fill in ``record`` as its directives' outcomes arrive (while it is recent)."""
        self._records[record.number] = record
        while len(self._records) > RECORDS_KEPT:
            oldest = self._records.pop(min(self._records))
            self._report_refusals(oldest)  # later outcomes are not counted in it anyway
            oldest.release()

    def all_sent(self, record: CycleRecord) -> None:
        """``record``'s cycle has sent every directive it will: once all are settled, its
        refusals are reported."""
        record.all_sent = True
        self._report_if_settled(record)

    async def wait(self, record: CycleRecord, limit: float) -> None:
        """Until every directive of ``record`` has an outcome, or ``limit`` seconds."""
        await record.wait_settled(limit)

    def on_outcome(self, worker: WorkerId, outcome: Outcome) -> None:
        self.on_outcomes(worker, (outcome,))

    def on_outcomes(self, worker: WorkerId, outcomes: Iterable[Outcome]) -> None:
        records, totals = self._records, self.totals
        by_outcome = totals.by_outcome
        refused: list[tuple[Directive, Outcome]] = []
        touched: dict[int, CycleRecord] = {}
        # Applied outcomes (nearly all of a big cycle's) are counted per group at the end: by
        # cycle, op and reason.
        applied: dict[tuple[int, bool, str], list[Outcome]] = {}
        applied_status = OutcomeStatus.APPLIED
        last_cycle, last_op, last_reason = -1, None, ""
        same: list[Outcome] = []
        # Applied drops that say when the key was gone: the view takes them in at once
        # (``ClusterState.apply_drops``) rather than at the next poll, and the ledger settles
        # those it shows, never listing them for the poll (``Ledger.settle_many``).
        held: list[tuple[Entry, Outcome]] = []
        settled = self._ledger.settle_many(outcomes, held)
        if _one_kind(settled):  # nearly every batch of a big cycle: no Python step per outcome
            entry, outcome = settled[0]
            key = (entry.cycle, entry.directive.op is _DROP, outcome.reason)
            applied[key] = list(map(_SECOND, settled))
            settled_here: list[tuple[Entry, Outcome]] = []
        else:
            settled_here = settled
        for entry, outcome in settled_here:
            status = outcome.status
            if status is applied_status:
                op = entry.directive.op
                if entry.cycle != last_cycle or op is not last_op or outcome.reason != last_reason:
                    # A batch's outcomes are nearly all of one kind: a tuple and a look-up
                    # only when the kind changes.
                    last_cycle, last_op, last_reason = entry.cycle, op, outcome.reason
                    same = applied.setdefault((last_cycle, op is _DROP, last_reason), [])
                same.append(outcome)
                continue
            by_outcome[entry.directive.op, status, outcome.reason] += 1
            if status is OutcomeStatus.REFUSED:
                totals.refused += 1
            else:
                totals.failed += 1
            record = records.get(entry.cycle)
            if record is not None:
                record.settle(outcome)
                touched[record.number] = record
            refused.append((entry.directive, outcome))
            if record is not None:
                record.not_applied[outcome.reason.lower() or "unspecified"] += 1
                record.refusers.add(worker)
                if len(record.refused_keys) < MAX_KEYS_LISTED:
                    record.refused_keys.append(entry.directive.key)
        for (cycle, drop, reason), group in applied.items():
            totals.applied += len(group)
            by_outcome[Op.DROP if drop else Op.REPLICATE, applied_status, reason] += len(group)
            record = records.get(cycle)
            if record is not None:
                record.settle_applied(group)
                touched[record.number] = record
        if held:
            self._take_drops(worker, held)
        if refused:
            self._refused(worker, refused)
        for record in touched.values():
            self._report_if_settled(record)
        watcher = self.watcher
        if settled and watcher is not None and watcher.watching:
            watcher.on_settled(worker, [(entry.directive, outcome) for entry, outcome in settled])

    def _take_drops(self, worker: WorkerId, held: list[tuple[Entry, Outcome]]) -> None:
        """Take the applied drops ``held`` by ``Ledger.settle_many`` into the view, by the
        incarnation that answered (nearly always one); the ledger settles those it shows, and
        lists the others for the poll that will."""
        answers = list(map(_SECOND, held))
        incarnation = answers[0].incarnation
        if list(map(_INCARNATION, answers)).count(incarnation) < len(answers):
            by_incarnation: dict[str, list[tuple[Entry, Outcome]]] = {}
            for item in held:
                by_incarnation.setdefault(item[1].incarnation, []).append(item)
            for some in by_incarnation.values():
                self._take_drops(worker, some)
            return
        entries = list(map(_FIRST, held))
        shown: list[int] = []
        gone = zip(map(_KEY_OF, entries), map(_DROPPED_VERSION, answers), strict=True)
        self._state.apply_drops(worker, incarnation, gone, shown)
        if len(shown) == len(held):
            self._ledger.drops_shown(entries, listed=False)
            return
        self._ledger.drops_shown([entries[i] for i in shown], listed=False)
        unshown = set(range(len(held))).difference(shown)
        self._ledger.list_applied([held[i] for i in sorted(unshown)])

    def _report_if_settled(self, record: CycleRecord) -> None:
        if record.all_sent and record.unsettled == 0:
            self._report_refusals(record)

    def _report_refusals(self, record: CycleRecord) -> None:
        """The ``directives-refused`` event of ``record``'s cycle, once, if it had refusals."""
        if record.refusals_reported or not record.not_applied or self._events is None:
            return
        record.refusals_reported = True
        counts = ", ".join(f"{reason} {n}" for reason, n in record.not_applied.most_common())
        tally = ((record.refused, "refused"), (record.failed, "failed"))
        what = ", ".join(f"{n} {status}" for n, status in tally if n)
        workers = record.refusers
        worker = next(iter(workers)) if len(workers) == 1 else ""
        where = "" if worker else f" by {len(workers)} workers"
        self._events.record(
            "directives-refused",
            f"cycle {record.number}: {what}{where}: {counts}",
            worker=worker,
            keys=record.refused_keys,
        )

    def _refused(self, worker: WorkerId, refused: list[tuple[Directive, Outcome]]) -> None:
        """Keep the refusals; log one line per kind (thousands of drops of a batch may be
        refused for one reason), with the first one's detail."""
        now = self._clock()
        kinds: dict[tuple[str, str, str], list[tuple[Directive, Outcome]]] = {}
        for directive, outcome in refused:
            self.refusals.appendleft(Refusal(directive, outcome, now))
            kind = (outcome.status.value, directive.op.value, outcome.reason)
            kinds.setdefault(kind, []).append((directive, outcome))
        for (status, op, reason), items in kinds.items():
            directive, outcome = items[0]
            more = f" (and {len(items) - 1} more {op}s)" if len(items) > 1 else ""
            log.info(
                "%s %s %s %s%s: %s %s",
                worker,
                status,
                op,
                directive.key,
                more,
                reason,
                outcome.message,
            )

    def expire(
        self, now: float, timeout: float, answering: Callable[[WorkerId], bool]
    ) -> list[Directive]:
        """Give up on directives in flight for longer than ``timeout`` (monotonic ``now``) to
        workers that are not ``answering``; return the overdue ones of workers that are, to be
        sent again under the same id."""
        self._settle_lost(self._ledger.expire(now, timeout, answering))
        return self._ledger.overdue(now, timeout)

    def forget_in_flight(self, worker: WorkerId) -> None:
        """The worker left or restarted: what was in flight to it will never be answered."""
        self._settle_lost(self._ledger.forget_worker(worker))

    def _settle_lost(self, entries: list[Entry]) -> None:
        self.totals.failed += len(entries)
        by_outcome = self.totals.by_outcome
        touched: dict[int, CycleRecord] = {}
        for entry in entries:
            by_outcome[entry.directive.op, OutcomeStatus.FAILED, UNANSWERED] += 1
            record = self._records.get(entry.cycle)
            if record is not None:
                record.give_up(entry.directive.id)
                touched[record.number] = record
        for record in touched.values():
            self._report_if_settled(record)

    def close(self) -> None:
        """Release every waiter: the AMM is shutting down."""
        for record in self._records.values():
            record.release()

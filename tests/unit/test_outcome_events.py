"""The ``directives-refused`` event: one per cycle that had refusals, once its outcomes are all in
(or its record is no longer kept), never one per refusal."""

from __future__ import annotations

from collections.abc import Sequence

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.events import EventLog
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.runtime.records.cycle import CycleRecord
from amm_service.runtime.records.outcomes import RECORDS_KEPT, Outcomes

W1, W2 = WorkerId("w1:1"), WorkerId("w2:1")


def setup() -> tuple[Outcomes, Ledger, EventLog]:
    ledger, events = Ledger(), EventLog(clock=lambda: 0.0)
    outcomes = Outcomes(ClusterState(), ledger, max_refusals=10, clock=lambda: 0.0, events=events)
    return outcomes, ledger, events


def cycle(
    outcomes: Outcomes, ledger: Ledger, number: int, *targets: WorkerId
) -> tuple[CycleRecord, list[Directive]]:
    """A cycle record tracked, with one drop sent to each of ``targets``."""
    record = CycleRecord(number, 0.0)
    outcomes.track(record)
    sent = [
        Directive(f"{number}-{i}", 1, Op.DROP, Key(f"k{number}-{i}"), w, 10, "c")
        for i, w in enumerate(targets)
    ]
    record.sending(sent, 0.0)
    for d in sent:
        ledger.add(d, 0.0, number)
    return record, sent


def refuse(d: Directive, reason: str, status: OutcomeStatus = OutcomeStatus.REFUSED) -> Outcome:
    return Outcome(d.id, status, reason)


def refused_events(events: EventLog) -> Sequence[object]:
    return events.of_kind("directives-refused")


def test_one_event_per_cycle_once_every_outcome_is_in() -> None:
    outcomes, ledger, events = setup()
    record, d = cycle(outcomes, ledger, 1, W1, W1, W2, W2)
    outcomes.on_outcomes(W1, [refuse(d[0], "PINNED"), refuse(d[1], "PINNED")])
    outcomes.all_sent(record)
    outcomes.on_outcomes(W2, [refuse(d[2], "IN_USE")])
    assert refused_events(events) == [], "one directive is still unanswered"
    outcomes.on_outcomes(W2, [Outcome(d[3].id, OutcomeStatus.APPLIED, inventory_version=1)])
    (event,) = events.of_kind("directives-refused")
    assert event.message == "cycle 1: 3 refused by 2 workers: pinned 2, in_use 1"
    assert event.worker == ""
    assert event.keys == ("k1-0", "k1-1", "k1-2")
    outcomes.on_outcomes(W2, [refuse(d[2], "IN_USE")])  # a repeated answer
    assert len(refused_events(events)) == 1


def test_a_cycle_with_no_refusal_records_nothing_and_one_worker_is_named() -> None:
    outcomes, ledger, events = setup()
    record, d = cycle(outcomes, ledger, 1, W1)
    outcomes.all_sent(record)
    outcomes.on_outcomes(W1, [Outcome(d[0].id, OutcomeStatus.APPLIED, inventory_version=1)])
    assert refused_events(events) == []
    record, d = cycle(outcomes, ledger, 2, W1, W1)
    outcomes.all_sent(record)
    outcomes.on_outcomes(
        W1, [refuse(d[0], "CHECKSUM_MISMATCH", OutcomeStatus.FAILED), refuse(d[1], "")]
    )
    (event,) = events.of_kind("directives-refused")
    assert event.worker == W1
    assert event.message == "cycle 2: 1 refused, 1 failed: checksum_mismatch 1, unspecified 1"


def test_a_cycle_never_settled_reports_when_its_record_is_dropped() -> None:
    outcomes, ledger, events = setup()
    record, d = cycle(outcomes, ledger, 1, W1, W2)
    outcomes.all_sent(record)
    outcomes.on_outcomes(W1, [refuse(d[0], "PAUSED")])
    for number in range(2, RECORDS_KEPT + 1):
        cycle(outcomes, ledger, number)
    assert refused_events(events) == []
    cycle(outcomes, ledger, RECORDS_KEPT + 1)
    (event,) = events.of_kind("directives-refused")
    assert event.message == "cycle 1: 1 refused: paused 1"


def test_outcomes_of_two_cycles_in_one_batch_count_in_each_and_in_the_totals() -> None:
    """Applied outcomes are counted per cycle, op and reason once per batch; each cycle's record
    and the totals come out as one at a time would make them."""
    outcomes, ledger, _ = setup()
    first, d1 = cycle(outcomes, ledger, 1, W1, W1, W1)
    second, d2 = cycle(outcomes, ledger, 2, W1, W1)
    outcomes.all_sent(first)
    outcomes.all_sent(second)
    applied = [Outcome(d.id, OutcomeStatus.APPLIED, inventory_version=1) for d in (*d1, *d2)]
    batch = [applied[0], refuse(d1[1], "PINNED"), applied[2], applied[3], applied[4]]
    outcomes.on_outcomes(W1, [*batch, applied[0]])  # the last one repeated: counted once
    assert (first.applied, first.refused, first.unsettled) == (2, 1, 0)
    assert (second.applied, second.unsettled) == (2, 0)
    assert first.directives[d1[0].id].outcome == applied[0]
    assert first.directives[d1[1].id].outcome is not None
    totals = outcomes.totals
    assert (totals.applied, totals.refused, totals.failed) == (4, 1, 0)
    assert totals.by_outcome[Op.DROP, OutcomeStatus.APPLIED, ""] == 4
    assert totals.by_outcome[Op.DROP, OutcomeStatus.REFUSED, "PINNED"] == 1

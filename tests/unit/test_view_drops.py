"""Applied drops taken into the cluster view ahead of the poll (``ClusterState.apply_drops``).

An outcome saying "gone at version V" is a poll of one key at V: news only for the worker's
incarnation and while its poll cursor is older than V. These check the fence, the journal and
what a later poll makes of it, and the path from an outcome to the view (``Outcomes``).
"""

from __future__ import annotations

from collections.abc import Sequence

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, KeyReport, WorkerId
from amm_service.runtime.records.outcomes import Outcomes
from tests.support.views import poll

A, B, C = WorkerId("a"), WorkerId("b"), WorkerId("c")
X, Y, Z = Key("x"), Key("y"), Key("z")


def cluster(*held: tuple[WorkerId, Sequence[KeyReport]]) -> ClusterState:
    """Workers of incarnation "i1", each polled in full at version 5."""
    state = ClusterState(track_changes=True)
    for worker, keys in held:
        state.register(worker, "", "i1", now=0.0)
        poll(state, worker, 5, full=True, keys=keys)
    state.take_changes()
    return state


def x_everywhere() -> ClusterState:
    return cluster(*((w, [KeyReport(X, 3, "s")]) for w in (A, B, C)))


def test_an_applied_drop_takes_the_holder_off_at_once_and_is_journaled() -> None:
    state = x_everywhere()
    before = state.snapshot()
    assert state.apply_drops(A, "i1", [(X, 7)]) == 1
    after = state.snapshot()
    assert after.keys[X].holders == {B, C}
    assert after.held_by(A) == frozenset()
    assert state.held_by(A) == frozenset()
    worker = state.worker(A)
    assert worker is not None
    assert (worker.nkeys, worker.version) == (0, 5)
    assert after.changed_since(*before.feed) == {X}
    # The poll that brings the drop changes nothing more, and notes nothing again.
    poll(state, A, 7, removed=[X])
    assert state.keys[X].holders == {B, C}
    assert state.snapshot().changed_since(*after.feed) == set()
    assert state.take_changes() == (set(), set())


def test_dropped_down_to_one_holder_the_key_is_no_longer_replicated() -> None:
    state = x_everywhere()
    state.apply_drops(A, "i1", [(X, 6)])
    assert state.snapshot().replicated == {X}
    state.apply_drops(B, "i1", [(X, 9)])
    snap = state.snapshot()
    assert snap.keys[X].holders == {C}
    assert snap.replicated == frozenset()


def test_a_drop_the_poll_covered_already_is_ignored() -> None:
    state = x_everywhere()
    poll(state, A, 8)  # the cursor moved past the drop; what the poll said stands
    assert state.apply_drops(A, "i1", [(X, 7), (X, 8)]) == 0
    assert state.keys[X].holders == {A, B, C}


def test_an_outcome_after_a_poll_that_shows_the_key_put_again_is_ignored() -> None:
    state = x_everywhere()
    # Dropped at 7, put again at 9: the poll since 5 reports it held, before the outcome arrives.
    poll(state, A, 9, keys=[KeyReport(X, 3, "s")])
    assert state.apply_drops(A, "i1", [(X, 7)]) == 0
    assert state.keys[X].holders == {A, B, C}
    assert X in state.held_by(A)


def test_a_later_poll_brings_back_a_key_put_again_after_the_drop() -> None:
    state = x_everywhere()
    assert state.apply_drops(A, "i1", [(X, 7)]) == 1
    before = state.snapshot()
    poll(state, A, 9, keys=[KeyReport(X, 3, "s")])  # since 5: the key as it is now
    assert state.keys[X].holders == {A, B, C}
    assert state.snapshot().changed_since(*before.feed) == {X}


def test_an_outcome_of_another_incarnation_is_ignored() -> None:
    state = x_everywhere()
    # A restarted: its new process counts versions anew, and holds x (a copy made since).
    state.register(A, "", "i2", now=2.0)
    poll(state, A, 2, incarnation="i2", full=True, keys=[KeyReport(X, 3, "s")])
    assert state.apply_drops(A, "i1", [(X, 7)]) == 0
    assert state.apply_drops(A, "", [(X, 7)]) == 0  # an agent that did not say which
    assert state.keys[X].holders == {A, B, C}
    assert state.apply_drops(A, "i2", [(X, 3)]) == 1


def test_unknown_workers_and_keys_not_held_there_are_ignored() -> None:
    state = cluster((A, [KeyReport(X, 3, "s")]), (B, [KeyReport(X, 3, "s")]), (C, []))
    assert state.apply_drops(WorkerId("gone"), "i1", [(X, 7)]) == 0
    assert state.apply_drops(C, "i1", [(X, 7), (Y, 7)]) == 0
    assert state.keys[X].holders == {A, B}


def test_the_last_holder_pins_and_conflicts_are_left_to_the_poll() -> None:
    state = cluster(
        (A, [KeyReport(X, 3, "s"), KeyReport(Y, 1, "t", pinned=True), KeyReport(Z, 2, "u")]),
        (B, [KeyReport(X, 3, "s"), KeyReport(Y, 1, "t"), KeyReport(Z, 2, "other")]),
    )
    assert state.apply_drops(B, "i1", [(X, 7)]) == 1
    # Its last holder: taking it off would report the key lost, on an outcome's word.
    assert state.apply_drops(A, "i1", [(X, 7), (Y, 7), (Z, 7)]) == 0
    assert state.apply_drops(B, "i1", [(Y, 8), (Z, 8)]) == 0
    snap = state.snapshot()
    assert snap.keys[X].holders == {A}
    assert snap.keys[Y].holders == snap.keys[Z].holders == {A, B}
    assert state.take_changes() == (set(), set())


def drop(number: int, key: Key, worker: WorkerId) -> Directive:
    return Directive(f"d{number}", 1, Op.DROP, key, worker, 3, "s", holders=(C,))


def test_outcomes_that_say_when_the_key_was_gone_reach_the_view() -> None:
    state, ledger = x_everywhere(), Ledger()
    outcomes = Outcomes(state, ledger, max_refusals=10, clock=lambda: 0.0)
    sent = [drop(1, X, A), drop(2, X, B)]
    ledger.add_many(sent, 0.0, 1)
    applied = OutcomeStatus.APPLIED
    outcomes.on_outcomes(
        A, [Outcome("d1", applied, inventory_version=7, dropped_version=7, incarnation="i1")]
    )
    assert state.keys[X].holders == {B, C}
    # An agent that does not say when the key was gone: the poll will tell.
    outcomes.on_outcomes(B, [Outcome("d2", applied, inventory_version=7)])
    assert state.keys[X].holders == {B, C}
    assert outcomes.totals.applied == 2


def test_refused_and_unknown_outcomes_change_no_holder() -> None:
    state, ledger = x_everywhere(), Ledger()
    outcomes = Outcomes(state, ledger, max_refusals=10, clock=lambda: 0.0)
    ledger.add(drop(1, X, A), 0.0, 1)
    refused = Outcome("d1", OutcomeStatus.REFUSED, "PINNED", "", 7, False, 7, "i1")
    outcomes.on_outcomes(A, [refused])
    # Not in flight (expired, or answered already): nothing to take in.
    stray = Outcome("d9", OutcomeStatus.APPLIED, "", "", 7, False, 7, "i1")
    outcomes.on_outcomes(A, [stray])
    assert state.keys[X].holders == {A, B, C}


def test_apply_drops_tells_which_drops_the_view_shows() -> None:
    state = cluster(
        (A, [KeyReport(X, 3, "s"), KeyReport(Y, 1, "t"), KeyReport(Z, 2, "u")]),
        (B, [KeyReport(X, 3, "s"), KeyReport(Y, 1, "t")]),
    )
    poll(state, A, 8, removed=[Y])  # the poll took y off at 8 already
    shown: list[int] = []
    # x taken in; y covered by the poll, which took A off; z: A is its last holder (left to
    # the poll).
    state.apply_drops(A, "i1", [(X, 9), (Y, 7), (Z, 9)], shown)
    assert shown == [0, 1]
    put_again: list[int] = []
    poll(state, B, 9, keys=[KeyReport(X, 3, "s")])  # reported held since: put again
    state.apply_drops(B, "i1", [(X, 7)], put_again)
    assert put_again == []


def test_an_applied_drop_the_view_took_in_leaves_the_ledger_at_once() -> None:
    state, ledger = x_everywhere(), Ledger()
    outcomes = Outcomes(state, ledger, max_refusals=10, clock=lambda: 0.0)
    ledger.add_many([drop(1, X, A), drop(2, X, B)], 0.0, 1)
    applied = OutcomeStatus.APPLIED
    outcomes.on_outcomes(
        A, [Outcome("d1", applied, inventory_version=7, dropped_version=7, incarnation="i1")]
    )
    assert "d1" not in ledger
    assert ledger.in_flight(X).dropping == {B}
    # Not said when gone: in flight till a poll shows it, as before.
    outcomes.on_outcomes(B, [Outcome("d2", applied, inventory_version=7)])
    assert "d2" in ledger
    assert ledger.in_flight(X).dropping == {B}
    assert outcomes.totals.applied == 2


def test_while_a_cycle_plans_on_its_snapshot_drops_taken_in_still_count_as_dropping() -> None:
    """The snapshot still lists the holders the view took off: settled at once, the cycle
    (and its retirement review) would count them as copies that stay."""
    state, ledger = x_everywhere(), Ledger()
    outcomes = Outcomes(state, ledger, max_refusals=10, clock=lambda: 0.0)
    ledger.add(drop(1, X, A), 0.0, cycle=1)  # an earlier cycle's
    ledger.viewing(2)
    ledger.add(drop(2, X, B), 0.0, cycle=2)  # this cycle's own
    applied = OutcomeStatus.APPLIED
    outcomes.on_outcomes(
        A, [Outcome("d1", applied, inventory_version=7, dropped_version=7, incarnation="i1")]
    )
    outcomes.on_outcomes(
        B, [Outcome("d2", applied, inventory_version=7, dropped_version=7, incarnation="i1")]
    )
    assert state.keys[X].holders == {C}
    assert "d1" in ledger  # the other cycle's waits for the snapshot to go
    assert "d2" not in ledger  # this cycle's leaves, but still counts
    assert len(ledger) == 1
    assert ledger.in_flight(X).dropping == {A, B}
    assert ledger.count(X) == 2
    ledger.viewed()
    assert len(ledger) == 0
    assert ledger.in_flight(X) == ledger.in_flight(Y)
    assert ledger.count(X) == 0

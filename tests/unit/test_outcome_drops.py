"""Applied drops taken from their outcomes: ``Outcomes.on_outcomes`` settles a batch in one pass
(``Ledger.settle_many``) and never lists for the poll a drop the view shows at once, with the
same ledger and view as settling each outcome, then the drops the view shows (the way it did
before)."""

from __future__ import annotations

import random

import pytest

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Entry, Ledger
from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId
from amm_service.runtime.records import outcomes as outcomes_module
from amm_service.runtime.records.cycle import CycleRecord
from amm_service.runtime.records.outcomes import Outcomes
from tests.support.views import joined

WORKERS = [WorkerId(w) for w in "abc"]
KEYS = [Key(f"k{n}") for n in range(12)]


def cluster(rng: random.Random) -> ClusterState:
    """Keys on two or three workers, some pinned, the workers polled at version 10."""
    state = ClusterState(track_changes=True)
    held: dict[WorkerId, list[KeyReport]] = {w: [] for w in WORKERS}
    for key in KEYS:
        for w in rng.sample(WORKERS, rng.randint(1, 3)):
            held[w].append(KeyReport(key, 10, f"sum-{key}", pinned=rng.random() < 0.15))
    for w in WORKERS:
        joined(state, w, 10, held[w], memory=Memory())
    return state


def scenario(
    seed: int,
) -> tuple[ClusterState, Ledger, list[tuple[WorkerId, list[Outcome]]], int | None]:
    """A cluster, a ledger of drops and copies of two cycles, and batches of their outcomes:
    applied drops with and without the version they were gone at (some of keys pinned or not
    held, some at versions a poll showed already), another incarnation's, refusals, failures,
    repeats and unknown ids."""
    rng = random.Random(seed)
    state = cluster(rng)
    ledger = Ledger()
    directives = []
    for n in range(40):
        op = Op.DROP if rng.random() < 0.85 else Op.REPLICATE
        d = Directive(f"d{n}", 1, op, rng.choice(KEYS), rng.choice(WORKERS), 10, "sum")
        directives.append(d)
        ledger.add_many([d], now=0.0, cycle=rng.choice([1, 2]))
    version = dict.fromkeys(WORKERS, 10)
    batches: dict[WorkerId, list[Outcome]] = {w: [] for w in WORKERS}
    for d in [*rng.sample(directives, len(directives)), directives[0], directives[1]]:
        version[d.worker] += 1
        roll = rng.random()
        if roll < 0.1:
            status = rng.choice([OutcomeStatus.REFUSED, OutcomeStatus.FAILED])
            outcome = Outcome(d.id, status, "PINNED", inventory_version=version[d.worker])
        else:
            gone = 0 if roll < 0.2 else rng.choice([version[d.worker], 5])
            outcome = Outcome(
                d.id,
                OutcomeStatus.APPLIED,
                inventory_version=version[d.worker],
                dropped_version=gone,
                incarnation=rng.choice(["i1"] * 6 + ["", "i0"]),
            )
        batches[d.worker].append(outcome)
    batches[WORKERS[0]].append(Outcome("unknown", OutcomeStatus.APPLIED, dropped_version=3))
    split = [(w, part) for w, o in batches.items() for part in (o[: len(o) // 2], o[len(o) // 2 :])]
    return state, ledger, split, rng.choice([None, 1, 2])


def one_at_a_time(
    state: ClusterState, ledger: Ledger, worker: WorkerId, batch: list[Outcome]
) -> None:
    """What ``on_outcomes`` did to the ledger and the view before ``settle_many``: settle each
    outcome (applied ones listed for the poll), then take the drops into the view and settle
    those it shows."""
    dropped: dict[str, list[tuple[Key, int]]] = {}
    entries: dict[str, list[Entry]] = {}
    for outcome in batch:
        entry = ledger.settle(outcome)
        if entry is None or outcome.status is not OutcomeStatus.APPLIED:
            continue
        if outcome.dropped_version and entry.directive.op is Op.DROP:
            dropped.setdefault(outcome.incarnation, []).append(
                (entry.directive.key, outcome.dropped_version)
            )
            entries.setdefault(outcome.incarnation, []).append(entry)
    for incarnation, gone in dropped.items():
        shown: list[int] = []
        state.apply_drops(worker, incarnation, gone, shown)
        ledger.drops_shown([entries[incarnation][i] for i in shown])


def summary(state: ClusterState, ledger: Ledger) -> object:
    in_flight = {key: (ledger.in_flight(key), ledger.count(key)) for key in KEYS}
    return dict(state.keys), sorted(e.directive.id for e in ledger), in_flight


@pytest.mark.parametrize("seed", range(60))
def test_a_batch_settles_as_one_outcome_at_a_time(seed: int) -> None:
    new_state, new_ledger, batches, viewing = scenario(seed)
    old_state, old_ledger, _, _ = scenario(seed)
    outcomes = Outcomes(new_state, new_ledger, max_refusals=100, clock=lambda: 0.0)
    for ledger in (new_ledger, old_ledger):
        if viewing is not None:
            ledger.viewing(viewing)
    for worker, batch in batches:
        outcomes.on_outcomes(worker, batch)
        one_at_a_time(old_state, old_ledger, worker, batch)
        assert summary(new_state, new_ledger) == summary(old_state, old_ledger), seed
    for ledger in (new_ledger, old_ledger):
        ledger.viewed()
    assert summary(new_state, new_ledger) == summary(old_state, old_ledger), seed
    # What is left settles at the same polls.
    for seen in (12, 20, 60):
        for ledger in (new_ledger, old_ledger):
            ledger.observe(dict.fromkeys(WORKERS, seen).get)
        assert summary(new_state, new_ledger) == summary(old_state, old_ledger), (seed, seen)


def test_drops_the_view_shows_at_once_are_never_listed_for_the_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of applied drops the view takes in settles them without listing them among the
    entries a poll settles: listed, each was unlisted again right after (``Ledger._compact``),
    work done twice for each of a big cycle's 300,000 drops."""
    state = ClusterState()
    reports = [KeyReport(key, 10, f"sum-{key}") for key in KEYS]
    for w in WORKERS:
        joined(state, w, 10, reports, memory=Memory())
    ledger = Ledger()
    a = WorkerId("a")
    drops = [Directive(f"d{n}", 1, Op.DROP, key, a, 10, "sum") for n, key in enumerate(KEYS)]
    ledger.add_many(drops, now=0.0, cycle=1)
    compacted: list[WorkerId] = []
    monkeypatch.setattr(Ledger, "_compact", lambda self, worker: compacted.append(worker))
    answers = [
        Outcome(d.id, OutcomeStatus.APPLIED, "", "", 11 + n, False, 11 + n, "i1")
        for n, d in enumerate(drops)
    ]
    Outcomes(state, ledger, max_refusals=10, clock=lambda: 0.0).on_outcomes(a, answers)
    assert len(ledger) == 0
    assert all(a not in state.keys[key].holders for key in KEYS)
    assert not ledger._applied
    assert compacted == []


@pytest.mark.parametrize("seed", range(40))
def test_batches_of_one_kind_count_as_the_loop_does(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose outcomes are all applied, of one cycle, op and reason is counted without a
    step per outcome (``_one_kind``): the totals and cycle records are those of the loop."""
    rng = random.Random(seed)

    def run(fast: bool) -> object:
        state, ledger, batches, _ = scenario(seed)
        outcomes = Outcomes(state, ledger, max_refusals=100, clock=lambda: 0.0)
        cycles = [CycleRecord(n, 0.0) for n in (1, 2)]
        for record in cycles:
            outcomes.track(record)
        with monkeypatch.context() as patch:
            if not fast:
                patch.setattr(outcomes_module, "_one_kind", lambda settled: False)
            for worker, batch in batches:
                # Applied ones alone too, so that some batches are of one kind.
                kept = [o for o in batch if o.status is OutcomeStatus.APPLIED]
                outcomes.on_outcomes(worker, kept if rng.random() < 0.5 else batch)
                outcomes.on_outcomes(worker, batch)
        totals = outcomes.totals
        counts = [(r.applied, r.refused, r.failed, dict(r.not_applied)) for r in cycles]
        return totals.applied, totals.refused, totals.failed, dict(totals.by_outcome), counts

    rng_state = rng.getstate()
    fast = run(True)
    rng.setstate(rng_state)
    assert fast == run(False)

"""Re-planning only what changed: ReduceReplicas after a complete run looks only at the keys whose
record or work in flight changed since (``decisions.journal``), and the core walks the ledger
only when a suggestion is to be decided. The randomized test checks that it plans exactly what a
fresh policy planning every key would, cycle after cycle."""

from __future__ import annotations

import gc
import random
import sys
from collections.abc import Iterator

from amm_service.decisions.core import PAUSE_WORK, STEP, Plan, PlanConfig, plan, planning, step
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.journal import Journal
from amm_service.decisions.pending import InFlight, Ledger
from amm_service.decisions.view import (
    ClusterState,
    Key,
    KeyReport,
    Memory,
    WorkerId,
    WorkerStatus,
)
from amm_service.policies.base import SORT_STEP
from amm_service.policies.reduce_replicas import ReduceReplicas
from tests.factories import cluster, new_ids

CFG = PlanConfig(measure="managed", epoch=1)


class CountingLedger(Ledger):
    """A ledger that counts the keys a plan asked about and its walks of every directive."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[Key] = []
        self.walks = 0

    def in_flight(self, key: Key) -> InFlight:
        self.asked.append(key)
        return super().in_flight(key)

    def directives(self) -> Iterator[Directive]:
        self.walks += 1
        return super().directives()


def _send(ledger: Ledger, result: Plan) -> None:
    for d in result.directives:
        ledger.add(d, now=0.0)


def _keys(n: int) -> list[str]:
    return [f"k{i:03d}" for i in range(n)]


def test_a_cycle_with_no_change_sends_nothing_and_looks_at_no_key() -> None:
    keys = _keys(50)
    state = cluster({"a": keys, "b": keys, "c": keys})
    ledger, policy = CountingLedger(), ReduceReplicas()
    first = plan(state.snapshot(), [policy], ledger, CFG, new_ids())
    assert len(first.directives) == 100  # two extra copies of each key
    _send(ledger, first)
    ledger.asked.clear()
    ledger.walks = 0
    again = plan(state.snapshot(), [policy], ledger, CFG, new_ids("e"))
    assert again.directives == ()
    assert again.suggestions == 0
    assert ledger.asked == []
    assert ledger.walks == 0, "nothing to decide: the ledger is not walked"
    # A fresh policy, with no memory of the last run, agrees: nothing to do.
    assert plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids("f")).directives == ()


def test_a_poll_delta_and_a_refusal_replan_only_their_keys() -> None:
    keys = _keys(50)
    state = cluster({"a": keys, "b": keys})
    ledger, policy = CountingLedger(), ReduceReplicas()
    first = plan(state.snapshot(), [policy], ledger, CFG, new_ids())
    _send(ledger, first)
    refused = first.directives[7]
    ledger.settle(Outcome(refused.id, OutcomeStatus.REFUSED, reason="PINNED"))
    new = KeyReport(Key("new"), 100, "sum-new")
    for worker in ("a", "b"):  # a key put on both workers since: a poll delta of one key
        state.apply_poll(
            WorkerId(worker),
            incarnation=f"inc-{worker}",
            version=10,
            full=False,
            keys=[new],
            removed=(),
            memory=Memory(),
            status=WorkerStatus.RUNNING,
            name=worker,
            now=2.0,
        )
    ledger.asked.clear()
    second = plan(state.snapshot(), [policy], ledger, CFG, new_ids("e"))
    assert sorted(set(ledger.asked)) == sorted([refused.key, Key("new")])
    assert sorted(d.key for d in second.directives) == sorted([refused.key, Key("new")])


def test_drops_that_never_reached_the_ledger_are_planned_again() -> None:
    """A cycle that failed before sending its drops: the next one plans them again."""
    keys = _keys(10)
    state = cluster({"a": keys, "b": keys})
    policy = ReduceReplicas()
    first = plan(state.snapshot(), [policy], Ledger(), CFG, new_ids())
    ledger = Ledger()
    _send(ledger, Plan(first.directives[:4], (), 4))  # only the first four were sent
    second = plan(state.snapshot(), [policy], ledger, CFG, new_ids("e"))
    assert sorted(d.key for d in second.directives) == sorted(d.key for d in first.directives[4:])


def test_another_state_or_a_status_change_means_every_key() -> None:
    keys = _keys(20)
    ledger, policy = CountingLedger(), ReduceReplicas()
    state = cluster({"a": keys, "b": keys})
    _send(ledger, plan(state.snapshot(), [policy], ledger, CFG, new_ids()))
    other = cluster({"a": keys, "b": keys})  # another state: its journal is another one
    ledger.asked.clear()
    plan(other.snapshot(), [policy], ledger, CFG, new_ids("e"))
    assert len(set(ledger.asked)) == len(keys)
    state.apply_poll(
        WorkerId("a"),
        incarnation="inc-a",
        version=20,
        full=False,
        keys=(),
        removed=(),
        memory=Memory(),
        status=WorkerStatus.CLOSING,  # its copies no longer count as live
        name="a",
        now=3.0,
    )
    plan(state.snapshot(), [policy], ledger, CFG, new_ids("f"))
    ledger.asked.clear()
    plan(state.snapshot(), [policy], ledger, CFG, new_ids("g"))
    assert ledger.asked == []  # the change was taken in once
    state.apply_poll(
        WorkerId("a"),
        incarnation="inc-a",
        version=21,
        full=False,
        keys=(),
        removed=(),
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name="a",
        now=4.0,
    )
    plan(state.snapshot(), [policy], ledger, CFG, new_ids("h"))
    assert len(set(ledger.asked)) == len(keys)


def test_journal_forgets_its_oldest_half_and_says_so() -> None:
    journal: Journal[str] = Journal(limit=10)
    uid, start = journal.uid, journal.position
    for n in range(8):
        journal.note(f"k{n}")
    assert journal.since(uid, start) == {f"k{n}" for n in range(8)}
    middle = journal.position
    for n in range(8, 12):
        journal.note(f"k{n}")
    assert journal.since(uid, start) is None  # forgotten: the reader must look at everything
    assert journal.since(uid, middle) == {f"k{n}" for n in range(8, 12)}
    assert journal.since(uid + 1_000_000, middle) is None
    assert len(journal) <= 10
    # As noted, for a reader that makes the set in steps: the same keys, or None alike.
    journal.note("k8")
    assert journal.noted(uid, middle) == ["k8", "k9", "k10", "k11", "k8"]
    assert journal.noted(uid, middle, middle + 2) == ["k8", "k9"]
    assert journal.noted(uid, start) is None
    assert journal.noted(uid + 1_000_000, middle) is None


def test_incremental_plans_equal_fresh_plans_through_random_changes() -> None:
    """Cycle after cycle of random polls (holders added and removed, pins, statuses) and
    outcomes (applied, refused, failed, expired), the policy that remembers plans exactly the
    directives a fresh one does."""
    for seed in range(12):
        _random_cycles(random.Random(seed))


def _random_cycles(rng: random.Random) -> None:
    workers = [WorkerId(w) for w in "abcde"]
    keys = [Key(k) for k in _keys(60)]
    state = ClusterState()
    versions = dict.fromkeys(workers, 0)
    statuses = dict.fromkeys(workers, WorkerStatus.RUNNING)
    for w in workers:
        state.register(w, w, f"inc-{w}", now=0.0)

    def poll(w: WorkerId, add: list[Key], remove: list[Key], pinned: set[Key]) -> None:
        versions[w] += 1
        state.apply_poll(
            w,
            incarnation=f"inc-{w}",
            version=versions[w],
            full=False,
            keys=[KeyReport(k, 100, f"sum-{k}", pinned=k in pinned) for k in add],
            removed=remove,
            memory=Memory(rng.randrange(1000), rng.randrange(1000), 0, rng.randrange(1000), 0),
            status=statuses[w],
            name=w,
            now=float(versions[w]),
        )

    for w in workers:
        poll(w, rng.sample(keys, 30), [], set())
    ledger, policy = Ledger(), ReduceReplicas()
    for cycle in range(15):
        view = state.snapshot(goals={keys[0]: 3, keys[1]: None} if cycle % 5 else {})
        fresh = plan(view, [ReduceReplicas()], ledger, CFG, new_ids(f"f{cycle}."))
        kept = plan(view, [policy], ledger, CFG, new_ids(f"k{cycle}."))
        assert [(d.op, d.key, d.worker) for d in kept.directives] == [
            (d.op, d.key, d.worker) for d in fresh.directives
        ], f"cycle {cycle}"
        assert kept.rejections == fresh.rejections
        sent = list(kept.directives)
        if rng.random() < 0.2:
            sent = sent[: len(sent) // 2]  # the cycle failed part way through sending
        for d in sent:
            ledger.add(d, now=float(cycle))
        # Outcomes: some applied (and polled), some refused or failed, some left in flight.
        for d in sent:
            roll = rng.random()
            if roll < 0.4:
                ledger.settle(Outcome(d.id, OutcomeStatus.APPLIED, inventory_version=10_000))
                poll(d.worker, [], [d.key], set())
            elif roll < 0.55:
                ledger.settle(Outcome(d.id, OutcomeStatus.REFUSED, reason="PINNED"))
            elif roll < 0.6:
                ledger.settle(Outcome(d.id, OutcomeStatus.FAILED))
        ledger.observe(lambda w: versions[w])
        if rng.random() < 0.2:
            ledger.expire(float(cycle) + 100, 1.0)
        # Random polls: new copies, dropped copies, pins, a worker's status.
        for w in rng.sample(workers, 2):
            if rng.random() < 0.3:
                statuses[w] = rng.choice(
                    [WorkerStatus.RUNNING, WorkerStatus.PAUSED, WorkerStatus.CLOSING]
                )
            held = state.held_by(w)
            poll(
                w,
                rng.sample(keys, 3),
                rng.sample(sorted(held), min(2, len(held))),
                set(rng.sample(keys, 2)),
            )
        if rng.random() < 0.1:
            state.missed_poll(rng.choice(workers))
        assert all(d.op is Op.DROP for d in kept.directives)


def test_telling_what_changed_among_many_keys_asked_pauses() -> None:
    """After a cycle that dropped copies of 5,000 keys, the next one checks each of them (their
    drops may not all have reached the ledger) with pauses in between: in one go, checking 100k
    held the AMM's loop for 50 ms."""
    keys = _keys(5_000)
    state = cluster({"a": keys, "b": keys})
    ledger, policy = CountingLedger(), ReduceReplicas()
    _send(ledger, plan(state.snapshot(), [policy], ledger, CFG, new_ids()))
    ledger.asked.clear()
    steps = planning(state.snapshot(), [policy], ledger, CFG, new_ids("e"))
    pauses = 0
    while not isinstance(done := step(steps), Plan):
        pauses += 1
    assert done.directives == ()
    assert ledger.asked == []  # nothing changed: no key is looked at
    assert pauses >= len(keys) // 1_000


def test_the_last_runs_memory_is_let_go_before_the_keys_are_looked_at() -> None:
    """What the last run looked at (after a big cycle, every key it dropped copies of) is read
    only to tell what changed: held through the run, it was alive alongside what the run
    builds, and a big cycle's policy state counted twice in the AMM's peak."""
    keys = _keys(200)
    state = cluster({"a": keys, "b": keys})
    policy = ReduceReplicas()
    references: list[int] = []
    watched: list[object] = []

    class Watching(Ledger):
        def in_flight(self, key: Key) -> InFlight:
            if watched and not references:  # the first key looked at: what changed is known
                references.append(sys.getrefcount(watched[0]))
            return super().in_flight(key)

    ledger = Watching()
    first = plan(state.snapshot(), [policy], ledger, CFG, new_ids())
    _send(ledger, first)
    ledger.settle(Outcome(first.directives[3].id, OutcomeStatus.REFUSED, reason="PINNED"))
    last = policy._looked
    assert last is not None
    watched.append(last)
    held = sys.getrefcount(last)  # ``last``, ``watched``'s, the policy's and the call's own
    again = plan(state.snapshot(), [policy], ledger, CFG, new_ids("e"))
    assert [d.key for d in again.directives] == [first.directives[3].key]
    assert references == [held - 1], "the policy's, and only it, let go of the last run's"


def test_what_a_run_asked_is_remembered_in_a_few_bytes_a_key() -> None:
    """The keys whose drops a run asked for are remembered till the next run (100k after a big
    cycle): as lists by count, 8 bytes a key, not a dict of 37."""
    keys = _keys(10_000)
    state = cluster({"a": keys, "b": keys, "c": keys})
    policy = ReduceReplicas()
    ledger = Ledger()
    _send(ledger, plan(state.snapshot(), [policy], ledger, CFG, new_ids()))
    looked = policy._looked
    assert looked is not None
    remembered = looked.asked
    containers = sys.getsizeof(remembered) + sum(
        sys.getsizeof(value) for value in remembered.values()
    )
    assert sum(map(len, remembered.values())) == len(keys)
    assert containers < 10 * len(keys)
    # Still checked as before: a drop that never reached the ledger is planned again.
    assert plan(state.snapshot(), [policy], Ledger(), CFG, new_ids("e")).directives


def test_neither_the_state_nor_a_snapshot_holds_a_set_of_the_replicated_keys() -> None:
    """They are worked out from the records when read: the state's index of them (4 MiB with
    100k keys) and each snapshot's copy (as much again, for as long as its cycle runs) held
    nothing the records do not say."""
    keys = _keys(2_000)
    state = cluster({"a": keys, "b": keys, "c": keys[:10]})
    view = state.snapshot()
    assert view.replicated == frozenset(keys)
    held = [*gc.get_referents(view), *vars(state).values()]
    big = [o for o in held if isinstance(o, (set, frozenset)) and len(o) >= len(keys)]
    assert big == []
    # ReduceReplicas still finds every key with a copy to drop.
    assert len(plan(view, [ReduceReplicas()], Ledger(), CFG, new_ids()).directives) == 2_010


def test_looking_at_every_key_of_a_converged_cluster_pauses() -> None:
    """A run that looks at every key reads their records in slices, pausing in between, even
    when none has a copy to drop (the AMM's loop is not held for a scan of 100k records)."""
    keys = [f"k{i:05d}" for i in range(20_000)]
    state = cluster({"a": keys[::2], "b": keys[1::2]})
    steps = planning(state.snapshot(), [ReduceReplicas()], Ledger(), CFG, new_ids())
    pauses = 0
    while not isinstance(done := step(steps), Plan):
        pauses += 1
    assert done.directives == ()
    # A pause stands for ``PAUSE_WORK`` units of the planning's ``STEP``.
    assert pauses >= len(keys) // SORT_STEP * PAUSE_WORK // STEP >= 2

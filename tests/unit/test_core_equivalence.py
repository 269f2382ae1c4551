"""A suggestion of ``copies=k`` decides exactly as k suggestions of one copy.

The core picks a key's k drops in one pass (its fast path); ``Expanded`` turns any policy's
``copies=k`` back into k single suggestions. Every plan here runs on a randomized view (zones,
pins, paused, closing, retiring, retired, stale and unreachable workers, memory limits,
conflicts, goals, directives in flight, throttles, the start-up grace, a tight suggestion budget)
both ways, and the two plans must be equal: same directives in the same order, same rejections,
same retirements, same counts. (When the fast path was introduced, the same test compared it with
a frozen copy of the core before it; see the history of this file.)
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from amm_service.decisions import core
from amm_service.decisions.core import InFlightSource, Plan, PlanConfig, plan
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import (
    MEASURES,
    ClusterState,
    ClusterView,
    Key,
    KeyReport,
    Measure,
    Memory,
    WorkerId,
    WorkerStatus,
)
from amm_service.policies.base import PendingView, Policy, PolicyRun, RetireRequest, Suggestion
from amm_service.policies.pause_to_retire import PauseToRetire
from amm_service.policies.rebalance import Rebalance
from amm_service.policies.reduce_replicas import ReduceReplicas
from amm_service.policies.replication import Replicate
from amm_service.policies.retire_worker import RetireWorker
from tests.factories import new_ids
from tests.support.views import joined

STATUSES = (WorkerStatus.RUNNING,) * 6 + (WorkerStatus.PAUSED, WorkerStatus.CLOSING)


def random_state(rng: random.Random) -> tuple[ClusterState, list[Key]]:
    """A cluster of 2-12 workers holding up to 60 keys, with every complication drawn at random."""
    zoned = rng.random() < 0.5
    zones = ["", "a", "b", "c"][: rng.randint(1, 4)] if zoned else [""]
    workers = [WorkerId(f"w{n:02d}") for n in range(rng.randint(2, 12))]
    keys = [Key(f"k{n:03d}") for n in range(rng.randint(1, 60))]
    held: dict[WorkerId, list[KeyReport]] = {w: [] for w in workers}
    for key in keys:
        size = rng.choice([1, 10, 100, 1000])
        nholders = rng.randint(1, len(workers))
        odd = rng.random() < 0.03
        for n, w in enumerate(rng.sample(workers, nholders)):
            checksum = f"other-{key}" if odd and n == 0 else f"sum-{key}"
            held[w].append(KeyReport(key, size, checksum, pinned=rng.random() < 0.15))
    state = ClusterState()
    for n, w in enumerate(workers):
        zone = rng.choice(zones)
        mem = rng.choice([0, 100, 500, 1000, 5000])
        limit = rng.choice([0, 0, 2000, 5000, 20000])
        memory = Memory(mem, rng.choice([mem, mem // 2]), 0, rng.choice([mem, mem * 2]), limit)
        status = rng.choice(STATUSES)
        joined(state, w, n + 1, held[w], incarnation="i", memory=memory, status=status, zone=zone)
        roll = rng.random()
        if roll < 0.08:
            state.set_flags(w, 0.0, retiring=True)
        elif roll < 0.12:
            state.set_flags(w, 0.0, retired=True)
        elif roll < 0.16:
            state.set_flags(w, 0.0, stale=True)
        elif roll < 0.22:
            state.missed_poll(w)
    return state, keys


def random_ledger(rng: random.Random, view: ClusterView, keys: list[Key]) -> Ledger:
    """Directives of earlier cycles still in flight, some already shown by a poll."""
    ledger = Ledger()
    workers = sorted(view.workers)
    for n in range(rng.choice([0, 0, 3, 12])):
        key = rng.choice([*keys, Key("gone")])
        kv = view.keys.get(key)
        op = rng.choice([Op.REPLICATE, Op.DROP])
        worker = rng.choice([*workers, WorkerId("departed")])
        sources = tuple(rng.sample(workers, rng.randint(0, 2)))
        directive = Directive(
            f"old{n}", 1, op, key, worker, kv.size if kv else 7, "sum", sources=sources
        )
        ledger.add(directive, now=0.0)
    return ledger


def random_goals(rng: random.Random, keys: list[Key]) -> dict[Key, int | None]:
    goals: dict[Key, int | None] = {}
    for key in [*rng.sample(keys, rng.randint(0, len(keys) // 3)), Key("nobody-holds")]:
        goals[key] = rng.choice([None, 1, 2, 3, 5, 20])
    return goals


def random_config(rng: random.Random) -> PlanConfig:
    measure: Measure = rng.choice(MEASURES)
    return PlanConfig(
        measure,
        epoch=3,
        max_suggestions=rng.choice([1_000_000, 1_000_000, 1_000_000, rng.randint(1, 40)]),
        allow_drops=rng.random() < 0.9,
        max_incoming=rng.choice([0, 0, 1, 2]),
        max_outgoing=rng.choice([0, 0, 1, 3]),
    )


class Expanded:
    """Runs ``policy`` with each ``copies=k`` suggestion asked as k suggestions of one copy; the
    policy gets the answer the core gives a many-copies suggestion (the last worker chosen, or
    None once one copy is rejected, after which the rest are asked and rejected all the same)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.priority = getattr(policy, "priority", 50)

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        inner = self.policy.run(view, pending, measure)
        try:
            asked = next(inner)
            while True:
                if asked is None or isinstance(asked, RetireRequest) or asked.copies == 1:
                    asked = inner.send((yield asked))
                    continue
                one = asked._replace(copies=1)
                last: WorkerId | None = None
                for n in range(asked.copies):
                    last = yield one
                    if last is None:
                        for _ in range(asked.copies - n - 1):
                            yield one
                        break
                asked = inner.send(last)
        except StopIteration:
            return


def policies(rng: random.Random, expand: bool) -> list[Policy]:
    """The built-in policies (a fresh set: some keep state across cycles), drawn the same way for
    both runs; with ``expand``, each one's many-copies suggestions are asked one copy at a time."""
    every: list[Policy] = [
        PauseToRetire(timeout=0.5),
        Replicate(),
        RetireWorker(),
        ReduceReplicas(),
        Rebalance(),
    ]
    chosen = [p for p in every if rng.random() < 0.6] or every
    return [Expanded(p) for p in chosen] if expand else chosen


def both(seed: int, make: Callable[[random.Random, bool], list[Policy]]) -> tuple[Plan, Plan]:
    """The plans of the core with many-copies suggestions and with single ones, on the view drawn
    from ``seed``."""
    rng = random.Random(seed)
    state, keys = random_state(rng)
    view = state.snapshot(goals=random_goals(rng, keys), now=rng.choice([1.0, 10.0]))
    ledger_seed, config, policy_seed = rng.random(), random_config(rng), rng.random()
    new = plan(
        view,
        make(random.Random(policy_seed), False),
        random_ledger(random.Random(ledger_seed), view, keys),
        config,
        new_ids(),
    )
    old = plan(
        view,
        make(random.Random(policy_seed), True),
        random_ledger(random.Random(ledger_seed), view, keys),
        config,
        new_ids(),
    )
    return new, old


@pytest.mark.parametrize("block", range(8))
def test_builtin_policies_plan_the_same_with_single_suggestions(block: int) -> None:
    drops = 0
    for seed in range(block * 100, block * 100 + 100):
        new, old = both(seed, policies)
        assert new == old, f"seed {seed}"
        drops += sum(d.op is Op.DROP for d in new.directives)
    assert drops > 0


class Scripted:
    """Yields the suggestions drawn from ``seed`` for the view's keys, ``copies`` as drawn."""

    def __init__(self, seed: float) -> None:
        self.name = "Scripted"
        self.seed = seed
        self.answers: list[WorkerId | None] = []

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        rng = random.Random(self.seed)
        workers = sorted(view.workers)
        for key in [*rng.sample(sorted(view.keys), min(len(view.keys), 15)), Key("gone")]:
            op = rng.choice([Op.DROP, Op.DROP, Op.REPLICATE])
            candidates = rng.choice(
                [None, frozenset(rng.sample(workers, rng.randint(0, min(4, len(workers)))))]
            )
            copies = rng.randint(1, 5)
            self.answers.append((yield Suggestion(op, key, candidates, "scripted", copies)))


@pytest.mark.parametrize("block", range(4))
def test_copies_decide_as_that_many_suggestions_of_one(block: int) -> None:
    directives = 0
    for seed in range(block * 100, block * 100 + 100):
        made: list[Scripted] = []

        def scripted(rng: random.Random, expand: bool, made: list[Scripted] = made) -> list[Policy]:
            made.append(Scripted(rng.random()))
            return [Expanded(made[-1])] if expand else [made[-1]]

        new, old = both(seed, scripted)
        assert new == old, f"seed {seed}"
        assert made[0].answers == made[1].answers, f"seed {seed}"
        assert all("stopped after" in e for e in new.policy_errors), new.policy_errors
        directives += len(new.directives)
    assert directives > 0


def test_copies_below_one_is_a_policy_error() -> None:
    class Zero:
        name = "Zero"

        def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
            yield Suggestion(Op.DROP, Key("x"), None, "", 0)

    state, _ = random_state(random.Random(1))
    result = plan(state.snapshot(), [Zero()], Ledger(), PlanConfig("managed", 1), new_ids())
    assert result.directives == ()
    assert result.policy_errors == (
        "policy Zero failed: ValueError: a suggestion's copies must be 1 or more, not 0",
    )


@pytest.mark.parametrize("block", range(4))
def test_directives_name_only_registered_holders_of_the_keys_content(block: int) -> None:
    """The AMM's half of "a drop's keeper must be a registered worker that holds the key" (issue
    9): every DROP names as keepers only other registered workers that hold the key with the
    content it drops, and every REPLICATE fetches only from such holders, on views with every
    complication drawn at random (conflicting content included)."""
    checked = 0
    for seed in range(block * 100, block * 100 + 100):
        rng = random.Random(seed)
        state, keys = random_state(rng)
        view = state.snapshot(goals=random_goals(rng, keys), now=1.0)
        config, policy_seed = random_config(rng), rng.random()
        made = plan(view, policies(random.Random(policy_seed), False), Ledger(), config, new_ids())
        for d in made.directives:
            kv = view.keys[d.key]
            assert not kv.conflicting, f"seed {seed}: {d}"
            assert d.checksum == kv.checksum
            named = d.holders if d.op is Op.DROP else d.sources
            assert named, f"seed {seed}: {d}"
            assert set(named) <= kv.holders & set(view.workers), f"seed {seed}: {d}"
            assert d.worker not in named
            checked += 1
    assert checked > 0


class _RankedByTuples(core._Decider):
    """The decider ranking holders by (rank, memory, address) tuples always, as it did before
    it ranked them by memory and address alone when every worker has one rank."""

    def __init__(self, view: ClusterView, earlier: InFlightSource, config: PlanConfig) -> None:
        super().__init__(view, earlier, config)
        self.one_rank = self.one_drop_rank = False


def one_rank_state(rng: random.Random) -> tuple[ClusterState, list[Key]]:
    """Running workers only (one rank: ``droppers``' sorts without tuples), with memory figures
    drawn from a few so that ties between holders are common."""
    workers = [WorkerId(f"w{n:02d}") for n in range(rng.randint(2, 8))]
    keys = [Key(f"k{n:03d}") for n in range(rng.randint(1, 60))]
    held: dict[WorkerId, list[KeyReport]] = {w: [] for w in workers}
    for key in keys:
        size = rng.choice([1, 10, 100])
        for w in rng.sample(workers, rng.randint(1, len(workers))):
            held[w].append(KeyReport(key, size, f"sum-{key}", pinned=rng.random() < 0.1))
    state = ClusterState()
    for n, w in enumerate(workers):
        mem = rng.choice([0, 100, 100, 1000])
        joined(state, w, n + 1, held[w], incarnation="i", memory=Memory(mem, mem, 0, mem, 0))
    return state, keys


@pytest.mark.parametrize("block", range(4))
def test_holders_ranked_by_memory_alone_as_by_rank_tuples(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every worker of one rank, ``droppers`` sorts holders by memory and address with
    no tuple per holder (each set of holders sorted by address once): the plans are those of
    the tuples' ranking, directive for directive (keepers in order included), on one-rank
    clusters and on the mixed ones of ``random_state``."""
    drops = 0
    for seed in range(block * 100, block * 100 + 100):
        rng = random.Random(seed)
        state, keys = (one_rank_state if seed % 2 else random_state)(rng)
        view = state.snapshot(goals=random_goals(rng, keys), now=1.0)
        config, policy_seed = random_config(rng), rng.random()
        # The sorted sets of holders forgotten now and then too.
        monkeypatch.setattr(core, "MAX_SORTED_POOLS", 4_096 if seed % 3 else 1 + seed % 4)
        fast = plan(view, policies(random.Random(policy_seed), False), Ledger(), config, new_ids())
        with monkeypatch.context() as patch:
            patch.setattr(core, "_Decider", _RankedByTuples)
            slow = plan(
                view, policies(random.Random(policy_seed), False), Ledger(), config, new_ids()
            )
        assert fast == slow, f"seed {seed}"
        drops += sum(len(d.holders) > 1 for d in fast.directives if d.op is Op.DROP)
    assert drops > 0  # keepers ranked, not only the one left

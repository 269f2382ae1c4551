"""ReduceReplicas through the core: what it suggests and what survives."""

from __future__ import annotations

import builtins
import random
from collections.abc import Iterator

import pytest

from amm_service.decisions.core import Plan, PlanConfig, Steps, plan, planning, step
from amm_service.decisions.directive import Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import Key, WorkerId
from amm_service.policies import PolicyError, base, build_all
from amm_service.policies.base import SCAN_STEP, SORT_STEP, sorted_in_steps
from amm_service.policies.reduce_replicas import ReduceReplicas
from tests.factories import cluster, new_ids, view

CFG = PlanConfig(measure="managed", epoch=1)


def test_keeps_one_replica_of_each_key() -> None:
    v = view(
        {"a": ["x", "y", "z"], "b": ["x", "y"], "c": ["x"]},
        memory={"a": 300, "b": 200, "c": 100},
    )
    result = plan(v, [ReduceReplicas()], Ledger(), CFG, new_ids())
    survivors = {
        k: set(v.keys[Key(k)].holders) - {d.worker for d in result.directives if d.key == k}
        for k in ("x", "y", "z")
    }
    assert all(len(s) == 1 for s in survivors.values())
    assert all(d.op is Op.DROP and d.policy == "ReduceReplicas" for d in result.directives)
    assert len(result.directives) == 3


def test_keeps_a_replica_on_every_worker_where_it_is_pinned() -> None:
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]},
        pinned={"a": ["x"], "b": ["x"]},
    )
    result = plan(v, [ReduceReplicas()], Ledger(), CFG, new_ids())
    assert {d.worker for d in result.directives} == {WorkerId("c"), WorkerId("d")}


def test_counts_drops_already_in_flight() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"a": 1, "b": 2, "c": 3})
    ledger = Ledger()
    first = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids())
    ledger.add(first.directives[0], now=0.0)  # only one of the two drops was sent
    second = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids("e"))
    assert len(second.directives) == 1
    assert second.directives[0].worker != first.directives[0].worker


def test_nothing_to_do_on_a_cluster_without_duplicates() -> None:
    v = view({"a": ["x"], "b": ["y"]})
    result = plan(v, [ReduceReplicas()], Ledger(), CFG, new_ids())
    assert result.directives == ()
    assert result.suggestions == 0


def test_registry_builds_builtins_and_names_twins_apart() -> None:
    policies = build_all(
        [
            ("ReduceReplicas", {}),
            ("amm_service.policies.reduce_replicas.ReduceReplicas", {}),
        ]
    )
    assert [p.name for p in policies] == ["ReduceReplicas", "ReduceReplicas#2"]


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        ("NoSuchPolicy", {}, "built-ins: .*ReduceReplicas.*RetireWorker"),
        ("nosuchmodule.Policy", {}, "cannot import policy module 'nosuchmodule'"),
        ("amm_service.policies.reduce_replicas.Nope", {}, "has no class 'Nope'"),
        ("ReduceReplicas", {"bogus": 1}, "invalid arguments for policy 'ReduceReplicas'"),
        ("collections.OrderedDict", {}, "is not a policy"),
    ],
)
def test_registry_refuses_bad_specs_with_a_clear_message(
    path: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_all([(path, kwargs)])


def test_a_scan_with_nothing_to_drop_pauses_every_scan_step_keys() -> None:
    """Every key already has its drop in flight: the policy suggests nothing, yet pauses now
    and then, so that the core lets the event loop run during the scan (it held the loop for
    100-300 ms at 100k keys)."""
    keys = [f"k{i:05d}" for i in range(5 * SCAN_STEP + 5)]
    state = cluster({"a": keys, "b": keys})
    ledger = Ledger()
    first = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids())
    assert len(first.directives) == len(keys)
    for d in first.directives:
        ledger.add(d, now=0.0)
    run = ReduceReplicas().run(state.snapshot(), ledger, "managed")
    assert list(run) == [None] * 5
    steps = planning(state.snapshot(), [ReduceReplicas()], Ledger(), CFG, new_ids("e"))
    flying = planning(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids("f"))
    # Nothing is suggested, so the core never walks the ledger: every step is the scan's.
    assert _steps(flying) >= 1, "no pause while scanning"
    assert _steps(steps) >= 1


def _steps(steps: Steps) -> int:
    n = 0
    while not isinstance(step(steps), Plan):
        n += 1
    return n


def test_sorting_in_steps_pauses_and_sorts_as_sorted_does() -> None:
    keys = [Key(f"k{random.randrange(10**9):09d}") for _ in range(5 * SORT_STEP + 7)]
    run = sorted_in_steps(keys)
    pauses = 0
    while True:
        try:
            assert next(run) is None
            pauses += 1
        except StopIteration as done:
            result = done.value
            break
    assert result == sorted(keys)
    assert pauses >= len(keys) // SORT_STEP
    assert list(sorted_in_steps(keys[:10])) == []  # a few keys: sorted at once, no pause


def test_no_step_of_a_big_sort_handles_more_than_a_few_slices_of_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Merges go in pieces too: the last merge of a 100k-key sort, made whole, held the AMM's
    loop for 23 ms of CPU. Judged by the keys each step hands to ``sorted`` (as many as it
    compares, about), not by time."""
    keys = [Key(f"k{random.randrange(10**9):09d}") for _ in range(50 * SORT_STEP + 7)]
    handled: list[int] = []
    real = builtins.sorted

    def counting(items: list[Key]) -> list[Key]:
        handled[-1] += len(items)
        return real(items)

    monkeypatch.setattr(base, "sorted", counting, raising=False)
    run = sorted_in_steps(keys)
    handled.append(0)
    while True:
        try:
            next(run)
        except StopIteration as done:
            result = done.value
            break
        handled.append(0)
    assert result == real(keys)
    assert max(handled) <= 2 * SORT_STEP, max(handled)


def test_sorting_in_steps_reads_and_filters_its_keys_a_slice_at_a_time() -> None:
    """The keys are read lazily, so that a policy need not make their set whole first: ``(todo |
    others) & replicated`` of 100k keys, made before the sort began, held the AMM's loop for
    23 ms of CPU. No more than a slice is read before the first pause."""
    keys = [Key(f"k{n:09d}") for n in random.sample(range(10**9), 20 * SORT_STEP + 3)]
    within = frozenset(keys[::3])
    read = 0

    def source() -> Iterator[Key]:
        nonlocal read
        for key in keys:
            read += 1
            yield key

    run = sorted_in_steps(source(), within=within)
    assert next(run) is None
    assert read <= SORT_STEP
    rest = list(run)  # every pause, until the sorted keys are returned
    assert rest == [None] * len(rest)
    assert sorted_in_steps_now(keys, within) == sorted(within)
    assert sorted_in_steps_now(keys[:5], within) == sorted(set(keys[:5]) & within)
    assert sorted_in_steps_now([], None) == []
    assert sorted_in_steps_now(keys[: 2 * SORT_STEP], frozenset()) == []


def sorted_in_steps_now(keys: list[Key], within: frozenset[Key] | None) -> list[Key]:
    run = sorted_in_steps(keys, within=within)
    while True:
        try:
            next(run)
        except StopIteration as done:
            result: list[Key] = done.value
            return result


def test_a_big_scan_pauses_while_it_sorts_its_keys() -> None:
    """The keys to look at are sorted in slices, with pauses: sorting 100k keys in one go held
    the AMM's event loop for 25-70 ms."""
    keys = [f"k{i:06d}" for i in range(3 * SORT_STEP)]
    run = ReduceReplicas().run(cluster({"a": keys, "b": keys}).snapshot(), Ledger(), "managed")
    assert next(run) is None, "the first suggestion came before any pause"


def test_planning_steps_are_small() -> None:
    """Each step of planning does a bounded, small amount of work (the event loop runs between
    steps): at most 512 directives released, and a pause at least every 1,000 keys scanned.
    Steps of 2,048 units held the AMM's loop for 30-95 ms of CPU at 100k keys."""
    keys = [f"k{i:05d}" for i in range(10_000)]
    state = cluster({"a": keys, "b": keys})
    ledger = Ledger()
    steps = planning(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids(), stream=True)
    released, nsteps = 0, 0
    while not isinstance(out := step(steps), Plan):
        assert len(out) <= 512
        released += len(out)
        nsteps += 1
    assert released + len(out.directives[released:]) == len(keys)
    for d in out.directives:
        ledger.add(d, now=0.0)
    flying = planning(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids("f"))
    assert _steps(flying) >= len(keys) // 1_000

"""Replicate and ReduceReplicas with replication goals, through the core, on views built here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from amm_service.decisions.core import PlanConfig, plan
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, ClusterView, Goal, Key, WorkerId, WorkerStatus
from amm_service.policies import Policy, build_all
from amm_service.policies.goals import GoalCounter, GoalStatus
from amm_service.policies.reduce_replicas import ReduceReplicas
from amm_service.policies.replication import Replicate
from tests.factories import cluster, new_ids

CFG = PlanConfig(measure="managed", epoch=1)
K, W = Key, WorkerId
BOTH: list[Policy] = [Replicate(), ReduceReplicas()]


def snap(state: ClusterState, goals: Mapping[str, Goal]) -> ClusterView:
    return state.snapshot(goals={K(k): n for k, n in goals.items()}, now=5.0)


def targets(directives: Iterable[Directive]) -> list[tuple[str, str, str]]:
    return [(d.op.value, d.key, d.worker) for d in directives]


def test_copies_are_made_up_to_the_goal_onto_the_least_loaded_workers() -> None:
    state = cluster(
        {"a": ["x"], "b": [], "c": [], "d": []}, memory={"a": 0, "b": 30, "c": 10, "d": 20}
    )
    result = plan(snap(state, {"x": 3}), BOTH, Ledger(), CFG, new_ids())
    assert targets(result.directives) == [("replicate", "x", "c"), ("replicate", "x", "d")]
    assert all(d.policy == "Replicate" for d in result.directives)
    assert result.directives[0].reason == "goal of 3 copies: 1 live of 3"
    assert result.rejections == ()


def test_keys_with_the_fewest_live_copies_go_first() -> None:
    state = cluster({"a": ["x", "y", "z"], "b": ["x", "z"], "c": [], "d": []})
    result = plan(snap(state, {"z": 3, "y": 3, "x": 3}), [Replicate()], Ledger(), CFG, new_ids())
    assert [d.key for d in result.directives] == ["y", "y", "x", "z"]


def test_replications_in_flight_are_not_asked_again() -> None:
    state = cluster({"a": ["x"], "b": [], "c": []})
    ledger = Ledger()
    (first, second) = plan(snap(state, {"x": 3}), [Replicate()], ledger, CFG, new_ids()).directives
    ledger.add(first, now=0.0)  # only one of the two was sent
    again = plan(snap(state, {"x": 3}), [Replicate()], ledger, CFG, new_ids("e"))
    assert [d.worker for d in again.directives] == [second.worker]


def test_a_copy_on_a_worker_that_stopped_answering_is_recreated_from_a_survivor() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": ["x"], "d": []})
    state.missed_poll(W("c"))
    result = plan(snap(state, {"x": 3}), BOTH, Ledger(), CFG, new_ids())
    (d,) = result.directives
    assert (d.op, d.worker) == (Op.REPLICATE, W("d"))
    assert set(d.sources) == {W("a"), W("b")}
    assert result.rejections == ()  # ReduceReplicas does not count c's copy either


def test_at_the_goal_neither_policy_suggests_anything() -> None:
    state = cluster({"a": ["x", "y"], "b": ["x", "y"], "c": ["x", "y"], "d": ["y"]})
    state.missed_poll(W("d"))  # y's fourth copy is unreachable: not live, and not dropped
    result = plan(snap(state, {"x": 3, "y": 3}), BOTH, Ledger(), CFG, new_ids())
    assert result.suggestions == 0


def test_a_goal_of_every_worker_counts_paused_holders_but_copies_only_to_running_ones() -> None:
    state = cluster(
        {"a": ["x"], "b": ["x"], "c": [], "d": []},
        status={"b": WorkerStatus.PAUSED, "d": WorkerStatus.PAUSED},
    )
    result = plan(snap(state, {"x": None}), BOTH, Ledger(), CFG, new_ids())
    assert targets(result.directives) == [("replicate", "x", "c")]
    assert result.rejections == ()


def test_a_goal_beyond_the_cluster_is_capped_and_not_retried_in_vain() -> None:
    state = cluster({"a": ["x"], "b": []})
    result = plan(snap(state, {"x": 5}), BOTH, Ledger(), CFG, new_ids())
    assert targets(result.directives) == [("replicate", "x", "b")]
    assert result.rejections == ()


def test_a_goal_of_two_prefers_a_worker_in_another_zone() -> None:
    state = cluster(
        {"a1": ["x"], "a2": [], "b1": []},
        memory={"a1": 0, "a2": 0, "b1": 500},
        zones={"a1": "a", "a2": "a", "b1": "b"},
    )
    (d,) = plan(snap(state, {"x": 2}), BOTH, Ledger(), CFG, new_ids()).directives
    assert d.worker == W("b1")


def test_keys_nobody_holds_or_with_conflicting_content_are_skipped() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": []}, checksums={("b", "x"): "other"})
    result = plan(snap(state, {"x": 3, "lost": 2}), [Replicate()], Ledger(), CFG, new_ids())
    assert result.suggestions == 0


def test_no_goals_no_suggestions() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": []})
    assert plan(snap(state, {}), [Replicate()], Ledger(), CFG, new_ids()).suggestions == 0


def test_reduce_replicas_keeps_the_goal_target() -> None:
    state = cluster({w: ["x", "y", "z"] for w in "abcd"}, memory={"a": 1, "b": 2, "c": 3, "d": 4})
    goals: dict[str, Goal] = {"x": 2, "y": None}
    result = plan(snap(state, goals), BOTH, Ledger(), CFG, new_ids())
    dropped: dict[str, int] = {}
    for d in result.directives:
        assert d.op is Op.DROP
        dropped[d.key] = dropped.get(d.key, 0) + 1
    assert dropped == {"x": 2, "z": 3}  # x keeps 2, y every copy, z one


def test_reduce_replicas_counts_only_live_copies() -> None:
    """An unreachable holder's copy does not count: dropping a live one instead would be undone
    by Replicate every cycle."""
    state = cluster({"a": ["x"], "b": ["x"], "c": ["x"]})
    state.missed_poll(W("c"))
    assert (
        plan(snap(state, {"x": 2}), [ReduceReplicas()], Ledger(), CFG, new_ids()).suggestions == 0
    )
    (d,) = plan(snap(state, {}), [ReduceReplicas()], Ledger(), CFG, new_ids()).directives
    assert d.worker in {W("a"), W("b")}


def test_copies_on_retiring_workers_are_dropped_once_live_copies_meet_the_goal() -> None:
    state = cluster({"a": ["x", "y"], "b": ["x", "y"], "r": ["x", "y"], "c": []})
    state.set_flags(W("r"), 2.0, retiring=True)
    result = plan(snap(state, {"x": 2, "y": 3}), BOTH, Ledger(), CFG, new_ids())
    # x: two live copies meet its goal, r's goes. y: r's copy stays a source until c has one.
    assert sorted(targets(result.directives)) == [("drop", "x", "r"), ("replicate", "y", "c")]
    without_goals = plan(snap(state, {}), [ReduceReplicas()], Ledger(), CFG, new_ids())
    for key in ("x", "y"):
        dropped = {d.worker for d in without_goals.directives if d.key == key}
        assert len(dropped) == 2
        assert W("r") in dropped  # and one of a, b: one live copy is left


def test_goal_status_counts_live_copies_against_the_capped_target() -> None:
    state = cluster(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": []}, status={"d": WorkerStatus.PAUSED}
    )
    state.missed_poll(W("c"))
    view = state.snapshot()
    counter = GoalCounter(view.workers)
    kv = view.keys[K("x")]
    assert counter.status(K("x"), 5, kv) == GoalStatus(K("x"), 5, 2, 2)
    assert not counter.status(K("x"), 2, kv).below
    assert counter.status(K("x"), None, kv).target == 2  # a and b accept replicas; c, d do not
    lost = counter.status(K("gone"), 2, None)
    assert (lost.target, lost.live, lost.below) == (2, 0, True)


def test_replicate_is_a_builtin_that_runs_before_reduce_replicas() -> None:
    (policy,) = build_all([("Replicate", {})])
    assert policy.name == "Replicate"
    assert getattr(policy, "priority", None) == 10


def test_loading_the_builtins_keeps_the_replicate_helper_importable() -> None:
    """A policy module named like a helper of ``amm_service.policies`` would replace it."""
    build_all([("Replicate", {}), ("ReduceReplicas", {})])
    from amm_service import policies

    assert callable(policies.replicate)
    assert policies.replicate(K("x")).op is Op.REPLICATE

"""RetireWorker and PauseToRetire on views built in memory, planned by the real core."""

from __future__ import annotations

import pytest

from amm_service.decisions.core import Plan, PlanConfig, Why, plan
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, Memory, WorkerId, WorkerStatus
from amm_service.policies import BUILTINS, Policy, build_all
from amm_service.policies.pause_to_retire import PauseToRetire
from amm_service.policies.reduce_replicas import ReduceReplicas
from amm_service.policies.retire_worker import RetireWorker
from tests.factories import cluster, new_ids

CFG = PlanConfig(measure="managed", epoch=3)


def W(w: str) -> WorkerId:
    return WorkerId(w)


def retiring(state: ClusterState, *workers: str, now: float = 2.0) -> ClusterState:
    for w in workers:
        state.set_flags(W(w), now, retiring=True)
    return state


def run(state: ClusterState, *policies: Policy, ledger: Ledger | None = None) -> Plan:
    return plan(state.snapshot(now=10.0), policies, ledger or Ledger(), CFG, new_ids())


def ops(result: Plan) -> set[tuple[str, str, str]]:
    return {(d.op.value, d.key, d.worker) for d in result.directives}


def test_keys_only_on_the_retiring_worker_go_to_the_lowest_memory_worker() -> None:
    state = retiring(
        cluster({"a": ["x", "y"], "b": [], "c": []}, memory={"a": 50, "b": 300, "c": 100}), "a"
    )
    result = run(state, RetireWorker())
    assert ops(result) == {("replicate", "x", "c"), ("replicate", "y", "c")}
    assert all(d.sources == ("a",) for d in result.directives), "a retiring worker still serves"
    assert all(d.policy == "RetireWorker" and "retiring" in d.reason for d in result.directives)


def test_keys_with_a_surviving_copy_are_dropped_from_the_retiring_worker_only() -> None:
    state = retiring(cluster({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"a": 1}), "a")
    assert ops(run(state, RetireWorker(), ReduceReplicas())) == {
        ("drop", "x", "a"),
        ("drop", "x", "c"),
    }


def test_a_copy_in_flight_is_waited_for_and_drops_under_way_are_not_repeated() -> None:
    state = retiring(cluster({"a": ["x", "y"], "b": ["y"], "c": []}), "a")
    ledger = Ledger()
    ledger.add(Directive("d1", 3, Op.REPLICATE, Key("x"), W("c"), 100, "sum-x", (W("a"),)), 0.0)
    ledger.add(Directive("d2", 3, Op.DROP, Key("y"), W("a"), 100, "sum-y", (), (W("b"),)), 0.0)
    result = run(state, RetireWorker(), ledger=ledger)
    assert result.directives == ()
    assert result.rejections == ()


def test_two_retiring_holders_are_not_copies_that_survive() -> None:
    state = retiring(cluster({"a": ["x"], "b": ["x"], "c": []}), "a", "b")
    assert ops(run(state, RetireWorker())) == {("replicate", "x", "c")}


def test_a_pinned_key_is_copied_but_not_dropped() -> None:
    state = retiring(cluster({"a": ["x"], "b": ["x"]}, pinned={"a": ["x"]}), "a")
    result = run(state, RetireWorker())
    assert result.directives == ()
    assert [r.why for r in result.rejections] == [Why.PINNED]


def test_no_room_and_no_recipient_are_rejected_with_their_reason() -> None:
    roomless = retiring(cluster({"a": ["x"], "b": []}, sizes={"x": 1000}, limit={"b": 500}), "a")
    assert [r.why for r in run(roomless, RetireWorker()).rejections] == [Why.NO_ROOM]
    alone = retiring(cluster({"a": ["x"], "b": []}, status={"b": WorkerStatus.PAUSED}), "a")
    assert [r.why for r in run(alone, RetireWorker()).rejections] == [Why.NO_RECIPIENT]


def test_retired_workers_that_hold_keys_again_are_emptied_too() -> None:
    state = cluster({"a": ["x"], "b": []})
    state.set_flags(W("a"), 2.0, retired=True)
    assert ops(run(state, RetireWorker())) == {("replicate", "x", "b")}


def test_workers_not_retiring_are_left_alone() -> None:
    assert run(cluster({"a": ["x"], "b": ["y"]}), RetireWorker()).suggestions == 0


def paused_since(since: float) -> ClusterState:
    """a is paused (its status changed at ``since``), b runs."""
    state = ClusterState()
    for w in ("a", "b"):
        state.register(W(w), w, f"inc-{w}", now=0.0)
        state.apply_poll(
            W(w),
            incarnation=f"inc-{w}",
            version=1,
            full=True,
            keys=(),
            removed=(),
            memory=Memory(),
            status=WorkerStatus.PAUSED if w == "a" else WorkerStatus.RUNNING,
            name=w,
            now=since,
        )
    return state


def test_pause_to_retire_asks_once_the_worker_was_paused_longer_than_the_timeout() -> None:
    policy = PauseToRetire(timeout="5s")
    young = plan(paused_since(6.0).snapshot(now=10.0), [policy], Ledger(), CFG, new_ids())
    assert young.retirements == ()
    old = plan(paused_since(4.0).snapshot(now=10.0), [policy], Ledger(), CFG, new_ids())
    (decision,) = old.retirements
    assert (decision.worker, decision.accepted, decision.close) == ("a", True, True)
    assert decision.reason == "paused for 6.0 s, longer than 5 s"
    assert decision.policy == "PauseToRetire"


def test_pause_to_retire_is_declined_for_the_last_running_worker() -> None:
    state = paused_since(0.0)
    state.unregister(W("b"))
    (decision,) = plan(
        state.snapshot(now=100.0), [PauseToRetire(timeout=1, close=False)], Ledger(), CFG, new_ids()
    ).retirements
    assert not decision.accepted
    assert decision.verdict == "it is the last running worker"
    assert decision.close is False


def test_pause_to_retire_skips_retiring_workers() -> None:
    state = retiring(paused_since(0.0), "a", now=0.0)
    result = plan(state.snapshot(now=100.0), [PauseToRetire(timeout=1)], Ledger(), CFG, new_ids())
    assert result.retirements == ()


@pytest.mark.parametrize("timeout", [0, -1, "soon", float("inf")])
def test_pause_to_retire_rejects_a_bad_timeout(timeout: object) -> None:
    with pytest.raises(ValueError, match=r"timeout|duration"):
        PauseToRetire(timeout=timeout)  # type: ignore[arg-type]


def test_both_are_built_ins_with_their_priorities() -> None:
    retire, pause = build_all(
        [("RetireWorker", {}), ("PauseToRetire", {"timeout": "2m", "close": False})]
    )
    assert {"RetireWorker", "PauseToRetire"} <= set(BUILTINS)
    assert isinstance(pause, PauseToRetire)
    assert (pause.timeout, pause.close) == (120.0, False)
    assert (getattr(retire, "priority", None), pause.priority) == (20, 5)

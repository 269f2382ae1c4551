"""The core's decisions, on real views built by small factories; no network."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from amm_service.decisions.core import Plan, PlanConfig, plan
from amm_service.decisions.directive import Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterView, Key, Measure, WorkerId, WorkerStatus
from amm_service.policies import Policy, PolicyRun, Suggestion, drop, replicate
from amm_service.policies.reduce_replicas import ReduceReplicas
from tests.factories import cluster, new_ids, view

CFG = PlanConfig(measure="optimistic", epoch=7)


class Scripted:
    """A policy that yields fixed suggestions and records what the core answered."""

    def __init__(self, suggestions: Iterable[Suggestion], name: str = "scripted") -> None:
        self.name = name
        self.suggestions = list(suggestions)
        self.answers: list[WorkerId | None] = []

    def run(self, view: ClusterView, pending: object, measure: Measure) -> PolicyRun:
        for suggestion in self.suggestions:
            self.answers.append((yield suggestion))


def run(v: ClusterView, *policies: Policy, ledger: Ledger | None = None) -> Plan:
    return plan(v, policies, ledger or Ledger(), CFG, new_ids())


def K(k: str) -> Key:
    return Key(k)


def W(w: str) -> WorkerId:
    return WorkerId(w)


def test_never_drops_the_last_replica() -> None:
    policy = Scripted([drop(K("x")), drop(K("x"))])
    result = run(view({"a": ["x"], "b": []}), policy)
    assert result.directives == ()
    assert [r.reason for r in result.rejections] == ["last replica", "last replica"]
    assert policy.answers == [None, None]


def test_drops_exactly_the_excess_when_many_drops_are_suggested_at_once() -> None:
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]}, memory={"a": 1, "b": 2, "c": 3, "d": 4}
    )
    result = run(v, Scripted([drop(K("x"))] * 10))
    assert len(result.directives) == 3
    assert {d.worker for d in result.directives} == {W("b"), W("c"), W("d")}
    assert sum(r.reason == "last replica" for r in result.rejections) == 7


def test_drops_from_the_holder_with_the_highest_memory() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"a": 10, "b": 30, "c": 20})
    (directive,) = run(v, Scripted([drop(K("x"))])).directives
    assert directive.worker == W("b")
    assert directive.op is Op.DROP
    assert directive.epoch == 7
    assert set(directive.holders) == {W("a"), W("c")}


def test_memory_estimates_spread_successive_drops() -> None:
    # b is fullest; dropping y from it makes c the fullest for the next drop of z.
    v = view(
        {"a": ["y", "z"], "b": ["y", "z"], "c": ["y", "z"]},
        memory={"a": 0, "b": 1000, "c": 950},
        sizes={"y": 100, "z": 100},
    )
    first, second = run(v, Scripted([drop(K("y")), drop(K("z"))])).directives
    assert (first.worker, second.worker) == (W("b"), W("c"))


def test_candidates_restrict_drops() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"a": 10, "b": 30, "c": 20})
    (directive,) = run(v, Scripted([drop(K("x"), frozenset({W("a"), W("c")}))])).directives
    assert directive.worker == W("c")


def test_empty_candidates_mean_nowhere() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": []})
    result = run(v, Scripted([drop(K("x"), frozenset()), replicate(K("x"), frozenset())]))
    assert result.directives == ()
    assert len(result.rejections) == 2


def test_candidates_not_holding_the_key_cannot_drop_it() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": []})
    result = run(v, Scripted([drop(K("x"), frozenset({W("c")}))]))
    assert result.directives == ()
    assert "no reachable candidate holds the key" in result.rejections[0].reason


def test_pinned_holders_are_kept() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"b": 50}, pinned={"b": ["x"]})
    result = run(v, Scripted([drop(K("x"))] * 3))
    assert W("b") not in {d.worker for d in result.directives}
    assert len(result.directives) == 2


def test_a_key_pinned_everywhere_is_not_dropped() -> None:
    v = view({"a": ["x"], "b": ["x"]}, pinned={"a": ["x"], "b": ["x"]})
    result = run(v, Scripted([drop(K("x"))]))
    assert result.directives == ()
    assert result.rejections[0].reason == "pinned on every candidate"


def test_copies_on_closing_workers_do_not_count_as_surviving_replicas() -> None:
    v = view({"a": ["x"], "b": ["x"]}, memory={"a": 100}, status={"b": WorkerStatus.CLOSING})
    result = run(v, Scripted([drop(K("x")), drop(K("x"))]))
    # a holds the only durable copy: only b's copy may go.
    assert [d.worker for d in result.directives] == [W("b")]


def test_two_cycles_before_the_first_is_applied_still_leave_one_replica() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": ["x"]}, memory={"a": 1, "b": 2, "c": 3})
    ledger = Ledger()
    ids = new_ids()
    first = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, ids)
    for d in first.directives:
        ledger.add(d, now=0.0)
    # Nothing applied yet: the view is unchanged, the drops are in flight.
    second = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, ids)
    assert len(first.directives) == 2
    assert second.directives == ()
    assert {d.worker for d in first.directives} == {W("b"), W("c")}


def test_refused_drops_are_no_longer_in_flight() -> None:
    state = cluster({"a": ["x"], "b": ["x"]}, memory={"a": 1, "b": 2})
    ledger = Ledger()
    (d,) = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids()).directives
    ledger.add(d, now=0.0)
    ledger.settle(Outcome(d.id, OutcomeStatus.REFUSED, "PINNED"))
    again = plan(state.snapshot(), [ReduceReplicas()], ledger, CFG, new_ids("e"))
    assert [x.worker for x in again.directives] == [W("b")]


def test_replicates_onto_the_running_worker_with_lowest_memory() -> None:
    v = view(
        {"a": ["x"], "b": [], "c": [], "d": []},
        memory={"a": 0, "b": 50, "c": 20, "d": 10},
        status={"d": WorkerStatus.PAUSED},
    )
    policy = Scripted([replicate(K("x")), replicate(K("x"))])
    first, second = run(v, policy).directives
    assert (first.worker, second.worker) == (W("c"), W("b"))
    assert first.sources == (W("a"),)
    assert policy.answers == [W("c"), W("b")]


def test_replicate_skips_workers_without_room_under_their_limit() -> None:
    v = view(
        {"a": ["x"], "b": [], "c": []},
        memory={"b": 10, "c": 500},
        sizes={"x": 100},
        limit={"b": 50},
    )
    (d,) = run(v, Scripted([replicate(K("x"))])).directives
    assert d.worker == W("c")


def test_replicate_is_rejected_when_every_worker_holds_the_key() -> None:
    result = run(view({"a": ["x"], "b": ["x"]}), Scripted([replicate(K("x"))]))
    assert result.directives == ()
    assert "no running worker" in result.rejections[0].reason


def test_unknown_keys_are_rejected() -> None:
    result = run(view({"a": []}), Scripted([drop(K("nope")), replicate(K("nope"))]))
    assert [r.reason for r in result.rejections] == ["unknown key", "unknown key"]


def test_a_failing_policy_is_reported_and_others_still_run() -> None:
    class Broken:
        name = "broken"

        def run(self, view: ClusterView, pending: object, measure: Measure) -> PolicyRun:
            yield drop(K("x"))
            raise RuntimeError("boom")

    v = view({"a": ["x"], "b": ["x"], "c": ["x"]})
    result = run(v, Broken(), Scripted([drop(K("x"))]))
    assert len(result.directives) == 2
    assert result.policy_errors == ("policy broken failed: RuntimeError: boom",)


@pytest.mark.parametrize("measure", ["process", "managed", "optimistic"])
def test_every_measure_is_honoured(measure: Measure) -> None:
    state = cluster({"a": ["x"], "b": ["x"]})
    v = state.snapshot()
    result = plan(v, [Scripted([drop(K("x"))])], Ledger(), PlanConfig(measure, 1), new_ids())
    assert len(result.directives) == 1


def test_workers_that_missed_a_poll_are_neither_recipients_sources_nor_durable() -> None:
    state = cluster({"a": ["x"], "b": ["x"], "c": []}, memory={"a": 10, "b": 50, "c": 0})
    state.missed_poll(W("b"))
    v = state.snapshot()
    # b looks fullest, but its copy cannot be counted on, nor can b hear a directive.
    result = run(v, Scripted([drop(K("x"))]))
    assert result.directives == ()
    assert result.rejections[0].reason == "last replica"
    (d,) = run(v, Scripted([replicate(K("x"))])).directives
    assert (d.worker, d.sources) == (W("c"), (W("a"),))
    state.missed_poll(W("c"))
    assert run(state.snapshot(), Scripted([replicate(K("x"))])).rejections[0].reason == (
        "no running worker that lacks the key is left to receive it"
    )


def test_keys_with_conflicting_content_are_left_alone() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": []}, checksums={("b", "x"): "other"})
    assert v.keys[K("x")].conflicting == {W("b")}
    assert K("x") not in v.replicated
    result = run(v, Scripted([drop(K("x")), replicate(K("x"))]))
    assert result.directives == ()
    assert {r.reason for r in result.rejections} == {"conflicting content on b"}


def test_replications_in_flight_count_against_memory_and_limits() -> None:
    state = cluster(
        {"a": ["x", "y"], "b": [], "c": []},
        memory={"a": 0, "b": 0, "c": 50},
        sizes={"x": 100, "y": 100},
        limit={"b": 150},
    )
    ledger = Ledger()
    (first,) = plan(
        state.snapshot(), [Scripted([replicate(K("x"))])], ledger, CFG, new_ids()
    ).directives
    assert first.worker == W("b")
    ledger.add(first, now=0.0)
    # x is still on its way to b: b has no room for y as well, c gets it.
    (second,) = plan(
        state.snapshot(), [Scripted([replicate(K("y"))])], ledger, CFG, new_ids("e")
    ).directives
    assert second.worker == W("c")


def test_planned_drops_do_not_free_room_under_a_limit() -> None:
    v = view(
        {"a": ["x", "y"], "b": ["x"], "c": []},
        memory={"a": 0, "b": 100, "c": 500},
        sizes={"x": 100, "y": 100},
        limit={"b": 150},
    )
    d_drop, d_repl = run(
        v, Scripted([drop(K("x"), frozenset({W("b")})), replicate(K("y"))])
    ).directives
    assert (d_drop.worker, d_repl.worker) == (W("b"), W("c"))


def test_reduce_replicas_plans_the_same_whatever_the_hash_seed() -> None:
    import subprocess
    import sys

    script = (
        "from tests.factories import view, new_ids\n"
        "from amm_service.decisions.core import plan, PlanConfig\n"
        "from amm_service.decisions.pending import Ledger\n"
        "from amm_service.policies.reduce_replicas import ReduceReplicas\n"
        "v = view({'a': list('abcdef'), 'b': list('abcdef')}, memory={'a': 5, 'b': 5})\n"
        "r = plan(v, [ReduceReplicas()], Ledger(), PlanConfig('managed', 1), new_ids())\n"
        "print([(d.key, d.worker) for d in r.directives])\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(5)
    }
    assert len(outputs) == 1


class _Looking:
    """A policy that suggests nothing and keeps what the core hands it as ``pending``."""

    name = "looking"

    def __init__(self) -> None:
        self.pending: object = None

    def run(self, view: ClusterView, pending: object, measure: Measure) -> PolicyRun:
        self.pending = pending
        return
        yield


def test_a_cycles_picks_of_the_same_workers_are_one_tuple() -> None:
    """The drops a cycle picks are kept per key until it ends: a big cycle's 100k keys each
    had a tuple of their own (6 MiB of the AMM's peak), for a few distinct sets of workers."""
    holdings = {w: [f"k{i}" for i in range(6)] for w in ("a", "b", "c")}
    looking = _Looking()
    out = run(view(holdings), ReduceReplicas(), looking)
    assert len(out.directives) == 12
    picked = looking.pending._dropping  # type: ignore[attr-defined]
    assert len(picked) == 6
    assert len({id(workers) for workers in picked.values()}) == len(set(picked.values()))

"""Rebalance through the core, on views built in memory: who sends, who receives, which keys
move, and a move's life over cycles (replicate, then drop)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from amm_service.config import DEFAULT_POLICIES
from amm_service.decisions.core import Plan, PlanConfig, plan
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterView, Key, WorkerId, WorkerStatus
from amm_service.policies import BUILTINS, Policy, PolicyError, build_all, priority_of
from amm_service.policies.rebalance import Rebalance
from amm_service.policies.reduce_replicas import ReduceReplicas
from tests.factories import cluster, new_ids, view
from tests.support.simulate import Simulation

CFG = PlanConfig(measure="managed", epoch=1)


def run(v: ClusterView, *policies: Policy, ledger: Ledger | None = None) -> Plan:
    return plan(v, policies, ledger or Ledger(), CFG, new_ids())


def keys(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def received(result: Plan) -> dict[str, list[str]]:
    """The keys each worker is to receive."""
    out: dict[str, list[str]] = {}
    for d in result.directives:
        if d.op is Op.REPLICATE:
            out.setdefault(d.worker, []).append(d.key)
    return out


def moved_bytes(result: Plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in result.directives:
        if d.op is Op.REPLICATE:
            out[d.worker] = out.get(d.worker, 0) + d.size
    return out


# -- configuration -----------------------------------------------------------------------------


def test_defaults_are_dasks_and_it_runs_after_the_other_policies() -> None:
    policy = Rebalance()
    assert (policy.sender_min, policy.recipient_max, policy.sender_recipient_gap) == (
        0.30,
        0.60,
        0.10,
    )
    assert policy.name == "Rebalance"
    assert priority_of(policy) == 90 > priority_of(ReduceReplicas())


def test_is_a_builtin_but_not_on_by_default() -> None:
    (policy,) = build_all([("Rebalance", {"sender_min": 0.5, "sender_recipient_gap": 0})])
    assert isinstance(policy, Rebalance)
    assert (policy.sender_min, policy.sender_recipient_gap) == (0.5, 0.0)
    assert BUILTINS["Rebalance"] == "amm_service.policies.rebalance.Rebalance"
    assert all("Rebalance" not in spec.class_path for spec in DEFAULT_POLICIES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sender_min": -0.1}, "sender_min must be between 0 and 1"),
        ({"recipient_max": 1.5}, "recipient_max must be between 0 and 1"),
        ({"sender_recipient_gap": "10%"}, "sender_recipient_gap must be a number"),
        ({"sender_min": True}, "sender_min must be a number"),
        ({"name": 3}, "name must be a string"),
    ],
)
def test_bad_kwargs_stop_the_amm_with_a_clear_message(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(PolicyError, match="invalid configuration for policy 'Rebalance'") as err:
        build_all([("Rebalance", kwargs)])
    assert message in str(err.value)


def test_unknown_kwargs_are_refused() -> None:
    with pytest.raises(PolicyError, match="invalid arguments for policy 'Rebalance'"):
        build_all([("Rebalance", {"sender-min": 0.3})])


# -- senders and recipients --------------------------------------------------------------------


def test_moves_keys_from_the_fullest_worker_to_the_emptiest_ones() -> None:
    # mean 333, half gap 100: a gives down to 400, b and c each take up to the mean.
    v = view(
        {"a": keys("k", 10), "b": [], "c": []},
        memory={"a": 1000},
        limit={"a": 2000, "b": 2000, "c": 2000},
    )
    result = run(v, Rebalance())
    assert all(d.op is Op.REPLICATE and d.policy == "Rebalance" for d in result.directives)
    assert all(d.sources == (WorkerId("a"),) for d in result.directives)
    assert all(d.reason.startswith("rebalance: a at ") for d in result.directives)
    assert moved_bytes(result) == {"b": 300, "c": 300}
    assert result.rejections == ()


def test_the_largest_key_that_keeps_the_pair_on_its_sides_of_the_mean_moves_first() -> None:
    # mean 500. 500 would swap the pair's places (0 + 500 is not below 1000 - 500); 300 fits,
    # then 100 brings a within half the gap (100) of the mean; the last 100 stays.
    sizes = {"big": 500, "mid": 300, "s1": 100, "s2": 100}
    v = view(
        {"a": list(sizes), "b": []},
        memory={"a": 1000},
        sizes=sizes,
        limit={"a": 2000, "b": 2000},
    )
    result = run(v, Rebalance())
    assert [d.key for d in result.directives] == ["mid", "s1"]


def test_nothing_moves_when_the_fullest_worker_is_below_sender_min() -> None:
    # mean 625, half gap 500: a is far enough above it, but under 30% of its limit.
    v = view(
        {"a": keys("k", 25), "b": [], "c": [], "d": []},
        memory={"a": 2500},
        limit=dict.fromkeys("abcd", 10_000),
    )
    assert run(v, Rebalance()).directives == ()
    assert received(run(v, Rebalance(sender_min=0.25))) != {}


def test_workers_at_recipient_max_receive_nothing() -> None:
    # mean 8000: b is far below it, but already at 60% of its limit.
    v = view(
        {"a": keys("k", 10), "b": keys("j", 6), "c": keys("i", 10)},
        memory={"a": 10_000, "b": 6000, "c": 8000},
        sizes={**dict.fromkeys(keys("k", 10), 1000), **dict.fromkeys(keys("i", 10), 800)},
        limit=dict.fromkeys("abc", 10_000),
    )
    assert run(v, Rebalance()).directives == ()
    assert set(received(run(v, Rebalance(recipient_max=0.7)))) == {"b"}


def test_a_worker_within_half_the_gap_above_the_mean_sends_nothing() -> None:
    # mean 5000; a is 300 above it: within half the gap (500) by default, beyond 250.
    v = view(
        {"a": keys("k", 53), "b": keys("j", 47)},
        memory={"a": 5300, "b": 4700},
        limit={"a": 10_000, "b": 10_000},
    )
    assert run(v, Rebalance()).directives == ()
    assert received(run(v, Rebalance(sender_recipient_gap=0.05))) == {"b": ["k0"]}


def test_retiring_and_unreachable_workers_take_no_part_and_paused_ones_only_send() -> None:
    state = cluster(
        {"a": keys("k", 10), "p": keys("j", 10), "r": [], "u": [], "e": []},
        memory={"a": 1000, "p": 1000},
        status={"p": WorkerStatus.PAUSED},
        limit=dict.fromkeys("aprue", 2000),
    )
    state.set_flags(WorkerId("r"), 1.0, retiring=True)
    state.missed_poll(WorkerId("u"))
    result = run(state.snapshot(), Rebalance())
    # mean over a, p and e only (667): e takes from both senders, nobody else receives.
    assert set(received(result)) == {"e"}
    assert {d.sources for d in result.directives} == {(WorkerId("a"),), (WorkerId("p"),)}


# -- the rule for workers without a memory limit -----------------------------------------------


def test_a_worker_without_a_limit_is_measured_against_the_largest_limit() -> None:
    # a has no limit: against 10_000, 2500 is under sender_min (3000); 3000 is not.
    def cluster_view(a: int) -> ClusterView:
        return view(
            {"a": keys("k", a // 100), "b": [], "c": []},
            memory={"a": a},
            limit={"b": 10_000, "c": 4000},
        )

    assert run(cluster_view(2500), Rebalance()).directives == ()
    assert run(cluster_view(3000), Rebalance()).directives != ()


def test_without_any_limit_the_thresholds_are_fractions_of_the_cluster_total() -> None:
    # Total 1000, mean 200: a, b and c are 80 above the mean, beyond half the gap (50), but
    # each holds less than 30% of the total.
    even = view(
        {"a": keys("a", 28), "b": keys("b", 28), "c": keys("c", 28), "d": keys("d", 8), "e": []},
        memory={"a": 280, "b": 280, "c": 280, "d": 80, "e": 80},
        sizes=dict.fromkeys(keys("a", 28) + keys("b", 28) + keys("c", 28) + keys("d", 8), 10),
    )
    assert run(even, Rebalance()).directives == ()
    # One worker with 60% of the total is a sender (mean 333, half the gap 50): it gives down
    # to 380, the others take up to the mean.
    skewed = view(
        {"a": keys("k", 60), "b": keys("j", 20), "c": keys("i", 20)},
        memory={"a": 600, "b": 200, "c": 200},
        sizes=dict.fromkeys(keys("k", 60) + keys("j", 20) + keys("i", 20), 10),
    )
    assert moved_bytes(run(skewed, Rebalance())) == {"b": 110, "c": 110}


# -- which keys ---------------------------------------------------------------------------------


def test_never_onto_a_worker_that_holds_the_key_nor_a_pinned_or_conflicting_key() -> None:
    sizes = {"held": 100, "pinned": 300, "odd": 300, "ok": 100}
    v = view(
        {"a": list(sizes), "b": ["held"], "c": ["odd"]},
        memory={"a": 800, "b": 100, "c": 300},
        sizes=sizes,
        pinned={"a": ["pinned"]},
        checksums={("c", "odd"): "other"},
        limit=dict.fromkeys("abc", 2000),
    )
    result = run(v, Rebalance())
    # held goes to c (b has it); pinned and odd stay; ok follows to b.
    assert [(d.key, d.worker) for d in result.directives] == [("held", "c"), ("ok", "b")]


def test_never_onto_a_worker_already_receiving_the_key() -> None:
    v = view(
        {"a": ["x", "y"], "b": [], "c": []},
        memory={"a": 800},
        sizes={"x": 200, "y": 200},
        limit=dict.fromkeys("abc", 2000),
    )
    ledger = Ledger()
    ledger.add(
        Directive("e1", 1, Op.REPLICATE, Key("x"), WorkerId("b"), 200, "sum-x", (WorkerId("a"),)),
        now=0.0,
    )
    # b is the emptiest but already receiving x: x goes to c, and y to b.
    result = run(v, Rebalance(), ledger=ledger)
    assert [(d.key, d.worker) for d in result.directives] == [("x", "c"), ("y", "b")]


def test_a_key_spread_over_zones_is_not_moved_into_a_zone_that_already_has_it() -> None:
    state = cluster(
        {"a": ["x"], "b": ["x"], "c": [], "d": []},
        memory={"a": 1000, "b": 500},
        sizes={"x": 200},
        limit=dict.fromkeys("abcd", 2000),
    )
    for w, zone in {"a": "z1", "b": "z2", "c": "z2", "d": "z3"}.items():
        state.register(WorkerId(w), w, f"inc-{w}", now=0.0, zone=zone)
    result = run(state.snapshot(), Rebalance())
    assert [(d.key, d.worker) for d in result.directives] == [("x", "d")]


def test_a_zone_s_only_copy_is_not_moved_to_a_worker_without_a_zone() -> None:
    """The core drops a copy on a worker without a zone before a zone's only copy: moving the
    key from a zoned sender to an unzoned recipient would have ReduceReplicas drop the new copy,
    and Rebalance move it again, every cycle. Such a key stays; a recipient in a zone takes it."""
    holdings = {"a": keys("k", 4), "b": [], "c": []}
    zones = {"a": "z1", "b": "", "c": ""}
    sim = Simulation(holdings, [ReduceReplicas(), Rebalance()], sizes=100, limits=1000, zones=zones)
    sim.run(max_cycles=20)
    assert sim.replications == []
    zones["c"] = "z2"
    sim = Simulation(holdings, [ReduceReplicas(), Rebalance()], sizes=100, limits=1000, zones=zones)
    sim.run(max_cycles=20)
    assert [(d.key, d.worker) for d in sim.replications] == [("k0", "c")]
    assert sim.moved_back == []
    assert sim.memories() == {"a": 300, "b": 0, "c": 100}


def test_a_copy_on_a_silent_or_leaving_worker_does_not_keep_its_zone_for_a_move() -> None:
    """As for the core, only durable copies count for zones: a's copy is z1's only durable one,
    so moving it to c (no zone) would have the new copy dropped, and the move made again."""
    for flags in ({"stale": True}, {"retiring": True}):
        state = cluster(
            {"a": ["x"], "b": ["x"], "c": []},
            memory={"a": 1000, "b": 0},
            sizes={"x": 200},
            limit=dict.fromkeys("abc", 2000),
            zones={"a": "z1", "b": "z1"},
        )
        state.set_flags(WorkerId("b"), 2.0, **flags)
        assert run(state.snapshot(), Rebalance()).directives == (), flags


# -- a move over cycles --------------------------------------------------------------------------


def two_workers(*policies: Policy, n: int = 10, **kwargs: object) -> Simulation:
    return Simulation(
        {"a": keys("k", n), "b": []},
        policies,
        sizes=100,
        limits=1000,
        **kwargs,  # type: ignore[arg-type]
    )


def ops(result: Plan) -> list[tuple[Op, str, str, str]]:
    return [(d.op, d.key, d.worker, d.policy) for d in result.directives]


def test_a_move_replicates_first_and_drops_the_sender_copy_once_the_view_shows_it() -> None:
    policy = Rebalance()
    # mean 200, half the gap 50: one key moves (a second would leave the pair even)
    sim = two_workers(policy, n=4)
    first = sim.step()
    assert ops(first) == [(Op.REPLICATE, "k0", "b", "Rebalance")]
    assert set(policy.moves) == {Key("k0")}
    second = sim.step()
    assert ops(second) == [(Op.DROP, "k0", "a", "Rebalance")]
    assert second.directives[0].reason == "rebalance: b holds the moved copy"
    third = sim.step()
    assert third.directives == ()
    assert policy.moves == {}
    assert sim.memories() == {"a": 300, "b": 100}


def test_moves_in_flight_count_so_a_slow_transfer_is_not_planned_twice() -> None:
    sim = two_workers(Rebalance(), delay=3)
    first = sim.step()
    assert len(first.directives) == 4  # mean 500: a gives 400 (500 would leave the pair even)
    for _ in range(3):
        assert sim.step().directives == ()  # in flight, not landed: nothing new
    assert [d.op for d in sim.step().directives] == [Op.DROP] * 4


def test_when_reduce_replicas_drops_the_sender_copy_first_it_is_not_dropped_twice() -> None:
    policy = Rebalance()
    sim = two_workers(ReduceReplicas(), policy, n=4)
    sim.step()
    second = sim.step()
    assert ops(second) == [(Op.DROP, "k0", "a", "ReduceReplicas")]
    assert sim.step().directives == ()
    assert policy.moves == {}


def test_a_failed_replica_is_forgotten() -> None:
    policy = Rebalance()
    sim = two_workers(policy, n=4)
    sim.step()
    sim.status[WorkerId("b")] = WorkerStatus.PAUSED  # refuses the replica, then takes no part
    again = sim.step()
    assert [why for _, why in sim.landed[-1].refused] == ["not running"]
    assert again.directives == ()
    assert policy.moves == {}


def test_the_drop_waits_while_the_sender_copy_is_pinned() -> None:
    policy = Rebalance()
    sim = two_workers(policy, n=4)
    sim.step()
    sim.pinned[WorkerId("a")] = {Key("k0")}
    for _ in range(2):
        result = sim.step()
        assert result.directives == ()
        assert [r.reason for r in result.rejections] == ["pinned on every candidate"]
    sim.pinned.clear()
    assert ops(sim.step()) == [(Op.DROP, "k0", "a", "Rebalance")]


def test_the_sender_copy_is_kept_when_another_copy_went_meanwhile() -> None:
    # x is held by a and c; a's copy moves to b. Once b holds it, c loses its copy: dropping
    # a's copy now would leave one copy where there were two. The move is abandoned (a is
    # still a sender and moves x again, to c, the emptiest).
    policy = Rebalance()
    sim = Simulation(
        {"a": ["x", *keys("k", 9)], "b": [], "c": ["x"]},
        [policy],
        sizes={"x": 500, **dict.fromkeys(keys("k", 9), 100)},
        limits=3000,
    )
    first = sim.step()
    assert (Op.REPLICATE, "x", "b", "Rebalance") in ops(first)
    sim.held[WorkerId("c")].discard(Key("x"))
    second = sim.step()
    assert (Op.DROP, "x", "a", "Rebalance") not in ops(second)
    sim.run()
    assert sim.fewest_copies[Key("x")] == 2
    assert sim.copies()[Key("x")] == 2


def test_moves_are_forgotten_when_their_key_vanishes() -> None:
    policy = Rebalance()
    sim = two_workers(policy, n=4)
    sim.step()
    for w in sim.held.values():
        w.discard(Key("k0"))
    sim.step()
    assert Key("k0") not in policy.moves


def directives_of(sim: Simulation, op: Op) -> Iterable[Directive]:
    return (d for d in sim.directives if d.op is op)


def test_throttled_moves_resume_in_later_cycles_and_end_at_the_same_place() -> None:
    free = two_workers(ReduceReplicas(), Rebalance())
    free.run()
    throttled = two_workers(
        ReduceReplicas(), Rebalance(), config=PlanConfig("managed", 1, max_incoming=1)
    )
    throttled.run()
    assert throttled.memories() == free.memories() == {"a": 600, "b": 400}
    assert len(list(directives_of(throttled, Op.REPLICATE))) == 4

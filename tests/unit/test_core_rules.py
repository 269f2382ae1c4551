"""The core's rules for zones, retiring workers, transfer limits, the start-up grace, retire
requests and policy priority, on real views built by small factories; no network."""

from __future__ import annotations

from collections.abc import Iterable

from amm_service.decisions.core import (
    STEP,
    Plan,
    PlanConfig,
    RetireDecision,
    Why,
    plan,
    planning,
    step,
)
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterView, Key, Measure, WorkerId, WorkerStatus
from amm_service.policies import PolicyRun, RetireRequest, Suggestion, drop, replicate
from amm_service.policies.base import PendingView
from tests.factories import cluster, new_ids, view

CFG = PlanConfig(measure="optimistic", epoch=7)


class Scripted:
    """A policy that yields fixed suggestions (or retire requests) and records the answers."""

    def __init__(
        self,
        suggestions: Iterable[Suggestion | RetireRequest],
        name: str = "scripted",
        priority: int | None = None,
    ) -> None:
        self.name = name
        self.suggestions = list(suggestions)
        self.answers: list[WorkerId | None] = []
        if priority is not None:
            self.priority = priority

    def run(self, view: ClusterView, pending: object, measure: Measure) -> PolicyRun:
        for suggestion in self.suggestions:
            self.answers.append((yield suggestion))


def run(
    v: ClusterView, *policies: Scripted, cfg: PlanConfig = CFG, ledger: Ledger | None = None
) -> Plan:
    return plan(v, policies, ledger if ledger is not None else Ledger(), cfg, new_ids())


def K(k: str) -> Key:
    return Key(k)


def W(w: str) -> WorkerId:
    return WorkerId(w)


# -- readers on paused workers (Dask's ping-pong rule) -------------------------------------------


def test_the_only_running_holder_keeps_its_copy_while_the_readers_workers_are_paused() -> None:
    """x is pinned on a paused worker and also held by a running one: the pinned copy cannot
    go, and dropping the running copy would leave the key only where no replica can be made
    from. Dask keeps both (``_find_dropper``); before, amm dropped the running copy."""
    v = view(
        {"a": ["x"], "b": ["x"]},
        status={"a": WorkerStatus.PAUSED},
        pinned={"a": ["x"]},
    )
    result = run(v, Scripted([drop(K("x"))]))
    assert result.directives == ()
    (rejected,) = result.rejections
    assert rejected.why is Why.PINNED
    assert rejected.reason.startswith("kept on b, the only running candidate")
    # A running reader's copy leaves nothing to fear: the other copy goes.
    v = view({"a": ["x"], "b": ["x"]}, pinned={"a": ["x"]})
    (d,) = run(v, Scripted([drop(K("x"))])).directives
    assert (d.op, d.worker) == (Op.DROP, W("b"))
    # Two unpinned copies besides the paused reader's: one of them may go.
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"]},
        status={"a": WorkerStatus.PAUSED},
        pinned={"a": ["x"]},
        memory={"b": 10, "c": 20},
    )
    (d,) = run(v, Scripted([drop(K("x"))])).directives
    assert d.worker == W("c")


# -- zones -------------------------------------------------------------------------------------


def test_a_replica_goes_to_a_zone_without_a_copy_before_a_less_loaded_worker() -> None:
    v = view(
        {"a": ["x"], "b": [], "c": []},
        memory={"a": 0, "b": 0, "c": 500},
        zones={"a": "z1", "b": "z1", "c": "z2"},
    )
    first, second = run(v, Scripted([replicate(K("x")), replicate(K("x"))])).directives
    # c is fuller but z2 has no copy; once both zones have one, memory decides again.
    assert (first.worker, second.worker) == (W("c"), W("b"))
    assert first.sources == (W("a"),)


def test_drops_keep_a_copy_in_every_zone() -> None:
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"]},
        memory={"a": 10, "b": 20, "c": 90},
        zones={"a": "z1", "b": "z1", "c": "z2"},
    )
    first, *_ = run(v, Scripted([drop(K("x"))])).directives
    # c is the fullest, but it holds z2's only copy: z1 has one to spare.
    assert first.worker == W("b")
    assert set(first.holders) == {W("a"), W("c")}


def test_a_copy_on_a_leaving_or_silent_worker_does_not_cover_its_zone() -> None:
    """A copy on a retiring or stale worker is about to go: the replica that replaces it goes
    to that zone, not next to the surviving copy's."""
    for flags in ({"retiring": True}, {"stale": True}):
        state = cluster(
            {"a": ["x"], "b": ["x"], "c": [], "d": []},
            memory={"a": 0, "b": 0, "c": 0, "d": 500},
            zones={"a": "z1", "b": "z2", "c": "z1", "d": "z2"},
        )
        state.set_flags(W("b"), 2.0, **flags)
        (first,) = run(state.snapshot(), Scripted([replicate(K("x"))])).directives
        assert first.worker == W("d"), flags


# -- retiring and paused workers -----------------------------------------------------------------


def test_retiring_holders_are_dropped_first_then_paused_then_the_fullest() -> None:
    state = cluster(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]},
        memory={"a": 1, "b": 2, "c": 50, "d": 60},
        status={"b": WorkerStatus.PAUSED},
    )
    state.set_flags(W("a"), 0.0, retiring=True)
    result = run(state.snapshot(), Scripted([drop(K("x"))] * 4))
    assert [d.worker for d in result.directives] == [W("a"), W("b"), W("d")]
    assert [r.why for r in result.rejections] == [Why.LAST_REPLICA]


def test_a_retiring_holder_serves_as_a_source_but_is_no_surviving_replica() -> None:
    state = cluster({"a": ["x", "y"], "b": ["x"], "c": []}, memory={"a": 0, "b": 100, "c": 50})
    state.set_flags(W("a"), 0.0, retiring=True)
    v = state.snapshot()
    # b holds the only durable copy of x: only a's copy may go, though b is fuller.
    result = run(v, Scripted([drop(K("x")), drop(K("x"))]))
    assert [d.worker for d in result.directives] == [W("a")]
    assert [r.why for r in result.rejections] == [Why.LAST_REPLICA]
    # y lives only on a: it is copied from a, never onto it, and a's copy cannot be dropped.
    result = run(v, Scripted([replicate(K("y")), drop(K("y"))]))
    (d,) = result.directives
    assert (d.op, d.worker, d.sources) == (Op.REPLICATE, W("c"), (W("a"),))
    assert [r.why for r in result.rejections] == [Why.LAST_REPLICA]


# -- transfer limits -------------------------------------------------------------------------------


def test_incoming_transfers_are_capped_per_worker() -> None:
    v = view({"a": ["x", "y", "z"], "b": []})
    cfg = PlanConfig("optimistic", 7, max_incoming=2)
    result = run(v, Scripted([replicate(K(k)) for k in "xyz"]), cfg=cfg)
    assert [d.key for d in result.directives] == ["x", "y"]
    (rejection,) = result.rejections
    assert (rejection.key, rejection.why) == ("z", Why.THROTTLED)
    assert "2 incoming transfers" in rejection.reason


def test_outgoing_transfers_are_capped_per_source() -> None:
    v = view({"a": ["x", "y"], "b": [], "c": []})
    cfg = PlanConfig("optimistic", 7, max_outgoing=1)
    result = run(v, Scripted([replicate(K("x")), replicate(K("y"))]), cfg=cfg)
    assert [d.key for d in result.directives] == ["x"]
    (rejection,) = result.rejections
    assert (rejection.key, rejection.why) == ("y", Why.THROTTLED)
    assert "1 outgoing transfers" in rejection.reason


def test_transfers_in_flight_from_earlier_cycles_hold_their_slots_until_settled() -> None:
    state = cluster({"a": ["x", "y"], "b": []})
    ledger = Ledger()
    ids = new_ids()
    for cfg in (
        PlanConfig("optimistic", 7, max_incoming=1),
        PlanConfig("optimistic", 7, max_outgoing=1),
    ):

        def cycle(key: str, cfg: PlanConfig = cfg) -> Plan:
            return plan(state.snapshot(), [Scripted([replicate(K(key))])], ledger, cfg, ids)

        (first,) = cycle("x").directives
        ledger.add(first, now=0.0)
        # Next cycle, x is still on its way: b has no incoming slot, or a no outgoing one, for y.
        later = cycle("y")
        assert later.directives == ()
        assert [r.why for r in later.rejections] == [Why.THROTTLED]
        # Nor is x asked for twice.
        assert [r.why for r in cycle("x").rejections] == [Why.NO_RECIPIENT]
        # Once the transfer is settled its slot is free again.
        ledger.settle(Outcome(first.id, OutcomeStatus.FAILED))
        (freed,) = cycle("y").directives
        assert freed.worker == W("b")


def test_no_limits_when_they_are_zero() -> None:
    v = view({"a": [f"k{i}" for i in range(30)], "b": []})
    cfg = PlanConfig("optimistic", 7, max_incoming=0, max_outgoing=0)
    result = run(v, Scripted([replicate(K(f"k{i}")) for i in range(30)]), cfg=cfg)
    assert len(result.directives) == 30


# -- start-up grace ------------------------------------------------------------------------------


def test_no_drop_during_the_startup_grace_but_replicas_are_still_made() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": []})
    cfg = PlanConfig("optimistic", 7, allow_drops=False)
    policy = Scripted([drop(K("x")), replicate(K("x"))])
    result = run(v, policy, cfg=cfg)
    (d,) = result.directives
    assert (d.op, d.worker) == (Op.REPLICATE, W("c"))
    (rejection,) = result.rejections
    assert (rejection.op, rejection.why) == (Op.DROP, Why.GRACE)
    assert "start-up grace" in rejection.reason
    assert policy.answers == [None, W("c")]


# -- retire requests -----------------------------------------------------------------------------


def test_an_accepted_retirement_takes_the_worker_out_of_placement_at_once() -> None:
    v = view({"a": ["x"], "b": [], "c": []}, memory={"a": 0, "b": 0, "c": 50})
    policy = Scripted([RetireRequest(W("b"), "idle"), replicate(K("x"))])
    result = run(v, policy)
    assert result.retirements == (
        RetireDecision("scripted", W("b"), "idle", True, "accepted", True),
    )
    # b has the least memory, but it is on its way out.
    assert policy.answers == [W("b"), W("c")]


def test_retiring_the_last_running_worker_is_declined() -> None:
    policy = Scripted([RetireRequest(W("a"), "idle"), RetireRequest(W("b"), "idle")])
    result = run(view({"a": ["x"], "b": []}), policy)
    assert [(r.worker, r.accepted) for r in result.retirements] == [(W("a"), True), (W("b"), False)]
    assert result.retirements[1].verdict == "it is the last running worker"
    assert policy.answers == [W("a"), None]


def test_retiring_is_declined_when_the_others_have_no_room_for_its_data() -> None:
    holdings = {"a": ["x"], "b": []}
    tight = view(holdings, sizes={"x": 100}, limit={"b": 50})
    (decision,) = run(tight, Scripted([RetireRequest(W("a"), "idle")])).retirements
    assert not decision.accepted
    assert "no room" in decision.verdict
    # Without a limit on b, or when b holds a copy already, there is room.
    roomy = view(holdings, sizes={"x": 100})
    assert run(roomy, Scripted([RetireRequest(W("a"), "idle")])).retirements[0].accepted
    shared = view({"a": ["x"], "b": ["x"]}, sizes={"x": 100}, limit={"b": 50}, memory={"b": 50})
    assert run(shared, Scripted([RetireRequest(W("a"), "idle")])).retirements[0].accepted


def test_unknown_unreachable_or_already_retiring_workers_are_not_retired() -> None:
    state = cluster({"a": [], "b": [], "c": [], "d": []})
    state.set_flags(W("b"), 0.0, retiring=True)
    state.missed_poll(W("c"))
    requests = [RetireRequest(W(w), "idle") for w in ("nope", "b", "c")]
    verdicts = [r.verdict for r in run(state.snapshot(), Scripted(requests)).retirements]
    assert verdicts == [
        "unknown worker",
        "already retiring or retired",
        "the worker does not answer polls",
    ]


# -- priority and provenance ---------------------------------------------------------------------


def test_policies_run_in_priority_order_so_repairs_take_the_throttled_slots() -> None:
    v = view({"a": ["x", "y", "z"], "b": []})
    cfg = PlanConfig("optimistic", 7, max_incoming=1)
    balance = Scripted([replicate(K("x"))], name="balance", priority=90)
    tidy = Scripted([replicate(K("z"))], name="tidy")  # no attribute: 50
    repair = Scripted([replicate(K("y"))], name="repair", priority=10)
    result = run(v, balance, tidy, repair, cfg=cfg)
    (d,) = result.directives
    assert (d.key, d.policy) == ("y", "repair")
    assert [(r.policy, r.why) for r in result.rejections] == [
        ("tidy", Why.THROTTLED),
        ("balance", Why.THROTTLED),
    ]


def test_directives_carry_the_policy_and_its_reason() -> None:
    v = view({"a": ["x"], "b": ["x"], "c": []})
    result = run(
        v,
        Scripted([replicate(K("x"), reason="below goal"), drop(K("x"), reason="excess")], name="p"),
    )
    assert [(d.op, d.policy, d.reason) for d in result.directives] == [
        (Op.REPLICATE, "p", "below goal"),
        (Op.DROP, "p", "excess"),
    ]


# -- keepers -----------------------------------------------------------------------------------


def test_the_drops_of_a_key_in_one_cycle_name_only_the_holders_kept() -> None:
    """Siblings told to drop a key in the same cycle must not be asked to keep it: each drop
    names the same keepers, the holders left once all of them are done."""
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]},
        memory={"a": 40, "b": 30, "c": 20, "d": 10},
    )
    directives = run(v, Scripted([drop(K("x"), copies=3)])).directives
    assert [d.worker for d in directives] == [W("a"), W("b"), W("c")]
    assert {d.holders for d in directives} == {(W("d"),)}


def test_drops_of_one_key_by_several_suggestions_name_the_final_keepers() -> None:
    v = view(
        {"a": ["x"], "b": ["x"], "c": ["x"], "d": ["x"]},
        memory={"a": 40, "b": 30, "c": 20, "d": 10},
    )
    first = Scripted([drop(K("x"))], name="first", priority=1)
    second = Scripted([drop(K("x"), copies=2)], name="second", priority=2)
    directives = run(v, first, second).directives
    assert [d.worker for d in directives] == [W("a"), W("b"), W("c")]
    assert {d.holders for d in directives} == {(W("d"),)}
    for d in directives:
        assert d.worker not in d.holders


def test_a_streamed_plan_releases_its_directives_as_it_goes_and_in_order() -> None:
    holdings = {w: [f"k{i:05d}" for i in range(STEP)] for w in "abc"}
    v = view(holdings)
    steps = planning(
        v,
        [Scripted([drop(K(f"k{i:05d}"), copies=2) for i in range(STEP)])],
        Ledger(),
        CFG,
        new_ids(),
        stream=True,
    )
    released: list[tuple[int, int]] = []
    streamed: list[Directive] = []
    while not isinstance(out := step(steps), Plan):
        if out:
            released.append((len(streamed), len(out)))
        streamed.extend(out)
    assert released, "directives were released before the plan was done"
    assert len(out.directives) == 2 * STEP
    assert streamed == list(out.directives[: len(streamed)])
    whole = run(v, Scripted([drop(K(f"k{i:05d}"), copies=2) for i in range(STEP)]))
    assert whole.directives == out.directives


def test_a_streamed_plan_can_let_go_of_what_it_released() -> None:
    """Without ``keep_streamed`` the plan holds only what it did not yield: a big cycle's
    directives are not all alive at once (the AMM sent the others as they came)."""
    holdings = {w: [f"k{i:05d}" for i in range(STEP)] for w in "abc"}
    v = view(holdings)
    suggestions = [drop(K(f"k{i:05d}"), copies=2) for i in range(STEP)]
    steps = planning(v, [Scripted(suggestions)], Ledger(), CFG, new_ids(), stream=True)
    lean = planning(
        v, [Scripted(list(suggestions))], Ledger(), CFG, new_ids(), stream=True, keep_streamed=False
    )
    streamed: list[Directive] = []
    while not isinstance(out := step(lean), Plan):
        streamed.extend(out)
    assert streamed, "directives were released before the plan was done"
    assert len(out.directives) == 2 * STEP - len(streamed)
    while not isinstance(whole := step(steps), Plan):
        pass
    assert [*streamed, *out.directives] == list(whole.directives)


class AskThenDrop:
    """Asks what is in flight for ``x`` (as ReduceReplicas does right before it suggests), then
    suggests dropping it, STEP copies at once: the core yields before it answers."""

    name = "ask-then-drop"

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        pending.in_flight(K("x"))
        yield drop(K("x"), copies=STEP)


def test_a_drop_entering_the_ledger_while_the_plan_yields_counts_for_the_next_answer() -> None:
    """The core remembers the last in-flight answer for the key the policy just asked about;
    what enters the ledger while the plan has yielded (a directive made between cycles) must
    still count when the core answers, or it would drop the last replica."""
    v = view({"a": ["x"], "b": ["x"]})
    ledger = Ledger()
    steps = planning(v, [AskThenDrop()], ledger, CFG, new_ids())
    assert step(steps) == ()  # yielded with the suggestion not answered yet
    ledger.add(Directive("e7.z.1", 7, Op.DROP, K("x"), W("b"), 1, "c", (), (W("a"),)), 0.0)
    while not isinstance(out := step(steps), Plan):
        pass
    assert out.directives == ()
    assert {r.why for r in out.rejections} == {Why.LAST_REPLICA}

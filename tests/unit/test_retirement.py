"""Retirement bookkeeping: when a retirement is over or abandoned, which workers are cheapest to
retire, and what survives a restart. Real cluster states, a real in-memory state store."""

from __future__ import annotations

import asyncio

import pytest

from amm_service.decisions.core import Plan, Rejection, RetireDecision, Why
from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.events import EventLog
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId, WorkerStatus
from amm_service.errors import Unavailable
from amm_service.policies import Policy
from amm_service.policies.pause_to_retire import PauseToRetire
from amm_service.policies.retire_worker import RetireWorker
from amm_service.runtime.records.state import MEMORY, StateStore
from amm_service.runtime.workers.retirement import (
    Result,
    Retirement,
    Retirements,
    Verdict,
    cheapest,
    review,
    unique,
)
from tests.factories import cluster


def W(w: str) -> WorkerId:
    return WorkerId(w)


def under_way(worker: str, deadline: float | None = None) -> Retirement:
    return Retirement(W(worker), False, 0.0, deadline, "test")


def rejection(key: str, why: Why, policy: str = "RetireWorker") -> Rejection:
    return Rejection(policy, Op.REPLICATE, Key(key), f"because {why.value}", why)


def drop_directive(key: str, worker: str) -> Directive:
    return Directive(f"drop-{key}-{worker}", 1, Op.DROP, Key(key), W(worker), 100, "sum")


def judge(state: ClusterState, *retirements: Retirement, **kwargs: object) -> list[Verdict]:
    for r in retirements:
        state.set_flags(r.worker, 0.0, retiring=True)
    args: dict[str, object] = {"busy": (), "retirers": {"RetireWorker"}, "now": 10.0, **kwargs}
    rejections = args.pop("rejections", ())
    return review(retirements, state.snapshot(), rejections, **args)  # type: ignore[arg-type]


def test_a_worker_that_holds_nothing_and_has_nothing_in_flight_is_retired() -> None:
    state = cluster({"a": [], "b": ["x"]})
    assert judge(state, under_way("a")) == [
        Verdict(W("a"), True, "holds nothing that exists nowhere else")
    ]
    assert judge(state, under_way("a"), busy={W("a")}) == []
    assert judge(state, under_way("b")) == []


def test_a_worker_whose_inventory_is_unknown_is_not_judged_empty() -> None:
    """An AMM restarted mid-retirement knows a silent worker only by name: holding nothing in
    the view is not holding nothing. Nor is a worker that missed its last poll judged on an
    inventory it may have changed since."""
    state = cluster({"b": ["x"]})
    state.register(W("a"), "a", "", now=0.0)  # restored from the state file, never polled
    state.missed_poll(W("a"))
    assert judge(state, under_way("a")) == []
    state.register(W("c"), "c", "inc-c", now=0.0)  # registered after the cycle's poll
    assert judge(state, under_way("c")) == []
    state = cluster({"a": [], "b": ["x"]})
    state.missed_poll(W("a"))
    assert judge(state, under_way("a")) == []


def test_no_recipient_no_room_or_a_conflict_abandons_but_throttling_does_not() -> None:
    state = cluster({"a": ["x"], "b": []})
    for why in (Why.NO_RECIPIENT, Why.NO_ROOM, Why.CONFLICT):
        (verdict,) = judge(state, under_way("a"), rejections=[rejection("x", why)])
        assert not verdict.retired
        assert verdict.reason == f"cannot move 'x' elsewhere: because {why.value}"
    assert judge(state, under_way("a"), rejections=[rejection("x", Why.THROTTLED)]) == []
    other_policy = rejection("x", Why.NO_ROOM, policy="Replicate")
    assert judge(state, under_way("a"), rejections=[other_policy]) == []


def test_a_key_only_retiring_workers_hold_keeps_one_of_them_and_lets_the_others_go() -> None:
    """Every worker retiring at once: nowhere to move a shared key. One holder keeps it (its
    retirement is abandoned) and the others may go on, as Dask retires one of them; before, both
    holders of the key were abandoned in the same cycle and neither ever retired."""
    state = cluster({"a": ["x", "shared"], "b": ["shared"], "c": ["shared", "y"]})
    retiring = [under_way(w) for w in "abc"]
    no_recipient = [rejection(k, Why.NO_RECIPIENT) for k in ("x", "shared", "shared", "y")]
    verdicts = judge(state, *retiring, rejections=no_recipient)
    # a and c must stay for x and y; shared stays on one of them, so b goes on retiring.
    assert [(v.worker, v.retired) for v in verdicts] == [(W("a"), False), (W("c"), False)]
    state = cluster({"a": ["shared"], "b": ["shared"]})
    (verdict,) = judge(state, under_way("a"), under_way("b"), rejections=no_recipient[1:3])
    assert (verdict.worker, verdict.retired) == (W("b"), False)
    assert verdict.reason.startswith("cannot move 'shared' elsewhere")
    # Conflicting content is not one key kept: every holder of it stays.
    state = cluster({"a": ["z"], "b": ["z"]}, checksums={("b", "z"): "other"})
    conflict = [rejection("z", Why.CONFLICT)] * 2
    verdicts = judge(state, under_way("a"), under_way("b"), rejections=conflict)
    assert [v.worker for v in verdicts] == [W("a"), W("b")]


def test_a_leaving_worker_is_done_once_every_key_it_holds_has_a_copy_that_stays() -> None:
    """A worker whose agent is shutting down (DrainWorker) need not be emptied: its copies go
    with it. Only a copy on a durable worker, with the same content and not being dropped,
    counts."""
    leaving = Retirement(W("a"), False, 0.0, None, "draining", leaving=True)
    state = cluster({"a": ["x", "y"], "b": ["x"], "c": ["y"]})
    assert judge(state, leaving) == [
        Verdict(W("a"), True, "every key it holds has a copy on a worker that stays")
    ]
    assert judge(state, under_way("a")) == [], "an ordinary retirement waits for the drops"
    ledger = Ledger()
    ledger.add(drop_directive("y", "c"), 0.0, 1)
    assert judge(state, leaving, pending=ledger) == []
    state = cluster({"a": ["x", "y"], "b": ["x"], "c": ["y"]})
    state.set_flags(W("c"), 0.0, retiring=True)
    assert judge(state, leaving) == []
    state = cluster({"a": ["x"], "b": ["x"]}, checksums={("b", "x"): "other"})
    assert judge(state, leaving) == []
    state = cluster({"a": ["x"], "b": ["x"]})
    state.missed_poll(W("a"))  # what it holds now is not known
    assert judge(state, leaving) == []
    assert unique(cluster({"a": ["x", "y"], "b": ["x"]}).snapshot(), W("a")) == [Key("y")]


def test_the_deadline_abandons_and_a_worker_gone_is_abandoned() -> None:
    state = cluster({"a": ["x", "y"], "b": []})
    assert judge(state, under_way("a", deadline=11.0)) == []
    assert judge(state, under_way("a", deadline=10.0)) == [
        Verdict(W("a"), False, "timeout: still holds 2 key(s)")
    ]
    assert judge(state, under_way("zz")) == [Verdict(W("zz"), False, "the worker left")]


def test_cheapest_prefers_idle_workers_holding_the_fewest_bytes() -> None:
    state = cluster(
        {"h:1": ["p"], "h:2": ["big"], "h:10": ["s"], "h:3": [], "h:4": []},
        pinned={"h:1": ["p"]},
        sizes={"big": 5000, "s": 10, "p": 1},
        memory={"h:1": 1, "h:2": 5000, "h:10": 10, "h:3": 0, "h:4": 0},
        status={"h:4": WorkerStatus.CLOSING},
    )
    assert cheapest(state, 1) == [W("h:3")]
    assert cheapest(state, 3) == [W("h:3"), W("h:10"), W("h:2")]
    assert cheapest(state, 10) == [W("h:3"), W("h:10"), W("h:2"), W("h:1")]
    state.set_flags(W("h:3"), 1.0, retiring=True)
    assert cheapest(state, 1) == [W("h:10")]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bookkeeping(
    state: ClusterState, store: StateStore, clock: Clock
) -> tuple[Retirements, EventLog]:
    events = EventLog(clock=clock)
    policies: list[Policy] = [RetireWorker(), PauseToRetire(timeout=1)]
    return Retirements(state, store, events, policies, clock=clock), events


async def test_a_retirement_is_flagged_persisted_and_resumed_after_a_restart() -> None:
    clock = Clock()
    with StateStore(MEMORY) as store:
        state = cluster({"a": ["x"], "b": []})
        retirements, events = bookkeeping(state, store, clock)
        assert retirements.retirers == {"RetireWorker"}
        retirements.begin(W("a"), close=True, timeout=30.0, reason="asked for by a client")
        assert state.worker(W("a")).retiring  # type: ignore[union-attr]
        assert [e.kind for e in events.recent()] == ["retire-started"]

        # A new AMM on the same store: the flag comes back once the worker is registered.
        fresh = ClusterState()
        again, _ = bookkeeping(fresh, store, clock)
        again.load()
        assert set(again.active) == {W("a")}
        assert again.active[W("a")].deadline == 130.0
        fresh.register(W("a"), "a", "inc", now=0.0)
        again.apply_flags()
        assert fresh.worker(W("a")).retiring  # type: ignore[union-attr]
        # A caller asking for it again waits for the resumed retirement.
        again.begin(W("a"), close=False, timeout=None, reason="again")
        waiter = asyncio.ensure_future(again.wait([W("a")]))
        again.conclude(W("a"), retired=True, reason="done", closed=True)
        assert (await waiter)[0].closed


async def test_waiters_get_each_result_and_a_retired_worker_stays_retired() -> None:
    clock = Clock()
    with StateStore(MEMORY) as store:
        state = cluster({"a": [], "b": ["x"], "c": []})
        retirements, events = bookkeeping(state, store, clock)
        retirements.begin(W("a"), close=False, timeout=None, reason="r")
        retirements.begin(W("b"), close=False, timeout=None, reason="r")
        waiter = asyncio.ensure_future(retirements.wait([W("a"), W("b")]))
        await asyncio.sleep(0)
        assert retirements.waiting
        clock.now += 2.5
        retirements.conclude(W("a"), retired=True, reason="holds nothing")
        await asyncio.sleep(0)
        assert not waiter.done()
        retirements.conclude(W("b"), retired=False, reason="no room")
        assert await waiter == [
            Result(W("a"), True, "retired after 2.5 s: holds nothing"),
            Result(W("b"), False, "no room"),
        ]
        assert not retirements.waiting
        a, b = state.worker(W("a")), state.worker(W("b"))
        assert a is not None
        assert b is not None
        assert (a.retired, a.retiring, a.effective_status) == (True, False, WorkerStatus.RETIRED)
        assert (b.retiring, b.effective_status) == (False, WorkerStatus.RUNNING)
        assert [e.kind for e in events.recent()][:2] == ["retire-abandoned", "retired"]
        assert retirements.result_now(W("a")) == Result(W("a"), True, "already retired")
        assert [(r.worker, r.retired) for r in store.retirements()] == [("a", True)]
        retirements.left(W("a"))
        assert store.retirements() == []


async def test_a_worker_that_leaves_abandons_its_retirement() -> None:
    with StateStore(MEMORY) as store:
        state = cluster({"a": ["x"], "b": []})
        retirements, _ = bookkeeping(state, store, Clock())
        retirements.begin(W("a"), close=True, timeout=None, reason="r")
        waiter = asyncio.ensure_future(retirements.wait([W("a")]))
        retirements.left(W("a"))
        (result,) = await waiter
        assert (result.retired, result.reason) == (False, "the worker left before it was emptied")
        assert store.retirements() == []


async def test_a_caller_that_goes_away_leaves_the_retirement_going_on() -> None:
    with StateStore(MEMORY) as store:
        state = cluster({"a": ["x"], "b": []})
        retirements, _ = bookkeeping(state, store, Clock())
        retirements.begin(W("a"), close=False, timeout=None, reason="r")
        waiter = asyncio.ensure_future(retirements.wait([W("a")]))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not retirements.waiting
        assert set(retirements.active) == {W("a")}
        second = asyncio.ensure_future(retirements.wait([W("a")]))
        await asyncio.sleep(0)
        retirements.close()
        with pytest.raises(Unavailable, match="resumes the retirement"):
            await second


async def test_policy_decisions_are_recorded_and_the_same_refusal_only_once() -> None:
    with StateStore(MEMORY) as store:
        state = cluster({"a": ["x"], "b": [], "c": []})
        retirements, events = bookkeeping(state, store, Clock())

        def declined(verdict: str) -> RetireDecision:
            return RetireDecision("PauseToRetire", W("a"), "paused", False, verdict)

        retirements.decided([declined("no room (100 bytes, room 5)")])
        retirements.decided([declined("no room (120 bytes, room 4)")])
        retirements.decided([declined("it is the last running worker")])
        retirements.decided([])  # a resumed: asked again later, it is recorded again
        retirements.decided([declined("it is the last running worker")])
        kinds = [e.kind for e in events.recent()]
        assert kinds == ["pause-to-retire-declined"] * 3
        accepted = RetireDecision("PauseToRetire", W("c"), "paused", True, "accepted", False)
        retirements.decided([accepted])
        assert [e.kind for e in events.recent()][:2] == ["retire-started", "pause-to-retire"]
        assert set(retirements.active) == {W("c")}
        assert not retirements.active[W("c")].close
        other = RetireDecision("Custom", W("b"), "why", False, "no")
        retirements.decided([other])
        assert events.recent()[0].kind == "retire-requested-declined"


async def test_a_refusal_is_recorded_again_once_a_cycle_passed_without_the_request() -> None:
    """Each cycle's requests reach the bookkeeping, none at all included: a worker that resumed
    and is paused too long again is a new decision, recorded again."""
    with StateStore(MEMORY) as store:
        state = cluster({"a": ["x"], "b": []})
        retirements, events = bookkeeping(state, store, Clock())
        declined = RetireDecision("PauseToRetire", W("a"), "paused", False, "no room")

        async def cycle(*decisions: RetireDecision) -> None:
            async def close(worker: WorkerId) -> str | None:
                raise AssertionError("nothing to close")

            async def remove(worker: WorkerId) -> None:
                raise AssertionError("nothing to remove")

            plan = Plan((), (), len(decisions), retirements=decisions)
            await retirements.supervise(
                state.snapshot(), plan, busy=set, close=close, remove=remove
            )

        await cycle(declined)
        await cycle(declined)
        await cycle()  # it resumed: nothing asked
        await cycle(declined)
        assert [e.kind for e in events.recent()] == ["pause-to-retire-declined"] * 2


@pytest.mark.parametrize("answer", [None, "DEADLINE_EXCEEDED: no answer in time"])
async def test_an_agent_that_unregisters_before_its_close_is_answered_was_retired(
    answer: str | None,
) -> None:
    """An agent asked to close stops and unregisters at once: the AMM may handle that
    UnregisterWorker before the answer to its Close, or get no answer at all. The worker left
    holding nothing, so its retirement ended retired (closed when it said so), not abandoned."""
    with StateStore(MEMORY) as store:
        state = cluster({"a": [], "b": ["x"]})
        retirements, events = bookkeeping(state, store, Clock())
        retirements.begin(W("a"), close=True, timeout=None, reason="r")
        waiter = asyncio.ensure_future(retirements.wait([W("a")]))
        removed: list[WorkerId] = []

        async def close(worker: WorkerId) -> str | None:
            state.unregister(worker)  # its UnregisterWorker, handled first
            retirements.left(worker)
            return answer

        async def remove(worker: WorkerId) -> None:
            removed.append(worker)

        plan = Plan((), (), 0)
        await retirements.supervise(state.snapshot(), plan, busy=set, close=close, remove=remove)
        (result,) = await waiter
        assert (result.retired, result.closed) == (True, answer is None), result.reason
        assert events.recent()[0].kind == "retired"
        assert store.retirements() == []
        assert retirements.result_now(W("a")) is None
        assert removed == ([W("a")] if answer is None else [])

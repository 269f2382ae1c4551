"""Liveness verdicts, lost keys and the start-up grace, on real cluster states; no network."""

from __future__ import annotations

from amm_service.decisions.grace import StartupGrace
from amm_service.decisions.liveness import Liveness, Verdict, lost_after_removal
from amm_service.decisions.view import ClusterState, Key, Memory, WorkerId, WorkerStatus
from tests.factories import cluster


def W(w: str) -> WorkerId:
    return WorkerId(w)


def answer(state: ClusterState, worker: str) -> None:
    """``worker`` answers a poll (keeping what it held)."""
    ws = state.worker(W(worker))
    assert ws is not None
    state.apply_poll(
        W(worker),
        incarnation=ws.incarnation,
        version=ws.version,
        full=False,
        keys=(),
        removed=(),
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name=worker,
        now=0.0,
    )


def test_silence_is_counted_from_the_first_missed_poll_seen() -> None:
    state = cluster({"a": [], "b": []})
    live = Liveness(stale_after=3.0, dead_after=10.0)
    assert live.judge(state.workers, now=100.0) == Verdict()
    state.missed_poll(W("b"))
    # However long ago b last answered, its silence starts when it is first seen missing.
    assert live.judge(state.workers, now=200.0) == Verdict()
    assert live.judge(state.workers, now=202.9) == Verdict()
    assert live.judge(state.workers, now=203.0) == Verdict(stale=(W("b"),))
    assert live.silent_for(W("b"), 204.0) == 4.0
    assert live.silent_for(W("a"), 204.0) == 0.0


def test_a_stale_worker_is_flagged_once_then_declared_dead() -> None:
    state = cluster({"a": [], "b": []})
    live = Liveness(stale_after=3.0, dead_after=10.0)
    state.missed_poll(W("b"))
    live.observe(state.workers, now=0.0)
    assert live.judge(state.workers, now=5.0).stale == (W("b"),)
    state.set_flags(W("b"), 5.0, stale=True)
    assert live.judge(state.workers, now=9.0) == Verdict()
    assert live.judge(state.workers, now=12.5) == Verdict(dead=((W("b"), 12.5),))


def test_a_worker_that_answers_again_starts_afresh() -> None:
    state = cluster({"a": [], "b": []})
    live = Liveness(stale_after=3.0, dead_after=10.0)
    state.missed_poll(W("b"))
    live.observe(state.workers, now=0.0)
    state.set_flags(W("b"), 4.0, stale=True)
    answer(state, "b")
    ws = state.worker(W("b"))
    assert ws is not None
    assert not ws.stale
    assert live.judge(state.workers, now=9.0) == Verdict()
    state.missed_poll(W("b"))
    assert live.judge(state.workers, now=20.0) == Verdict()
    assert live.judge(state.workers, now=23.0).stale == (W("b"),)


def test_forgotten_and_unregistered_workers_are_not_tracked() -> None:
    state = cluster({"a": [], "b": []})
    live = Liveness(stale_after=1.0, dead_after=2.0)
    state.missed_poll(W("a"))
    state.missed_poll(W("b"))
    live.observe(state.workers, now=0.0)
    live.forget(W("a"))
    state.unregister(W("b"))
    assert live.silent_for(W("a"), 5.0) == 0.0
    # a (re-registered, say) still misses polls: its clock starts again; b is gone.
    assert live.judge(state.workers, now=5.0) == Verdict()
    assert live.judge(state.workers, now=7.0) == Verdict(dead=((W("a"), 2.0),))


def test_the_keys_a_removed_worker_held_alone_are_lost() -> None:
    state = cluster({"a": ["x", "shared"], "b": ["shared"]})
    held = state.held_by(W("a"))
    state.unregister(W("a"))
    assert lost_after_removal(held, state.keys) == [Key("x")]


def test_the_grace_ends_when_every_known_worker_has_reported() -> None:
    state = cluster({"a": []})  # a has answered a poll
    state.register(W("b"), "b", "", now=0.0)  # restored, not heard from yet
    grace = StartupGrace([W("a"), W("b")], until=30.0)
    assert grace.active
    assert grace.update(state.workers, now=1.0) is None
    assert grace.waiting == {W("b")}
    answer(state, "b")
    ended = grace.update(state.workers, now=2.0)
    assert ended is not None
    assert "every worker" in ended
    assert not grace.active
    assert grace.update(state.workers, now=3.0) is None


def test_the_grace_ends_after_its_period_naming_the_silent_workers() -> None:
    state = ClusterState()
    for w in ("a", "b"):
        state.register(W(w), w, "", now=0.0)
    grace = StartupGrace([W("a"), W("b")], until=30.0)
    assert grace.update(state.workers, now=29.9) is None
    ended = grace.update(state.workers, now=30.0)
    assert ended is not None
    assert "2 known worker(s) never reported: a, b" in ended
    assert not grace.active
    assert grace.waiting == frozenset()


def test_a_known_worker_that_left_is_not_waited_for() -> None:
    state = ClusterState()
    state.register(W("a"), "a", "", now=0.0)
    grace = StartupGrace([W("a")], until=30.0)
    state.unregister(W("a"))
    assert grace.update(state.workers, now=1.0) is not None
    assert not grace.active


def test_no_grace_without_known_workers() -> None:
    assert not StartupGrace([], until=30.0).active

"""The notes of keys agents are storing for a Put: when they end, and what a removal takes."""

from __future__ import annotations

from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus
from amm_service.runtime.storing import Storing

W = WorkerId("127.0.0.1:7001")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def polled(state: ClusterState, keys: list[str], now: float, incarnation: str = "i1") -> None:
    state.apply_poll(
        W,
        incarnation=incarnation,
        version=1,
        full=True,
        keys=[KeyReport(Key(k), 1, "c") for k in keys],
        removed=(),
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name="w",
        now=now,
    )


def test_a_note_ends_when_a_poll_lists_the_key_or_after_the_put_window() -> None:
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock, window=60.0)
    assert storing.note(state, W, "i1", ["listed", "failed"]) == 2
    polled(state, ["listed"], now=clock.now + 1)
    storing.polled(state)
    assert len(storing) == 1  # "failed" may still be arriving: a Put can take the window
    polled(state, ["listed"], now=clock.now + 59)
    storing.polled(state)
    assert len(storing) == 1
    polled(state, ["listed"], now=clock.now + 61)  # answered after the window: the Put failed
    storing.polled(state)
    assert len(storing) == 0
    assert storing.take(W) == frozenset()


def test_a_removal_or_a_new_process_takes_the_notes_of_the_one_that_asked() -> None:
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock)
    assert storing.note(state, W, "i2", ["other"]) == 0  # not the registered process
    assert storing.note(state, WorkerId("127.0.0.1:1"), "i1", ["nobody"]) == 0
    storing.note(state, W, "i1", ["a", "b"])
    assert storing.take(W, incarnation="i0") == frozenset()
    assert storing.take(W, other_than="i1") == frozenset()  # still that process
    assert storing.take(W, other_than="i2") == {"a", "b"}
    assert len(storing) == 0
    state.register(W, "w", "i2", now=clock.now)
    storing.note(state, W, "i2", ["c"])
    assert storing.take(W) == {"c"}

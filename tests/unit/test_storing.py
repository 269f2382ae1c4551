"""The notes of keys agents are storing for a Put: when they end, and what a removal takes."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus
from amm_service.runtime.loop import pacing
from amm_service.runtime.records import storing as storing_module
from amm_service.runtime.records.storing import POLLED_STEP, Storing

W = WorkerId("127.0.0.1:7001")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def polled(
    state: ClusterState, keys: list[str], now: float, incarnation: str = "i1", worker: WorkerId = W
) -> None:
    state.apply_poll(
        worker,
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


def _noting(keys: list[str]) -> tuple[Clock, ClusterState, Storing]:
    """A worker registered and the notes of a Put of ``keys`` to it."""
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock)
    storing.note(state, W, "i1", keys)
    return clock, state, storing


def test_a_note_ends_when_a_poll_lists_the_key_or_after_the_put_window() -> None:
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock, window=60.0)
    assert storing.note(state, W, "i1", ["listed", "failed"]) == 2
    polled(state, ["listed"], now=clock.now + 1)
    asyncio.run(storing.polled(state))
    assert len(storing) == 1  # "failed" may still be arriving: a Put can take the window
    polled(state, ["listed"], now=clock.now + 59)
    asyncio.run(storing.polled(state))
    assert len(storing) == 1
    polled(state, ["listed"], now=clock.now + 61)  # answered after the window: the Put failed
    asyncio.run(storing.polled(state))
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


def test_ending_many_notes_lets_the_event_loop_in_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first poll round after a Put of 100k keys ended that many notes in one step of the
    AMM's loop (80-100 ms of CPU): other tasks now run between slices of ``POLLED_STEP``."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every slice
    keys = [f"k{i}" for i in range(5 * POLLED_STEP)]
    clock, state, storing = _noting(keys)
    polled(state, keys[: len(keys) // 2], now=clock.now + 1)

    async def main() -> int:
        ticks = 0
        done = asyncio.Event()

        async def tick() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        await storing.polled(state)
        done.set()
        await ticker
        return ticks - before

    assert asyncio.run(main()) >= 4
    assert len(storing) == len(keys) // 2  # the unlisted half may still be arriving


def test_ending_many_notes_leaves_the_garbage_collector_alone() -> None:
    """Judging 100k notes makes no object per note that the cyclic garbage collector tracks: a
    (key, time) pair each made it run a hundred times, which held the AMM's loop for 20 ms of
    CPU at the first poll round after a 100k-key Put (each collection also walks what survived
    the last)."""
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock)
    keys = [f"k{i}" for i in range(100_000)]
    storing.note(state, W, "i1", keys)
    polled(state, keys[: len(keys) // 2], now=clock.now + 1)
    collections = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal collections
        collections += phase == "start"

    gc.collect()
    gc.callbacks.append(count)
    try:
        asyncio.run(storing.polled(state))
    finally:
        gc.callbacks.remove(count)
    assert collections < 10, f"{collections} garbage collections"
    assert len(storing) == len(keys) // 2


def test_a_note_made_again_while_a_round_judges_waits_for_the_next_round(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listed keys end in C-level passes over a slice (``Storing.polled``), but not a note
    made again since the round copied them: that Put may still be storing the key."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every slice
    keys = [f"k{i}" for i in range(3 * POLLED_STEP)]
    clock, state, storing = _noting(keys)
    polled(state, keys, now=clock.now + 1)
    again = keys[-3:]

    async def main() -> None:
        async def note_again() -> None:
            clock.now += 1
            storing.note(state, W, "i1", again)

        judging = asyncio.create_task(storing.polled(state))
        await asyncio.sleep(0)  # the first slice is judged
        await note_again()
        await judging

    asyncio.run(main())
    assert storing.take(W) == set(again)


def test_a_round_that_ends_while_another_judges_leaves_the_notes_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two rounds of polls ending together (a cycle's, and one made while the AMM was stopped)
    judged the same notes twice, side by side."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every slice
    keys = [f"k{i}" for i in range(5 * POLLED_STEP)]
    clock, state, storing = _noting(keys)
    polled(state, keys, now=clock.now + 1)

    async def main() -> None:
        first = asyncio.create_task(storing.polled(state))
        await asyncio.sleep(0)
        await storing.polled(state)
        assert not first.done(), "the second round judged the notes too"
        await first

    asyncio.run(main())
    assert len(storing) == 0


def test_the_notes_of_a_big_put_cost_about_the_bytes_of_its_keys() -> None:
    """A Put of 100k keys on 4 workers was noted as a dictionary entry per key and worker
    (and each worker's question brought strings of its own): 43 MiB of the AMM, still held
    when the first poll after the Put filled the view, the AMM's peak."""
    keys = [f"key-{i:07}" for i in range(100_000)]  # 11 characters each
    clock = Clock()
    state = ClusterState()
    workers = [WorkerId(f"127.0.0.1:{7001 + n}") for n in range(4)]
    for w in workers:
        state.register(w, "w", "i1", now=clock.now)
    storing = Storing(clock)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for w in workers:
            assert storing.note(state, w, "i1", keys) == len(keys)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / (len(workers) * len(keys)) < 16, f"{held / 400_000:.1f} bytes per note"
    assert storing.take(workers[0]) == set(keys)


def test_keys_holding_the_separator_are_noted_as_they_came() -> None:
    odd = ["a\x00b", "\x00", "plain"]
    clock, state, storing = _noting(odd)
    assert storing.take(W) == set(odd)
    clock, state, storing = _noting(odd)
    polled(state, ["\x00"], now=clock.now + 1)
    asyncio.run(storing.polled(state))
    assert storing.take(W) == {"a\x00b", "plain"}


def test_notes_beyond_the_most_per_worker_are_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storing_module, "MAX_NOTED", 5)
    clock, state, storing = _noting(["a", "b", "c"])
    assert storing.note(state, W, "i1", ["d", "e", "f", "g"]) == 2
    assert storing.note(state, W, "i1", ["h"]) == 0
    polled(state, ["a", "b"], now=clock.now + 1)
    asyncio.run(storing.polled(state))  # two notes end: room for two more
    assert storing.note(state, W, "i1", ["h", "i", "j"]) == 2
    assert storing.take(W) == {"c", "d", "e", "h", "i"}


def test_many_puts_of_one_key_end_in_one_round() -> None:
    """A Put of one key is a batch of its own: a round ends thousands of them, and keeps
    those whose keys no poll listed yet."""
    keys = [f"k{i}" for i in range(3 * POLLED_STEP)]
    clock = Clock()
    state = ClusterState()
    state.register(W, "w", "i1", now=clock.now)
    storing = Storing(clock)
    for key in keys:
        storing.note(state, W, "i1", [key])
    polled(state, keys[1:], now=clock.now + 1)
    asyncio.run(storing.polled(state))
    assert len(storing) == 1
    assert storing.take(W) == {keys[0]}


def test_notes_taken_while_a_round_judges_them_leave_the_other_workers_judged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker removed while its notes are judged ends their judging, not the round's: the
    next worker's listed keys still end in the same round."""
    monkeypatch.setattr(pacing, "BUDGET", 0.0)  # a breath after every slice
    other = WorkerId("127.0.0.1:7002")
    keys = [f"k{i}" for i in range(3 * POLLED_STEP)]
    clock, state, storing = _noting(keys)
    state.register(other, "o", "i1", now=clock.now)
    storing.note(state, other, "i1", keys)
    polled(state, keys, now=clock.now + 1)
    polled(state, keys, now=clock.now + 1, worker=other)

    async def main() -> frozenset[Key]:
        judging = asyncio.create_task(storing.polled(state))
        await asyncio.sleep(0)  # the first slice of W's notes is judged
        taken = storing.take(W)
        await judging
        return taken

    assert asyncio.run(main()) == set(keys)
    assert len(storing) == 0, "the other worker's listed keys were left noted"

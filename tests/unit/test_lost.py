"""The book of lost keys: what is lost and how, what comes back, what a restarted AMM finds
missing, and the names of the keys held kept in a real SQLite state file."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import time
from pathlib import Path

import pytest

from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus
from amm_service.runtime.records.lost import MISSING, LostBook, LostKey
from amm_service.runtime.records.state import MEMORY, StateError, StateStore


def K(*keys: str) -> list[Key]:
    return [Key(k) for k in keys]


def clock() -> float:
    return next(_ticks)


_ticks = itertools.count(100.0)


def holding(state: ClusterState, worker: str, keys: list[str], version: int = 1) -> None:
    if state.worker(WorkerId(worker)) is None:
        state.register(WorkerId(worker), worker, "i", now=0.0)
    state.apply_poll(
        WorkerId(worker),
        incarnation="i",
        version=version,
        full=True,
        keys=[KeyReport(Key(k), 1, "c") for k in keys],
        removed=(),
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name=worker,
        now=1.0,
    )


def test_keys_are_lost_once_come_back_or_are_forgotten_and_the_record_persists(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path) as store:
        book = LostBook(store, clock=clock)
        book.load()
        assert book.add(K("b", "a"), worker="h:1", reason="h:1 died") == K("a", "b")
        assert book.add(K("a", "c"), worker="h:2", reason="h:2 left") == K("c")
        assert (len(book), Key("a") in book, book.count()) == (3, True, 3)
        assert book.recovered(K("c", "d")) == K("c")
        assert book.recovered(K("c")) == []
        assert book.count() == 2
    with StateStore(path) as store:
        book = LostBook(store, clock=clock)
        book.load()
        found, total = book.listed(present={}, limit=10)
        assert total == 2
        assert [(r.key, r.worker, r.reason) for r in found] == [
            ("a", "h:1", "h:1 died"),
            ("b", "h:1", "h:1 died"),
        ]
        assert book.listed(K("b", "zz"), present={}, limit=10)[1] == 1
        assert [r.key for r in book.listed(present={}, after="a", limit=10)[0]] == ["b"]
        assert book.listed(present={Key("a"): object()}, limit=10)[1] == 1
        assert book.discard(K("a", "never")) == K("a")
    with StateStore(path) as store:
        book = LostBook(store, clock=clock)
        book.load()
        assert [r.key for r in book.listed(present={}, limit=10)[0]] == ["b"]
        assert isinstance(book.listed(present={}, limit=1)[0][0], LostKey)


async def test_keys_held_before_a_restart_and_held_by_nobody_after_it_are_lost(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path) as store:
        book = LostBook(store, clock=clock)
        book.load()
        state = ClusterState(track_changes=True)
        holding(state, "a", ["x", "y"])
        holding(state, "b", ["z", "w"])
        await book.save_held(*state.take_changes())
        assert store.held_keys() == {"w", "x", "y", "z"}
        holding(state, "b", ["z"], version=2)  # w deleted on purpose: not awaited after a restart
        await book.save_held(*state.take_changes())
        book.add(K("y"), worker="a", reason="a restarted")  # lost already: not awaited either
        assert store.held_keys() == {"x", "z"}
    with StateStore(path) as store:
        book = LostBook(store, clock=clock)
        book.load()
        assert book.unseen == 2
        state = ClusterState(track_changes=True)
        holding(state, "b", ["z"])  # b reported; a, which held x, has not yet
        assert book.settle(state.keys, all_reported=False) == []
        assert book.unseen == 1
        assert book.knows(Key("x"))
        assert book.settle(state.keys, all_reported=True) == K("x")
        assert book.unseen == 0
        (record,) = [r for r in book.listed(present={}, limit=10)[0] if r.key == "x"]
        assert (record.worker, record.reason) == ("", MISSING)
        assert "x" not in store.held_keys()
        assert book.settle(state.keys, all_reported=True) == []


async def test_a_failed_save_of_the_keys_held_is_logged_once_and_done_later(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store = StateStore(MEMORY)
    book = LostBook(store, clock=clock)
    state = ClusterState(track_changes=True)
    holding(state, "a", ["x"])
    real = store.add_keys

    def broken(keys: object) -> None:
        raise StateError("disk full")

    monkeypatch.setattr(store, "add_keys", broken)
    with caplog.at_level(logging.WARNING, logger="amm_service.runtime.records.lost"):
        await book.save_held(*state.take_changes())
        holding(state, "a", ["x", "y"], version=2)
        await book.save_held(*state.take_changes())
    assert [r.getMessage() for r in caplog.records] == [
        "cannot record the keys held (disk full); will try again"
    ]
    monkeypatch.setattr(store, "add_keys", real)
    await book.save_held(*state.take_changes())
    assert store.held_keys() == {"x", "y"}
    # A forgotten key is neither lost nor awaited any more.
    book.add(K("x"), worker="a", reason="gone")
    assert book.discard(K("x")) == K("x")
    assert not book.knows(Key("x"))


#: Keys of a big first save (a poll round after a big Put).
BIG_SAVE = 200_000
#: Most CPU seconds the loop may be held in one go during ``save_held``: a few of its steps.
#: Sorted at once, 200,000 keys held it for 110 ms.
MAX_HOLD = 0.02


async def test_a_big_save_of_the_keys_held_lets_the_loop_in(tmp_path: Path) -> None:
    """The keys of a big poll round are sorted (for the state file's pages) in runs with the loop
    let in between, not in one go: the loop is held for a few steps at a time."""
    with StateStore(str(tmp_path / "state.db")) as store:
        book = LostBook(store, clock=clock)
        born = {Key(f"key-{i:07}") for i in range(BIG_SAVE)}
        holds: list[float] = []
        done = asyncio.Event()

        async def watch() -> None:
            last = time.thread_time()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.thread_time()
                holds.append(now - last)
                last = now

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        collecting = gc.isenabled()
        gc.disable()  # a full collection over this process's objects is not the save's doing
        try:
            await book.save_held(born, set())
        finally:
            done.set()
            await watcher
            if collecting:
                gc.enable()
        assert len(store.held_keys()) == BIG_SAVE
        assert max(holds) < MAX_HOLD, f"the loop was held {max(holds) * 1e3:.1f} ms of CPU"

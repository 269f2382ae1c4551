"""The AMM's persistent state: what survives a restart, and how a bad file is reported."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from amm_service.runtime.records.state import (
    _APPLICATION_ID,
    _MIGRATIONS,
    EPOCH_STEP,
    FIRST_EPOCHS,
    MEMORY,
    KnownWorker,
    LostRecord,
    RetirementRecord,
    StateError,
    StateStore,
)


def fake_clock(start: float = 1000.0) -> Callable[[], float]:
    """A clock that advances one second per reading."""
    now = [start]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    return clock


def no_jump(n: int) -> int:
    """``StateStore``'s ``draw`` without randomness: epochs move by one."""
    return 0


def test_epoch_increments_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path, draw=no_jump) as store:
        assert store.epoch == 0
        assert store.begin_epoch() == 1
        assert store.epoch == 1
    with StateStore(path, draw=no_jump) as store:
        assert store.epoch == 1
        assert store.begin_epoch() == 2
    with StateStore(path, draw=no_jump) as store:
        assert store.begin_epoch() == 3


def test_epochs_start_and_move_at_random_so_no_two_amms_share_one(tmp_path: Path) -> None:
    """Issue 10: two fresh AMMs both began at epoch 1, and two started from copies of one state
    file landed on the same number; agents took directives of their epoch from either."""
    firsts = set()
    for i in range(20):
        with StateStore(str(tmp_path / f"fresh-{i}.sqlite3")) as store:
            first = store.begin_epoch()
            assert 1 <= first <= FIRST_EPOCHS
            firsts.add(first)
    assert len(firsts) == 20
    original = tmp_path / "original.sqlite3"
    with StateStore(str(original)) as store:
        before = store.begin_epoch()
    copy = tmp_path / "copy.sqlite3"
    copy.write_bytes(original.read_bytes())
    nexts = set()
    for path in (original, copy):
        with StateStore(str(path)) as store:
            after = store.begin_epoch()
            assert before < after <= before + EPOCH_STEP
            nexts.add(after)
    assert len(nexts) == 2


def test_parent_directory_is_created_and_wal_is_on(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.sqlite3"
    with StateStore(str(path)) as store:
        store.begin_epoch()
    assert path.is_file()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
    finally:
        db.close()


def test_running_flag_persists(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path) as store:
        assert store.running is False
        store.set_running(True)
        assert store.running is True
    with StateStore(path) as store:
        assert store.running is True
        store.set_running(False)
    with StateStore(path) as store:
        assert store.running is False


def test_workers_remembered_and_forgotten_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path, clock=fake_clock()) as store:
        store.remember_worker("10.0.0.2:7000", "w2")
        store.remember_worker("10.0.0.1:7000", "w1")
        store.remember_worker("10.0.0.3:7000", "w3")
        store.forget_worker("10.0.0.3:7000")
        store.forget_worker("10.0.0.9:7000")
    with StateStore(path, clock=fake_clock(2000.0)) as store:
        assert store.known_workers() == [
            KnownWorker("10.0.0.1:7000", "w1", 1002.0, 1002.0),
            KnownWorker("10.0.0.2:7000", "w2", 1001.0, 1001.0),
        ]
        store.remember_worker("10.0.0.1:7000", "w1-renamed")
    with StateStore(path) as store:
        assert store.known_workers()[0] == KnownWorker(
            "10.0.0.1:7000", "w1-renamed", first_seen=1002.0, last_seen=2001.0
        )


def test_memory_store_works_and_keeps_nothing() -> None:
    with StateStore(MEMORY, clock=fake_clock(), draw=no_jump) as store:
        assert store.begin_epoch() == 1
        assert store.begin_epoch() == 2
        store.set_running(True)
        store.remember_worker("w:1", "w")
        assert store.running is True
        assert [w.address for w in store.known_workers()] == ["w:1"]
    with StateStore(MEMORY) as store:
        assert store.epoch == 0
        assert store.known_workers() == []


def test_garbage_file_is_a_state_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    path.write_bytes(b"this is not a database, just some text that is long enough" * 100)
    with pytest.raises(StateError) as info:
        StateStore(str(path))
    assert str(path) in str(info.value)
    assert "move it aside" in str(info.value)


def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="another application"):
        StateStore(str(path))


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    StateStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StateError, match=r"schema version 99.*upgrade amm"):
        StateStore(path)


def test_unwritable_parent_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StateError, match="cannot open the AMM state"):
        StateStore(str(blocker / "state.sqlite3"))


def test_close_is_idempotent_and_use_after_close_is_an_error() -> None:
    store = StateStore(MEMORY)
    store.close()
    store.close()
    with pytest.raises(StateError, match="closed"):
        store.begin_epoch()


def test_raise_epoch_moves_past_a_newer_epoch_only(tmp_path: Path) -> None:
    with StateStore(str(tmp_path / "s.sqlite3"), draw=no_jump) as store:
        assert store.begin_epoch() == 1
        assert store.raise_epoch(7) == 8
        assert store.raise_epoch(3) == 8
        assert store.begin_epoch() == 9


def test_goals_are_set_changed_removed_and_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path) as store:
        assert store.goals() == {}
        store.set_goals(["x", "y"], 3)
        store.set_goals(["y", "z"], None)
        store.remove_goals(["x", "never-had-one"])
    with StateStore(path) as store:
        assert store.goals() == {"y": None, "z": None}
        store.set_goals([], 2)  # nothing to do
        with pytest.raises(ValueError, match="at least 2"):
            store.set_goals(["y"], 1)
        assert store.goals() == {"y": None, "z": None}


def test_a_state_file_of_the_first_schema_gains_the_goals_table(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    for statement in _MIGRATIONS[0]:
        db.execute(statement)
    db.execute("UPDATE service SET epoch = 4")
    db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    db.execute("PRAGMA user_version = 1")
    db.close()
    with StateStore(path) as store:
        assert store.epoch == 4
        store.set_goals(["x"], 2)
        assert store.goals() == {"x": 2}


def test_retirements_persist_until_forgotten(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    under_way = RetirementRecord("h:2", True, 10.0, 40.0, "asked for by a client")
    retired = RetirementRecord("h:1", False, 5.0, None, "PauseToRetire: paused", retired=True)
    with StateStore(path) as store:
        assert store.retirements() == []
        store.save_retirement(under_way)
        store.save_retirement(retired)
    with StateStore(path) as store:
        assert store.retirements() == [retired, under_way]
        store.save_retirement(RetirementRecord("h:2", True, 10.0, 40.0, "again", retired=True))
        store.forget_retirement("h:1")
        store.forget_retirement("h:9")
    with StateStore(path) as store:
        assert [(r.worker, r.reason, r.retired) for r in store.retirements()] == [
            ("h:2", "again", True)
        ]


def test_lost_keys_and_the_keys_held_persist(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    solo = LostRecord("solo", "h:1", 12.5, "h:1 died")
    with StateStore(path) as store:
        assert (store.lost(), store.held_keys()) == ([], set())
        store.add_keys(["a", "b", "solo"])
        store.add_keys(["a"])  # already recorded
        store.remove_keys(["solo", "never-held"])
        store.save_lost([solo, LostRecord("gone", "", 13.0, "missing after a restart")])
    with StateStore(path) as store:
        assert store.held_keys() == {"a", "b"}
        assert [r.key for r in store.lost()] == ["gone", "solo"]
        assert store.lost()[1] == solo
        store.save_lost([LostRecord("solo", "h:2", 20.0, "h:2 unregistered")])
        store.forget_lost(["gone", "never-lost"])
    with StateStore(path) as store:
        assert store.lost() == [LostRecord("solo", "h:2", 20.0, "h:2 unregistered")]


def test_a_state_file_of_the_third_schema_gains_the_lost_tables(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:3]:
        for statement in step:
            db.execute(statement)
    db.execute("INSERT INTO goals (key, n) VALUES ('x', 2)")
    db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    db.execute("PRAGMA user_version = 3")
    db.close()
    with StateStore(path) as store:
        assert store.goals() == {"x": 2}
        assert (store.lost(), store.held_keys()) == ([], set())


def test_the_running_choice_is_none_until_a_start_or_stop_is_recorded(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    with StateStore(path) as store:
        assert store.running_choice is None
        store.set_running(False)
        assert store.running_choice is False
    with StateStore(path) as store:
        assert store.running_choice is False
        store.set_running(True)
    with StateStore(path) as store:
        assert store.running_choice is True


@pytest.mark.parametrize(("running", "choice"), [(1, True), (0, None)])
def test_a_running_flag_recorded_before_choices_were_counts_as_chosen_when_set(
    tmp_path: Path, running: int, choice: bool | None
) -> None:
    """Such an AMM started whatever its settings said; a flag never set chose nothing."""
    path = str(tmp_path / "state.sqlite3")
    db = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:3]:
        for statement in step:
            db.execute(statement)
    db.execute("UPDATE service SET running = ?", (running,))
    db.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
    db.execute("PRAGMA user_version = 3")
    db.close()
    with StateStore(path) as store:
        assert store.running_choice is choice

"""The cluster model: polls merged incrementally, snapshots frozen."""

from __future__ import annotations

import tracemalloc

from amm_service.decisions.view import ClusterState, Key, KeyReport, WorkerId
from tests.support.views import poll

A, B = WorkerId("a"), WorkerId("b")


def test_incremental_polls_add_and_remove_holdings() -> None:
    state = ClusterState()
    for w in (A, B):
        state.register(w, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    poll(state, B, full=True, keys=[KeyReport(Key("x"), 3, "s"), KeyReport(Key("y"), 1, "t")])
    snap = state.snapshot()
    assert snap.keys[Key("x")].holders == {A, B}
    assert snap.replicated == {Key("x")}
    poll(state, B, removed=[Key("x")], version=2)
    assert state.snapshot().keys[Key("x")].holders == {A}
    assert state.snapshot().replicated == frozenset()
    # The earlier snapshot did not change.
    assert snap.keys[Key("x")].holders == {A, B}


def test_pins_are_tracked_per_holder() -> None:
    state = ClusterState()
    state.register(A, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s", pinned=True)])
    assert state.snapshot().keys[Key("x")].pinned_on == {A}
    poll(state, A, keys=[KeyReport(Key("x"), 3, "s", pinned=False)], version=2)
    assert state.snapshot().keys[Key("x")].pinned_on == frozenset()


def test_full_snapshot_replaces_what_was_known() -> None:
    state = ClusterState()
    state.register(A, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    poll(state, A, full=True, keys=[KeyReport(Key("y"), 3, "s")], version=9)
    assert set(state.snapshot().keys) == {Key("y")}


def test_a_new_incarnation_loses_the_old_holdings() -> None:
    state = ClusterState()
    state.register(A, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    assert state.register(A, "", "i2", now=5.0) is True
    assert state.snapshot().keys == {}
    assert state.register(A, "", "i2", now=6.0) is False


def test_unregistering_removes_the_worker_and_its_holdings() -> None:
    state = ClusterState()
    state.register(A, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    assert state.unregister(A) is True
    assert state.unregister(A) is False
    snap = state.snapshot()
    assert snap.workers == {}
    assert snap.keys == {}


def test_conflicting_content_is_tracked_and_resolves_when_a_side_leaves() -> None:
    state = ClusterState()
    C = WorkerId("c")
    for w in (A, B, C):
        state.register(w, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s1")])
    poll(state, B, full=True, keys=[KeyReport(Key("x"), 5, "s2")])
    poll(state, C, full=True, keys=[KeyReport(Key("x"), 5, "s2")])
    kv = state.snapshot().keys[Key("x")]
    assert (kv.checksum, kv.conflicting) == ("s1", frozenset({B, C}))
    assert state.conflicts == [Key("x")]
    assert Key("x") not in state.snapshot().replicated
    # The only holder of s1 leaves: s2, held twice, becomes the content of x.
    state.unregister(A)
    kv = state.snapshot().keys[Key("x")]
    assert (kv.checksum, kv.size, kv.conflicting) == ("s2", 5, frozenset())
    assert state.conflicts == []
    assert Key("x") in state.snapshot().replicated


def test_missed_polls_count_until_the_worker_answers() -> None:
    state = ClusterState()
    state.register(A, "", "i1", now=0.0)
    state.missed_poll(A)
    state.missed_poll(A)
    worker = state.worker(A)
    assert worker is not None
    assert (worker.missed_polls, worker.reachable, worker.durable) == (2, False, False)
    poll(state, A, full=True)
    worker = state.worker(A)
    assert worker is not None
    assert worker.reachable


def test_keys_held_by_the_same_workers_share_one_set_of_holders() -> None:
    state = ClusterState()
    for worker in (A, B):
        state.register(worker, str(worker), "i1", 0.0)
    reports = [KeyReport(Key(f"k{i}"), 1, "c") for i in range(3)]
    poll(state, A, full=True, keys=reports)
    poll(state, B, full=True, keys=[*reports, KeyReport(Key("only-b"), 1, "c")])
    keys = state.snapshot().keys
    first = keys[Key("k0")].holders
    assert first == {A, B}
    assert all(keys[Key(f"k{i}")].holders is first for i in range(3))
    poll(state, A, version=2, removed=[Key("k1")])
    after = state.snapshot().keys
    assert after[Key("k1")].holders is after[Key("only-b")].holders
    assert after[Key("k1")].holders == {B}


def test_keys_that_appear_and_leave_the_cluster_are_noted_when_tracked() -> None:
    state = ClusterState(track_changes=True)
    for w in (A, B):
        state.register(w, "", "i1", now=0.0)
    x, y, z = Key("x"), Key("y"), Key("z")
    poll(state, A, full=True, keys=[KeyReport(x, 3, "s"), KeyReport(y, 1, "t")])
    poll(state, B, full=True, keys=[KeyReport(x, 3, "s")])
    assert state.take_changes() == ({x, y}, set())
    assert state.take_changes() == (set(), set())
    poll(state, A, removed=[x, y], version=2)  # x is still on B
    poll(state, B, keys=[KeyReport(z, 1, "u")], version=2)
    assert state.take_changes() == ({z}, {y})
    # Came and went (or went and came) in between: only where it ended counts.
    poll(state, A, keys=[KeyReport(y, 1, "t")], version=3)
    poll(state, A, removed=[y], version=4)
    state.unregister(B)
    poll(state, A, keys=[KeyReport(x, 3, "s")], version=5)
    assert state.take_changes() == ({x}, {y, z})
    assert ClusterState().take_changes() == (set(), set())


def test_holding_sets_keep_the_key_records_string_not_one_copy_per_poll() -> None:
    """Each poll brings its own copy of every key's string; holding 100k keys on 4 workers
    kept 4 copies of each until the sets kept the record's."""
    state = ClusterState()
    for w in (A, B):
        state.register(w, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("".join(["x", "y"])), 3, "s")])
    poll(state, B, full=True, keys=[KeyReport(Key("".join(["x", "y"])), 3, "s")])
    record = state.keys[Key("xy")].key
    assert all(next(iter(state.held_by(w))) is record for w in (A, B))
    assert state.snapshot().keys[Key("xy")].holders == {A, B}


def test_the_state_keeps_a_few_hundred_bytes_per_key_held_by_four_workers() -> None:
    """What the state itself allocates for 20k keys on 4 workers (their names and checksums
    made beforehand): a record each and its share of the indexes, 225 bytes. A set of keys
    per worker alongside the records made it 645."""
    workers = [WorkerId(f"w{n}") for n in range(4)]
    reports = [KeyReport(Key(f"key-{i:07}"), 100, f"{i:064x}") for i in range(20_000)]
    state = ClusterState()
    for worker in workers:
        state.register(worker, worker, "i1", 0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for worker in workers:
            poll(state, worker, full=True, keys=reports)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert state.nreplicas == 4 * len(reports)
    assert used / len(reports) < 300, f"{used / len(reports):.0f} bytes per key"


def test_a_snapshots_holdings_are_those_of_its_time() -> None:
    """Worked out when first read, a snapshot's holdings still show the cluster as it was when
    it was taken, not as later polls left it."""
    state = ClusterState()
    for w in (A, B):
        state.register(w, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    view = state.snapshot()
    poll(state, A, version=2, keys=[KeyReport(Key("y"), 1, "t")])
    poll(state, B, full=True, keys=[KeyReport(Key("x"), 3, "s")])
    assert view.holdings == {A: {"x"}, B: set()}
    assert view.held_by(A) == {"x"}
    assert view.held_by(WorkerId("c")) == set()
    assert state.snapshot().holdings == {A: {"x", "y"}, B: {"x"}}


def test_a_conflict_resolved_by_a_new_report_is_no_longer_listed() -> None:
    """The odd holder reporting the key's content again resolves the conflict: ``conflicts``
    (the status and metrics count) listed the key until a holder of it left."""
    state = ClusterState()
    for w in (A, B):
        state.register(w, "", "i1", now=0.0)
    poll(state, A, full=True, keys=[KeyReport(Key("x"), 3, "s1")])
    poll(state, B, full=True, keys=[KeyReport(Key("x"), 5, "s2")])
    assert state.conflicts == [Key("x")]
    poll(state, B, version=2, keys=[KeyReport(Key("x"), 3, "s1")])
    assert state.keys[Key("x")].conflicting == frozenset()
    assert state.conflicts == []
    assert Key("x") in state.snapshot().replicated

"""The agent's store: values, inventory versions and the changelog, pins, readers, leases."""

from __future__ import annotations

import pytest

from amm.base.checksum import checksum
from worker_agent import integrity
from worker_agent.integrity import Accept, Conditions, Directive, Op
from worker_agent.store import (
    COMPACT_SLICE,
    KEY_INFO_OVERHEAD,
    PAGE_SLICE,
    STALE_SORTED_MIN,
    Changes,
    Key,
    KeyInfo,
    Page,
    Store,
    Value,
)

A, B, C = Key("a"), Key("b"), Key("c")


def add(store: Store, key: Key, data: bytes = b"xyz") -> None:
    assert store.add(key, data, checksum(data))


def test_add_get_remove_track_bytes_and_version() -> None:
    store = Store()
    add(store, A, b"12345")
    add(store, B, b"12")
    assert store.total_bytes == 7
    assert store.version == 2
    assert store.get(A) == Value(A, b"12345", checksum(b"12345"))
    assert not store.add(A, b"other", checksum(b"other")), "keys are immutable"
    assert store.get(A).data == b"12345"  # type: ignore[union-attr]
    assert store.remove(A)
    assert not store.remove(A)
    assert store.total_bytes == 2
    assert store.version == 3
    assert [info.key for info in store.snapshot()] == [B]


def test_changes_since_reports_upserts_and_removals_after_a_version() -> None:
    store = Store()
    add(store, A)
    seen = store.version
    add(store, B)
    add(store, C)
    store.remove(B)
    store.pin(A)
    changes = store.changes_since(seen)
    assert changes is not None
    assert changes.version == store.version == 5
    assert {info.key: info.pinned for info in changes.upserts} == {C: False, A: True}
    assert changes.removed == (B,)
    assert store.changes_since(store.version) == type(changes)((), (), 5)


def test_changes_since_is_none_when_out_of_reach() -> None:
    store = Store(changelog_limit=4)
    for i in range(20):
        add(store, Key(f"k{i}"))
    assert store.changes_since(0) is None, "the changelog no longer reaches back"
    assert store.changes_since(store.version + 1) is None, "a version from the future"
    recent = store.changes_since(store.version - 4)
    assert recent is not None
    assert [info.key for info in recent.upserts] == ["k16", "k17", "k18", "k19"]


def test_changes_the_poller_acknowledged_are_let_go() -> None:
    """Before, the changelog kept up to a million changes (and the keys they name, forgotten
    long ago) whatever the AMM had already read."""
    store = Store()
    for i in range(10):
        add(store, Key(f"k{i}"))
    store.remove(Key("k0"))
    store.release_changes(8)
    assert store.changelog_length == 3
    assert store.changes_since(7) is None, "released: a snapshot"
    later = store.changes_since(8)
    assert later is not None
    assert [info.key for info in later.upserts] == ["k8", "k9"]
    assert later.removed == (Key("k0"),)
    store.release_changes(store.version + 5)  # never past the current version
    assert store.changelog_length == 0
    assert store.changes_since(store.version) == Changes((), (), store.version)
    add(store, Key("new"))
    after = store.changes_since(store.version - 1)
    assert after is not None
    assert [info.key for info in after.upserts] == ["new"]


def test_removed_bytes_are_counted_as_freed() -> None:
    store = Store()
    add(store, A, b"12345")
    add(store, B, b"123")
    store.remove(A)
    store.remove(Key("absent"))
    assert store.freed_bytes == 5


def test_pins_are_counted_and_bump_the_version_when_the_flag_flips() -> None:
    store = Store()
    add(store, A)
    v = store.version
    assert store.pin(A) == 1
    assert store.pin(A) == 2
    assert store.version == v + 1
    assert store.info(A) == KeyInfo(A, 3, checksum(b"xyz"), pinned=True)
    assert store.unpin(A) == 1
    assert store.version == v + 1
    assert store.unpin(A) == 0
    assert store.version == v + 2
    assert store.info(A).pinned is False  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        store.unpin(A)
    with pytest.raises(KeyError):
        store.pin(B)


def test_readers_and_dropping_do_not_change_the_inventory() -> None:
    store = Store()
    add(store, A)
    v = store.version
    store.begin_use(A)
    store.begin_use(A)
    store.mark_dropping(A)
    assert store.in_use(A) == 2
    assert store.is_dropping(A)
    store.end_use(A)
    store.end_use(A)
    store.unmark_dropping(A)
    assert store.in_use(A) == 0
    assert not store.is_dropping(A)
    assert store.version == v


def test_leases_extend_but_never_shorten_and_expire_by_the_given_clock() -> None:
    store = Store()
    add(store, A)
    assert store.promise(A, until=10.0) == 10.0
    assert store.promise(A, until=5.0) == 10.0
    assert store.promised_until(A, now=9.9) == 10.0
    assert store.promised_until(A, now=10.0) is None
    assert store.promise(A, until=20.0) == 20.0
    store.remove(A)
    assert store.promised_until(A, now=0.0) is None
    with pytest.raises(KeyError):
        store.promise(A, until=1.0)


def test_snapshot_pages_follow_key_order_within_the_limits() -> None:
    store = Store()
    for i in (3, 1, 4, 0, 2):
        add(store, Key(f"k{i}"))
    first = store.snapshot_page(None, max_keys=2)
    assert ([k.key for k in first.keys], first.last) == (["k0", "k1"], "k1")
    second = store.snapshot_page(first.last, max_keys=2)
    assert ([k.key for k in second.keys], second.last) == (["k2", "k3"], "k3")
    store.remove(Key("k4"))
    assert store.snapshot_page(second.last, max_keys=2) == Page((), None)
    assert [k.key for k in store.snapshot_page(Key("k10"), max_keys=9).keys] == ["k2", "k3"]
    assert store.snapshot_page(None).keys == tuple(store.snapshot())


def test_pages_pass_over_removed_keys_across_slices_and_end_exactly_at_the_last_key() -> None:
    """Pages read the index a slice at a time (``PAGE_SLICE``): runs of removed keys still
    listed, longer than a slice, are passed over; a page that takes the last key held says that
    none follow, one that stops before another says where it stopped."""
    store = Store()
    keys = [Key(f"k{i:05d}") for i in range(3 * PAGE_SLICE)]
    for key in keys:
        add(store, key)
    gone = set(keys[10 : 10 + PAGE_SLICE + 7]) | set(keys[-5:])
    for key in sorted(gone):
        store.remove(key)
    held = [key for key in keys if key not in gone]
    store.pin(held[3])
    for limit in (1, 10, 11, PAGE_SLICE, len(held) - 1, len(held), len(held) + 1):
        pages, after = [], None
        while True:
            page = store.snapshot_page(after, max_keys=limit)
            pages.append(page)
            if page.last is None:
                break
            assert len(page.keys) == limit
            after = page.last
        assert [k for page in pages for k in page.keys] == [store.info(key) for key in held]
        assert pages[-1].keys, f"an empty last page (limit {limit})"
    assert store.infos([keys[0], keys[10], held[3], keys[-1], held[3]]) == [
        store.info(keys[0]),
        KeyInfo(held[3], 3, checksum(b"xyz"), True),
        KeyInfo(held[3], 3, checksum(b"xyz"), True),
    ]


def test_pages_count_the_utf8_bytes_of_keys_that_are_not_ascii() -> None:
    store = Store()
    for i in range(5):
        add(store, Key(f"{i}" + "\u00e9" * 500))  # 501 characters, 1,001 bytes
    cost = 1001 + KEY_INFO_OVERHEAD
    assert len(store.snapshot_page(None, max_bytes=3 * cost).keys) == 3
    assert len(store.snapshot_page(None, max_bytes=3 * cost - 1).keys) == 2
    changes = store.changes_since(0, max_bytes=2 * cost)
    assert changes is not None
    assert len(changes.upserts) == 2


def test_pages_are_cut_by_bytes_too_but_always_progress() -> None:
    """50,000 keys of 1 KiB would not fit in one 16 MiB message."""
    store = Store()
    for i in range(10):
        add(store, Key(f"{i}" * 1000))
    cost = 1000 + KEY_INFO_OVERHEAD
    page = store.snapshot_page(None, max_keys=50_000, max_bytes=3 * cost)
    assert len(page.keys) == 3
    assert len(store.snapshot_page(None, max_bytes=1).keys) == 1, "one key at least"
    changes = store.changes_since(0, max_bytes=4 * cost)
    assert changes is not None
    assert (len(changes.upserts), changes.version, changes.more) == (4, 4, True)


def test_changes_stop_at_max_keys_complete_up_to_their_version() -> None:
    store = Store()
    add(store, A)
    add(store, B)
    store.pin(A)  # A again: no new key
    add(store, C)
    store.remove(B)
    first = store.changes_since(0, max_keys=2)
    assert first is not None
    assert ([i.key for i in first.upserts], first.removed) == ([A], (B,)), "as they are now"
    assert (first.version, first.more) == (3, True), "complete up to the version before C"
    rest = store.changes_since(first.version, max_keys=2)
    assert rest == Changes((store.info(C),), (B,), 5, False)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [3, 40], ids=["inserted one by one", "merged"])
def test_add_many_is_add_for_each_value_not_held(count: int) -> None:
    keys = [Key(f"k{i:03}") for i in range(count)]
    one_by_one, batched = Store(), Store()
    for store in (one_by_one, batched):
        add(store, Key("k001"), b"held")
        add(store, Key("zz"))
    values = [(k, k.encode(), checksum(k.encode())) for k in reversed(keys)]
    for key, data, digest in values:
        one_by_one.add(key, data, digest)
    stored = batched.add_many([*values, values[0]])
    assert stored == sum(len(data) for key, data, _ in values if key != "k001")
    assert batched.snapshot() == one_by_one.snapshot()
    assert batched.total_bytes == one_by_one.total_bytes
    assert batched.version == one_by_one.version
    assert batched.changes_since(2) == one_by_one.changes_since(2)


def _guarded(store: Store, key: Key) -> None:
    """Every way a key can be guarded here, one per key (by its last character)."""
    kind = key[-1]
    if kind == "p":
        store.pin(key)
    elif kind == "u":
        store.begin_use(key)
    elif kind == "d":
        store.mark_dropping(key)
    elif kind == "l":
        store.promise(key, 150.0)
    elif kind == "e":
        store.promise(key, 50.0)  # expired by the time asked (100)


def test_clear_to_remove_is_the_all_clear_of_judge_drop_and_judge_drop_commit() -> None:
    """The batch's one-lookup all-clear agrees with the integrity rules on every kind of key:
    pinned, read, being dropped, promised, promised once, held with other content, not held."""
    store, now = Store(), 100.0
    keys = [Key(f"key-{kind}") for kind in "pudlex"]
    for key in keys:
        store.add(key, b"data", checksum(b"data"))
        _guarded(store, key)
    for key in [*keys, Key("missing")]:
        for digest in ("", checksum(b"data"), checksum(b"other")):
            directive = Directive("d", 1, Op.DROP, key, checksum=digest, holders=("peer:1",))
            verdict = integrity.judge_drop(store, directive, Conditions(), now)
            go = isinstance(verdict, Accept) and not verdict.noop
            assert (store.clear_to_remove(key, digest, now) is not None) is go, (key, digest)
            if digest:
                commit = integrity.judge_drop_commit(store, key, digest, now)
                go = isinstance(commit, Accept) and not commit.noop
                cleared = store.clear_to_remove(key, digest, now, mine=True)
                assert (cleared is not None) is go, (key, digest)


def test_mark_and_remove_if_clear_act_exactly_when_the_all_clear_is_given() -> None:
    """The batch's fused steps: ``mark_if_clear`` marks, and ``remove_if_clear`` removes (and
    unmarks, telling the version after), exactly the keys ``clear_to_remove`` clears, and
    change nothing otherwise."""
    now = 100.0
    for key in [*(Key(f"key-{kind}") for kind in "pudlex"), Key("missing")]:
        for digest in ("", checksum(b"data"), checksum(b"other")):
            store = Store()
            if key != "missing":
                store.add(key, b"data", checksum(b"data"))
                _guarded(store, key)
            clear = store.clear_to_remove(key, digest, now) is not None
            dropping = store.is_dropping(key)
            assert (store.mark_if_clear(key, digest, now) is not None) is clear, (key, digest)
            assert store.is_dropping(key) is (dropping or clear)
            mine = store.clear_to_remove(key, digest, now, mine=True) is not None
            version = store.version
            removed = store.remove_if_clear(key, digest, now)
            assert (removed is not None) is mine, (key, digest)
            if mine:
                assert removed == version + 1 == store.version
                assert key not in store
                assert not store.is_dropping(key)
            else:
                assert store.version == version
                assert (key in store) is (key != "missing")


def test_promise_held_promises_exactly_what_judge_keep_accepts() -> None:
    store, until = Store(), 150.0
    keys = [Key(f"key-{kind}") for kind in "pudlex"]
    for key in keys:
        store.add(key, b"data", checksum(b"data"))
        _guarded(store, key)
    for key in [*keys, Key("missing")]:
        for digest in ("", checksum(b"data"), checksum(b"other")):
            verdict = integrity.judge_keep(store, key, digest, Conditions())
            before = store.promised_until(key, 0.0)
            expires = store.promise_held(key, digest, until)
            assert (expires is not None) is isinstance(verdict, Accept), (key, digest)
            if expires is None:
                assert store.promised_until(key, 0.0) == before, "nothing recorded"
            else:
                assert expires == max(until, before or until)


def test_snapshots_skip_removed_keys_the_sorted_index_still_lists() -> None:
    """Removed keys stay in the sorted index until enough accumulate; pages never show them,
    a key put again shows once, and the index is rebuilt without them past the threshold."""
    store = Store()
    keys = [Key(f"k{i:05d}") for i in range(STALE_SORTED_MIN * 3)]
    store.add_many((key, b"v", checksum(b"v")) for key in keys)
    removed = keys[::2]
    for key in removed[: STALE_SORTED_MIN // 2]:
        store.remove(key)
    store.add(removed[0], b"v", checksum(b"v"))
    store.add_many([(removed[1], b"v", checksum(b"v"))])
    expected = sorted(set(keys) - set(removed[2 : STALE_SORTED_MIN // 2]))
    assert [info.key for info in store.snapshot()] == expected
    paged: list[Key] = []
    after = None
    while True:
        page = store.snapshot_page(after, max_keys=1000)
        paged += [info.key for info in page.keys]
        if page.last is None:
            break
        after = page.last
    assert paged == expected
    for key in keys:
        store.remove(key)
    assert store.snapshot() == []
    assert store.snapshot_page(None).keys == ()
    assert len(store._sorted) < STALE_SORTED_MIN * 2, "rebuilt without the removed keys"


def _changes_one_by_one(store: Store, since: int, max_keys: int, max_bytes: int) -> Changes:
    """``changes_since`` as it was written before its usual answer was taken whole: each key of
    the changelog in turn against the limits, as they are now."""
    log = store._log
    keys: dict[Key, None] = {}
    used, version, more = 0, store.version, False
    for index in range(since - store._base, len(log)):
        key = log[index]
        if key in keys:
            continue
        cost = len(key.encode()) + KEY_INFO_OVERHEAD
        if keys and (len(keys) >= max_keys or used + cost > max_bytes):
            version, more = store._base + index, True
            break
        keys[key] = None
        used += cost
    upserts = tuple(store.info(k) for k in keys if k in store)
    return Changes(upserts, tuple(k for k in keys if k not in store), version, more)  # type: ignore[arg-type]


@pytest.mark.parametrize("max_keys", [1, 7, 12, 13, 40])
@pytest.mark.parametrize("max_bytes", [1, 3 * (3 + KEY_INFO_OVERHEAD), 10**6])
def test_changes_taken_whole_are_those_taken_one_by_one(max_keys: int, max_bytes: int) -> None:
    """Keys added, removed, re-added and pinned (some not ASCII), read back from every version:
    the answer taken whole when it fits is the one the limits give key by key."""
    store = Store()
    keys = [Key(f"k{i:02}" if i % 3 else f"\u00e9{i}") for i in range(20)]
    for i, key in enumerate(keys):
        add(store, key)
        if i % 4 == 0:
            store.remove(keys[i // 2])
        if i % 5 == 0 and key in store:
            store.pin(key)
        if i % 6 == 0 and keys[i // 3] not in store:
            add(store, keys[i // 3])
    for since in range(store.version + 1):
        assert store.changes_since(since, max_keys=max_keys, max_bytes=max_bytes) == (
            _changes_one_by_one(store, since, max_keys, max_bytes)
        ), since


def _listed_as_held(store: Store) -> None:
    """The sorted index lists every key held, and its stale keys are exactly the others."""
    listed = set(store._sorted)
    held = set(store.held)
    assert held <= listed
    assert store._stale == listed - held
    assert [info.key for info in store.snapshot()] == sorted(held)


def test_a_compaction_in_steps_keeps_every_change_made_between_them() -> None:
    """The sorted index rebuilt a slice per step (the loop let in between) lists every key held
    once it is done, whatever was put, removed or put again meanwhile, before or after its
    slice was filtered; ``remove`` does not rebuild it at once meanwhile."""
    store = Store()
    keys = [Key(f"k{i:05d}") for i in range(STALE_SORTED_MIN * 3)]
    assert len(keys) > COMPACT_SLICE * 2
    store.add_many((key, b"v", checksum(b"v")) for key in keys)
    for key in keys[1::3]:
        store.remove(key)
    assert store.compaction_due
    steps = store.compaction()
    next(steps)
    assert store.compacting
    assert not store.compaction_due
    late = [Key(f"z{i:03d}") for i in range(50)]
    changes = iter(
        [
            lambda: store.remove(keys[0]),  # filtered first: removed after its slice
            lambda: store.remove(keys[-1]),  # removed before its slice
            lambda: store.add(keys[1], b"v", checksum(b"v")),  # removed, put back
            lambda: store.add(late[0], b"v", checksum(b"v")),  # new, after every slice
            lambda: store.add_many([(late[1], b"v", checksum(b"v"))]),
            lambda: store.remove(late[0]),  # new, then removed
            lambda: store.add(keys[0], b"v", checksum(b"v")),  # removed, then put back
            lambda: store.remove(keys[2]),
        ]
    )
    for _ in steps:
        change = next(changes, None)
        if change is not None:
            change()
        _listed_as_held(store)  # the old index stays right until the swap
    for change in changes:
        change()
    assert not store.compacting
    _listed_as_held(store)
    assert len(store._sorted) <= len(store.held) + 2, "rebuilt without the removed keys"
    # Many removals while one is under way leave the rebuild to it, not to ``remove``.
    steps = store.compaction()
    next(steps)
    for key in keys[::3]:
        store.remove(key)
    assert len(store._stale) >= len(store.held), "past where remove rebuilds it at once"
    assert len(store._sorted) >= len(keys) * 2 // 3
    assert list(steps)
    assert not store.compacting
    _listed_as_held(store)


def test_a_compaction_abandoned_leaves_the_index_as_it_was() -> None:
    store = Store()
    keys = [Key(f"k{i:05d}") for i in range(STALE_SORTED_MIN * 3)]
    store.add_many((key, b"v", checksum(b"v")) for key in keys)
    for key in keys[1::3]:
        store.remove(key)
    steps = store.compaction()
    next(steps)
    next(steps)
    store.remove(keys[0])
    store.add(keys[1], b"v", checksum(b"v"))
    steps.close()
    assert not store.compacting
    _listed_as_held(store)
    assert store.compaction_due

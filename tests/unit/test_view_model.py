"""``ClusterState`` against a small reference model, over seeded random sequences of operations.

``_merge_holdings`` takes the common cases of a poll (a key gaining a holder, a copy dropped, a
key reported again as it was) in its own loop, beside the general path (``_set_holding``,
``_remove_holding``) for new keys, pins, conflicting content and a last holder leaving. The two
must agree on every record, index and journal note (and so must ``apply_drops``, which takes
applied drops into the view ahead of the poll); this model keeps only what each worker
reported and each key's reference content, and derives the rest the obvious way.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from amm_service.decisions import view as view_module
from amm_service.decisions.view import (
    ClusterState,
    ClusterView,
    Key,
    KeyReport,
    KeyView,
    WorkerId,
)
from tests.support.views import poll

WORKERS = [WorkerId(w) for w in "abcd"]
KEYS = [Key(f"k{i}") for i in range(8)]
STEPS = 300

Report = tuple[int, str, bool]
"""What a worker reported of a key: (size, checksum, pinned)."""


class Model:
    """What each worker holds, and each key's reference content; everything else derived.

    The rules, from ``KeyView`` and ``ClusterState``: a key's content is that of its first holder;
    holders reporting another checksum are ``conflicting``; when a holder leaves and every
    remaining one conflicts, the lowest-named remaining holder's report becomes the content
    (only then: a holder that itself reports other content leaves every holder conflicting,
    as the state does). A key with no holder is gone."""

    def __init__(self) -> None:
        self.incarnation: dict[WorkerId, str] = {}
        self.nkeys: dict[WorkerId, int] = {}
        self.version: dict[WorkerId, int] = {}
        self.reports: dict[WorkerId, dict[Key, Report]] = {}
        self.content: dict[Key, tuple[int, str]] = {}
        self.last_event: dict[Key, str] = {}
        """Per key, "born" or "gone": its last change of existence since ``take_changes``."""

    # -- derived ---------------------------------------------------------------------------

    def holders(self, key: Key) -> frozenset[WorkerId]:
        return frozenset(w for w, held in self.reports.items() if key in held)

    def view(self, key: Key) -> KeyView:
        size, checksum = self.content[key]
        holders = self.holders(key)
        return KeyView(
            key,
            size,
            checksum,
            holders,
            frozenset(w for w in holders if self.reports[w][key][2]),
            frozenset(w for w in holders if self.reports[w][key][1] != checksum),
        )

    def keys(self) -> dict[Key, KeyView]:
        return {key: self.view(key) for key in self.content}

    def replicated(self) -> frozenset[Key]:
        return frozenset(
            k for k, kv in self.keys().items() if len(kv.holders) > 1 and not kv.conflicting
        )

    # -- primitive changes -----------------------------------------------------------------

    def hold(self, worker: WorkerId, report: KeyReport) -> None:
        if report.key not in self.content:
            self.content[report.key] = (report.size, report.checksum)
            self.last_event[report.key] = "born"
        self.reports[worker][report.key] = (report.size, report.checksum, report.pinned)

    def drop(self, worker: WorkerId, key: Key) -> None:
        del self.reports[worker][key]
        holders = self.holders(key)
        if not holders:
            del self.content[key]
            self.last_event[key] = "gone"
            return
        checksum = self.content[key][1]
        if all(self.reports[w][key][1] != checksum for w in holders):
            size, checksum, _ = self.reports[min(holders)][key]
            self.content[key] = (size, checksum)

    def forget(self, worker: WorkerId) -> None:
        for key in list(self.reports[worker]):
            self.drop(worker, key)

    def merge(self, worker: WorkerId, held: Iterable[KeyReport], gone: Iterable[Key]) -> bool:
        changed = False
        for report in held:
            self.hold(worker, report)
            changed = True
        for key in gone:
            if key in self.reports[worker]:
                self.drop(worker, key)
                changed = True
        return changed

    # -- operations, as ClusterState's -----------------------------------------------------

    def register(self, worker: WorkerId, incarnation: str) -> bool:
        if self.incarnation.get(worker) == incarnation:
            return False
        if worker in self.incarnation:
            self.forget(worker)
        self.incarnation[worker] = incarnation
        self.reports[worker] = {}
        self.nkeys[worker] = 0
        self.version[worker] = 0
        return True

    def unregister(self, worker: WorkerId) -> bool:
        if worker not in self.incarnation:
            return False
        self.forget(worker)
        for table in (self.incarnation, self.reports, self.nkeys, self.version):
            del table[worker]
        return True

    def poll(
        self,
        worker: WorkerId,
        incarnation: str,
        version: int,
        full: bool,
        keys: list[KeyReport],
        removed: list[Key],
    ) -> None:
        if worker not in self.incarnation:
            return
        if full or incarnation != self.incarnation[worker]:
            self.forget(worker)
        self.merge(worker, keys, removed)
        self.incarnation[worker] = incarnation
        self.version[worker] = version
        self.nkeys[worker] = len(self.reports[worker])

    def lookup(
        self, worker: WorkerId, incarnation: str, held: list[KeyReport], absent: list[Key]
    ) -> None:
        if self.incarnation.get(worker) != incarnation:
            return
        if self.merge(worker, held, absent):
            self.nkeys[worker] = len(self.reports[worker])

    def drops(self, worker: WorkerId, incarnation: str, dropped: list[tuple[Key, int]]) -> None:
        """Applied drops with the version each key was gone at: news only for the worker's
        incarnation, past its poll cursor, and only for a plain copy with another holder."""
        if self.incarnation.get(worker) != incarnation:
            return
        cursor, held = self.version[worker], self.reports[worker]
        changed = False
        for key, version in dropped:
            if version <= cursor or key not in held:
                continue
            kv = self.view(key)
            if len(kv.holders) < 2 or kv.pinned_on or kv.conflicting:
                continue
            self.drop(worker, key)
            changed = True
        if changed:
            self.nkeys[worker] = len(held)

    def take_changes(self) -> tuple[set[Key], set[Key]]:
        events, self.last_event = self.last_event, {}
        return (
            {k for k, e in events.items() if e == "born"},
            {k for k, e in events.items() if e == "gone"},
        )


def fresh(text: str) -> str:
    """An equal string that is another object, as each poll brings its own copies."""
    return "".join(list(text))


class Driver:
    """Random operations applied to the state and the model alike."""

    def __init__(self, seed: int, track: bool) -> None:
        self.rng = random.Random(seed)
        self.state = ClusterState(track_changes=track)
        self.model = Model()
        self.track = track
        self.incarnations = 0
        self.versions = 0

    def report(self, worker: WorkerId, key: Key) -> KeyReport:
        rng, model = self.rng, self.model
        held = model.reports.get(worker, {}).get(key)
        if held is not None and rng.random() < 0.6:
            size, checksum, pinned = held  # reported again as it was
        elif key in model.content and rng.random() < 0.7:
            size, checksum = model.content[key]
            pinned = False
        else:
            n = rng.choice((1, 1, 1, 2, 3))
            size, checksum, pinned = 10 * n + int(key[1:]), f"{key}-{n}", False
        if rng.random() < 0.15:
            pinned = not pinned
        if rng.random() < 0.05:
            size += 1  # same checksum, another size: the content's size stays
        if rng.random() < 0.5:
            checksum = fresh(checksum)
        return KeyReport(Key(fresh(key) if rng.random() < 0.5 else key), size, checksum, pinned)

    def some_keys(self, worker: WorkerId, most: int) -> list[Key]:
        held = sorted(self.model.reports.get(worker, {}))
        return [
            self.rng.choice(held) if held and self.rng.random() < 0.8 else self.rng.choice(KEYS)
            for _ in range(self.rng.randint(0, most))
        ]

    def new_incarnation(self) -> str:
        self.incarnations += 1
        return f"i{self.incarnations}"

    def step(self) -> str:
        rng, state, model = self.rng, self.state, self.model
        worker = rng.choice(WORKERS)
        current = model.incarnation.get(worker, "i0")
        op = rng.choices(
            ["changes", "snapshot", "lookup", "drops", "register", "restart", "leave", "take"],
            weights=[45, 14, 10, 15, 6, 7, 5, 13],
        )[0]
        if op in ("changes", "snapshot"):
            full = op == "snapshot"
            incarnation = current if rng.random() < 0.9 else self.new_incarnation()
            if full:
                keys = [self.report(worker, k) for k in KEYS if rng.random() < 0.5]
                removed: list[Key] = []
            else:
                keys = [self.report(worker, k) for k in self.some_keys(worker, 4)]
                removed = self.some_keys(worker, 3)
            self.versions += 1
            poll(
                state,
                worker,
                self.versions,
                incarnation=incarnation,
                full=full,
                keys=keys,
                removed=removed,
                now=float(self.versions),
            )
            model.poll(worker, incarnation, self.versions, full, keys, removed)
            return f"{op} {worker} {incarnation} keys={keys} removed={removed}"
        if op == "lookup":
            incarnation = current if rng.random() < 0.9 else "stale"
            held = [self.report(worker, k) for k in self.some_keys(worker, 2)]
            absent = self.some_keys(worker, 2)
            state.apply_lookup(worker, incarnation=incarnation, held=held, absent=absent)
            model.lookup(worker, incarnation, held, absent)
            return f"lookup {worker} {incarnation} held={held} absent={absent}"
        if op == "drops":
            incarnation = current if rng.random() < 0.9 else "stale"
            cursor = model.version.get(worker, 0)
            dropped = [
                (key, rng.randint(max(0, cursor - 2), self.versions + 2))
                for key in self.some_keys(worker, 4)
            ]
            state.apply_drops(worker, incarnation, dropped)
            model.drops(worker, incarnation, dropped)
            return f"drops {worker} {incarnation} cursor={cursor} dropped={dropped}"
        if op in ("register", "restart"):
            incarnation = current if op == "register" else self.new_incarnation()
            assert state.register(worker, "", incarnation, now=0.0) == model.register(
                worker, incarnation
            )
            return f"{op} {worker} {incarnation}"
        if op == "leave":
            assert state.unregister(worker) == model.unregister(worker)
            return f"leave {worker}"
        assert state.take_changes() == (model.take_changes() if self.track else (set(), set()))
        return "take_changes"


def check(state: ClusterState, model: Model, view: ClusterView) -> None:
    expected = model.keys()
    assert dict(state.keys) == expected
    assert dict(view.keys) == expected
    assert view.replicated == model.replicated()
    assert state.nkeys == len(expected)
    assert state.conflicts == sorted(k for k, kv in expected.items() if kv.conflicting)
    assert state.nreplicas == sum(len(held) for held in model.reports.values())
    assert set(state.worker_ids) == set(model.incarnation)
    assert dict(view.holdings) == {w: frozenset(held) for w, held in model.reports.items()}
    each = state.held_by_each(WORKERS)
    assert {w: sorted(keys) for w, keys in each.items()} == {
        w: sorted(model.reports.get(w, ())) for w in WORKERS
    }
    for worker in WORKERS:
        held = frozenset(model.reports.get(worker, ()))
        assert state.held_by(worker) == held
        assert state.holding(worker) == len(held)
        # Holding sets keep the record's string, not each poll's copy.
        assert all(key is state.keys[key].key for key in state.held_by(worker))
        assert view.held_by(worker) == held
        known = state.worker(worker)
        if known is None:
            continue
        assert (known.incarnation, known.nkeys, known.version) == (
            model.incarnation[worker],
            model.nkeys[worker],
            model.version[worker],
        )


@pytest.mark.parametrize("seed", range(8))
def test_the_state_matches_the_model(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if seed % 2:  # the table of shared sets of holders emptied now and then, too
        monkeypatch.setattr(view_module, "MAX_SHARED_SETS", 6)
    driver = Driver(seed, track=seed % 4 != 3)
    state, model = driver.state, driver.model
    before, view = model.keys(), state.snapshot()
    history: list[str] = []
    for _ in range(STEPS):
        history.append(driver.step())
        after, later = model.keys(), state.snapshot()
        context = f"seed {seed}, steps:\n" + "\n".join(history[-8:])
        assert dict(view.keys) == before, context  # an earlier snapshot stays as it was
        try:
            check(state, model, later)
        except AssertionError as e:
            raise AssertionError(f"{context}\n{e}") from e
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        noted = later.changed_since(*view.feed)
        assert noted is not None, context
        assert changed <= noted, context
        before, view = after, later

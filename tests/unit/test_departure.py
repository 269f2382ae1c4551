"""A worker leaving through a ``Departure`` (worked out in steps, taken in at once) leaves the
cluster state exactly as removing its keys one at a time did: records, the replicated keys,
conflicts, the journal, ``take_changes`` and the holdings, whatever changed in between."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from amm_service.decisions.journal import Journal
from amm_service.decisions.view import (
    ClusterState,
    Departure,
    Key,
    KeyReport,
    Memory,
    WorkerId,
    WorkerStatus,
)

WORKERS = [WorkerId(f"w{i}") for i in range(5)]
LEAVER = WORKERS[0]


class OneAtATime(ClusterState):
    """The state as it was: a leaving worker's keys removed one at a time."""

    def _forget_holdings(self, worker: WorkerId, departure: object = None) -> None:
        for key in self.held_by(worker):
            self._remove_holding(worker, key)


def _poll(
    state: ClusterState,
    worker: WorkerId,
    keys: list[KeyReport],
    removed: list[Key] = [],  # noqa: B006 - never mutated
    *,
    full: bool = False,
    incarnation: str = "i1",
) -> None:
    state.apply_poll(
        worker,
        incarnation=incarnation,
        version=1,
        full=full,
        keys=keys,
        removed=removed,
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name=worker,
        now=1.0,
    )


def _report(rng: random.Random, key: str) -> KeyReport:
    """Mostly the key's usual content; now and then other content (a conflict), or pinned."""
    checksum = "odd" if rng.random() < 0.08 else f"sum-{key}"
    return KeyReport(Key(key), 10, checksum, pinned=rng.random() < 0.15)


def _populate(state: ClusterState, seed: int, nkeys: int) -> None:
    rng = random.Random(seed)
    for worker in WORKERS:
        state.register(worker, worker, "i1", 0.0)
    for worker in WORKERS:
        held = [f"k{i}" for i in range(nkeys) if rng.random() < (0.7 if worker == LEAVER else 0.4)]
        _poll(state, worker, [_report(rng, k) for k in held], full=True)


def _picture(state: ClusterState, since: int) -> dict[str, object]:
    snap = state.snapshot()
    return {
        "keys": dict(snap.keys),
        "replicated": snap.replicated,
        "conflicts": state.conflicts,
        "odd": {k: dict(v) for k, v in state._odd.items()},
        "held": {w: state.held_by(w) for w in state.worker_ids},
        "holding": {w: state.holding(w) for w in state.worker_ids},
        "holdings": {w: snap.holdings[w] for w in snap.holdings},
        "workers": set(state.worker_ids),
        "changes": state.take_changes(),
        "noted": state.journal.since(state.journal.uid, since),
        "nreplicas": state.nreplicas,
    }


Meddle = Callable[[ClusterState, int], None]


def _churn(seed: int, nkeys: int) -> Meddle:
    """Between two steps: other workers and the leaver itself gain, lose and re-pin keys, some
    of which the leaver holds; the same changes for every state given the same step."""

    def meddle(state: ClusterState, step: int) -> None:
        rng = random.Random(seed * 1000 + step)
        for worker in rng.sample(WORKERS, 2):
            keys = [_report(rng, f"k{rng.randrange(nkeys + 5)}") for _ in range(6)]
            gone = [Key(f"k{rng.randrange(nkeys)}") for _ in range(4)]
            _poll(state, worker, keys, gone)

    return meddle


def _unregister(state: ClusterState, departure: object) -> object:
    return state.unregister(LEAVER, departure)  # type: ignore[arg-type]


def _restart(state: ClusterState, departure: object) -> object:
    return state.register(LEAVER, LEAVER, "i2", 2.0, departure=departure)  # type: ignore[arg-type]


def _alone(state: ClusterState) -> Departure:
    return state.depart(LEAVER)


def _together(state: ClusterState) -> Departure:
    """Begun in one pass with another worker's: it looks only at the keys the leaver holds."""
    departures = state.depart_each([LEAVER, WORKERS[2]])
    assert set(departures[LEAVER].keys) == state.held_by(LEAVER)
    return departures[LEAVER]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("leave", [_unregister, _restart], ids=["unregister", "new incarnation"])
@pytest.mark.parametrize("churn", [False, True], ids=["quiet", "churn"])
@pytest.mark.parametrize("begin", [_alone, _together], ids=["alone", "together"])
def test_a_departure_leaves_the_state_as_one_key_at_a_time_did(
    seed: int,
    leave: Callable[[ClusterState, object], object],
    churn: bool,
    begin: Callable[[ClusterState], Departure],
) -> None:
    """Plain, pinned, conflicting and last-held keys, with other changes between the steps
    (made to the reference too) and after them; the old one-at-a-time removal is the
    reference. What the leaver holds, worked out from its departure (``held_through``), is
    ``held_by`` whatever changed."""
    nkeys = 60 + 20 * seed
    ref, new = OneAtATime(track_changes=True), ClusterState(track_changes=True)
    _populate(ref, seed, nkeys)
    _populate(new, seed, nkeys)
    assert _picture(ref, 0) == _picture(new, 0)
    meddle = _churn(seed, nkeys)
    departure = begin(new)
    step = 0
    while not new.prepare(departure, 7):
        step += 1
        if churn:
            meddle(ref, step)
            meddle(new, step)
    assert step > 3
    assert new.held_through(departure) == new.held_by(LEAVER)
    for after in range(step + 1, step + 4 if churn else step + 1):
        meddle(ref, after)
        meddle(new, after)
        assert new.held_through(departure) == new.held_by(LEAVER)
    starts = ref.journal.position, new.journal.position
    leave(ref, None)
    leave(new, departure)
    expected, got = _picture(ref, starts[0]), _picture(new, starts[1])
    assert got == expected
    assert got["noted"]


@pytest.mark.parametrize("seed", range(6))
def test_workers_leaving_together_leave_as_one_at_a_time_did(seed: int) -> None:
    """Departures begun in one pass (``depart_each``), taken in one after another: each sees
    the records the others changed (the keys they shared) and is worked out again for those,
    without the journal; what each held is ``held_by``, and the state ends as the reference's."""
    leaving = WORKERS[:3]
    ref, new = OneAtATime(track_changes=True), ClusterState(track_changes=True)
    _populate(ref, seed, 150)
    _populate(new, seed, 150)
    departures = new.depart_each(leaving)
    for departure in departures.values():
        new.prepare(departure)
    for worker in leaving:
        start = ref.journal.position, new.journal.position
        assert new.held_through(departures[worker]) == new.held_by(worker) == ref.held_by(worker)
        assert ref.unregister(worker) == new.unregister(worker, departures[worker]) is True
        assert _picture(new, start[1]) == _picture(ref, start[0])


def test_every_shape_of_key_leaves_as_before() -> None:
    """One key of each shape, named: the leaver plain with others, the last holder, pinned by
    it or by another, conflicting, the last holder of the reference content (the odd holders
    become the reference), and a key it holds alone pinned."""
    a, b, c = LEAVER, WORKERS[1], WORKERS[2]
    reports: dict[WorkerId, list[KeyReport]] = {a: [], b: [], c: []}

    def hold(key: str, **by: tuple[str, bool]) -> None:
        for name, (checksum, pinned) in by.items():
            worker = {"a": a, "b": b, "c": c}[name]
            reports[worker].append(KeyReport(Key(key), 10, checksum, pinned))

    plain = ("s", False)
    hold("shared", a=plain, b=plain, c=plain)
    hold("pair", a=plain, b=plain)
    hold("alone", a=plain)
    hold("alone-pinned", a=("s", True))
    hold("pinned-here", a=("s", True), b=plain)
    hold("pinned-there", a=plain, b=("s", True))
    hold("odd-other", a=plain, b=plain, c=("x", False))
    hold("odd-here", a=("x", False), b=plain)
    hold("reference-leaves", a=plain, b=("x", False), c=("y", False))
    pictures = []
    for state in (OneAtATime(track_changes=True), ClusterState(track_changes=True)):
        for worker in (a, b, c):
            state.register(worker, worker, "i1", 0.0)
        for worker, held in reports.items():
            _poll(state, worker, held, full=True)
        state.take_changes()
        start = state.journal.position
        departure = state.depart(a)
        assert state.prepare(departure, 3) is False
        while not state.prepare(departure, 3):
            pass
        assert state.unregister(a, departure)
        pictures.append(_picture(state, start))
    assert pictures[0] == pictures[1]
    keys = pictures[1]["keys"]
    assert isinstance(keys, dict)
    assert Key("alone") not in keys
    assert Key("alone-pinned") not in keys
    assert keys[Key("reference-leaves")].checksum == "x"
    assert pictures[1]["changes"] == (set(), {Key("alone"), Key("alone-pinned")})


def test_preparing_changes_nothing_anyone_reads() -> None:
    """Until it is taken in, the leaver is listed with all it holds: no window where a reader
    sees it half gone."""
    state = ClusterState(track_changes=True)
    _populate(state, 3, 200)
    state.take_changes()
    before = _picture(state, 0)
    position = state.journal.position
    departure = state.depart(LEAVER)
    while not state.prepare(departure, 10):
        assert state.journal.position == position
    assert _picture(state, 0) == before


@pytest.mark.parametrize("how", ["journal forgot", "registered again", "full poll"])
@pytest.mark.parametrize("begin", [_alone, _together], ids=["alone", "together"])
def test_a_departure_overtaken_is_worked_out_again(
    how: str, begin: Callable[[ClusterState], Departure]
) -> None:
    """The journal forgot what changed since it began, or the worker is another process now,
    or a full poll replaced its holdings: it is not used, and the removal is as before."""
    pictures = []
    for state in (OneAtATime(track_changes=True), ClusterState(track_changes=True)):
        _populate(state, 5, 300)
        departure = begin(state)
        state.prepare(departure)
        if how == "journal forgot":
            state.journal.limit = 8
            _poll(state, WORKERS[1], [KeyReport(Key(f"n{i}"), 1, "n") for i in range(20)])
        elif how == "registered again":
            state.register(LEAVER, LEAVER, "i2", 1.0)
            _poll(
                state,
                LEAVER,
                [_report(random.Random(1), f"k{i}") for i in range(50)],
                [],
                incarnation="i2",
            )
        else:
            _poll(state, LEAVER, [_report(random.Random(2), f"k{i}") for i in range(40)], full=True)
        state.take_changes()
        start = state.journal.position
        assert state.held_through(departure) == state.held_by(LEAVER)
        state.unregister(LEAVER, departure)
        pictures.append(_picture(state, start))
    assert pictures[0] == pictures[1]
    assert pictures[1]["held"] == {w: pictures[1]["held"][w] for w in WORKERS[1:]}  # type: ignore[index]


def test_release_frees_what_it_replaced_in_steps() -> None:
    state = ClusterState()
    _populate(state, 1, 100)
    departure = state.depart(LEAVER)
    state.prepare(departure)
    replaced = len(departure.replaced)
    assert 10 < replaced <= len(state.held_by(LEAVER))  # not the conflicting ones
    state.unregister(LEAVER, departure)
    assert departure.release(10) is False
    assert len(departure.replaced) == replaced - 10
    while not departure.release(10):
        pass
    assert departure.replaced == []


def test_extend_is_note_of_each() -> None:
    one, many = Journal[str](limit=10), Journal[str](limit=10)
    one.uid = many.uid
    keys = [f"k{i}" for i in range(27)]
    for key in keys:
        one.note(key)
    many.extend(keys[:3])
    many.extend(iter(keys[3:]))
    assert one.position == many.position == 27
    assert len(many) <= many.limit
    assert many.noted(many.uid, 22) == one.noted(one.uid, 22) == keys[22:]

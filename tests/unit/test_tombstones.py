"""Tombstones of forgotten keys: the agent's store keeps them, the core plans no copy of them,
and the AMM's book tells each agent in turn and notices a key put again. No network."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import pytest

from amm_service.decisions.core import PlanConfig, Why, plan
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import (
    ClusterState,
    ClusterView,
    Key,
    KeyReport,
    Measure,
    Memory,
    WorkerId,
    WorkerStatus,
)
from amm_service.policies import PolicyRun, Suggestion, drop, replicate
from amm_service.runtime.records import tombstones as tombstones_module
from amm_service.runtime.records.state import MEMORY, StateStore
from amm_service.runtime.records.tombstones import NOTHING, Push, TombstoneBook
from tests.factories import cluster, new_ids
from worker_agent.store import Key as AgentKey
from worker_agent.store import Store

K = Key("k")
AK = AgentKey("k")
A, B = WorkerId("a"), WorkerId("b")


# -- the agent's store -----------------------------------------------------------------------


def test_an_agent_takes_a_tombstone_once_and_a_put_lifts_it() -> None:
    store = Store()
    assert not store.forgotten(AK, now=0.0)
    assert store.bury(AK, 7, now=0.0, ttl=60.0)
    assert store.forgotten(AK, now=1.0)
    assert not store.bury(AK, 7, now=1.0, ttl=60.0), "the same Forget sent again changes nothing"
    store.put_again(AK)
    assert not store.forgotten(AK, now=1.0)
    assert store.bury(AK, 8, now=2.0, ttl=60.0), "a new Forget of the key"
    assert store.forgotten(AK, now=2.0)
    store.put_again(AK, tombstone=7)  # the mark of an older Forget does not lift a newer one
    assert store.forgotten(AK, now=2.0)
    store.put_again(AK, tombstone=8)
    assert not store.forgotten(AK, now=2.0)


def test_a_transfer_that_began_before_a_tombstone_is_discarded_even_once_put_again() -> None:
    store = Store()
    began = store.generation
    store.bury(AK, 1, now=0.0, ttl=60.0)
    assert store.doomed(AK, began, now=1.0)
    store.put_again(AK)
    assert store.doomed(AK, began, now=1.0), "it began before the Forget"
    assert not store.doomed(AK, store.generation, now=1.0), "one that began after the put"
    assert not store.doomed(AgentKey("other"), began, now=1.0)


def test_an_agents_tombstones_expire_and_are_bounded() -> None:
    store = Store()
    store.bury(AK, 1, now=0.0, ttl=10.0)
    assert not store.forgotten(AK, now=10.0)
    store._max_tombstones = 2
    for n, key in enumerate(["x", "y", "z"]):
        store.bury(AgentKey(key), n + 2, now=20.0, ttl=10.0)
    assert [store.forgotten(AgentKey(k), now=21.0) for k in "xyz"] == [False, True, True]


def test_an_agents_expired_tombstones_go_without_a_new_one() -> None:
    """Before, they went only when a newer tombstone was taken: after the last Forget they were
    kept for good."""
    store = Store()
    for n, key in enumerate("xyz"):
        store.bury(AgentKey(key), n + 1, now=float(n), ttl=10.0)
    assert store.expire_tombstones(now=10.5) == 1
    assert store.tombstones == 2
    assert store.expire_tombstones(now=100.0) == 2
    assert store.tombstones == 0


# -- the core ---------------------------------------------------------------------------------


class Asks:
    def __init__(self, *suggestions: Suggestion) -> None:
        self.name = "asks"
        self.suggestions = suggestions
        self.answers: list[WorkerId | None] = []

    def run(self, view: ClusterView, pending: object, measure: Measure) -> PolicyRun:
        self.answers = []
        for suggestion in self.suggestions:
            self.answers.append((yield suggestion))


def test_the_core_plans_no_copy_of_a_forgotten_key_but_drops_it() -> None:
    state = cluster({"a": ["k"], "b": ["k"], "c": []})
    view = state.snapshot(forgotten=frozenset({K}))
    done = plan(
        view,
        [Asks(replicate(K), drop(K))],
        Ledger(),
        PlanConfig(measure="managed", epoch=1),
        new_ids(),
    )
    assert [d.op.name for d in done.directives] == ["DROP"]
    (rejection,) = done.rejections
    assert rejection.why is Why.FORGOTTEN


# -- the AMM's book ---------------------------------------------------------------------------


def fake_clock(start: float = 1000.0) -> tuple[Callable[[], float], Callable[[float], None]]:
    now = [start]

    def advance(seconds: float) -> None:
        now[0] += seconds

    return (lambda: now[0]), advance


def poll(
    state: ClusterState,
    worker: WorkerId,
    keys: Iterable[str] = (),
    *,
    pinned: Iterable[str] = (),
    incarnation: str = "i1",
) -> list[Key]:
    """A full poll answer of ``worker`` (registered if new), as an agent that takes
    tombstones; the keys it reports."""
    if state.worker(worker) is None:
        state.register(worker, worker, incarnation, now=0.0)
    pins = set(pinned)
    reports = [KeyReport(Key(k), 10, f"sum-{k}", pinned=k in pins) for k in keys]
    state.apply_poll(
        worker,
        incarnation=incarnation,
        version=1,
        full=True,
        keys=reports,
        removed=(),
        memory=Memory(),
        status=WorkerStatus.RUNNING,
        name=worker,
        now=1.0,
        features=frozenset({"tombstones"}),
    )
    return [r.key for r in reports]


@pytest.fixture
def store() -> StateStore:
    return StateStore(MEMORY)


def book_of(store: StateStore, ttl: float = 600.0) -> tuple[TombstoneBook, Callable[[float], None]]:
    clock, advance = fake_clock()
    book = TombstoneBook(store, ttl=ttl, clock=clock)
    book.load()
    return book, advance


def deliver(book: TombstoneBook, state: ClusterState, worker: WorkerId, *keys: str) -> Push:
    """One poll of ``worker``: the pending tombstones go out, ``keys`` come back."""
    known = state.worker(worker)
    incarnation = known.incarnation if known is not None else ""
    push = book.pending(worker, incarnation)
    seen = poll(state, worker, keys)
    book.polled(worker, push, state, seen, [])
    return push


def test_every_agent_is_told_each_tombstone_once(store: StateStore) -> None:
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A)
    book.bury(["k", "j"])
    assert book.live == {Key("k"), Key("j")}
    push = deliver(book, state, A)
    assert [key for key, _, _ in push.items] == ["k", "j"]
    assert book.pending(A, "i1") == NOTHING
    book.bury(["k"])  # forgotten again: a new tombstone, sent again
    (item,) = book.pending(A, "i1").items
    assert item[0] == "k"
    assert item[1] > push.items[0][1]
    # A new incarnation of the agent knows none of them.
    assert len(book.pending(A, "i2").items) == 2


def test_tombstones_go_out_in_bounded_pushes(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tombstones_module, "PUSH_KEYS", 2)
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A)
    book.bury(["k1", "k2", "k3"])
    assert [k for k, _, _ in deliver(book, state, A).items] == ["k1", "k2"]
    assert [k for k, _, _ in deliver(book, state, A).items] == ["k3"]
    assert book.pending(A, "i1") == NOTHING


def test_a_key_reported_again_by_an_agent_that_took_its_tombstone_was_put_again(
    store: StateStore,
) -> None:
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A)
    poll(state, B)
    book.bury(["k"])
    deliver(book, state, A)
    deliver(book, state, B)
    deliver(book, state, B, "k")  # B holds it again: a Put there
    assert book.live == frozenset()
    ((key, _, put_again),) = book.pending(A, "i1").items
    assert (key, put_again) == ("k", True)


def test_a_leftover_on_an_agent_that_has_not_taken_the_tombstone_is_no_put(
    store: StateStore,
) -> None:
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A, ["k"])
    book.bury(["k"])
    book.polled(A, NOTHING, state, poll(state, A, ["k"]), [])  # a poll that carried nothing
    assert book.live == {K}


def test_a_pinned_copy_kept_through_the_tombstone_is_no_put(store: StateStore) -> None:
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A, ["k"], pinned=["k"])
    book.bury(["k"])
    push = book.pending(A, "i1")
    book.polled(A, push, state, poll(state, A, ["k"], pinned=["k"]), [])
    assert book.live == {K}
    book.polled(A, NOTHING, state, poll(state, A, ["k"]), [])  # unpinned later: still no put
    assert book.live == {K}


def test_an_unpinned_copy_kept_through_a_tombstone_sent_again_was_put_again(
    store: StateStore,
) -> None:
    """An AMM that restarted sends every tombstone again; the agent recognises the id, and
    keeps the value put since, which the AMM takes as the put it is."""
    book, _ = book_of(store)
    state = ClusterState()
    poll(state, A)
    book.bury(["k"])
    deliver(book, state, A)
    again, _ = book_of(store)  # the restarted AMM
    state = ClusterState()
    deliver(again, state, A, "k")
    assert again.live == frozenset()


def test_tombstones_persist_and_expire(store: StateStore) -> None:
    book, advance = book_of(store, ttl=60.0)
    book.bury(["k"])
    (record,) = store.tombstones()
    again, _ = book_of(store, ttl=60.0)
    assert again.live == {K}
    ((_, tombstone, _),) = again.pending(A, "i1").items
    assert tombstone == record.id
    advance(61.0)
    book.expire()
    assert book.live == frozenset()
    assert store.tombstones() == []


def test_a_burst_of_tombstones_leaves_no_big_table_once_they_expired(store: StateStore) -> None:
    """A dict keeps its table after deletions: a soak's forgets left about 160 KiB behind."""
    book, advance = book_of(store, ttl=60.0)
    empty = sys.getsizeof(book._stones)
    book.bury([f"k{i}" for i in range(5_000)])
    advance(61.0)
    book.expire()
    assert len(book) == 0
    assert sys.getsizeof(book._stones) == empty


def test_an_agent_that_does_not_take_tombstones_is_not_sent_them_again_and_again(
    store: StateStore,
) -> None:
    book, _ = book_of(store)
    book.bury(["k"])
    assert book.pending(A, "i1").items  # its features are not known yet
    assert book.pending(A, "i1", frozenset({"put-batches"})) == NOTHING

"""An agent holding many keys keeps them out of the garbage collector's full collections
(``amm.base.heap``): each walked its whole store with the loop held (30-40 ms every second or so
while it dropped 100k keys, a sixth of the CPU of a batch of 100,000 drops), and a HoldsKeys or
a poll waited as long. The heap is thawed and collected every ``thaw_every`` seconds, and once
the store is small again."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from amm.base.checksum import checksum
from amm.base.heap import HeapFreezer
from tests.support.agent import running_agent
from tests.support.waiting import wait_for
from worker_agent.agent import FREEZE_FROM
from worker_agent.store import Key


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.usefixtures("thawed")
def test_a_big_heap_is_frozen_and_thawed_every_so_often() -> None:
    clock = Clock()
    heap = HeapFreezer(thaw_every=300.0, clock=clock)
    heap.freeze(big=False)
    assert (heap.frozen, gc.get_freeze_count()) == (False, 0), "a small heap is left alone"
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    heap.freeze(big=True)
    assert heap.frozen
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert gone() is not None, "frozen garbage in a reference cycle waits for the thaw"
    clock.now = 300.0
    heap.freeze(big=True)
    assert gone() is None, "the thaw collected the whole heap once"
    assert heap.frozen, "and froze it again"
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("thawed")
def test_a_heap_that_became_small_is_thawed_and_collected() -> None:
    heap = HeapFreezer(clock=Clock())
    heap.freeze(big=True)
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    heap.freeze(big=True)
    del cycle
    heap.freeze(big=False)
    assert gone() is None
    assert (heap.frozen, gc.get_freeze_count()) == (False, 0)


@pytest.mark.usefixtures("thawed")
async def test_a_big_store_is_frozen_out_of_full_collections_until_the_agent_stops() -> None:
    async with running_agent(memory_interval=0.05) as agent:
        data = b"v"
        digest = checksum(data)
        agent.node.put_many([(Key(f"k{i:06d}"), data, digest) for i in range(FREEZE_FROM)])
        values = [agent.node.store.get(Key(f"k{i:06d}")) for i in range(100)]
        await wait_for(
            lambda: gc.get_freeze_count() >= FREEZE_FROM, within=30, what="a frozen heap"
        )
        # What the store holds is among what is frozen (a tracked object that a full
        # collection no longer walks).
        walked = {id(o) for o in gc.get_objects(generation=2)}
        assert all(gc.is_tracked(v) and id(v) not in walked for v in values)
    assert gc.get_freeze_count() == 0, "a stopped agent leaves the heap as it found it"

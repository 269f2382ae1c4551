"""An agent holding a big store keeps it out of full garbage collections (``worker_agent.heap``):
the heap is frozen while the store is big, thawed and collected every ``thaw_every`` seconds,
and once the store is small again."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from amm.base.checksum import checksum
from tests.support.agent import running_agent
from tests.support.waiting import wait_for
from worker_agent.heap import BIG_STORE, Heap
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
def test_a_big_store_is_frozen_and_thawed_every_so_often() -> None:
    clock = Clock()
    heap = Heap(big=100, thaw_every=300.0, clock=clock)
    heap.settle(99)
    assert (heap.frozen, gc.get_freeze_count()) == (False, 0), "a small store is left alone"
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    heap.settle(100)
    assert heap.frozen
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert gone() is not None, "frozen garbage in a reference cycle waits for the thaw"
    clock.now = 300.0
    heap.settle(100)
    assert gone() is None, "the thaw collected the whole heap once"
    assert heap.frozen, "and froze it again"
    assert gc.get_freeze_count() > 0


@pytest.mark.usefixtures("thawed")
def test_a_store_that_became_small_is_thawed_and_collected() -> None:
    heap = Heap(big=100, clock=Clock())
    heap.settle(500)
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    heap.settle(500)
    del cycle
    heap.settle(10)
    assert gone() is None
    assert (heap.frozen, gc.get_freeze_count()) == (False, 0)


@pytest.mark.usefixtures("thawed")
async def test_an_agent_with_a_big_store_freezes_its_heap_until_it_stops() -> None:
    """Before: the agent left its heap to the collector, whose full collections walked every
    value held (a sixth of the CPU of a batch of 100,000 drops)."""
    values = [(Key(f"big-{i}"), i.to_bytes(4, "little")) for i in range(BIG_STORE)]
    async with running_agent(memory_interval=0.05) as agent:
        agent.node.put_many([(key, data, checksum(data)) for key, data in values])
        await wait_for(gc.get_freeze_count, within=20, what="a frozen heap")
    assert gc.get_freeze_count() == 0, "a stopped agent leaves the heap as it found it"

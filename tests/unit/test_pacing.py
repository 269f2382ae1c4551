"""Keeping a big AMM's heap out of full garbage collections."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from amm_service.runtime.pacing import FREEZE_AFTER, HeapFreezer, gc_paused


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("thawed")
def test_a_big_heap_is_frozen_and_its_cyclic_garbage_collected_at_each_thaw() -> None:
    now = [0.0]
    heap = HeapFreezer(thaw_every=300.0, clock=lambda: now[0])
    heap.freeze(big=False)
    assert gc.get_freeze_count() == 0, "a small AMM is left to the collector"
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    heap.freeze(big=True)
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert gone() is not None, "frozen garbage in a reference cycle waits for the thaw"
    now[0] = 300.0
    heap.freeze(big=True)
    assert gone() is None, "the thaw collected the whole heap once"
    assert gc.get_freeze_count() > 0, "and froze it again"


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.usefixtures("thawed")
def test_what_a_big_bulk_step_leaves_is_frozen_at_its_end() -> None:
    """No collection of a bulk step's survivors right after it (pacing.gc_paused)."""
    heap = HeapFreezer(clock=lambda: 0.0)
    heap.freeze(big=False)
    with gc_paused():
        _few: list[list[int]] = [[] for _ in range(100)]
    assert gc.get_freeze_count() == 0, "a small step is left to the collector"
    many: list[list[list[int]]] = []
    for _ in range(4):  # small steps that leave much, in all
        with gc_paused():
            many.append([[] for _ in range(FREEZE_AFTER // 2)])
    assert gc.get_freeze_count() >= FREEZE_AFTER
    gc.unfreeze()
    heap.freeze(big=True)
    frozen = gc.get_freeze_count()
    with gc_paused():
        more: list[list[int]] = [[] for _ in range(100)]
    assert gc.get_freeze_count() >= frozen + len(more), "a frozen heap stays frozen"


@pytest.mark.usefixtures("thawed")
def test_objects_in_a_frozen_heap_are_still_freed_by_reference_counting() -> None:
    heap = HeapFreezer(clock=lambda: 0.0)

    class Thing:
        pass

    things = [Thing() for _ in range(1_000)]
    heap.freeze()
    count = gc.get_freeze_count()
    del things
    assert gc.get_freeze_count() <= count - 1_000

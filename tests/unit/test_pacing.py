"""Keeping a big AMM's heap out of full garbage collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from amm_service.runtime.pacing import HeapFreezer


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("thawed")
def test_a_big_heap_is_frozen_and_thawed_now_and_then() -> None:
    now = [0.0]
    heap = HeapFreezer(thaw_every=300.0, clock=lambda: now[0])
    heap.freeze(big=False)
    assert gc.get_freeze_count() == 0, "a small AMM is left to the collector"
    heap.freeze(big=True)
    assert gc.get_freeze_count() > 0
    now[0] = 300.0
    heap.freeze(big=True)
    assert gc.get_freeze_count() == 0, "thawed, so that a full collection sees everything once"
    now[0] = 301.0
    heap.freeze(big=True)
    assert gc.get_freeze_count() > 0


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

"""Keeping a big AMM's heap out of full garbage collections."""

from __future__ import annotations

import asyncio
import gc
import itertools
import platform
import subprocess
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterator

import pytest

from amm_service.runtime.loop.pacing import FREEZE_AFTER, Budget, HeapFreezer, gc_paused
from worker_agent import pacing as agent_pacing
from worker_agent.pacing import Pace


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


@pytest.mark.parametrize("side", ["amm", "agent"])
async def test_paced_tasks_share_one_budget_per_turn_of_the_loop(
    side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three bulk tasks, each in slices of 3 ms: a turn of the loop, between two ticks of a task
    that stands for a control call (or a poll of an agent), runs about one budget of their
    slices in all, not one budget per task.

    One fake clock for the slices and the loop's timers, which a tick moves by 0.1 ms: by the
    real clock, a pause could end within a turn on a busy machine, and a task woken late ran
    with the next shift's."""
    loop = asyncio.get_running_loop()
    now = [loop.time()]  # after any pause an earlier test left in this loop's shift
    log: list[str] = []

    def clock() -> float:
        return now[0]

    async def bulk(name: str) -> None:
        if side == "amm":
            pace: Callable[[], Awaitable[bool]] = Budget(0.005, clock=clock)
            items = 1
        else:
            pace, items = Pace(0.005, clock=clock), agent_pacing.EVERY
        for _ in range(30):
            log.append(name)
            for _ in range(items):  # the agent's reads its clock every EVERY items
                now[0] += 0.003 / items
                await pace()

    async def control() -> None:
        while True:
            log.append("|")
            now[0] += 0.0001
            await asyncio.sleep(0)

    monkeypatch.setattr(loop, "time", clock)
    ticking = asyncio.create_task(control())
    await asyncio.sleep(0)
    await asyncio.gather(bulk("a"), bulk("b"), bulk("c"))
    ticking.cancel()
    sizes = sorted(len(run) for run in "".join(log).split("|") if run)
    # A budget is two slices; each task's budget alone made a third of the turns six ("aabbcc").
    assert sizes[len(sizes) * 9 // 10] <= 2, sizes
    assert sizes[-1] <= 4, sizes
    # And they take turns: the loop that began a pause does not win the next shift too.
    runs = [run for run in "".join(log).split("|") if run]
    for name in "abc":
        turns = [i for i, run in enumerate(runs) if name in run]
        assert max(b - a for a, b in itertools.pairwise(turns)) <= 3, runs


@pytest.mark.usefixtures("thawed")
def test_steps_that_leave_nothing_do_not_freeze_a_small_heap() -> None:
    """Counted per step, not the young generation's count: many bulk steps of a small AMM under
    churn (a poll, a dispatch) froze its whole heap, keeping its cyclic garbage for minutes."""
    heap = HeapFreezer(clock=lambda: 0.0)
    heap.freeze(big=False)
    gc.collect()
    young: list[list[int]] = [[] for _ in range(gc.get_threshold()[0] - 100)]  # before any step
    assert gc.get_count()[0] >= len(young)
    for _ in range(3 * FREEZE_AFTER // len(young)):
        with gc_paused():
            pass
    assert gc.get_freeze_count() == 0


def test_the_c_heap_is_trimmed_once_a_period() -> None:
    """The AMM gives its C heap's free memory back (``malloc.trim``) from time to time: gRPC's
    thread arenas kept what a forget of thousands of keys freed otherwise."""
    now, trims = [0.0], []
    heap = HeapFreezer(clock=lambda: now[0], trim_every=60.0, trim=lambda: trims.append(now[0]))
    for t in (1.0, 30.0, 59.0, 60.0, 61.0, 119.0, 120.5):
        now[0] = t
        heap.freeze(big=False)
    assert trims == [60.0, 120.5]


def test_a_trim_gives_back_what_a_thread_freed() -> None:
    """In a process of its own: memory freed in a thread's arena below a chunk still in use stays
    resident until ``malloc.trim``, which the AMM's ``HeapFreezer`` calls."""
    code = """
import ctypes, threading
from amm.base import malloc, memdebug
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def churn():
    blocks = [libc.malloc(4000) for _ in range(20000)]
    for b in blocks[:-1]:
        libc.free(b)  # the last one stays in use, above all the freed ones
t = threading.Thread(target=churn); t.start(); t.join()
before = memdebug.rss()
print(malloc.trim(), (before - memdebug.rss()) // 2**20)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    trimmed, given_back_mib = done.stdout.split()
    if platform.libc_ver()[0] != "glibc":
        assert trimmed == "False"
        return
    assert trimmed == "True"
    assert int(given_back_mib) >= 40, "20,000 freed chunks of 4 kB were still resident"

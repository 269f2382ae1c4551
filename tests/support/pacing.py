"""Control calls timed against bulk loops of fixed CPU slices, paced as the AMM's or an agent's
bulk work is: what a call waits for then does not change with the machine's speed."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable

from amm_service.runtime.loop.pacing import Budget
from tests.support.waiting import wait_for

#: Bulk loops at once, as a big cycle's polls and streams, or an agent's batches in hand.
BULK_LOOPS = 3
#: CPU seconds of one slice of bulk work between two breaths.
SLICE = 0.0002


async def call_cpu(
    call: Callable[[int], Awaitable[object]],
    breather: Callable[[], Callable[[], Awaitable[object]]],
    calls: int = 40,
) -> list[float]:
    """The CPU the loop's thread spent while each of ``calls`` calls (``call(i)``) was in flight,
    with ``BULK_LOOPS`` bulk loops running, each breathing with its own ``breather()`` between
    slices. The cyclic GC is paused meanwhile: a full collection over this process's objects is
    not the pacing's doing."""
    stop = asyncio.Event()

    async def bulk() -> None:
        breathe = breather()
        while not stop.is_set():
            end = time.thread_time() + SLICE
            while time.thread_time() < end:
                pass
            await breathe()

    collecting = gc.isenabled()
    gc.disable()
    loops = [asyncio.create_task(bulk()) for _ in range(BULK_LOOPS)]
    spent: list[float] = []
    try:
        for i in range(calls):
            before = time.thread_time()
            await call(i)
            spent.append(time.thread_time() - before)
            await asyncio.sleep(0.002)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        if collecting:
            gc.enable()
    return spent


class PacedBulk:
    """Bulk work in the AMM's loop, paced as a cycle's is (``pacing.Budget``), in slices of a
    millisecond of work each by its own clock (no real work: the test counts, it does not
    time): how many slices it did, and how many times it breathed."""

    SLICE = 0.001

    def __init__(self) -> None:
        self.now = 0.0
        self.slices = 0
        self.breaths = 0
        self.stop = False

    async def run(self) -> None:
        pace = Budget(clock=lambda: self.now)
        while not self.stop:
            self.now += self.SLICE
            self.slices += 1
            if await pace():
                self.breaths += 1

    async def per_breath(self, slices: int = 50) -> float:
        """Slices per breath over the next ``slices`` slices."""
        start = (self.slices, self.breaths)
        await wait_for(lambda: self.slices - start[0] >= slices, what="bulk slices")
        return (self.slices - start[0]) / max(1, self.breaths - start[1])

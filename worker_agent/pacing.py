"""Letting the agent's event loop in during bulk work (a batch of thousands of drops, promises,
directives decoded or outcomes judged), so that a poll or a read is answered within milliseconds
of arriving instead of behind the whole batch.

A loop over a batch calls ``await pace()`` between two items: it returns at once until ``BUDGET``
seconds have passed since the loop last let others in, then pauses for ``PAUSE``. A pause, not a
zero sleep: grpc.aio learns of new calls on a poller thread that needs the GIL, and a zero sleep
hands the loop back before that thread has had it (as in ``amm_service.runtime.pacing``).

Whoever paces must not rely on anything staying as it was across a pause: every integrity rule is
judged per key, in the synchronous step that acts on that key.
"""

from __future__ import annotations

import asyncio
import time

#: Most seconds of work between two pauses.
BUDGET = 0.005
#: How long a pause lasts, in seconds.
PAUSE = 0.001
#: Items between two readings of the clock.
EVERY = 16


class Pace:
    """One bulk loop's pacing: ``await pace()`` between two items.

    The clock is read every ``EVERY`` items only: a batch has tens of thousands of them."""

    __slots__ = ("_budget", "_count", "_since")

    def __init__(self, budget: float = BUDGET) -> None:
        self._budget = budget
        self._count = 0
        self._since = time.perf_counter()

    async def __call__(self) -> bool:
        """Pause if the budget is spent; whether it paused (what was read before may be stale)."""
        self._count += 1
        if self._count < EVERY:
            return False
        self._count = 0
        if time.perf_counter() - self._since < self._budget:
            return False
        await asyncio.sleep(PAUSE)
        self._since = time.perf_counter()
        return True

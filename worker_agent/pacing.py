"""Letting the agent's event loop in during bulk work (a batch of thousands of drops, promises,
directives decoded or outcomes judged), so that a poll or a read is answered within milliseconds
of arriving instead of behind the whole batch.

A loop over a batch calls ``await pace()`` between two items (or, in the hottest loops,
``if pace.due() and await pace.breathe()``, which costs no coroutine per item): it returns at
once until the bulk loops running at once have spent ``BUDGET`` seconds since the last pause,
then every one of them pauses together (``amm.base.shifts``, which the AMM's pacing shares: a
pause for all, not one each, so that a HoldsKeys waits for one budget of bulk work, not one per
step of the call).

Whoever paces must not rely on anything staying as it was across a pause: every integrity rule is
judged per key, in the synchronous step that acts on that key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from amm.base.shifts import Paced

#: Most seconds of bulk work, by all the bulk loops of the agent, between two pauses.
BUDGET = 0.005
#: Items between two readings of the clock: an item of a batch costs a few microseconds, so 64
#: overrun the budget by well under a millisecond, and each reading (``Pace.breathe``) costs
#: about as much as an item.
EVERY = 64

T = TypeVar("T")


def parts(items: Sequence[T], size: int = EVERY) -> Iterator[Sequence[T]]:
    """``items`` in slices of ``size``: the hottest loops breathe once per slice (``await
    pace.breathe()``) rather than counting each item (``due``, a call per item)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Pace(Paced):
    """One bulk loop's pacing: ``await pace()`` between two items.

    The budget is shared by every bulk loop running at once (a batch of drops, its promises,
    a poll's answer), and so is the pause that follows it. The clock is read every ``EVERY``
    items only: a batch has tens of thousands of them."""

    __slots__ = ("_budget", "_count")

    def __init__(
        self, budget: float | None = None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        super().__init__(clock)
        self._budget = BUDGET if budget is None else budget  # read now: tests set it
        self._count = 0

    async def __call__(self) -> bool:
        """Pause if the budget is spent; whether it paused (what was read before may be stale)."""
        self._count += 1
        if self._count < EVERY:
            return False
        return await self.breathe()

    def due(self) -> bool:
        """Count one item; whether the clock is to be read now (``breathe``). The same as
        ``__call__`` without creating a coroutine for the items in between: a batch of drops
        paces each directive in several loops."""
        self._count += 1
        return self._count >= EVERY

    async def breathe(self) -> bool:
        """Pause if the budget is spent or a pause is under way (after ``due``); whether it
        paused."""
        self._count = 0
        return await self._breathe(self._budget)

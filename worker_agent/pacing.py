"""Letting the agent's event loop in during bulk work (a batch of thousands of drops, promises,
directives decoded or outcomes judged), so that a poll or a read is answered within milliseconds
of arriving instead of behind the whole batch.

A loop over a batch calls ``await pace()`` between two items: it returns at once until the bulk
loops running at once have spent ``BUDGET`` seconds in this turn of the event loop, then pauses
for ``PAUSE``. A pause, not a
zero sleep: grpc.aio learns of new calls on a poller thread that needs the GIL, and a zero sleep
hands the loop back before that thread has had it (as in ``amm_service.runtime.pacing``).

Whoever paces must not rely on anything staying as it was across a pause: every integrity rule is
judged per key, in the synchronous step that acts on that key.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable

#: Most seconds of work between two pauses.
BUDGET = 0.005
#: How long a pause lasts, in seconds.
PAUSE = 0.001
#: Items between two readings of the clock.
EVERY = 16


class _Turn:
    """The bulk work done in one turn of an event loop, by every ``Pace`` on it."""

    __slots__ = ("ending", "spent")

    def __init__(self) -> None:
        self.spent = 0.0
        self.ending = False

    def end(self) -> None:
        """Runs first in the loop's next turn, after its ``select``: a new turn's budget."""
        self.spent, self.ending = 0.0, False


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turn] = weakref.WeakKeyDictionary()
#: Pauses a paced loop takes at most, in a row, while other loops spend each turn's budget.
WAITS = 8


class Pace:
    """One bulk loop's pacing: ``await pace()`` between two items.

    The budget is shared by every bulk loop running at once (a batch of drops, its promises,
    a poll's answer): a turn of the event loop, and a poll or HoldsKeys waiting for it, takes
    about one budget of bulk work in all, not one per bulk loop. A pause ends the turn's budget
    (``_Turn.end`` runs first in the next turn); loops whose pause ends while the turn's budget
    is spent pause again, a few times at most. The clock is read every ``EVERY`` items only: a
    batch has tens of thousands of them."""

    __slots__ = ("_budget", "_clock", "_count", "_since")

    def __init__(
        self, budget: float = BUDGET, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self._budget = budget
        self._clock = clock
        self._count = 0
        self._since = clock()

    async def __call__(self) -> bool:
        """Pause if the budget is spent; whether it paused (what was read before may be stale)."""
        self._count += 1
        if self._count < EVERY:
            return False
        self._count = 0
        loop = asyncio.get_running_loop()
        turn = _turns.get(loop)
        if turn is None:
            turn = _turns[loop] = _Turn()
        now = self._clock()
        if turn.spent + (now - self._since) < self._budget:
            return False
        turn.spent += now - self._since
        for waited in range(WAITS):
            if not turn.ending:
                turn.ending = True
                loop.call_soon(turn.end)
            # Shorter once it lost a turn to other tasks: it comes before them in the next one.
            await asyncio.sleep(PAUSE / 2 if waited else PAUSE)
            if turn.spent < self._budget:
                break
        self._since = self._clock()
        return True

"""Bulk work shared fairly within each turn of an event loop.

Several bulk tasks pacing themselves alone each hold the loop for their own budget, so a turn
(and a control call waiting for it) takes a budget per task. ``Turns`` keeps, per event loop,
the bulk work done in its current turn by every task that paces itself through it; a task
breathes once the turn's budget is spent. The AMM's ``Budget`` and the agent's ``Pace`` stand
on it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

#: Seconds a paced task pauses when it breathes (the loop's other work runs meanwhile).
PAUSE = 0.001
#: Breaths a paced task takes at most, in a row, while other tasks spend each turn's budget.
WAITS = 8


class _Turn:
    """The bulk work done in one turn of an event loop."""

    __slots__ = ("ending", "spent")

    def __init__(self) -> None:
        self.spent = 0.0
        self.ending = False

    def end(self) -> None:
        """Runs first in the loop's next turn, after its ``select``: a new turn's budget."""
        self.spent, self.ending = 0.0, False


class Turns:
    """The turns of every event loop, for the tasks that pace themselves through this."""

    def __init__(self) -> None:
        self._turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Turn] = (
            weakref.WeakKeyDictionary()
        )
        # The loop asked about last and its turn (a weak reference to the loop): nearly every
        # call comes from the same loop, and a weak dictionary's lookup costs a microsecond.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], _Turn] | None = None

    async def breathe(
        self, since: float, budget: float, clock: Callable[[], float]
    ) -> float | None:
        """A task that worked since ``since`` (by ``clock``): breathe if this turn's ``budget``
        is spent, and return when it worked again from; None when it did not breathe.

        A breath ends the turn's budget: ``_Turn.end`` is queued to run first in the next turn
        (``call_soon`` callbacks run after the next ``select``). Tasks whose breath ends while
        the turn's budget is spent breathe again (``WAITS`` times at most, so no one starves),
        shorter once they lost a turn: they come before the others in the next one."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            turn = last[1]
        else:
            known = self._turns.get(loop)
            if known is None:
                known = self._turns[loop] = _Turn()
            turn = known
            self._last = (weakref.ref(loop), turn)
        now = clock()
        if turn.spent + (now - since) < budget:
            return None
        turn.spent += now - since
        for waited in range(WAITS):
            if not turn.ending:
                turn.ending = True
                loop.call_soon(turn.end)
            await asyncio.sleep(PAUSE / 2 if waited else PAUSE)
            if turn.spent < budget:
                break
        return clock()

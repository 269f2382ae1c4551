"""Bulk work shared in shifts by every bulk loop of an event loop, so that a control call waits
for one budget of bulk work, not one per step of the call.

A bulk loop (``Paced``) breathes between two slices of its work: it goes on at once until the
bulk loops of its event loop have spent ``budget`` seconds since the last pause (a shift), then
every one of them pauses for ``PAUSE``: none runs again until the pause is over, and a pause
lasts until a later turn of the event loop whatever the clock says. Loops woken at the end of a
pause wait for the next one if the first to run spent the next shift's budget already, ``WAITS``
times at most (no one starves). The loop that began a pause lets those that waited on it go
first when it ends (they take turns).

One pause for all, not a pause each: a unary call takes several turns of the loop to be answered
(its arrival, its request read, its handler, its reply; each step is handed over by gRPC's poller
thread, which needs the GIL). Paced each on its own clock, a few bulk loops in hand at once took
turns so that every turn of the loop ran a budget of bulk work or more, and a call waited 3 to 5
budgets (an agent's HoldsKeys of one key: p50/p99 12/97 ms; paced in shifts, 7/51 ms). Paced
together, the loop runs nothing but the calls and the poller thread during a pause: a call's
steps follow one another within a pause or two.

A pause, not a zero sleep: a zero sleep hands the loop back before the poller thread has had the
GIL; a sleep releases it in the loop's ``select``. The AMM's ``Budget`` and the agent's ``Pace``
stand on this.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

#: Seconds of each pause, in which no bulk loop runs.
PAUSE = 0.001
#: Pauses a bulk loop waits at most in a row while others spend the budget of each shift: no one
#: starves (a cycle's polls, a keeper's promises waiting for their answer, a lease ticking).
WAITS = 8


class _Shift:
    """The bulk work of one event loop since its last pause, and when the pause under way ends
    (by the loop's clock, which its timers follow)."""

    __slots__ = ("clock", "last", "pauses", "resume", "spent", "turning")

    def __init__(self) -> None:
        self.spent = 0.0
        #: When a bulk loop last breathed, by ``clock`` (the pacing clock it was read with):
        #: work counted up to there.
        self.last = float("-inf")
        self.clock: Callable[[], float] | None = None
        self.resume = float("-inf")
        #: Pauses begun so far: whether another began while a loop waited for one to end.
        self.pauses = 0
        #: Whether the turn of the loop in which the last pause began is still on: a pause lasts
        #: until a later turn whatever the clock says (a process waiting for a core may see
        #: ``PAUSE`` pass within the turn, and the loop would have served nothing meanwhile).
        self.turning = False

    def turned(self) -> None:
        """Runs in the turn after a pause began (``call_soon``)."""
        self.turning = False


_shifts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Shift] = weakref.WeakKeyDictionary()
#: The loop asked about last and its shift: nearly every call comes from the same loop, and a
#: weak dictionary's lookup costs a microsecond.
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], _Shift] | None = None


def _shift(loop: asyncio.AbstractEventLoop) -> _Shift:
    global _last
    if _last is not None and _last[0]() is loop:
        return _last[1]
    shift = _shifts.get(loop)
    if shift is None:
        shift = _shifts[loop] = _Shift()
    _last = (weakref.ref(loop), shift)
    return shift


class Paced:
    """One bulk loop paced in its event loop's shifts: ``await self._breathe(budget)`` between
    two slices of its work."""

    __slots__ = ("_clock", "_since")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._since = clock()

    async def _breathe(self, budget: float) -> bool:
        """Pause if the shift's ``budget`` is spent or a pause is under way; whether it paused
        (what was read before may be stale).

        The work counted is since this loop's last breath or any loop's, whichever came later:
        bulk loops take turns, and what ran in between was counted by whoever breathed last (or
        was something else the loop did, which the pause makes room for all the same). Only a
        breath by the same clock counts (tests pace with clocks of their own)."""
        loop = asyncio.get_running_loop()
        shift = _shift(loop)
        clock = self._clock
        now = clock()
        if shift.clock is clock:
            shift.spent += now - max(self._since, shift.last)
        else:
            shift.spent += max(0.0, now - self._since)
            shift.clock = clock
        shift.last = now
        wait = shift.resume - loop.time()
        began = False
        if wait <= 0 and not shift.turning:
            if shift.spent < budget:
                self._since = now
                return False
            shift.resume = loop.time() + PAUSE
            shift.spent = 0.0
            shift.pauses += 1
            shift.turning = True
            loop.call_soon(shift.turned)
            wait = PAUSE
            began = True
        for _ in range(WAITS):
            pause = shift.pauses
            await asyncio.sleep(wait)
            if began:
                # The loop that began a pause went to sleep first and wakes first: it lets
                # those that waited on the pause go before it, or it would win every shift.
                began = False
                await asyncio.sleep(0)
            # Woken with others at the end of a pause, one of which may have spent the next
            # shift's budget already.
            if shift.pauses == pause:
                break
            wait = shift.resume - loop.time()
        self._since = now = clock()
        if shift.clock is clock:
            shift.last = now
        return True

"""Letting the agent's event loop in during bulk work (a batch of thousands of drops, promises,
directives decoded or outcomes judged), so that a poll or a read is answered within milliseconds
of arriving instead of behind the whole batch.

A loop over a batch calls ``await pace()`` between two items (or, in the hottest loops,
``if pace.due() and await pace.breathe()``, which costs no coroutine per item): it returns at
once until the bulk loops running at once have spent ``BUDGET`` seconds since the last pause,
then every one of them pauses for ``PAUSE``: none runs again until the pause is over (and the
loops woken with it wait for the next one if the first to run spent the budget again, ``WAITS``
times at most).

One pause for all, not a pause each: a unary call takes several turns of the loop to be
answered (its arrival, its request read, its handler; each step is handed over by gRPC's poller
thread, which needs the GIL). Paused each on its own clock (``amm.base.turns``), a few batches in
hand at once took turns so that every turn of the loop ran a budget of bulk work or more, and a
HoldsKeys of one key waited 3 to 5 budgets (a loop trace: 5-16 ms of directive batch in every
turn, 60 ms for the call). Paused together, the loop runs nothing but the calls and the poller
thread for ``PAUSE``: a call's steps follow one another within a pause or two.

Whoever paces must not rely on anything staying as it was across a pause: every integrity rule is
judged per key, in the synchronous step that acts on that key.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

#: Most seconds of bulk work, by all the bulk loops of the agent, between two pauses.
BUDGET = 0.005
#: Seconds of each pause, in which no bulk loop runs.
PAUSE = 0.001
#: Pauses a bulk loop waits at most in a row while others spend the budget of each shift: no one
#: starves (a keeper's promises wait for their answer, a lease ticking).
WAITS = 8
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


class _Shift:
    """The bulk work of one event loop since its last pause, and when the pause under way ends
    (by the loop's clock, which its timers follow)."""

    __slots__ = ("last", "pauses", "resume", "spent", "turning")

    def __init__(self) -> None:
        self.spent = 0.0
        #: When a bulk loop last breathed (by the pacing clock): work counted up to there.
        self.last = float("-inf")
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


class Pace:
    """One bulk loop's pacing: ``await pace()`` between two items.

    The budget is shared by every bulk loop running at once (a batch of drops, its promises,
    a poll's answer), and so is the pause that follows it. The clock is read every ``EVERY``
    items only: a batch has tens of thousands of them."""

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
        return await self.breathe()

    def due(self) -> bool:
        """Count one item; whether the clock is to be read now (``breathe``). The same as
        ``__call__`` without creating a coroutine for the items in between: a batch of drops
        paces each directive in several loops."""
        self._count += 1
        return self._count >= EVERY

    async def breathe(self) -> bool:
        """Pause if the budget is spent or a pause is under way (after ``due``); whether it
        paused.

        The work counted is since this loop's last breath or any loop's, whichever came later:
        bulk loops take turns, and what ran in between was counted by whoever breathed last (or
        was something else the loop did, which the pause makes room for all the same)."""
        self._count = 0
        loop = asyncio.get_running_loop()
        shift = _shift(loop)
        now = self._clock()
        shift.spent += now - max(self._since, shift.last)
        shift.last = now
        wait = shift.resume - loop.time()
        if wait <= 0 and not shift.turning:
            if shift.spent < self._budget:
                self._since = now
                return False
            shift.resume = loop.time() + PAUSE
            shift.spent = 0.0
            shift.pauses += 1
            shift.turning = True
            loop.call_soon(shift.turned)
            wait = PAUSE
        for _ in range(WAITS):
            pause = shift.pauses
            await asyncio.sleep(wait)
            # Woken with others at the end of a pause, one of which may have spent the next
            # shift's budget already.
            if shift.pauses == pause:
                break
            wait = shift.resume - loop.time()
        self._since = shift.last = self._clock()
        return True

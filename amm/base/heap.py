"""Keeping a big process's long-lived objects out of the cyclic garbage collector's full
collections (the AMM's cluster state and ledger, an agent's store).

Every full collection walks every tracked object, with the event loop held: 100-300 ms in an AMM
with 100k keys, 30-40 ms every second or so in an agent holding 100k keys while it drops them
(a loop probe in each agent during a 100k-key convergence), which is what a control call
waiting for that loop then waits for. ``gc.freeze`` moves what exists into the permanent
generation, which collections skip (it splices lists: it costs nothing); frozen objects are
still freed by reference counting as usual. Only garbage in reference cycles frozen before it
was collected waits for the next thaw: every ``thaw_every`` seconds ``freeze`` thaws the heap
and collects it whole, once, before it freezes it again.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

#: Seconds between two thaws of the frozen heap.
THAW_EVERY = 300.0


class HeapFreezer:
    """``freeze`` now and then (after a poll round, a cycle, a tick of a sampler)."""

    def __init__(
        self, thaw_every: float = THAW_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._thaw_every = thaw_every
        self._clock = clock
        self._thawed = clock()
        #: Whether this froze the heap (and has not thawed it since).
        self.frozen = False

    def freeze(self, big: bool = True) -> None:
        """Freeze the heap if ``big`` (a small heap is left to the collector as it is); thaw and
        collect it whole first once ``thaw_every`` passed since the last thaw, or once it is no
        longer big (what was frozen meanwhile would otherwise never be examined)."""
        now = self._clock()
        if now - self._thawed >= self._thaw_every or (self.frozen and not big):
            self._thawed = now
            gc.unfreeze()
            gc.collect()
            self.frozen = False
        if big:
            gc.freeze()
            self.frozen = True

    def thaw(self) -> None:
        """Leave the heap as it was found (a process that stops its part of a bigger one)."""
        if self.frozen:
            gc.unfreeze()
            self.frozen = False

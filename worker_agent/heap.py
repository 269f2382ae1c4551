"""Keeping a big store out of the cyclic garbage collector's full collections.

An agent holding 100,000 keys tracks a few hundred thousand objects (the values, the key
index), all acyclic and freed by reference counting. A batch of thousands of drops allocates
objects that live as long as the batch (directives, outcomes, promises asked), so they reach the
oldest generation and soon trigger full collections, each walking the whole store: a sixth of
the CPU an agent spent carrying out a batch of drops (0.6 of 3.6 s for 100,000 drops, measured).

``Heap.settle``, called every memory sample, moves what exists into the permanent generation
(``gc.freeze`` splices lists: it costs nothing) while the store is big; the collector skips it,
and reference counting still frees each object as usual. Only garbage in reference cycles frozen
before it was collected waits for the next thaw: every ``thaw_every`` seconds the heap is thawed
and collected whole, once. A small store is left to the collector as it is.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

#: Keys held from which the heap is kept frozen.
BIG_STORE = 20_000
#: Seconds between two thaws (and full collections) of a frozen heap.
THAW_EVERY = 300.0


class Heap:
    """Freezes the process's heap while the store is big, thawing it every ``thaw_every`` s."""

    def __init__(
        self,
        big: int = BIG_STORE,
        thaw_every: float = THAW_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._big = big
        self._thaw_every = thaw_every
        self._clock = clock
        self._thawed = clock()
        #: Whether this froze the heap (and has not thawed it since).
        self.frozen = False

    def settle(self, keys: int) -> None:
        """Called now and then with the number of keys held: freeze what exists when that is
        big; thaw and collect the heap every ``thaw_every`` seconds, and once it is small again
        (what was frozen meanwhile would otherwise never be examined)."""
        now = self._clock()
        if self.frozen and (keys < self._big or now - self._thawed >= self._thaw_every):
            self._thawed = now
            gc.unfreeze()
            gc.collect()
            self.frozen = False
        if keys >= self._big:
            gc.freeze()
            self.frozen = True

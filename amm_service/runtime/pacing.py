"""Letting other work in between the steps of a big cycle (planning, sending, outcomes), and
keeping the garbage collector out of each step.

``asyncio.sleep(0)`` is not enough: grpc.aio learns of new calls on a poller thread that needs
the GIL, and a zero sleep hands the loop back before that thread has had it. A pause of a
millisecond releases the GIL in the loop's ``select``, so calls that arrived are taken in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Iterator

#: How long a big cycle pauses between two steps, in seconds.
PAUSE = 0.001


async def breathe() -> None:
    """Let the event loop, and gRPC's poller thread, run for a moment."""
    await asyncio.sleep(PAUSE)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one bounded step of bulk bookkeeping.

    A big cycle allocates hundreds of thousands of acyclic objects (ledger entries, messages,
    outcomes); every collection they trigger walks the AMM's whole state, which made entering
    300k directives in the ledger three times slower. Collections resume between steps.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


#: Seconds between two thaws of the frozen heap (see ``HeapFreezer``).
THAW_EVERY = 300.0


class HeapFreezer:
    """Keeps the AMM's long-lived state out of the cyclic garbage collector's full collections.

    With 100k keys the AMM holds millions of objects (the cluster state, the ledger), nearly
    all acyclic and freed by reference counting. Each full collection walks all of them (100-300
    ms with the loop held, 12% of the AMM's CPU in a 100k-key cycle, measured with py-spy).
    ``freeze`` after each poll round and cycle moves what exists into the permanent generation,
    which the collector skips; objects in it are still freed by reference counting as usual. Only
    garbage in reference cycles that was not collected before a freeze waits for the next thaw:
    every ``thaw_every`` seconds ``freeze`` thaws instead, so the next full collection sees the
    whole heap once. A small AMM (``big`` false) is left to the collector as it is.
    """

    def __init__(
        self, thaw_every: float = THAW_EVERY, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._thaw_every = thaw_every
        self._clock = clock
        self._thawed = clock()

    def freeze(self, big: bool = True) -> None:
        now = self._clock()
        if now - self._thawed >= self._thaw_every:
            gc.unfreeze()
            self._thawed = now
        elif big:
            gc.freeze()

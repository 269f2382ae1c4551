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
from collections.abc import Iterator

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

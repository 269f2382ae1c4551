"""Letting other work in between the steps of a big cycle (planning, sending, outcomes).

``asyncio.sleep(0)`` is not enough: grpc.aio learns of new calls on a poller thread that needs
the GIL, and a zero sleep hands the loop back before that thread has had it. A pause of a
millisecond releases the GIL in the loop's ``select``, so calls that arrived are taken in.
"""

from __future__ import annotations

import asyncio

#: How long a big cycle pauses between two steps, in seconds.
PAUSE = 0.001


async def breathe() -> None:
    """Let the event loop, and gRPC's poller thread, run for a moment."""
    await asyncio.sleep(PAUSE)

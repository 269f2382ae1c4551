"""The AMM's cycle lock: one cycle (or what acts as one: forgetting keys, ending a retirement) at a
time. A big cycle holds it while it waits for its agents (``cycling.FEED``), for as long as they
take to carry its directives out; whoever asks for the lock meanwhile has the cycle ``hurry`` (plan
and send the rest at once), so it waits for the planning, not for the agents."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal


class CycleLock(asyncio.Lock):
    """An ``asyncio.Lock`` that calls ``on_wanted`` when asked for while held."""

    def __init__(self) -> None:
        super().__init__()
        self.on_wanted: Callable[[], None] = lambda: None

    async def acquire(self) -> Literal[True]:
        if self.locked():
            self.on_wanted()
        return await super().acquire()

"""Memory measurement of the worker process: the only module that imports psutil.

Managed memory is what the store holds; the process measures more (interpreter, buffers, fragmented
heap). Like Dask, the agent reports the *optimistic* figure, managed plus the unmanaged memory that
persisted over a recent window, so that a short spike does not make the worker look full. Whether
the worker is paused follows the process memory, which is what an out-of-memory killer sees.
"""

from __future__ import annotations

import asyncio
import collections
import os
from dataclasses import dataclass
from typing import Protocol

import psutil


@dataclass(frozen=True, slots=True)
class MemoryReport:
    """The worker's memory in bytes (``amm.v1.MemoryReport``)."""

    process: int
    managed: int
    unmanaged_old: int
    optimistic: int
    limit: int


class MemoryProbe(Protocol):
    """Where the process memory comes from; tests may substitute a fixed figure."""

    def process_bytes(self) -> int: ...


class PsutilProbe:
    """Resident set size of the current process."""

    def __init__(self, pid: int | None = None) -> None:
        self._process = psutil.Process(pid if pid is not None else os.getpid())

    def process_bytes(self) -> int:
        return int(self._process.memory_info().rss)


class MemoryMonitor:
    """Samples the probe and keeps the unmanaged samples of the last ``window`` seconds."""

    def __init__(
        self,
        probe: MemoryProbe,
        *,
        window: float,
        limit: int = 0,
        pause_fraction: float | None = None,
    ) -> None:
        self._probe = probe
        self._window = window
        self._limit = limit
        self._pause_fraction = pause_fraction
        self._unmanaged: collections.deque[tuple[float, int]] = collections.deque()

    def sample(self, managed: int, now: float) -> MemoryReport:
        """Measure now and report, remembering the unmanaged part for the window."""
        process = self._probe.process_bytes()
        unmanaged = max(0, process - managed)
        samples = self._unmanaged
        while samples and samples[0][0] < now - self._window:
            samples.popleft()
        # Only the minimum matters: drop older samples that are not below the new one.
        while samples and samples[-1][1] >= unmanaged:
            samples.pop()
        samples.append((now, unmanaged))
        unmanaged_old = samples[0][1]
        return MemoryReport(
            process=process,
            managed=managed,
            unmanaged_old=unmanaged_old,
            optimistic=managed + unmanaged_old,
            limit=self._limit,
        )

    @property
    def may_pause(self) -> bool:
        """Whether ``paused`` can ever be true (a limit and a pause fraction are set)."""
        return self._pause_fraction is not None and bool(self._limit)

    def paused(self, report: MemoryReport) -> bool:
        """Above the pause threshold: take no new replicas."""
        if self._pause_fraction is None or not self._limit:
            return False
        return report.process > self._pause_fraction * self._limit


class ByteBudget:
    """Bytes in use out of ``limit`` (0: no limit), taken in amounts that wait for room.

    Bounds what the agent serves at once: gRPC buffers what a reader has not read yet, up to
    about a value per stream, so a hundred unread reads of one value held a hundred copies. An
    amount larger than the whole budget is taken alone (charged as the whole budget), so no value
    is unservable.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def waiting(self) -> int:
        """Takers waiting for room."""
        return len(self._waiters)

    def charge(self, nbytes: int) -> int:
        """What taking ``nbytes`` counts against the budget."""
        return min(nbytes, self.limit) if self.limit else nbytes

    def _fits(self, charge: int) -> bool:
        return not self.limit or self.used + charge <= self.limit

    async def take(self, charge: int, patience: float) -> bool:
        """Take ``charge`` (see ``charge()``) once it fits, waiting up to ``patience`` seconds;
        False when it did not fit by then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while not self._fits(charge):
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                return False
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.used += charge
        return True

    def give_back(self, charge: int) -> None:
        self.used -= charge
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

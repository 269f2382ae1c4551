"""The AMM's cycle loop: cycles an interval apart, paced by the work in flight as well as by the
clock, and cut short by ``wake``. It owns the loop task (``start``, ``stop``); the retirement
driver runs the same pacing in its own task while the loop is stopped (``every_interval``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from amm_service.runtime.records.cycle import CycleRecord

log = logging.getLogger(__name__)

#: The least time between a cycle and the next when the next follows up on applied work, in
#: seconds (or a twentieth of the interval, if longer).
FOLLOW_UP = 0.05


class CycleLoop:
    """Runs ``run_cycle`` an interval apart while not ``fenced``; ``settled`` waits until
    every directive of a cycle's record has an outcome, or a limit in seconds
    (``Outcomes.wait``)."""

    def __init__(
        self,
        *,
        interval: float,
        run_cycle: Callable[[], Awaitable[CycleRecord]],
        settled: Callable[[CycleRecord, float], Awaitable[None]],
        fenced: Callable[[], bool],
        monotonic: Callable[[], float],
    ) -> None:
        self._interval = interval
        self._run_cycle = run_cycle
        self._settled = settled
        self._fenced = fenced
        self._monotonic = monotonic
        self._loop_task: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done() and not self._fenced()

    def start(self) -> None:
        if not self.running:
            self._loop_task = asyncio.create_task(self._loop(), name="amm-cycle-loop")

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        await self.every_interval(lambda: True, "AMM cycle")

    async def every_interval(self, go_on: Callable[[], bool], what: str) -> None:
        """Run cycles an interval apart while ``go_on()``; a failed cycle is logged, not fatal.

        Paced by the work in flight as well as by the clock: once every directive of a cycle
        has an answer and at least one was applied, the next cycle follows after
        ``follow_up`` instead of the rest of the interval, so a retirement or a repair moves
        on as fast as its transfers complete. A cycle that sent nothing, or whose directives
        were all refused, waits for the interval as usual, unless ``wake`` is called (which
        also cuts short the wait for a cycle's outcomes).

        The same holds for the last cycle that sent directives when a later one polled while
        some of them were still unanswered (a big cycle's directives take longer than the
        interval to carry out, and the cycles meanwhile plan nothing new): once they all have an
        answer and one was applied, the next cycle follows up, so the AMM's view catches up with
        what was done instead of an interval later.
        """
        interval = self._interval
        follow_up = min(interval, max(FOLLOW_UP, interval / 20))
        sent: CycleRecord | None = None  # the last cycle that sent directives
        while go_on() and not self._fenced():
            started = self._monotonic()
            self._woken.clear()
            # Some of its directives unanswered as this cycle polls: their effects may be missed.
            behind = sent is not None and sent.unsettled > 0
            record = None
            try:
                record = await self._run_cycle()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
                # A call awaited inside the cycle was cancelled (its channel closed), not us.
                log.exception("%s was cut short; the next one runs as usual", what)
            except Exception:
                log.exception("%s failed; the next one runs as usual", what)
            rest = max(0.0, interval - (self._monotonic() - started))
            if record is not None and record.planned_count:
                sent = record
            elif not behind:
                sent = None  # a poll after every answer saw their effects: nothing to follow
            if sent is not None:
                waited = self._monotonic()
                await self._settled_or_woken(sent, rest)
                rest = max(0.0, rest - (self._monotonic() - waited))
                if sent.unsettled == 0 and sent.applied:
                    rest = min(rest, max(0.0, follow_up - (self._monotonic() - started)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), rest)

    async def _settled_or_woken(self, record: CycleRecord, limit: float) -> None:
        """Until every directive of ``record`` has an outcome, ``wake`` is called (a
        retirement began, a transfer slot it waits for freed), or ``limit`` seconds."""
        settled = asyncio.ensure_future(self._settled(record, limit))
        woken = asyncio.ensure_future(self._woken.wait())
        try:
            await asyncio.wait((settled, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (settled, woken):
                waiting.cancel()
            await asyncio.gather(settled, woken, return_exceptions=True)

    def wake(self) -> None:
        """Run the next cycle now, not at the end of the interval: work arrived that a cycle
        should act on (a retirement began, a goal was set)."""
        self._woken.set()

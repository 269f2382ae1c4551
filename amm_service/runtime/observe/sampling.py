"""Sampling for the dashboard's history: one sample per cycle run, and, while the AMM does not
cycle, one per interval after a round of polls (``History``). It owns the task that samples
while the AMM is stopped (``start``, ``close``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from amm_service.decisions.view import ClusterState
from amm_service.runtime.observe.history import History
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.lost import LostBook
from amm_service.runtime.records.outcomes import Outcomes

log = logging.getLogger(__name__)


class Sampler:
    """Samples into ``history`` (nothing when it is None: the dashboard is off). ``running``
    tells whether the AMM cycles, ``busy`` whether a cycle runs now (the cycle lock),
    ``cycles`` how many ran; ``poll_all`` polls every agent."""

    def __init__(
        self,
        history: History | None,
        state: ClusterState,
        outcomes: Outcomes,
        goals: GoalBook,
        lost: LostBook,
        *,
        poll_all: Callable[[], Awaitable[object]],
        running: Callable[[], bool],
        busy: Callable[[], bool],
        cycles: Callable[[], int],
        interval: float,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self.history = history
        self._state = state
        self._outcomes = outcomes
        self._goals = goals
        self._lost = lost
        self._poll_all = poll_all
        self._running = running
        self._busy = busy
        self._cycles = cycles
        self._interval = interval
        self._clock = clock
        self._monotonic = monotonic
        self._idle_sampling: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sample while the AMM is stopped, from now until ``close``."""
        if self.history is not None:
            self._idle_sampling = asyncio.create_task(
                self._sample_while_stopped(), name="amm-sampling-while-stopped"
            )

    async def close(self) -> None:
        sampling, self._idle_sampling = self._idle_sampling, None
        if sampling is not None:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling

    def sample(self, cycle: int, rejected: int = 0) -> None:
        """Add what the AMM sees now to the dashboard's history, if it keeps one."""
        if self.history is not None:
            self.history.record(
                at=self._clock(),
                cycle=cycle,
                running=self._running(),
                workers=self._state.workers,
                totals=self._outcomes.totals,
                rejected=rejected,
                keys=self._state.nkeys,
                replicas=self._state.nreplicas,
                lost=self._lost.count(),
                goals=self._goals.totals(self._state),
            )

    async def _sample_while_stopped(self) -> None:
        """With the dashboard on, while the AMM does not cycle: poll every agent once an
        interval and sample, so the memory chart has no gap where the AMM was off. No planning
        and no directives: a poll reads an agent (handing it the tombstones of keys an operator
        forgot, as every poll does), as a fresh query's polls do."""
        history = self.history
        if history is None:
            return
        interval = self._interval
        while True:
            started = self._monotonic()
            # Not while a cycle runs (RunOnce, a retirement's) or right after one: it samples.
            idle = not self._running() and not self._busy()
            if idle and history.newest <= self._clock() - interval / 2:
                try:
                    await self._poll_all()
                    if not self._running():  # started meanwhile: its cycles sample
                        self.sample(self._cycles())
                except Exception:
                    log.exception("sampling for the dashboard failed; trying again")
            await asyncio.sleep(max(0.0, interval - (self._monotonic() - started)))

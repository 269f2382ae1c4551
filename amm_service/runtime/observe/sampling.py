"""What a stopped AMM still does, and the dashboard's history.

With ``poll_while_stopped`` or the dashboard on, an AMM that does not cycle polls every agent
once an interval (change polls, by the same code as a cycle's; no planning, no directives), so
queries answer from a current view without a fresh poll. With the dashboard on, each such round
and each cycle run adds a sample to its history (``History``).
The ``Sampler`` owns the one task that polls while stopped (``start``, ``close``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

from amm_service.decisions.view import ClusterState
from amm_service.runtime.observe.history import History
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.lost import LostBook
from amm_service.runtime.records.outcomes import Outcomes

log = logging.getLogger(__name__)


class Sampler:
    """Samples into ``history`` (nothing when it is None: the dashboard is off), and polls
    while the AMM is stopped when ``poll_while_stopped`` or the dashboard is on. ``running``
    tells whether the AMM cycles, ``busy`` whether a cycle runs now (the cycle lock),
    ``cycles`` how many ran; ``poll_all`` polls every agent; ``heard`` runs after each round
    polled while stopped (the liveness judge forgets the silence of workers that answered);
    ``fenced`` tells whether another AMM took over (then only the dashboard's samples poll)."""

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
        poll_while_stopped: bool = False,
        heard: Callable[[], None] = lambda: None,
        fenced: Callable[[], bool] = lambda: False,
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
        self._poll_while_stopped = poll_while_stopped or history is not None
        self._heard = heard
        self._fenced = fenced
        #: When the last cycle ended or the last round polled while stopped did (monotonic).
        self._last_round = -math.inf
        self._idle_polling: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll (and sample) while the AMM is stopped, from now until ``close``."""
        if self._poll_while_stopped and self._idle_polling is None:
            self._idle_polling = asyncio.create_task(
                self._poll_while_stopped_loop(), name="amm-polling-while-stopped"
            )

    async def close(self) -> None:
        polling, self._idle_polling = self._idle_polling, None
        if polling is not None:
            polling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling

    def sample(self, cycle: int, rejected: int = 0) -> None:
        """A cycle ran (or a round was polled while stopped): add what the AMM sees now to the
        dashboard's history, if it keeps one."""
        self._last_round = self._monotonic()
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

    async def _poll_while_stopped_loop(self) -> None:
        """While the AMM does not cycle: poll every agent once an interval and sample, so the
        view stays current (and the dashboard's memory chart has no gap where the AMM was off).

        No planning and no directives: a poll reads an agent (handing it the tombstones of keys
        an operator forgot, as every poll does), as a fresh query's polls do; a big inventory
        is read and merged in paced steps as in a cycle, so the loop keeps serving calls. Not
        while a cycle runs (RunOnce, a retirement's while stopped) nor within half an interval
        of one: its polls are as recent. Liveness is not judged here: a worker that stops
        answering is judged from the first cycle that misses it, as before (``liveness``).

        A worker that registered empty is read whole once (a poll since version 0 is a
        snapshot), and a snapshot is kept only if every page beats the poll deadline: while
        agents are busy storing a big put on a loaded machine, the view may lag until they
        are idle."""
        interval = self._interval
        while True:
            started = self._monotonic()
            idle = not self._running() and not self._busy()
            # Fenced off, the agents are another AMM's: polled for the dashboard only, as before.
            idle = idle and (self.history is not None or not self._fenced())
            if idle and self._last_round <= started - interval / 2:
                try:
                    await self._poll_all()
                    if not self._running():  # started meanwhile: its cycles judge and sample
                        self._heard()
                        self.sample(self._cycles())
                    self._last_round = self._monotonic()
                except Exception:
                    log.exception("polling while stopped failed; trying again")
            await asyncio.sleep(max(0.0, interval - (self._monotonic() - started)))

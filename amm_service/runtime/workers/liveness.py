"""Judging the workers' liveness between polls: STALE after ``stale-after`` of silence, removed
as dead after ``dead-after`` (``decisions.liveness`` decides; this acts on its verdicts), and
whether a worker answers: what was sent to it will be answered, and copies applied on workers
gone before a poll showed them are no longer counted in flight."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from amm_service.decisions.events import EventLog
from amm_service.decisions.liveness import Liveness
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId

log = logging.getLogger(__name__)


class LivenessJudge:
    """Acts on the liveness rules for one AMM: flags, removals (through ``remove``, which
    reports the keys lost) and the copies in flight on workers gone. ``is_open`` tells whether
    a worker's directive stream is open (``Dispatcher.is_open``)."""

    def __init__(
        self,
        state: ClusterState,
        ledger: Ledger,
        events: EventLog,
        *,
        stale_after: float,
        dead_after: float,
        is_open: Callable[[WorkerId], bool],
        remove: Callable[[WorkerId, str], Awaitable[list[Key]]],
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._events = events
        self._dead_after = dead_after
        self._is_open = is_open
        self._remove = remove
        self._clock = clock
        self._monotonic = monotonic
        self._liveness = Liveness(stale_after=stale_after, dead_after=dead_after)

    def observe(self) -> None:
        """Start the silence clocks of the workers known now (those taken back at start-up)."""
        self._liveness.observe(self._state.workers, self._monotonic())

    def heard(self) -> None:
        """Polls made while no cycle judges (the AMM stopped) reached these workers: their
        silence is over, so a later miss is timed from then, not from a silence before. Those
        that missed them are left to the next judgement, which starts their clocks."""
        for worker in self._state.workers:
            if worker.missed_polls == 0:
                self._liveness.forget(worker.address)

    def forget_copies_on_gone_workers(self) -> None:
        """Copies applied on workers gone before a poll showed them (a failed poll and a broken
        directive stream: say, SIGKILLed) are no longer counted in flight (``pending``, 5). A
        slow agent missing a poll keeps its stream, and its copies stay counted."""

        def gone(worker: WorkerId) -> bool:
            known = self._state.worker(worker)
            return known is None or (not known.reachable and not self._is_open(worker))

        settled = self._ledger.forget_copies(gone)
        for worker in {entry.directive.worker for entry in settled}:
            keys = [e.directive.key for e in settled if e.directive.worker == worker]
            log.info(
                "%s is gone before a poll showed %d copy(ies) it applied (%s%s): no longer "
                "counted as copies in flight",
                worker,
                len(keys),
                ", ".join(keys[:3]),
                ", ..." if len(keys) > 3 else "",
            )

    def answering(self, worker: WorkerId) -> bool:
        """Whether ``worker`` answers polls and its directive stream is open: what was sent to
        it will be answered (see ``pending``)."""
        known = self._state.worker(worker)
        return known is not None and known.reachable and self._is_open(worker)

    async def judge(self) -> None:
        """Flag workers silent for ``stale-after`` STALE; remove those silent for
        ``dead-after`` and report the keys left without a copy as lost; notice lost keys that
        are back (their holder re-registered, or someone put them again)."""
        now, wall = self._monotonic(), self._clock()
        verdict = self._liveness.judge(self._state.workers, now)
        for worker in verdict.stale:
            self._state.set_flags(worker, wall, stale=True)
            self._events.record(
                "worker-stale",
                f"no answer to polls for {self._liveness.silent_for(worker, now):.1f} s: it gets "
                "no new replicas and its copies do not count as durable",
                worker=worker,
            )
        for worker, silent in verdict.dead:
            await self._declare_dead(worker, silent)

    async def _declare_dead(self, worker: WorkerId, silent: float) -> None:
        held = self._state.held_by(worker)
        self._events.record(
            "worker-dead",
            f"no answer to polls for {silent:.1f} s (dead-after {self._dead_after:g} s): "
            f"removed; it held {len(held)} key(s)",
            worker=worker,
            keys=held,
        )
        await self._remove(worker, f"died (no answer to polls for {silent:.1f} s)")
        self._liveness.forget(worker)

"""Worker liveness: when a silent worker is STALE, when it is DEAD, and which keys died with it.

The AMM polls; a worker that stops answering is not trusted at once (the core already stops
counting on it from its first missed poll) but is judged by how long it has been missing polls:

1. for ``stale_after``: STALE. It receives no new replicas and its copies are not durable; it
   stays in the view, so its keys keep their other holders' counts and nothing is re-replicated
   for a blip.
2. for ``dead_after``: DEAD. The manager removes it; keys left with no copy anywhere are LOST
   (``lost_after_removal``; ``runtime.records.lost`` keeps them).
3. it answers again before that: it is forgotten here and counts again at once.

Silence is measured from the first missed poll this tracker observed, not from the worker's last
answer: an AMM that was stopped for an hour did not watch its workers meanwhile, and must not
declare one dead on its first missed poll after that hour.

Pure: no I/O and no clock; the caller passes ``now`` (one monotonic clock for every call).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from amm_service.decisions.view import Key, WorkerId, WorkerView


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one judgement found: workers to flag STALE now, and workers found DEAD (with how
    long each has been silent)."""

    stale: tuple[WorkerId, ...] = ()
    dead: tuple[tuple[WorkerId, float], ...] = ()


class Liveness:
    """Tracks since when each worker has been missing polls, and judges it."""

    def __init__(self, *, stale_after: float, dead_after: float) -> None:
        self.stale_after = stale_after
        self.dead_after = dead_after
        self._since: dict[WorkerId, float] = {}

    def observe(self, workers: Iterable[WorkerView], now: float) -> None:
        """Start the clock for workers that newly miss polls; stop it for those that answer
        (and for workers no longer registered)."""
        since: dict[WorkerId, float] = {}
        for ws in workers:
            if ws.missed_polls > 0:
                since[ws.address] = self._since.get(ws.address, now)
        self._since = since

    def judge(self, workers: Collection[WorkerView], now: float) -> Verdict:
        """Observe, then say which workers are to be flagged STALE and which are DEAD."""
        self.observe(workers, now)
        stale: list[WorkerId] = []
        dead: list[tuple[WorkerId, float]] = []
        for ws in workers:
            started = self._since.get(ws.address)
            if started is None:
                continue
            silent = now - started
            if silent >= self.dead_after:
                dead.append((ws.address, silent))
            elif silent >= self.stale_after and not ws.stale:
                stale.append(ws.address)
        return Verdict(tuple(sorted(stale)), tuple(sorted(dead)))

    def silent_for(self, worker: WorkerId, now: float) -> float:
        """Seconds ``worker`` has been missing polls (0 when it answers)."""
        started = self._since.get(worker)
        return 0.0 if started is None else now - started

    def forget(self, worker: WorkerId) -> None:
        self._since.pop(worker, None)


def lost_after_removal(held: Iterable[Key], remaining: Mapping[Key, object]) -> list[Key]:
    """The keys a removed worker held that no remaining worker holds: they are lost."""
    return sorted(k for k in held if k not in remaining)

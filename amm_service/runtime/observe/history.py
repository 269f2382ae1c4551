"""A bounded history of what every cycle saw and did, for the dashboard.

One sample per cycle (not dry runs), taken at its end from what the AMM keeps anyway: each
worker's memory (managed, process, limit) and status, the directive totals (so a sample holds
what the cycle sent and what was refused since the previous one), keys, replicas, lost keys and
goals. While the AMM is stopped it samples too, after a round of polls every interval and with
``running`` false (``sampling``), so the memory chart covers the AMM's off periods as well: the
seed's picture is memory with the AMM off against on.

A ring buffer: the oldest samples go first, so memory stays bounded however long the AMM
runs: ``maxlen`` samples (an hour and a half at the default 2 s interval), and fewer on a big
cluster, so that the samples hold at most ``max_worker_samples`` worker figures (about 200 bytes
each with its JSON: 20 MB; 100 cycles of 1,000 workers). Each sample is encoded as JSON once,
when taken: a page that opens reads the whole history, and joining bytes keeps that off the
event loop's back (encoding it all then took about a second on a loaded machine).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from amm_service.decisions.directive import Op
from amm_service.decisions.view import WorkerView
from amm_service.runtime.records.outcomes import Totals

#: Samples kept by default: 2,700 cycles (90 minutes at a 2 s interval).
DEFAULT_SAMPLES = 2_700
#: Worker figures kept at most, over all samples.
DEFAULT_WORKER_SAMPLES = 100_000


#: The fields of a worker in a sample's JSON, in order.
WORKER_FIELDS = ("name", "address", "managed", "process", "limit", "status")


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One worker at the end of a cycle."""

    name: str
    address: str
    managed: int
    process: int
    limit: int
    status: str
    """The AMM's verdict over the agent's report (``WorkerView.effective_status``)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One cycle's end: the cluster as the AMM saw it, and what the cycle changed."""

    at: float
    cycle: int
    """The last cycle run when it was taken (a sample of a stopped AMM repeats it)."""
    running: bool
    """Whether the AMM was cycling: False for the polls of a stopped AMM (and its ``RunOnce``)."""
    workers: tuple[WorkerSample, ...]
    replicated: int
    """Replications sent since the previous sample (this cycle's, and overdue ones sent again)."""
    dropped: int
    """Drops sent since the previous sample."""
    refused: int
    """Directives refused or failed since the previous sample."""
    rejected: int
    """Suggestions this cycle's core rejected (throttled, no candidate, last copy...)."""
    keys: int
    replicas: int
    lost: int
    with_goal: int
    below_goal: int

    def as_json(self) -> dict[str, Any]:
        """The sample as the dashboard reads it; each worker an array of ``WORKER_FIELDS``."""
        return {
            "at": self.at,
            "cycle": self.cycle,
            "running": self.running,
            # One array per worker, in WORKER_FIELDS order: a tenth the size of objects.
            "workers": [
                [w.name, w.address, w.managed, w.process, w.limit, w.status] for w in self.workers
            ],
            "replicated": self.replicated,
            "dropped": self.dropped,
            "refused": self.refused,
            "rejected": self.rejected,
            "keys": self.keys,
            "replicas": self.replicas,
            "lost": self.lost,
            "with_goal": self.with_goal,
            "below_goal": self.below_goal,
        }


class History:
    """The last ``maxlen`` samples, oldest first; used from the event loop only."""

    def __init__(
        self, maxlen: int = DEFAULT_SAMPLES, max_worker_samples: int = DEFAULT_WORKER_SAMPLES
    ) -> None:
        self._samples: deque[tuple[Sample, bytes]] = deque()
        self._maxlen = maxlen
        self._max_worker_samples = max_worker_samples
        self._worker_samples = 0
        self._seen = (0, 0, 0)
        """The totals (replications, drops, refused or failed) at the previous sample."""

    def record(
        self,
        *,
        at: float,
        cycle: int,
        running: bool,
        workers: Iterable[WorkerView],
        totals: Totals,
        rejected: int,
        keys: int,
        replicas: int,
        lost: int,
        goals: tuple[int, int],
    ) -> Sample:
        """Sample the cluster after cycle ``cycle`` (or a stopped AMM's polls, ``running``
        false); the directive counts are ``totals`` less what they were at the previous
        sample."""
        seen = (totals.sent_by_op[Op.REPLICATE], totals.sent_by_op[Op.DROP])
        seen_all = (*seen, totals.refused + totals.failed)
        replicated, dropped, refused = (
            max(0, now - before) for now, before in zip(seen_all, self._seen, strict=True)
        )
        self._seen = seen_all
        sample = Sample(
            at=at,
            cycle=cycle,
            running=running,
            workers=tuple(
                WorkerSample(
                    name=w.name,
                    address=str(w.address),
                    managed=w.memory.managed,
                    process=w.memory.process,
                    limit=w.memory.limit,
                    status=w.effective_status.value,
                )
                for w in sorted(workers, key=lambda w: (w.name, w.address))
            ),
            replicated=replicated,
            dropped=dropped,
            refused=refused,
            rejected=rejected,
            keys=keys,
            replicas=replicas,
            lost=lost,
            with_goal=goals[0],
            below_goal=goals[1],
        )
        encoded = json.dumps(sample.as_json(), separators=(",", ":")).encode()
        self._samples.append((sample, encoded))
        self._worker_samples += len(sample.workers)
        while len(self._samples) > 1 and (
            len(self._samples) > self._maxlen or self._worker_samples > self._max_worker_samples
        ):
            self._worker_samples -= len(self._samples.popleft()[0].workers)
        return sample

    def after(self, at: float) -> list[Sample]:
        """The samples taken strictly after ``at`` (a wall-clock time), oldest first."""
        return [sample for sample, _ in self._newer(at)]

    def json_after(self, at: float) -> bytes:
        """``{"samples": [...]}`` of the samples taken after ``at``, as JSON."""
        return b'{"samples":[' + b",".join(encoded for _, encoded in self._newer(at)) + b"]}"

    def _newer(self, at: float) -> list[tuple[Sample, bytes]]:
        if not self._samples or self._samples[-1][0].at <= at:
            return []
        out = []
        for entry in reversed(self._samples):
            if entry[0].at <= at:
                break
            out.append(entry)
        out.reverse()
        return out

    @property
    def newest(self) -> float:
        """When the newest sample was taken (wall clock); 0 when there is none."""
        return self._samples[-1][0].at if self._samples else 0.0

    def __len__(self) -> int:
        return len(self._samples)

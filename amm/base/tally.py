"""Plain counts and duration histograms that the service and the agent keep as they work.

They are what the Prometheus metrics read at scrape time (``amm.base.metrics``), kept here
without any Prometheus import: an observation is a list index and two additions, made on the
event loop, so the code that records one does not care whether metrics are served at all.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

#: Buckets (upper bounds, seconds) for gRPC calls: from a sub-millisecond poll to a long stream.
RPC_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: Buckets (seconds) for AMM cycles and their phases, and for value transfers.
WORK_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class Durations:
    """A histogram of durations in fixed buckets: what a Prometheus histogram exposes.

    ``counts[i]`` counts the observations at most ``bounds[i]`` and above ``bounds[i - 1]``; the
    last one those above every bound (``+Inf``).
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = WORK_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bucket bounds must be increasing")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most it)`` per bucket, ``+Inf`` last."""
        total = 0
        out = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

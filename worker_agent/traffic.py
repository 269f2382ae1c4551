"""What moved through this agent: bytes of values in and out, and how long transfers took.

Plain counters, kept whether or not metrics are served (an addition per value, on the loop);
``worker_agent.metrics`` reads them at scrape time.
"""

from __future__ import annotations

from collections import Counter

from amm.base.tally import Durations

#: Where received bytes came from: Put calls, PutMany calls, peers (replicas and read-throughs).
RECEIVED_VIA = ("put", "put_many", "peer")
#: Where sent bytes went: Get calls (clients) and Fetch calls (peers).
SENT_VIA = ("get", "fetch")


class Traffic:
    """Value bytes received and sent, by way, and the durations of transfers by direction:
    ``in`` a fetch from a peer that delivered a verified value, ``out`` a Get or Fetch stream."""

    __slots__ = ("received", "sent", "transfers")

    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self.transfers = {"in": Durations(), "out": Durations()}

"""Notable things the AMM decided or observed, kept for operators.

Worker deaths, lost keys, retirements and their outcomes, pause-to-retire decisions: each is logged
once and kept in a bounded list that ``GetStatus`` reports newest first, so an operator can see
*why* the AMM did something without reading its log.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("amm_service.decisions.events")

MAX_KEYS_LISTED = 100
WARNING_KINDS = frozenset({"worker-dead", "key-lost", "retire-abandoned", "epoch-fenced"})


@dataclass(frozen=True, slots=True)
class Event:
    """One event; ``keys`` lists at most ``MAX_KEYS_LISTED`` keys concerned."""

    at: float
    kind: str
    message: str
    worker: str = ""
    keys: tuple[str, ...] = ()


class EventLog:
    """The most recent events, newest first; every event is logged when recorded."""

    def __init__(self, maxlen: int = 200, *, clock: Callable[[], float] = time.time) -> None:
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._clock = clock
        #: Events recorded since the start, by kind (the list keeps only the recent ones).
        self.counts: Counter[str] = Counter()

    def record(
        self, kind: str, message: str, *, worker: str = "", keys: Iterable[str] = ()
    ) -> Event:
        listed = tuple(sorted(keys))
        event = Event(self._clock(), kind, message, worker, listed[:MAX_KEYS_LISTED])
        self._events.appendleft(event)
        self.counts[kind] += 1
        level = logging.WARNING if kind in WARNING_KINDS else logging.INFO
        log.log(level, "%s%s: %s", kind, f" {worker}" if worker else "", message)
        return event

    def recent(self, limit: int | None = None) -> list[Event]:
        events = list(self._events)
        return events if limit is None else events[:limit]

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self._events if e.kind == kind]

    def __len__(self) -> int:
        return len(self._events)

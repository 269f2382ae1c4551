"""Notable things the AMM decided or observed, kept for operators.

Worker deaths, lost keys, retirements and their outcomes, pause-to-retire decisions: each is logged
once and kept in a bounded list that ``GetStatus`` reports newest first, so an operator can see
*why* the AMM did something without reading its log. Each event gets the next sequence number
(``seq``, from 1 per run of the AMM) and the run's random ``incarnation``: the resume point of the
``WatchEvents`` stream, whose fan-out to watchers (``runtime.observe.event_feed``) listens here.
"""

from __future__ import annotations

import logging
import secrets
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
    seq: int = 0
    incarnation: str = ""


class EventLog:
    """The most recent ``maxlen`` events, newest first; every event is logged when recorded and
    handed to each listener (``listen``)."""

    def __init__(
        self,
        maxlen: int = 1000,
        *,
        clock: Callable[[], float] = time.time,
        incarnation: str | None = None,
    ) -> None:
        self._events: deque[Event] = deque(maxlen=maxlen)
        self._clock = clock
        #: This run's random id: seqs start at 1 again in the next run.
        self.incarnation = incarnation if incarnation is not None else secrets.token_hex(8)
        #: The seq of the newest event recorded; 0 before the first.
        self.last_seq = 0
        self._listeners: list[Callable[[Event], None]] = []
        #: Events recorded since the start, by kind (the list keeps only the recent ones).
        self.counts: Counter[str] = Counter()

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every event recorded from now on, synchronously: it must
        not block, nor record events itself."""
        self._listeners.append(listener)

    def record(
        self, kind: str, message: str, *, worker: str = "", keys: Iterable[str] = ()
    ) -> Event:
        listed = tuple(sorted(keys))
        self.last_seq += 1
        event = Event(
            self._clock(),
            kind,
            message,
            worker,
            listed[:MAX_KEYS_LISTED],
            self.last_seq,
            self.incarnation,
        )
        self._events.appendleft(event)
        self.counts[kind] += 1
        level = logging.WARNING if kind in WARNING_KINDS else logging.INFO
        log.log(level, "%s%s: %s", kind, f" {worker}" if worker else "", message)
        for listener in self._listeners:
            listener(event)
        return event

    def recent(self, limit: int | None = None) -> list[Event]:
        events = list(self._events)
        return events if limit is None else events[:limit]

    def after(self, seq: int) -> list[Event]:
        """The retained events newer than ``seq``, oldest first."""
        newer = []
        for event in self._events:  # newest first
            if event.seq <= seq:
                break
            newer.append(event)
        newer.reverse()
        return newer

    @property
    def oldest_seq(self) -> int:
        """The seq of the oldest event retained; ``last_seq + 1`` when none is."""
        return self._events[-1].seq if self._events else self.last_seq + 1

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self._events if e.kind == kind]

    def __len__(self) -> int:
        return len(self._events)

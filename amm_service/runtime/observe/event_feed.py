"""The AMM's events as a feed that watchers follow: ``WatchEvents``, and later a dashboard.

``EventFeed.subscribe(after)`` returns a ``Subscription``: an async iterator of the events
retained after a resume point, oldest first, then (``follow``) each new event as ``EventLog``
records it, pushed into the subscription's own queue and woken through an ``asyncio.Event``:
nobody polls. Every queue is bounded: a watcher that falls behind by more than ``buffer``
events loses the oldest it has not taken yet, and gets a ``Gap`` saying how many in their place,
so a slow or stuck watcher costs at most ``buffer`` references to events the log holds anyway.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from amm_service.decisions.events import Event, EventLog
from amm_service.errors import AmmServiceError, InvalidArgument

#: Events one subscription buffers for its watcher, at most: as many as the log retains.
DEFAULT_BUFFER = 1000
#: Watchers following at once, at most; one more is RESOURCE_EXHAUSTED.
DEFAULT_MAX_WATCHERS = 64
#: Kinds one subscription may filter on.
MAX_KINDS = 100


class TooManyWatchers(AmmServiceError):
    """Every watcher slot is taken."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True, slots=True)
class Gap:
    """Events the watcher will never get, before whatever it gets next: ``missed`` of them (not
    retained any more, or dropped because it fell behind); ``restarted``: its resume point came
    from an earlier run of the AMM, whose later events are gone and uncounted."""

    missed: int
    restarted: bool = False


class Subscription:
    """One watcher's view of the feed; iterate it, and ``close`` it when done."""

    def __init__(
        self,
        feed: EventFeed | None,
        backlog: Iterable[Event],
        gap: Gap | None,
        kinds: frozenset[str],
        buffer: int,
    ) -> None:
        self._feed = feed
        self._kinds = kinds
        self._buffer = buffer
        self._queue: deque[Event] = deque()
        self._missed = gap.missed if gap is not None else 0
        self._restarted = gap.restarted if gap is not None else False
        self._wake = asyncio.Event()
        self._closed = False
        for event in backlog:
            self.push(event)

    @property
    def following(self) -> bool:
        return self._feed is not None

    @property
    def queued(self) -> int:
        """Events waiting for the watcher (at most ``buffer``)."""
        return len(self._queue)

    def push(self, event: Event) -> None:
        """Queue ``event`` if it passes the filter; when the queue is full the oldest queued
        event makes room and is counted missed."""
        if self._closed or (self._kinds and event.kind not in self._kinds):
            return
        if len(self._queue) >= self._buffer:
            self._queue.popleft()
            self._missed += 1
        self._queue.append(event)
        self._wake.set()

    def close(self) -> None:
        """Stop receiving events and end the iteration; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._feed is not None:
            self._feed._unsubscribe(self)
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event | Gap:
        while True:
            if self._missed or self._restarted:
                gap = Gap(self._missed, self._restarted)
                self._missed, self._restarted = 0, False
                return gap
            if self._queue:
                return self._queue.popleft()
            if self._closed or self._feed is None:
                self.close()
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()


class EventFeed:
    """Fans the events an ``EventLog`` records out to subscriptions; ``close`` ends them all."""

    def __init__(
        self,
        log: EventLog,
        *,
        buffer: int = DEFAULT_BUFFER,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be positive, not {buffer}")
        self._log = log
        self._buffer = buffer
        self._max_watchers = max_watchers
        self._watchers: set[Subscription] = set()
        self._closed = False
        log.listen(self._publish)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def subscribe(
        self,
        after: int | None = None,
        *,
        incarnation: str = "",
        kinds: Iterable[str] = (),
        follow: bool = True,
    ) -> Subscription:
        """The events after ``after`` (None: every event retained, no gap reported), then with
        ``follow`` each new one. Taken at the call: nothing recorded afterwards is missed, and
        nothing is delivered twice."""
        wanted = frozenset(kinds)
        if len(wanted) > MAX_KINDS:
            raise InvalidArgument(f"too many kinds: {len(wanted)} > {MAX_KINDS}")
        if after is not None and after < 0:
            raise InvalidArgument(f"after must not be negative, not {after}")
        log = self._log
        gap: Gap | None = None
        if after is None:
            backlog = log.after(0)
        elif (incarnation and incarnation != log.incarnation) or after > log.last_seq:
            # A resume point of an earlier run: all of this run is newer than it.
            backlog = log.after(0)
            gap = Gap(log.oldest_seq - 1, restarted=True)
        else:
            backlog = log.after(after)
            missed = log.oldest_seq - after - 1
            gap = Gap(missed) if missed > 0 else None
        following = follow and not self._closed
        if following and len(self._watchers) >= self._max_watchers:
            raise TooManyWatchers(
                f"{len(self._watchers)} watchers already follow the AMM's events; try later"
            )
        subscription = Subscription(self if following else None, backlog, gap, wanted, self._buffer)
        if following:
            self._watchers.add(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._watchers.discard(subscription)

    def _publish(self, event: Event) -> None:
        for watcher in self._watchers:
            watcher.push(event)

    def close(self) -> None:
        """End every subscription (each delivers what it queued first); idempotent."""
        self._closed = True
        for watcher in list(self._watchers):
            watcher.close()

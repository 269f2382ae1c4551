"""The event feed behind WatchEvents: resume points, gaps, pushing without polling, and the bound
on what a slow watcher costs."""

from __future__ import annotations

import asyncio

import pytest

from amm_service.decisions.events import Event, EventLog
from amm_service.errors import InvalidArgument
from amm_service.runtime.observe.event_feed import EventFeed, Gap, Subscription, TooManyWatchers


def record(log: EventLog, n: int, kind: str = "key-lost") -> None:
    for i in range(n):
        log.record(kind, f"event {log.last_seq + 1}", keys=[f"k{i}"])


async def drain(subscription: Subscription) -> list[Event | Gap]:
    """What a non-following subscription delivers, to its end."""
    return [item async for item in subscription]


def seqs(items: list[Event | Gap]) -> list[int | str]:
    return [item.seq if isinstance(item, Event) else f"gap {item.missed}" for item in items]


async def test_events_are_numbered_per_run_and_a_resume_point_gets_only_newer_ones() -> None:
    log = EventLog(incarnation="run-1")
    feed = EventFeed(log)
    record(log, 5)
    assert [e.seq for e in log.recent()] == [5, 4, 3, 2, 1]
    assert {e.incarnation for e in log.recent()} == {"run-1"}
    assert seqs(await drain(feed.subscribe(follow=False))) == [1, 2, 3, 4, 5]
    assert seqs(await drain(feed.subscribe(3, follow=False))) == [4, 5]
    assert seqs(await drain(feed.subscribe(5, incarnation="run-1", follow=False))) == []
    assert feed.watchers == 0  # not following: nothing is kept for the caller


async def test_a_resume_point_older_than_retained_reports_the_gap_first() -> None:
    log = EventLog(maxlen=3)
    feed = EventFeed(log)
    record(log, 10)  # 8, 9, 10 retained
    assert seqs(await drain(feed.subscribe(2, follow=False))) == ["gap 5", 8, 9, 10]
    assert seqs(await drain(feed.subscribe(7, follow=False))) == [8, 9, 10]
    # No resume point: whatever is retained, and no gap for what came before.
    assert seqs(await drain(feed.subscribe(None, follow=False))) == [8, 9, 10]


async def test_a_resume_point_of_an_earlier_run_says_the_amm_restarted() -> None:
    log = EventLog(maxlen=3, incarnation="now")
    feed = EventFeed(log)
    record(log, 4)  # 2, 3, 4 retained
    (gap, *rest) = await drain(feed.subscribe(1, incarnation="before", follow=False))
    assert gap == Gap(missed=1, restarted=True)
    assert seqs(rest) == [2, 3, 4]
    # Beyond the newest event: it cannot be this run's, whatever the incarnation says.
    (gap, *rest) = await drain(feed.subscribe(99, follow=False))
    assert gap == Gap(missed=1, restarted=True)
    assert seqs(rest) == [2, 3, 4]


async def test_a_follower_is_woken_by_the_next_event_without_polling() -> None:
    log = EventLog()
    feed = EventFeed(log)
    subscription = feed.subscribe(0)
    waiting = asyncio.create_task(anext(subscription))
    await asyncio.sleep(0)  # the follower is parked on its wake-up, not on a timer
    assert not waiting.done()
    log.record("worker-dead", "gone", worker="w1")
    event = await asyncio.wait_for(waiting, timeout=5)
    assert isinstance(event, Event)
    assert (event.kind, event.worker, event.seq) == ("worker-dead", "w1", 1)
    subscription.close()
    assert feed.watchers == 0


async def test_a_slow_follower_keeps_at_most_its_buffer_and_is_told_what_it_missed() -> None:
    log = EventLog(maxlen=1000)
    feed = EventFeed(log, buffer=3)
    subscription = feed.subscribe(0)
    record(log, 1000)
    assert subscription.queued == 3  # not 1000: the oldest made room
    subscription.close()  # delivers what it queued, then ends
    assert seqs(await drain(subscription)) == ["gap 997", 998, 999, 1000]


async def test_a_follower_that_catches_up_after_a_gap_gets_the_rest_in_order() -> None:
    log = EventLog()
    feed = EventFeed(log, buffer=2)
    subscription = feed.subscribe(0)
    record(log, 5)  # 4, 5 queued; 1-3 dropped
    assert seqs([await anext(subscription) for _ in range(3)]) == ["gap 3", 4, 5]
    record(log, 1)
    assert seqs([await anext(subscription)]) == [6]
    subscription.close()


async def test_kinds_filter_the_backlog_and_the_follow() -> None:
    log = EventLog()
    feed = EventFeed(log)
    log.record("worker-stale", "slow", worker="w1")
    log.record("key-lost", "gone", keys=["a"])
    subscription = feed.subscribe(0, kinds=["worker-stale", "worker-dead"])
    log.record("key-recovered", "back", keys=["a"])
    log.record("worker-dead", "dead", worker="w1")
    feed.close()
    assert [e.kind for e in await drain(subscription) if isinstance(e, Event)] == [
        "worker-stale",
        "worker-dead",
    ]


async def test_limits_are_enforced() -> None:
    feed = EventFeed(EventLog(), max_watchers=2)
    first, second = feed.subscribe(), feed.subscribe()
    with pytest.raises(TooManyWatchers):
        feed.subscribe()
    feed.subscribe(follow=False)  # a one-off read takes no slot
    first.close()
    third = feed.subscribe()
    with pytest.raises(InvalidArgument):
        feed.subscribe(-1)
    with pytest.raises(InvalidArgument):
        feed.subscribe(kinds=[str(i) for i in range(101)])
    feed.close()
    assert await drain(second) == []
    assert await drain(third) == []
    assert not feed.subscribe().following  # a closed feed has nobody to follow

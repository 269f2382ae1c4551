"""Polling with a deadline: how tests wait for a positive condition (never sleep-and-hope)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def wait_for(
    probe: Callable[[], Awaitable[T]],
    accept: Callable[[T], bool] = ...,
    *,
    within: float = ...,
    what: str = ...,
) -> T: ...


@overload
async def wait_for(
    probe: Callable[[], T],
    accept: Callable[[T], bool] = ...,
    *,
    within: float = ...,
    what: str = ...,
) -> T: ...


async def wait_for(
    probe: Callable[[], Any],
    accept: Callable[[Any], bool] = bool,
    *,
    within: float = 10.0,
    what: str = "condition",
) -> Any:
    """Call ``probe`` until ``accept`` holds; fail with the last value after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value: Any = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last value: {value!r}")
        await asyncio.sleep(0.02)


def poll_until(
    probe: Callable[[], T | None],
    within: float = 10.0,
    what: str = "condition",
    every: float = 0.05,
) -> T:
    """Blocking twin of ``wait_for`` for tests that drive the blocking ``Client``: the first
    truthy value ``probe`` returns, asking every ``every`` seconds (more for costly probes);
    ``AssertionError`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last value: {value!r}")
        time.sleep(every)

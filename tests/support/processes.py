"""Helpers for tests that run the real AMM service and worker agents as local processes.

Tests that need both entry points call ``require_processes()`` (or use ``local_cluster``) and are
skipped with a clear reason while ``amm_service.__main__`` or ``worker_agent.__main__`` does not
exist yet, so they start running as soon as both land. ``poll_until`` is how such tests wait for a
positive outcome: against a deadline, never by sleeping and hoping.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from amm.cluster import AGENT_MODULE, SERVICE_MODULE, LocalCluster

T = TypeVar("T")


def missing_entry_points() -> list[str]:
    """The ``python -m`` entry points a LocalCluster needs that are not importable."""
    missing = []
    for package in (SERVICE_MODULE, AGENT_MODULE):
        try:
            found = importlib.util.find_spec(f"{package}.__main__") is not None
        except ImportError:
            found = False
        if not found:
            missing.append(f"{package}.__main__")
    return missing


def require_processes() -> None:
    """Skip the calling test while the service or the agent has no entry point."""
    missing = missing_entry_points()
    if missing:
        pytest.skip(f"{' and '.join(missing)} not written yet; needed to start a LocalCluster")


@contextmanager
def local_cluster(n_workers: int = 2, **kwargs: Any) -> Iterator[LocalCluster]:
    """A LocalCluster with a quick interval and cycles stopped; skips if it cannot exist yet."""
    require_processes()
    kwargs.setdefault("interval", 0.2)
    kwargs.setdefault("start", False)
    with LocalCluster(n_workers, **kwargs) as cluster:
        yield cluster


def poll_until(
    probe: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """The first truthy value ``probe`` returns; ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(interval)

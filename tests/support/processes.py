"""Real AMM service and worker agent processes for tests that cross process boundaries."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from amm.cluster import LocalCluster


@contextmanager
def local_cluster(n_workers: int = 2, **kwargs: Any) -> Iterator[LocalCluster]:
    """A LocalCluster with a quick interval and cycles stopped."""
    kwargs.setdefault("interval", 0.2)
    kwargs.setdefault("start", False)
    with LocalCluster(n_workers, **kwargs) as cluster:
        yield cluster

"""Small factories of real value objects for unit tests of the service's pure modules."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

from amm_service.decisions.view import (
    ClusterState,
    ClusterView,
    Key,
    KeyReport,
    Memory,
    WorkerId,
    WorkerStatus,
)


def cluster(
    holdings: Mapping[str, Iterable[str]],
    *,
    memory: Mapping[str, int] | None = None,
    status: Mapping[str, WorkerStatus] | None = None,
    pinned: Mapping[str, Iterable[str]] | None = None,
    sizes: Mapping[str, int] | None = None,
    limit: Mapping[str, int] | None = None,
    checksums: Mapping[tuple[str, str], str] | None = None,
    zones: Mapping[str, str] | None = None,
) -> ClusterState:
    """A cluster state where worker ``w`` holds ``holdings[w]``.

    ``memory`` sets every measure of a worker to the same figure; ``pinned[w]`` lists the keys
    pinned on ``w``; ``sizes`` gives key sizes (default 100 bytes); ``checksums[(w, k)]``
    overrides the checksum ``w`` reports for ``k``; ``zones[w]`` is the zone ``w`` declared.
    """
    state = ClusterState()
    for n, (worker, keys) in enumerate(holdings.items()):
        wid = WorkerId(worker)
        zone = (zones or {}).get(worker, "")
        state.register(wid, worker, f"inc-{worker}", now=0.0, zone=zone)
        mem = (memory or {}).get(worker, 0)
        pins = set((pinned or {}).get(worker, ()))
        reports = [
            KeyReport(
                Key(k),
                (sizes or {}).get(k, 100),
                (checksums or {}).get((worker, k), f"sum-{k}"),
                pinned=k in pins,
            )
            for k in keys
        ]
        state.apply_poll(
            wid,
            incarnation=f"inc-{worker}",
            version=n + 1,
            full=True,
            keys=reports,
            removed=(),
            memory=Memory(mem, mem, 0, mem, (limit or {}).get(worker, 0)),
            status=(status or {}).get(worker, WorkerStatus.RUNNING),
            name=worker,
            now=1.0,
            zone=zone,
        )
    return state


def view(holdings: Mapping[str, Iterable[str]], **kwargs: object) -> ClusterView:
    return cluster(holdings, **kwargs).snapshot()  # type: ignore[arg-type]


def new_ids(prefix: str = "d") -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"{prefix}{next(counter)}"

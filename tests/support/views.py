"""Polls merged into a ``ClusterState`` by tests of the view, with what they do not vary."""

from __future__ import annotations

from collections.abc import Sequence

from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus


def poll(
    state: ClusterState,
    worker: WorkerId,
    version: int = 1,
    *,
    incarnation: str = "i1",
    full: bool = False,
    keys: Sequence[KeyReport] = (),
    removed: Sequence[Key] = (),
    now: float = 1.0,
) -> None:
    state.apply_poll(
        worker,
        incarnation=incarnation,
        version=version,
        full=full,
        keys=keys,
        removed=removed,
        memory=Memory(managed=1),
        status=WorkerStatus.RUNNING,
        name=str(worker),
        now=now,
    )

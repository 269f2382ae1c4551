"""Polls merged into a ``ClusterState`` by tests of the view, with what they do not vary."""

from __future__ import annotations

from collections.abc import Sequence

from amm_service.decisions.view import ClusterState, Key, KeyReport, Memory, WorkerId, WorkerStatus

SOME_MEMORY = Memory(managed=1)


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
    memory: Memory = SOME_MEMORY,
    status: WorkerStatus = WorkerStatus.RUNNING,
    zone: str = "",
) -> None:
    state.apply_poll(
        worker,
        incarnation=incarnation,
        version=version,
        full=full,
        keys=keys,
        removed=removed,
        memory=memory,
        status=status,
        name=str(worker),
        now=now,
        zone=zone,
    )


def joined(
    state: ClusterState,
    worker: WorkerId,
    version: int,
    keys: Sequence[KeyReport],
    *,
    incarnation: str = "i1",
    memory: Memory = SOME_MEMORY,
    status: WorkerStatus = WorkerStatus.RUNNING,
    zone: str = "",
) -> None:
    """``worker`` registered (at 0.0) and its whole inventory, ``keys``, merged (at 1.0): how a
    test's cluster starts."""
    state.register(worker, str(worker), incarnation, now=0.0, zone=zone)
    poll(
        state,
        worker,
        version,
        incarnation=incarnation,
        full=True,
        keys=keys,
        memory=memory,
        status=status,
        zone=zone,
    )

"""Replication goals: how many copies a key with a goal should have now, and how many it has.

Shared by the Replicate policy (which makes copies up to the target), ReduceReplicas (which never
drops below it) and the AMM's reports (``ListGoals``, the GetStatus totals), so that all three
count the same way. Two rules make Replicate and ReduceReplicas agree instead of fighting:

1. A *live* copy is one on a durable holder (answering polls, not closing, retiring or retired).
   A copy on a worker that stopped answering is not live: Replicate recreates it elsewhere, and
   ReduceReplicas must not count it either, or it would drop the recreated copy.
2. The *target* is the goal capped by the workers that can hold the key: those accepting replicas
   plus its durable holders (a paused holder keeps its copy). A goal of None means all of them,
   including workers that join later. A goal larger than the cluster is met by every worker.

Pure: no I/O. Worker sets are computed once per view, so one key costs O(its holders).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from amm_service.decisions.view import Goal, Key, KeyView, WorkerId, WorkerView


@dataclass(frozen=True, slots=True)
class GoalStatus:
    """One key's goal as it stands: ``n`` asked (None: every worker), ``target`` copies it should
    have now, ``live`` copies it has, and whether the key is ``lost``."""

    key: Key
    n: Goal
    target: int
    live: int
    lost: bool = False
    """The key is lost: no copy is left to make copies from (``runtime.records.lost``)."""

    @property
    def below(self) -> bool:
        """Fewer live copies than the target; a key with no live copy at all is always below."""
        return self.live < max(1, self.target)


class GoalCounter:
    """Targets and live copies over one set of workers (a view's, or the live state's)."""

    def __init__(self, workers: Mapping[WorkerId, WorkerView]) -> None:
        self.accepting = frozenset(w for w, ws in workers.items() if ws.accepts_replicas)
        self.durable = frozenset(w for w, ws in workers.items() if ws.durable)

    def live(self, kv: KeyView) -> frozenset[WorkerId]:
        """The holders whose copies count: durable ones."""
        return kv.holders & self.durable

    def target(self, n: Goal, kv: KeyView | None) -> int:
        """Copies ``kv`` should have for a goal of ``n``: n capped by the workers that can hold
        it. A key nobody holds can go to any accepting worker."""
        live = self.live(kv) if kv is not None else frozenset()
        room = len(self.accepting) + len(live - self.accepting)
        return room if n is None else min(n, room)

    def status(self, key: Key, n: Goal, kv: KeyView | None) -> GoalStatus:
        live = len(self.live(kv)) if kv is not None else 0
        return GoalStatus(key, n, self.target(n, kv), live)


def describe(n: Goal) -> str:
    """``3 copies`` / ``every worker``, for reasons and reports."""
    return "every worker" if n is None else f"{n} copies"

"""Replicate: keep every key with a tracked goal at its target number of live copies.

Goals are set with the ``Replicate`` RPC (``client.replicate``) and kept in the AMM's state, so
this is a standing order, not a one-off copy: each cycle it asks for the copies that are missing,

1. after a holder died or stopped answering (its copy is no longer live, see
   ``policies.goals``), recreating the copy from a survivor;
2. after a holder dropped the key or was retired;
3. when a worker joins and the goal is "every worker" (n = None);

counting replications already in flight, so a slow transfer is not asked for twice. Keys with the
fewest live copies go first (then by key): they are the closest to being lost, and they get the
throttled transfer slots. A key with a goal that no worker holds any more cannot be copied; it is
reported as below its goal. The core picks recipients, spreading copies over zones first.

The module is not called ``replicate``: that name in ``amm_service.policies`` is the suggestion
helper every policy imports, and a submodule of that name would replace it once loaded.
"""

from __future__ import annotations

from amm_service.decisions.view import ClusterView, Key, Measure
from amm_service.policies.base import PendingView, PolicyRun, replicate
from amm_service.policies.goals import GoalCounter, describe


class Replicate:
    """Suggest the replications that bring keys with a goal up to their target."""

    priority = 10

    def __init__(self, *, name: str = "Replicate") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        if not view.goals:
            return
        counter = GoalCounter(view.workers)
        todo: list[tuple[int, Key, int, str]] = []
        for key, n in view.goals.items():
            kv = view.keys.get(key)
            if kv is None or kv.conflicting:
                continue  # nothing to copy from, or nothing the core would copy
            live = len(counter.live(kv))
            target = counter.target(n, kv)
            missing = target - live - len(pending.in_flight(key).replicating)
            if missing > 0:
                reason = f"goal of {describe(n)}: {live} live of {target}"
                todo.append((live, key, missing, reason))
        todo.sort()
        for _, key, missing, reason in todo:
            for _ in range(missing):
                if (yield replicate(key, reason=reason)) is None:
                    break  # no recipient, room or slot for this key this cycle

    def __repr__(self) -> str:
        return f"Replicate(name={self.name!r})"

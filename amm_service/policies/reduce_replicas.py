"""ReduceReplicas: keep one replica of each key, more while readers on several workers pin it or
a replication goal asks for more.

A port of Dask's policy of the same name, counting the way the Replicate policy does (see
``policies.goals``) so that the two never fight over a key with a goal:

1. Only *live* copies (on durable holders) count against the copies desired: a copy on a worker
   that stopped answering is not one to keep, and counting it would drop a live copy that
   Replicate then recreates, every cycle.
2. Desired is the largest of one, the live holders that pinned it (the core never drops a
   pinned copy) and the key's goal target.
3. What is in flight counts: replicas being created will need dropping too, drops of live
   copies under way need not be asked again.
4. Copies on reachable workers that are retiring are extra by definition: they are dropped
   once the live copies alone meet what is desired (they remain sources until then).
"""

from __future__ import annotations

from amm_service.decisions.view import ClusterView, Measure
from amm_service.policies.base import SCAN_STEP, PendingView, PolicyRun, drop
from amm_service.policies.goals import GoalCounter


class ReduceReplicas:
    """Suggest dropping every replica beyond what readers and goals need."""

    def __init__(self, *, name: str = "ReduceReplicas") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        counter = GoalCounter(view.workers)
        leaving = frozenset(w for w, ws in view.workers.items() if ws.serves and not ws.durable)
        goals = view.goals
        reasons: dict[tuple[int, int], str] = {}
        for n, key in enumerate(sorted(view.replicated), 1):
            if not n % SCAN_STEP:
                yield None  # a pause (see ``PolicyRun``): most keys may have nothing to drop
            kv = view.keys[key]
            live = counter.live(kv)
            in_flight = pending.in_flight(key)
            desired = max(1, len(kv.pinned_on & live))
            if key in goals:
                desired = max(desired, counter.target(goals[key], kv))
            kept = len(live - in_flight.dropping)
            if kept >= desired:
                extra = (kv.holders & leaving) - kv.pinned_on - in_flight.dropping
                for worker in sorted(extra):
                    yield drop(key, frozenset((worker,)), reason="copy on a retiring worker")
            ndrop = kept + len(in_flight.replicating) - desired
            if ndrop > 0:  # one suggestion for all of them: the core picks them in one pass
                reason = reasons.get((kept, desired))
                if reason is None:  # one string per distinct reason, not one per key
                    reason = reasons[kept, desired] = f"{kept} live copies, {desired} needed"
                yield drop(key, live, reason, copies=ndrop)

    def __repr__(self) -> str:
        return f"ReduceReplicas(name={self.name!r})"

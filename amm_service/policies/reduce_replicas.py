"""ReduceReplicas: keep one replica of each key, more while readers on several workers pin it.

A port of Dask's policy of the same name. The number to drop accounts for what is already in
flight: replicas being created will need dropping too, drops under way need not be asked again.
Pinned holders are kept by the core (it never drops where a key is pinned), so a key pinned on
three workers keeps those three.
"""

from __future__ import annotations

from amm_service.policies.base import PendingView, PolicyRun, drop
from amm_service.view import ClusterView, Measure


class ReduceReplicas:
    """Suggest dropping every replica beyond what readers need."""

    def __init__(self, *, name: str = "ReduceReplicas") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        for key in sorted(view.replicated):
            kv = view.keys[key]
            desired = max(1, len(kv.pinned_on))
            in_flight = pending.in_flight(key)
            ndrop = len(kv.holders) - desired + len(in_flight.replicating) - len(in_flight.dropping)
            for _ in range(ndrop):
                yield drop(key)

    def __repr__(self) -> str:
        return f"ReduceReplicas(name={self.name!r})"

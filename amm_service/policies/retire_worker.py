"""RetireWorker: empty the workers the AMM is retiring, without losing a key.

A port of Dask's policy of the same name, stateless: which workers are retiring is a flag in the
view (set by the AMM when ``RetireWorkers`` is called or a policy's retire request is accepted),
so a restarted AMM resumes by setting the flag again. For every key a retiring worker holds:

1. another holder keeps a copy that survives (running or paused, answering, not retiring, not
   dropping it): drop it from the retiring worker;
2. a copy elsewhere is already being made: wait for it;
3. otherwise: replicate it; the core picks the running worker with the lowest memory that has
   room (retiring workers never receive), and rejects with NO_RECIPIENT or NO_ROOM when there is
   none, which makes the AMM abandon the retirement.

Retired workers that still hold keys (values put on them after they were retired) are emptied
the same way. A key pinned on the retiring worker keeps it: the core rejects the drop (PINNED)
until the reader leaves. Deciding when a retirement is over is the AMM's job, not this policy's.
"""

from __future__ import annotations

from amm_service.decisions.view import ClusterView, Measure
from amm_service.policies.base import PendingView, PolicyRun, drop, replicate


class RetireWorker:
    """Move the data of retiring workers elsewhere, then drop it from them."""

    priority = 20

    def __init__(self, *, name: str = "RetireWorker") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        workers = view.workers
        for worker in sorted(workers):
            ws = workers[worker]
            if not (ws.retiring or ws.retired):
                continue
            only = frozenset((worker,))
            for key in sorted(view.held_by(worker)):
                kv = view.keys.get(key)
                if kv is None:
                    continue
                in_flight = pending.in_flight(key)
                if worker in in_flight.dropping:
                    continue
                if view.durable(kv.holders - only - in_flight.dropping):
                    yield drop(key, only, reason=f"{worker} is retiring; a copy survives elsewhere")
                elif not in_flight.replicating:
                    yield replicate(key, reason=f"{worker} is retiring and holds the only copy")

    def __repr__(self) -> str:
        return f"RetireWorker(name={self.name!r})"

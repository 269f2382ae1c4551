"""A cluster simulated in memory, for multi-cycle tests of policies without a network.

Each ``step`` is one AMM cycle: the directives whose transfer time is up land first, the way
agents would apply them (replicas before drops; a replica needs a source that still holds the
key, a running worker and room under the limit; a drop needs the key unpinned and another
holder named in the directive still holding it), then a fresh view is built from the holdings
(memory = managed = the sizes held; sizes are only numbers, no bytes exist) and ``core.plan``
runs the policies over it with the real ledger. A directive stays in the ledger until it lands,
``delay`` cycles after it was planned (0: before the next cycle).

The simulation records what it takes to check a policy's convergence: every replica and drop
that landed, any replica that landed on a worker which had dropped that key before (a key moving
back), the fewest copies each key ever had, and the refusals.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from amm_service.decisions.core import Plan, PlanConfig, plan
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import (
    ClusterState,
    ClusterView,
    Key,
    KeyReport,
    Memory,
    WorkerId,
    WorkerStatus,
)
from amm_service.policies import Policy


@dataclass
class Landed:
    """What one cycle's landings did."""

    replicated: list[tuple[Key, WorkerId]] = field(default_factory=list)
    dropped: list[tuple[Key, WorkerId]] = field(default_factory=list)
    refused: list[tuple[Directive, str]] = field(default_factory=list)


class Simulation:
    """Workers holding sized keys, driven cycle by cycle by ``core.plan`` and some policies."""

    def __init__(
        self,
        holdings: Mapping[str, Iterable[str]],
        policies: Sequence[Policy],
        *,
        sizes: Mapping[str, int] | int = 100,
        limits: Mapping[str, int] | int = 0,
        pinned: Mapping[str, Iterable[str]] | None = None,
        status: Mapping[str, WorkerStatus] | None = None,
        zones: Mapping[str, str] | None = None,
        config: PlanConfig | None = None,
        delay: int = 0,
    ) -> None:
        self.held: dict[WorkerId, set[Key]] = {
            WorkerId(w): {Key(k) for k in keys} for w, keys in holdings.items()
        }
        keys = set().union(*self.held.values())
        self.sizes: dict[Key, int] = {
            k: sizes if isinstance(sizes, int) else sizes[k] for k in keys
        }
        self.limits = {
            w: limits if isinstance(limits, int) else limits.get(w, 0) for w in self.held
        }
        self.pinned = {WorkerId(w): {Key(k) for k in ks} for w, ks in (pinned or {}).items()}
        self.status = {WorkerId(w): s for w, s in (status or {}).items()}
        self.zones = {WorkerId(w): z for w, z in (zones or {}).items()}
        self.policies = list(policies)
        self.config = config or PlanConfig(measure="managed", epoch=1)
        self.delay = delay
        self.ledger = Ledger()
        self.cycle = 0
        self.plans: list[Plan] = []
        self.landed: list[Landed] = []
        self.dropped_from: dict[Key, set[WorkerId]] = {}
        self.moved_back: list[tuple[Key, WorkerId]] = []
        self.initial_copies = self.copies()
        self.fewest_copies = dict(self.initial_copies)
        self._due: dict[str, int] = {}
        self._ids = itertools.count(1)

    # -- the cluster -------------------------------------------------------------------------

    def memory(self, worker: str) -> int:
        return sum(self.sizes[k] for k in self.held[WorkerId(worker)])

    def memories(self) -> dict[WorkerId, int]:
        return {w: self.memory(w) for w in self.held}

    def spread(self) -> int:
        """The gap between the fullest and the emptiest worker."""
        values = self.memories().values()
        return max(values) - min(values)

    def copies(self) -> dict[Key, int]:
        counts: dict[Key, int] = {}
        for keys in self.held.values():
            for k in keys:
                counts[k] = counts.get(k, 0) + 1
        return counts

    def view(self) -> ClusterView:
        state = ClusterState()
        for w, keys in self.held.items():
            state.register(w, w, "inc", now=0.0, zone=self.zones.get(w, ""))
            pins = self.pinned.get(w, set())
            mem = self.memory(w)
            state.apply_poll(
                w,
                incarnation="inc",
                version=self.cycle + 1,
                full=True,
                keys=[KeyReport(k, self.sizes[k], f"sum-{k}", k in pins) for k in sorted(keys)],
                removed=(),
                memory=Memory(mem, mem, 0, mem, self.limits[w]),
                status=self.status.get(w, WorkerStatus.RUNNING),
                name=w,
                now=float(self.cycle),
                zone=self.zones.get(w, ""),
            )
        return state.snapshot(now=float(self.cycle))

    # -- cycles ------------------------------------------------------------------------------

    def step(self) -> Plan:
        """Land what is due, then plan one cycle and put its directives in flight."""
        self.landed.append(self._land())
        result = plan(
            self.view(), self.policies, self.ledger, self.config, lambda: f"d{next(self._ids)}"
        )
        for directive in result.directives:
            self.ledger.add(directive, now=float(self.cycle))
            self._due[directive.id] = self.cycle + self.delay
        self.plans.append(result)
        self.cycle += 1
        return result

    def run(self, max_cycles: int = 100) -> int:
        """Step until a cycle plans nothing with nothing in flight; returns the cycles taken."""
        for _ in range(max_cycles):
            if not self.step().directives and not len(self.ledger):
                return self.cycle
        raise AssertionError(
            f"still busy after {max_cycles} cycles: memory {self.memories()}, "
            f"{len(self.ledger)} directives in flight"
        )

    @property
    def directives(self) -> list[Directive]:
        return [d for p in self.plans for d in p.directives]

    @property
    def replications(self) -> list[Directive]:
        return [d for d in self.directives if d.op is Op.REPLICATE]

    def _land(self) -> Landed:
        landed = Landed()
        due = [e.directive for e in self.ledger if self._due[e.directive.id] < self.cycle]
        for d in sorted(due, key=lambda d: d.op is Op.DROP):
            why = self._apply(d)
            status = OutcomeStatus.APPLIED if why is None else OutcomeStatus.REFUSED
            self.ledger.settle(Outcome(d.id, status, why or ""))
            del self._due[d.id]
            if why is not None:
                landed.refused.append((d, why))
            elif d.op is Op.REPLICATE:
                landed.replicated.append((d.key, d.worker))
            else:
                landed.dropped.append((d.key, d.worker))
        self.ledger.observe(lambda worker: 0)  # the view shows every landed directive
        for key, count in self.copies().items():
            self.fewest_copies[key] = min(self.fewest_copies.get(key, count), count)
        for key in self.fewest_copies.keys() - self.copies().keys():
            self.fewest_copies[key] = 0
        return landed

    def _apply(self, d: Directive) -> str | None:
        """Apply ``d`` as an agent would; the reason it is refused, or None."""
        held = self.held[d.worker]
        if d.op is Op.REPLICATE:
            if d.key in held:
                return None
            if self.status.get(d.worker, WorkerStatus.RUNNING) is not WorkerStatus.RUNNING:
                return "not running"
            if not any(d.key in self.held[s] for s in d.sources):
                return "no source holds the key"
            limit = self.limits[d.worker]
            if limit and self.memory(d.worker) + d.size > limit:
                return "over the memory limit"
            held.add(d.key)
            if d.worker in self.dropped_from.get(d.key, set()):
                self.moved_back.append((d.key, d.worker))
            return None
        if d.key not in held:
            return None
        if d.key in self.pinned.get(d.worker, set()):
            return "pinned"
        if not any(d.key in self.held[h] for h in d.holders if h != d.worker):
            return "no other holder keeps the key"
        held.discard(d.key)
        self.dropped_from.setdefault(d.key, set()).add(d.worker)
        return None

"""The one decider: turns the policies' suggestions into directives.

``plan`` runs every policy over a frozen cluster view and answers each suggestion exactly as
Dask's AMM does, with what Dask left out added:

- replicate: onto the RUNNING worker with the lowest memory that neither holds the key nor is
  already receiving it, and that has room for it under its memory limit;
- drop: from the holder with the highest memory that has not pinned the key and is not already
  dropping it; never the last replica, counting drops in flight from earlier cycles as well as
  this one, and not counting copies on CLOSING workers as replicas that survive;
- ``candidates`` restricts the choice (None: anywhere; an empty set: nowhere);
- each choice adjusts the estimated memory of the worker concerned, so later suggestions in the
  same cycle spread out instead of piling onto one worker; directives still in flight from
  earlier cycles are counted the same way; room under a memory limit is only freed by drops a
  poll has shown, never by planned ones;
- a worker that missed its last poll is neither a recipient nor a source, and its copies do not
  count as replicas that survive; a key whose holders hold different content is left alone;
- a rejected suggestion is recorded with its reason; a policy that raises is reported, not fatal.

Pure: no I/O and no clock. The caller supplies directive ids and what is in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from amm_service.directive import Directive, Op
from amm_service.pending import InFlight
from amm_service.policies.base import PendingView, Policy, Suggestion
from amm_service.view import ClusterView, Key, KeyView, Measure, WorkerId


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """What a plan depends on besides the view: the memory measure, the AMM's epoch, and how
    many suggestions one policy may make in a cycle before it is stopped as runaway."""

    measure: Measure
    epoch: int
    max_suggestions: int = 1_000_000


@dataclass(frozen=True, slots=True)
class Rejection:
    """A suggestion the core turned down."""

    policy: str
    op: Op
    key: Key
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The outcome of planning one cycle."""

    directives: tuple[Directive, ...]
    rejections: tuple[Rejection, ...]
    suggestions: int
    policy_errors: tuple[str, ...] = ()


class InFlightSource(PendingView, Protocol):
    """What is in flight from earlier cycles (the ledger)."""

    def directives(self) -> Iterator[Directive]: ...


@dataclass(frozen=True, slots=True)
class _No:
    """Why no worker fits a suggestion."""

    reason: str


class _CyclePending:
    """In flight from earlier cycles (the ledger) plus what this cycle has picked so far."""

    def __init__(self, earlier: PendingView) -> None:
        self._earlier = earlier
        self._replicating: dict[Key, set[WorkerId]] = {}
        self._dropping: dict[Key, set[WorkerId]] = {}

    def in_flight(self, key: Key) -> InFlight:
        base = self._earlier.in_flight(key)
        repl = self._replicating.get(key)
        drop = self._dropping.get(key)
        if repl is None and drop is None:
            return base
        return InFlight(base.replicating | (repl or set()), base.dropping | (drop or set()))

    def add(self, op: Op, key: Key, worker: WorkerId) -> None:
        table = self._replicating if op is Op.REPLICATE else self._dropping
        table.setdefault(key, set()).add(worker)


class _Decider:
    """Chooses workers for one cycle; holds the cycle's memory estimates and pending picks."""

    def __init__(self, view: ClusterView, earlier: InFlightSource, measure: Measure) -> None:
        workers = view.workers
        self.view = view
        self.pending = _CyclePending(earlier)
        self.memory = {w: ws.memory.by(measure) for w, ws in workers.items()}
        self.managed = {w: ws.memory.managed for w, ws in workers.items()}
        self.running = frozenset(w for w, ws in workers.items() if ws.accepts_replicas)
        self.fragile = frozenset(w for w, ws in workers.items() if not ws.durable)
        self.unreachable = frozenset(w for w, ws in workers.items() if not ws.reachable)
        self.rank = {w: 0 if ws.accepts_replicas else 1 for w, ws in workers.items()}
        for directive in earlier.directives():
            self._count_in_flight(directive)

    def _count_in_flight(self, d: Directive) -> None:
        """Account for a directive of an earlier cycle whose effect no poll has shown yet."""
        kv = self.view.keys.get(d.key)
        if d.worker not in self.memory:
            return
        holds = kv is not None and d.worker in kv.holders
        if d.op is Op.REPLICATE and not holds:
            self.memory[d.worker] += d.size
            self.managed[d.worker] += d.size
        elif d.op is Op.DROP and holds:
            self.memory[d.worker] -= d.size

    def recipient(self, kv: KeyView, candidates: frozenset[WorkerId] | None) -> WorkerId | _No:
        """The worker to replicate onto, or the reason there is none."""
        pool = self.running if candidates is None else candidates & self.running
        pool = pool - kv.holders - self.pending.in_flight(kv.key).replicating
        if not pool:
            return _No("no running worker that lacks the key is left to receive it")
        roomy = [w for w in pool if self._has_room(w, kv.size)]
        if not roomy:
            return _No("no candidate has room for the key under its memory limit")
        return min(roomy, key=lambda w: (self.memory[w], w))

    def sources(self, kv: KeyView) -> tuple[WorkerId, ...]:
        """Holders to fetch from, most dependable and least loaded first."""
        dropping = self.pending.in_flight(kv.key).dropping
        usable = [w for w in kv.holders - self.fragile - dropping if w in self.view.workers]
        return tuple(sorted(usable, key=self._preference))

    def dropper(
        self, kv: KeyView, candidates: frozenset[WorkerId] | None
    ) -> tuple[WorkerId, tuple[WorkerId, ...]] | _No:
        """The holder to drop from with the other holders, most dependable first, or the reason
        there is none."""
        remaining = kv.holders - self.pending.in_flight(kv.key).dropping
        durable = remaining - self.fragile
        if len(remaining) < 2 or not durable:
            return _No("last replica")
        pool = remaining if candidates is None else candidates & remaining
        pool = pool - self.unreachable  # a directive it cannot hear is no use
        if not pool:
            return _No("no reachable candidate holds the key (or all are already dropping it)")
        pool = pool - kv.pinned_on
        if not pool:
            return _No("pinned on every candidate")
        if len(durable) == 1:
            pool = pool - durable  # a drop must leave at least one durable replica behind
            if not pool:
                return _No("last replica")
        memory = self.memory
        chosen = max(pool, key=lambda w: (memory[w], w))
        remaining = remaining - {chosen}
        return chosen, tuple(sorted(remaining, key=self._preference))

    def commit(self, op: Op, kv: KeyView, worker: WorkerId) -> None:
        self.pending.add(op, kv.key, worker)
        if op is Op.REPLICATE:
            self.memory[worker] += kv.size
            self.managed[worker] += kv.size
        else:
            self.memory[worker] -= kv.size

    def _has_room(self, worker: WorkerId, size: int) -> bool:
        limit = self.view.workers[worker].memory.limit
        return limit == 0 or self.managed[worker] + size <= limit

    def _preference(self, worker: WorkerId) -> tuple[int, int, str]:
        return (self.rank[worker], self.memory[worker], worker)


def plan(
    view: ClusterView,
    policies: Iterable[Policy],
    in_flight: InFlightSource,
    config: PlanConfig,
    new_id: Callable[[], str],
) -> Plan:
    """Run the policies over ``view`` and decide; see the module docstring for the rules."""
    decider = _Decider(view, in_flight, config.measure)
    directives: list[Directive] = []
    rejections: list[Rejection] = []
    errors: list[str] = []
    count = 0

    def decide(policy: str, suggestion: Suggestion) -> WorkerId | None:
        kv = view.keys.get(suggestion.key)
        choice: WorkerId | _No
        sources: tuple[WorkerId, ...] = ()
        holders: tuple[WorkerId, ...] = ()
        if kv is None:
            choice = _No("unknown key")
        elif kv.conflicting:
            choice = _No(f"conflicting content on {', '.join(sorted(kv.conflicting))}")
        elif suggestion.op is Op.REPLICATE:
            choice = decider.recipient(kv, suggestion.candidates)
            sources = decider.sources(kv)
            if not sources:
                choice = _No("no holder can serve as a source (all are dropping it)")
        else:
            picked = decider.dropper(kv, suggestion.candidates)
            choice = picked if isinstance(picked, _No) else picked[0]
            holders = () if isinstance(picked, _No) else picked[1]
        if isinstance(choice, _No) or kv is None:
            reason = choice.reason if isinstance(choice, _No) else "unknown key"
            rejections.append(Rejection(policy, suggestion.op, suggestion.key, reason))
            return None
        directives.append(
            Directive(
                id=new_id(),
                epoch=config.epoch,
                op=suggestion.op,
                key=kv.key,
                worker=choice,
                size=kv.size,
                checksum=kv.checksum,
                sources=sources,
                holders=holders,
                policy=policy,
            )
        )
        decider.commit(suggestion.op, kv, choice)
        return choice

    for policy in policies:
        run = policy.run(view, decider.pending, config.measure)
        made = 0
        try:
            suggestion = next(run)
            while made < config.max_suggestions:
                made += 1
                suggestion = run.send(decide(policy.name, suggestion))
            run.close()
            errors.append(
                f"policy {policy.name} stopped after {made} suggestions in one cycle (runaway?)"
            )
        except StopIteration:
            pass
        except Exception as err:  # a third-party policy's bug must not stop the others
            errors.append(f"policy {policy.name} failed: {type(err).__name__}: {err}")
        count += made
    return Plan(tuple(directives), tuple(rejections), count, tuple(errors))

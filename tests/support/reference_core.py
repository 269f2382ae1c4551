"""The core and ReduceReplicas exactly as they were before the planning fast paths (main at
b72b282), kept only so that tests can prove the fast paths decide exactly the same: same
directives, same order, same rejections. Not used by the service; do not edit it to follow new
rules — a deliberate change of decisions retires this reference instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from amm_service.core import InFlightSource, Plan, PlanConfig, Rejection, RetireDecision, Why
from amm_service.directive import Directive, Op
from amm_service.pending import InFlight
from amm_service.policies.base import (
    PendingView,
    Policy,
    PolicyRun,
    RetireRequest,
    Suggestion,
    drop,
    priority_of,
)
from amm_service.policies.goals import GoalCounter
from amm_service.view import ClusterView, Key, KeyView, Measure, WorkerId, WorkerStatus, WorkerView


@dataclass(frozen=True, slots=True)
class _No:
    """Why no worker fits a suggestion."""

    reason: str
    why: Why


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

    def __init__(self, view: ClusterView, earlier: InFlightSource, config: PlanConfig) -> None:
        workers = view.workers
        measure = config.measure
        self.view = view
        self.config = config
        self.pending = _CyclePending(earlier)
        self.memory = {w: ws.memory.by(measure) for w, ws in workers.items()}
        self.managed = {w: ws.memory.managed for w, ws in workers.items()}
        self.running = {w for w, ws in workers.items() if ws.accepts_replicas}
        self.fragile = frozenset(w for w, ws in workers.items() if not ws.durable)
        self.unreachable = frozenset(w for w, ws in workers.items() if not ws.reachable)
        self.serving = frozenset(w for w, ws in workers.items() if ws.serves)
        self.zone = {w: ws.zone for w, ws in workers.items()}
        self.rank = {w: 0 if ws.accepts_replicas else 1 for w, ws in workers.items()}
        self.drop_rank = {w: _drop_rank(ws) for w, ws in workers.items()}
        self.incoming: dict[WorkerId, int] = {}
        self.outgoing: dict[WorkerId, int] = {}
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
            self.incoming[d.worker] = self.incoming.get(d.worker, 0) + 1
            if d.sources:
                self.outgoing[d.sources[0]] = self.outgoing.get(d.sources[0], 0) + 1
        elif d.op is Op.DROP and holds:
            self.memory[d.worker] -= d.size

    def recipient(self, kv: KeyView, candidates: frozenset[WorkerId] | None) -> WorkerId | _No:
        """The worker to replicate onto, or the reason there is none."""
        pool = self.running if candidates is None else candidates & self.running
        replicating = self.pending.in_flight(kv.key).replicating
        pool = pool - kv.holders - replicating
        if not pool:
            return _No(
                "no running worker that lacks the key is left to receive it", Why.NO_RECIPIENT
            )
        roomy = [w for w in pool if self._has_room(w, kv.size)]
        if not roomy:
            return _No("no candidate has room for the key under its memory limit", Why.NO_ROOM)
        limit = self.config.max_incoming
        if limit:
            roomy = [w for w in roomy if self.incoming.get(w, 0) < limit]
            if not roomy:
                return _No(
                    f"throttled: every candidate has {limit} incoming transfers", Why.THROTTLED
                )
        zone = self.zone
        # A copy on a worker that is leaving or silent does not cover its zone: it may go.
        zones = {zone[w] for w in (kv.holders - self.fragile) | replicating if zone.get(w)}
        memory = self.memory
        return min(roomy, key=lambda w: (zone[w] in zones, memory[w], w))

    def sources(self, kv: KeyView) -> tuple[WorkerId, ...] | _No:
        """Holders to fetch from, most dependable and least loaded first, or the reason there is
        none."""
        dropping = self.pending.in_flight(kv.key).dropping
        usable = [w for w in kv.holders - dropping if w in self.serving]
        if not usable:
            return _No("no holder can serve as a source (all are dropping it)", Why.NO_SOURCE)
        limit = self.config.max_outgoing
        if limit:
            usable = [w for w in usable if self.outgoing.get(w, 0) < limit]
            if not usable:
                return _No(f"throttled: every holder has {limit} outgoing transfers", Why.THROTTLED)
        return tuple(sorted(usable, key=self._preference))

    def dropper(
        self, kv: KeyView, candidates: frozenset[WorkerId] | None
    ) -> tuple[WorkerId, tuple[WorkerId, ...]] | _No:
        """The holder to drop from with the other holders, most dependable first, or the reason
        there is none."""
        if not self.config.allow_drops:
            return _No(
                "start-up grace: not every worker known before the restart has reported yet",
                Why.GRACE,
            )
        remaining = kv.holders - self.pending.in_flight(kv.key).dropping
        durable = remaining - self.fragile
        if len(remaining) < 2 or not durable:
            return _No("last replica", Why.LAST_REPLICA)
        pool = remaining if candidates is None else candidates & remaining
        pool = pool - self.unreachable  # a directive it cannot hear is no use
        if not pool:
            return _No(
                "no reachable candidate holds the key (or all are already dropping it)",
                Why.UNREACHABLE,
            )
        pool = pool - kv.pinned_on
        if not pool:
            return _No("pinned on every candidate", Why.PINNED)
        if len(durable) == 1:
            pool = pool - durable  # a drop must leave at least one durable replica behind
            if not pool:
                return _No("last replica", Why.LAST_REPLICA)
        memory, zone, rank = self.memory, self.zone, self.drop_rank
        per_zone: dict[str, int] = {}
        for w in durable:
            per_zone[zone[w]] = per_zone.get(zone[w], 0) + 1

        def keeps_zone(w: WorkerId) -> bool:
            """Whether dropping from ``w`` leaves its zone (if it has one) a durable copy."""
            return not zone[w] or w not in durable or per_zone[zone[w]] > 1

        chosen = max(pool, key=lambda w: (keeps_zone(w), -rank[w], memory[w], w))
        remaining = remaining - {chosen}
        return chosen, tuple(sorted(remaining, key=self._preference))

    def retire(self, request: RetireRequest, accepted: set[WorkerId]) -> str | None:
        """Why ``request`` must be declined, or None to accept it."""
        ws = self.view.workers.get(request.worker)
        if ws is None:
            return "unknown worker"
        if ws.retiring or ws.retired:
            return "already retiring or retired"
        if not ws.reachable:
            return "the worker does not answer polls"
        others = self.running - accepted - {request.worker}
        if not others:
            return "it is the last running worker"
        view = self.view
        need = 0
        for key in view.held_by(request.worker):
            kv = view.keys.get(key)
            if kv is not None and not (kv.holders - {request.worker}) - self.fragile:
                need += kv.size
        limits = [view.workers[w].memory.limit for w in others]
        if any(limit == 0 for limit in limits):
            return None
        room = sum(max(0, view.workers[w].memory.limit - self.managed[w]) for w in others)
        if need > room:
            return f"the other workers have no room for its data ({need} bytes, room {room})"
        return None

    def commit(self, op: Op, kv: KeyView, worker: WorkerId, sources: tuple[WorkerId, ...]) -> None:
        self.pending.add(op, kv.key, worker)
        if op is Op.REPLICATE:
            self.memory[worker] += kv.size
            self.managed[worker] += kv.size
            self.incoming[worker] = self.incoming.get(worker, 0) + 1
            if sources:
                self.outgoing[sources[0]] = self.outgoing.get(sources[0], 0) + 1
        else:
            self.memory[worker] -= kv.size

    def _has_room(self, worker: WorkerId, size: int) -> bool:
        limit = self.view.workers[worker].memory.limit
        return limit == 0 or self.managed[worker] + size <= limit

    def _preference(self, worker: WorkerId) -> tuple[int, int, str]:
        return (self.rank[worker], self.memory[worker], worker)


def _drop_rank(ws: WorkerView) -> int:
    """Lower goes first among drop candidates: retiring workers, then paused ones, then the rest."""
    if ws.retiring or ws.retired:
        return 0
    if ws.status is not WorkerStatus.RUNNING:
        return 1
    return 2


def plan(
    view: ClusterView,
    policies: Iterable[Policy],
    in_flight: InFlightSource,
    config: PlanConfig,
    new_id: Callable[[], str],
) -> Plan:
    """Run the policies over ``view`` and decide; see the module docstring for the rules."""
    decider = _Decider(view, in_flight, config)
    directives: list[Directive] = []
    rejections: list[Rejection] = []
    retirements: list[RetireDecision] = []
    accepted: set[WorkerId] = set()
    errors: list[str] = []
    count = 0

    def retire(policy: str, request: RetireRequest) -> WorkerId | None:
        verdict = decider.retire(request, accepted)
        ok = verdict is None
        retirements.append(
            RetireDecision(
                policy, request.worker, request.reason, ok, verdict or "accepted", request.close
            )
        )
        if not ok:
            return None
        accepted.add(request.worker)
        decider.running.discard(request.worker)
        return request.worker

    def decide(policy: str, suggestion: Suggestion | RetireRequest) -> WorkerId | None:
        if isinstance(suggestion, RetireRequest):
            return retire(policy, suggestion)
        kv = view.keys.get(suggestion.key)
        choice: WorkerId | _No
        sources: tuple[WorkerId, ...] = ()
        holders: tuple[WorkerId, ...] = ()
        if kv is None:
            choice = _No("unknown key", Why.UNKNOWN_KEY)
        elif kv.conflicting:
            choice = _No(
                f"conflicting content on {', '.join(sorted(kv.conflicting))}", Why.CONFLICT
            )
        elif suggestion.op is Op.REPLICATE:
            choice = decider.recipient(kv, suggestion.candidates)
            if not isinstance(choice, _No):
                found = decider.sources(kv)
                if isinstance(found, _No):
                    choice = found
                else:
                    sources = found
        else:
            picked = decider.dropper(kv, suggestion.candidates)
            choice = picked if isinstance(picked, _No) else picked[0]
            holders = () if isinstance(picked, _No) else picked[1]
        if isinstance(choice, _No) or kv is None:
            no = choice if isinstance(choice, _No) else _No("unknown key", Why.UNKNOWN_KEY)
            rejections.append(Rejection(policy, suggestion.op, suggestion.key, no.reason, no.why))
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
                reason=suggestion.reason,
            )
        )
        decider.commit(suggestion.op, kv, choice, sources)
        return choice

    for policy in sorted(policies, key=priority_of):
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
    return Plan(tuple(directives), tuple(rejections), count, tuple(errors), tuple(retirements))


# --- ReduceReplicas as of b72b282 ---


class ReferenceReduceReplicas:
    """Suggest dropping every replica beyond what readers and goals need."""

    def __init__(self, *, name: str = "ReduceReplicas") -> None:
        self.name = name

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        counter = GoalCounter(view.workers)
        leaving = frozenset(w for w, ws in view.workers.items() if ws.serves and not ws.durable)
        goals = view.goals
        for key in sorted(view.replicated):
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
            for _ in range(ndrop):
                yield drop(key, live, reason=f"{kept} live copies, {desired} needed")

    def __repr__(self) -> str:
        return f"ReduceReplicas(name={self.name!r})"

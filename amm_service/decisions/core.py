"""The one decider: turns the policies' suggestions into directives.

``plan`` runs every policy over a frozen cluster view and answers each suggestion exactly as
Dask's AMM does, with what Dask left out added:

- replicate: onto the RUNNING worker that neither holds the key nor is already receiving it, has
  room for it under its memory limit and a free incoming-transfer slot; workers in a zone with no
  durable copy (nor one on its way) yet come first, then the lowest memory;
- drop: from a holder that has not pinned the key and is not already dropping it; holders whose
  zone keeps another copy first, then retiring, then paused workers, then the highest memory;
  never the last replica, counting drops in flight from earlier cycles as well as this one, and
  not counting copies on CLOSING, RETIRING or STALE workers as replicas that survive; never the
  copy of the last running candidate when the workers that pinned the key are all paused or
  leaving (Dask's rule: the key would be left only on workers on their way out, and copied
  back by RetireWorker and dropped again by ReduceReplicas, cycle after cycle);
- policies run in ascending priority, so repairs take the throttled transfer slots first;
- a retire request is accepted unless the worker is the last one taking replicas or the others
  have no room for what only it holds;
- during the start-up grace no drop is issued at all;
- ``candidates`` restricts the choice (None: anywhere; an empty set: nowhere);
- each choice adjusts the estimated memory of the worker concerned, so later suggestions in the
  same cycle spread out instead of piling onto one worker; directives still in flight from
  earlier cycles are counted the same way; room under a memory limit is only freed by drops a
  poll has shown, never by planned ones;
- a worker that missed its last poll is neither a recipient nor a source, and its copies do not
  count as replicas that survive; a key whose holders hold different content is left alone;
- a key an operator forgot (a tombstone, until it is put again) is never copied;
- a rejected suggestion is recorded with its reason; a policy that raises is reported, not fatal.

Pure: no I/O and no clock. The caller supplies directive ids and what is in flight.
"""

from __future__ import annotations

import enum
import gc
from collections.abc import Callable, Generator, Iterable, Iterator, Set
from dataclasses import dataclass
from typing import Protocol

from amm_service.decisions.directive import Directive, Op
from amm_service.decisions.pending import InFlight, Ledger
from amm_service.decisions.view import (
    ClusterView,
    Key,
    KeyView,
    Measure,
    WorkerId,
    WorkerStatus,
    WorkerView,
)
from amm_service.policies.base import (
    PendingView,
    Policy,
    RetireRequest,
    Suggestion,
    priority_of,
)

#: The members read once: ``Op.DROP`` is a lookup through ``EnumType`` (ten times a plain
#: class attribute on Python 3.11), and the hot loops below read one per key or directive.
_DROP, _REPLICATE = Op.DROP, Op.REPLICATE
_NOBODY: frozenset[WorkerId] = frozenset()


@dataclass(frozen=True, slots=True)
class PlanConfig:
    """What a plan depends on besides the view: the memory measure, the AMM's epoch, how many
    suggestions one policy may make in a cycle before it is stopped as runaway, whether drops
    are allowed (not during the start-up grace) and the per-worker transfer limits (0: none)."""

    measure: Measure
    epoch: int
    max_suggestions: int = 1_000_000
    allow_drops: bool = True
    max_incoming: int = 0
    max_outgoing: int = 0


class Why(enum.Enum):
    """Why a suggestion was rejected, for code that reacts to it (the retirement supervisor
    abandons a retirement on NO_RECIPIENT or NO_ROOM, never on THROTTLED)."""

    UNKNOWN_KEY = "unknown-key"
    CONFLICT = "conflict"
    NO_RECIPIENT = "no-recipient"
    NO_ROOM = "no-room"
    THROTTLED = "throttled"
    NO_SOURCE = "no-source"
    LAST_REPLICA = "last-replica"
    UNREACHABLE = "unreachable"
    PINNED = "pinned"
    GRACE = "grace"
    FORGOTTEN = "forgotten"


@dataclass(frozen=True, slots=True)
class Rejection:
    """A suggestion the core turned down."""

    policy: str
    op: Op
    key: Key
    reason: str
    why: Why = Why.UNKNOWN_KEY


@dataclass(frozen=True, slots=True)
class RetireDecision:
    """A policy's request to retire a worker, and whether the core accepted it."""

    policy: str
    worker: WorkerId
    reason: str
    accepted: bool
    verdict: str
    close: bool = True


@dataclass(frozen=True, slots=True)
class Plan:
    """The outcome of planning one cycle."""

    directives: tuple[Directive, ...]
    rejections: tuple[Rejection, ...]
    suggestions: int
    policy_errors: tuple[str, ...] = ()
    retirements: tuple[RetireDecision, ...] = ()


class InFlightSource(PendingView, Protocol):
    """What is in flight from earlier cycles (the ledger)."""

    def directives(self) -> Iterator[Directive]: ...


@dataclass(frozen=True, slots=True)
class _No:
    """Why no worker fits a suggestion."""

    reason: str
    why: Why


class _CyclePending:
    """In flight from earlier cycles (the ledger) plus what this cycle has picked so far; a
    ``TrackedPending`` when the ledger journals its changes."""

    def __init__(self, earlier: PendingView) -> None:
        self._earlier = earlier
        # Tuples, not sets: a big cycle picks for 100k keys, and a set of 3 costs 216 bytes.
        self._replicating: dict[Key, tuple[WorkerId, ...]] = {}
        self._dropping: dict[Key, tuple[WorkerId, ...]] = {}
        self._tuples: dict[tuple[WorkerId, ...], tuple[WorkerId, ...]] = {}
        """One instance of each tuple of workers picked: the 100k keys of a big cycle have a
        few distinct ones between them, and a tuple of 3 costs 64 bytes (6 MiB of the AMM's
        peak while a 100k-key cycle was under way)."""
        self._ledger = earlier if isinstance(earlier, Ledger) else None
        self._seen: tuple[Key, InFlight] | None = None
        """The last ``in_flight`` answer: a policy asks for a key right before it suggests,
        and the core asks again for the same key to answer it. Forgotten at every pick and
        whenever the planning yields (what is in flight may change only then)."""

    @property
    def feed(self) -> tuple[int, int] | None:
        return self._ledger.feed if self._ledger is not None else None

    def changed_since(self, uid: int, position: int) -> set[Key] | None:
        return self._ledger.changed_since(uid, position) if self._ledger is not None else None

    def noted_since(self, uid: int, position: int) -> list[Key] | None:
        return self._ledger.noted_since(uid, position) if self._ledger is not None else None

    def count(self, key: Key) -> int:
        return self._ledger.count(key) if self._ledger is not None else 0

    def picked(self) -> Set[Key]:
        return self._replicating.keys() | self._dropping.keys()

    def in_flight(self, key: Key) -> InFlight:
        seen = self._seen
        if seen is not None and seen[0] == key:
            return seen[1]
        base = self._earlier.in_flight(key)
        repl = self._replicating.get(key)
        drop = self._dropping.get(key)
        if repl is not None or drop is not None:
            base = InFlight(base.replicating.union(repl or ()), base.dropping.union(drop or ()))
        self._seen = (key, base)
        return base

    def forget(self) -> None:
        """Forget the last ``in_flight`` answer: the ledger may change from now on."""
        self._seen = None

    def add(self, op: Op, key: Key, workers: tuple[WorkerId, ...]) -> None:
        self._seen = None
        table = self._replicating if op is _REPLICATE else self._dropping
        known = table.get(key)
        picked = workers if known is None else known + workers
        table[key] = self._tuples.setdefault(picked, picked)

    def dropped(self, key: Key) -> bool:
        """Whether this cycle picked drops of ``key`` already."""
        return key in self._dropping


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
        self.zoned = any(self.zone.values())
        self.rank = {w: 0 if ws.accepts_replicas else 1 for w, ws in workers.items()}
        self.drop_rank = {w: _drop_rank(ws) for w, ws in workers.items()}
        # Whether every worker has one rank (the usual cluster: all running): holders are then
        # ranked by memory and address alone, with no tuple made per holder (``droppers``).
        self.one_rank = len(set(self.rank.values())) < 2
        self.one_drop_rank = len(set(self.drop_rank.values())) < 2
        self.by_address: dict[frozenset[WorkerId], list[WorkerId]] = {}
        """Sets of holders to drop from, each sorted by address, highest first: most keys have
        one of a few sets (the view shares equal sets of holders between keys)."""
        self.incoming: dict[WorkerId, int] = {}
        self.outgoing: dict[WorkerId, int] = {}

    def count_in_flight(self, d: Directive) -> None:
        """Account for a directive of an earlier cycle whose effect no poll has shown yet."""
        kv = self.view.keys.get(d.key)
        if d.worker not in self.memory:
            return
        holds = kv is not None and d.worker in kv.holders
        if d.op is _REPLICATE and not holds:
            self.memory[d.worker] += d.size
            self.managed[d.worker] += d.size
            self.incoming[d.worker] = self.incoming.get(d.worker, 0) + 1
            if d.sources:
                self.outgoing[d.sources[0]] = self.outgoing.get(d.sources[0], 0) + 1
        elif d.op is _DROP and holds:
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

    def droppers(
        self, kv: KeyView, candidates: frozenset[WorkerId] | None, copies: int
    ) -> tuple[list[WorkerId], tuple[WorkerId, ...], _No | None]:
        """Up to ``copies`` holders to drop from, with the holders left after all of them (the
        keepers, most dependable first), and why no more could be chosen (None: all were).

        Picks what ``copies`` drops of one would, in one pass: between the drops of one key only
        what is left of it changes (the dropped holders' memory no longer matters), so holders
        are ranked once while the last-replica and zone rules are re-applied after each pick.
        """
        if not self.config.allow_drops:
            return (
                [],
                (),
                _No(
                    "start-up grace: not every worker known before the restart has reported yet",
                    Why.GRACE,
                ),
            )
        # Each set taken away only when it holds something (most often none does): a set
        # operation copies the set even then, and this runs for every key a cycle drops.
        dropping, fragile, unreachable = (
            self.pending.in_flight(kv.key).dropping,
            self.fragile,
            self.unreachable,
        )
        remaining = kv.holders - dropping if dropping else kv.holders
        durable = remaining - fragile if fragile else remaining
        pool = (
            remaining if candidates is None or candidates is remaining else candidates & remaining
        )
        if unreachable:
            pool = pool - unreachable  # a directive it cannot hear is no use
        reachable = len(pool)
        readers = pool & kv.pinned_on if kv.pinned_on else _NOBODY
        if readers:
            pool = pool - readers
        unpinned = len(pool)
        memory, zone, rank = self.memory, self.zone, self.drop_rank
        # Dask's rule against ping-pong: when the readers' workers are all paused or leaving,
        # the last running candidate keeps its copy (it is where new copies can be made from).
        readers_not_running = bool(readers) and all(rank[w] < RUNNING_RANK for w in readers)
        # Best first (zones aside): retiring, then paused, then the most memory.
        if self.one_drop_rank:  # the same order: stable sorts, most memory first, then address
            by_address = self.by_address.get(pool)
            if by_address is None:
                if len(self.by_address) >= MAX_SORTED_POOLS:
                    self.by_address.clear()
                by_address = self.by_address[pool] = sorted(pool, reverse=True)
            order = sorted(by_address, key=memory.__getitem__, reverse=True)
        else:
            order = [
                w for _, _, w in sorted([(-rank[w], memory[w], w) for w in pool], reverse=True)
            ]
        per_zone: dict[str, int] = {}  # durable copies per zone; empty: no zone to keep
        if self.zoned:
            for w in durable:
                if zone[w]:
                    per_zone[zone[w]] = per_zone.get(zone[w], 0) + 1
        nleft, ndurable = len(remaining), len(durable)
        picks: list[WorkerId] = []
        no: _No | None = None
        if not per_zone and not readers and (not fragile or pool <= durable):
            # The usual key: every candidate durable, none pinned, no zone to keep. Each pick
            # then lessens nleft, ndurable and reachable alike, and the loop below would take
            # the first ``n`` of ``order``: how many, and why it stops, follow from the counts.
            n = min(copies, ndurable - 1, reachable) if ndurable else 0
            picks = order[: max(0, n)]
            if n < copies:
                if not ndurable or (n == ndurable - 1 and (nleft == ndurable or n < reachable)):
                    no = _No("last replica", Why.LAST_REPLICA)
                else:
                    no = _No(
                        "no reachable candidate holds the key (or all are already dropping it)",
                        Why.UNREACHABLE,
                    )
            copies = 0  # decided: the loop below is for the other keys
        for _ in range(copies):
            if nleft < 2 or not ndurable:
                no = _No("last replica", Why.LAST_REPLICA)
                break
            if not reachable:
                no = _No(
                    "no reachable candidate holds the key (or all are already dropping it)",
                    Why.UNREACHABLE,
                )
                break
            if not unpinned:
                no = _No("pinned on every candidate", Why.PINNED)
                break
            if per_zone or ndurable == 1:
                chosen = self._spare(order, durable, per_zone, ndurable == 1)
                if chosen is None:
                    no = _No("last replica", Why.LAST_REPLICA)
                    break
            else:
                chosen = order[0]  # no zone to keep and more than one durable copy left
            if unpinned == 1 and readers_not_running and rank[chosen] == RUNNING_RANK:
                no = _No(
                    f"kept on {chosen}, the only running candidate: the workers that pinned "
                    "it are paused or leaving",
                    Why.PINNED,
                )
                break
            order.remove(chosen)
            nleft, reachable, unpinned = nleft - 1, reachable - 1, unpinned - 1
            if chosen in durable:
                ndurable -= 1
                if per_zone and zone[chosen]:
                    per_zone[zone[chosen]] -= 1
            picks.append(chosen)
        # The keepers, ranked once the picks are made (nothing they are ranked by changed).
        rest = remaining.difference(picks) if picks else remaining
        if len(rest) < 2:  # the usual key: one keeper
            return picks, tuple(rest), no
        if self.one_rank:  # the same order: stable sorts, least memory first, then address
            return picks, tuple(sorted(sorted(rest), key=memory.__getitem__)), no
        keep_rank = self.rank
        left = sorted([(keep_rank[w], memory[w], w) for w in rest])
        return picks, tuple([w for _, _, w in left]), no

    def _spare(
        self,
        order: list[WorkerId],
        durable: frozenset[WorkerId],
        per_zone: dict[str, int],
        last: bool,
    ) -> WorkerId | None:
        """The first of ``order`` whose zone keeps a durable copy without it (else the first),
        never the ``last`` durable copy. ``order`` holds no worker picked already, so membership
        in the key's original ``durable`` holders is membership in those left."""
        zone = self.zone
        fallback = None
        for w in order:
            if last and w in durable:
                continue
            if not zone[w] or w not in durable or per_zone[zone[w]] > 1:
                return w
            if fallback is None:
                fallback = w
        return fallback

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

    def commit_drops(self, kv: KeyView, workers: list[WorkerId]) -> None:
        """``commit`` of drops of ``kv`` from each of ``workers``, at once."""
        self.pending.add(_DROP, kv.key, tuple(workers))
        memory, size = self.memory, kv.size
        for worker in workers:
            memory[worker] -= size

    def commit(self, op: Op, kv: KeyView, worker: WorkerId, sources: tuple[WorkerId, ...]) -> None:
        self.pending.add(op, kv.key, (worker,))
        if op is _REPLICATE:
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


_new_directive = tuple.__new__
"""Builds a ``Directive`` from a tuple of all its fields, in order."""

#: Sets of holders ``_Decider.by_address`` keeps sorted before it forgets them all.
MAX_SORTED_POOLS = 4_096
#: ``_drop_rank`` of a running worker (the last to drop from).
RUNNING_RANK = 2


def _drop_rank(ws: WorkerView) -> int:
    """Lower goes first among drop candidates: retiring workers, then paused ones, then the rest."""
    if ws.retiring or ws.retired:
        return 0
    if ws.status is not WorkerStatus.RUNNING:
        return 1
    return RUNNING_RANK


#: Units of work (suggestions of one, directives in flight counted) between two yields of
#: ``planning``: about 1-2 ms of planning (a step of 2,048 held the AMM's loop for 30-95 ms of
#: CPU on a busy machine; the caller's ``pacing.Budget`` lets the loop in every few steps, so
#: small steps cost no more pauses).
STEP = 256
#: The work a policy's pause stands for (``SCAN_STEP`` keys looked at; see ``PolicyRun``).
PAUSE_WORK = STEP // 4


def plan(
    view: ClusterView,
    policies: Iterable[Policy],
    in_flight: InFlightSource,
    config: PlanConfig,
    new_id: Callable[[], str],
) -> Plan:
    """Run the policies over ``view`` and decide; see the module docstring for the rules."""
    steps = planning(view, policies, in_flight, config, new_id)
    while not isinstance(done := step(steps), Plan):
        pass
    return done


Steps = Generator[tuple[Directive, ...], None, Plan]
"""``planning``: it yields directives ready to send (with ``stream``), and returns the plan."""


def step(steps: Steps) -> Plan | tuple[Directive, ...]:
    """Run one step of ``planning``: the plan once it is done, else the directives the step
    released (none unless it streams).

    The cyclic garbage collector is paused meanwhile: a big cycle allocates hundreds of
    thousands of directives and tuples, none in a reference cycle, and every collection they
    trigger would walk the whole view again (a third of the time with 100k keys)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return next(steps)
    except StopIteration as done:
        result: Plan = done.value
        return result
    finally:
        if collecting:
            gc.enable()


def planning(
    view: ClusterView,
    policies: Iterable[Policy],
    in_flight: InFlightSource,
    config: PlanConfig,
    new_id: Callable[[], str],
    *,
    stream: bool = False,
    keep_streamed: bool = True,
) -> Steps:
    """``plan`` in steps: it yields every ``STEP`` units of work, so that a caller on an event
    loop can let other work run in between (``step`` drives it); the plan is its return value.

    With ``stream``, each step yields the directives decided since the last one, so that the
    caller sends them while the rest is planned: agents start on a big cycle's work before its
    plan is done. A directive once yielded is final; only those not yet yielded have their
    keepers narrowed when a later suggestion drops another copy of their key (see below).

    The view is frozen; what is in flight may change between steps (an outcome settles a
    directive, or one this cycle streamed enters the ledger): later suggestions see the ledger
    as it is then, as the next cycle would; this cycle's own picks are counted once.

    Without ``keep_streamed``, the plan's ``directives`` are only those not yielded already:
    the caller has sent the others, and the ledger holds them while they are in flight; the plan
    keeps no second list and tuple of a big cycle's 300,000 (5 MB of slots).
    """
    decider = _Decider(view, in_flight, config)

    def count_in_flight() -> Generator[tuple[Directive, ...], None, None]:
        """Count what is in flight in the decider's estimates, in steps: only before the first
        suggestion is answered (nothing of this cycle is in flight yet), and only if one is (a
        cycle with nothing to decide does not walk the ledger)."""
        flying = list(in_flight.directives())  # the ledger may change while we yield
        for start in range(0, len(flying), STEP):
            for directive in flying[start : start + STEP]:
                decider.count_in_flight(directive)
            yield ()
            decider.pending.forget()

    counted = False
    directives: list[Directive] = []
    rejections: list[Rejection] = []
    retirements: list[RetireDecision] = []
    accepted: set[WorkerId] = set()
    errors: list[str] = []
    count = 0
    # The holders kept once this cycle's drops of a key are done: every drop of the key names
    # them (and only them), so siblings dropping it in the same cycle never ask each other.
    # Kept only for the keys dropped by several suggestions (earlier drops named more).
    keepers_of: dict[Key, tuple[WorkerId, ...]] = {}
    shared: dict[tuple[WorkerId, ...], tuple[WorkerId, ...]] = {}

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

    def reject(policy: str, suggestion: Suggestion, no: _No, times: int) -> None:
        rejection = Rejection(policy, suggestion.op, suggestion.key, no.reason, no.why)
        rejections.extend([rejection] * times)

    def emit(
        policy: str,
        suggestion: Suggestion,
        kv: KeyView,
        choice: WorkerId,
        sources: tuple[WorkerId, ...] = (),
        holders: tuple[WorkerId, ...] = (),
    ) -> None:
        directives.append(
            Directive(
                new_id(),
                config.epoch,
                suggestion.op,
                kv.key,
                choice,
                kv.size,
                kv.checksum,
                sources,
                holders,
                policy,
                suggestion.reason,
            )
        )
        decider.commit(suggestion.op, kv, choice, sources)

    def decide(policy: str, suggestion: Suggestion) -> WorkerId | None:
        copies = suggestion.copies
        kv = view.keys.get(suggestion.key)
        if kv is None:
            reject(policy, suggestion, _No("unknown key", Why.UNKNOWN_KEY), copies)
            return None
        if kv.conflicting:
            conflict = f"conflicting content on {', '.join(sorted(kv.conflicting))}"
            reject(policy, suggestion, _No(conflict, Why.CONFLICT), copies)
            return None
        if suggestion.op is _DROP:
            picks, keepers, no = decider.droppers(kv, suggestion.candidates, copies)
            keepers = shared.setdefault(keepers, keepers)  # a few distinct tuples for all keys
            if picks:
                if decider.pending.dropped(kv.key):
                    keepers_of[kv.key] = keepers
                key, size, checksum, reason = kv.key, kv.size, kv.checksum, suggestion.reason
                epoch = config.epoch
                directives.extend(
                    [  # every field, as a plain tuple: skips the NamedTuple's Python __new__
                        _new_directive(
                            Directive,
                            (
                                new_id(),
                                epoch,
                                _DROP,
                                key,
                                chosen,
                                size,
                                checksum,
                                (),
                                keepers,
                                policy,
                                reason,
                            ),
                        )
                        for chosen in picks
                    ]
                )
                decider.commit_drops(kv, picks)
            if no is not None:
                reject(policy, suggestion, no, copies - len(picks))
                return None
            return picks[-1]
        if kv.key in view.forgotten:
            forgotten = _No("forgotten: copied again only once it is put again", Why.FORGOTTEN)
            reject(policy, suggestion, forgotten, copies)
            return None
        last: WorkerId | None = None
        for made in range(copies):
            choice = decider.recipient(kv, suggestion.candidates)
            found = choice if isinstance(choice, _No) else decider.sources(kv)
            if isinstance(found, _No):
                reject(policy, suggestion, found, copies - made)
                return None
            assert not isinstance(choice, _No)
            emit(policy, suggestion, kv, choice, sources=found)
            last = choice
        return last

    def answer(policy: str, suggestion: Suggestion | RetireRequest) -> WorkerId | None:
        if isinstance(suggestion, RetireRequest):
            return retire(policy, suggestion)
        return decide(policy, suggestion)

    def units(suggestion: Suggestion | RetireRequest | None) -> int:
        """How many suggestions of one this stands for (a pause: none)."""
        if suggestion is None:
            return 0
        if isinstance(suggestion, RetireRequest):
            return 1
        if not isinstance(suggestion.copies, int) or suggestion.copies < 1:
            raise ValueError(f"a suggestion's copies must be 1 or more, not {suggestion.copies!r}")
        return suggestion.copies

    work = released = 0
    for policy in sorted(policies, key=priority_of):
        run = policy.run(view, decider.pending, config.measure)
        made = 0
        try:
            suggestion = next(run)
            while made + (n := units(suggestion)) <= config.max_suggestions:
                made += n
                work += n if suggestion is not None else PAUSE_WORK
                if work >= STEP:
                    work = 0
                    if stream:
                        yield tuple(directives[released:])
                        if keep_streamed:
                            released = len(directives)
                        else:
                            directives.clear()
                    else:
                        yield ()
                    decider.pending.forget()
                if suggestion is not None and not counted:
                    counted = True
                    yield from count_in_flight()
                suggestion = run.send(
                    None if suggestion is None else answer(policy.name, suggestion)
                )
            if made < config.max_suggestions:  # decide the copies that fit, as one at a time would
                assert isinstance(suggestion, Suggestion)
                if not counted:
                    counted = True
                    yield from count_in_flight()
                answer(policy.name, suggestion._replace(copies=config.max_suggestions - made))
                made = config.max_suggestions
            run.close()
            errors.append(
                f"policy {policy.name} stopped after {made} suggestions in one cycle (runaway?)"
            )
        except StopIteration:
            pass
        except Exception as err:  # a third-party policy's bug must not stop the others
            errors.append(f"policy {policy.name} failed: {type(err).__name__}: {err}")
        count += made
    if keepers_of:
        directives[released:] = [
            d._replace(holders=keepers_of[d.key]) if d.op is _DROP and d.key in keepers_of else d
            for d in directives[released:]
        ]
    return Plan(tuple(directives), tuple(rejections), count, tuple(errors), tuple(retirements))

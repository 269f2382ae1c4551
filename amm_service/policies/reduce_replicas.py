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

import itertools
from collections.abc import Generator, Mapping, Set
from dataclasses import dataclass

from amm_service.decisions.directive import Op
from amm_service.decisions.view import (
    ClusterView,
    Goal,
    Key,
    KeyView,
    Measure,
    WorkerId,
    WorkerView,
    replicated,
)
from amm_service.policies.base import (
    SCAN_STEP,
    SORT_STEP,
    PendingView,
    PolicyRun,
    Suggestion,
    TrackedPending,
    drop,
    sorted_in_steps,
)
from amm_service.policies.goals import GoalCounter

_DROP = Op.DROP
"""Read once (a lookup through ``EnumType`` costs ten times a plain class attribute on 3.11)."""
_NONE: frozenset[WorkerId] = frozenset()
_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class _Looked:
    """What the last complete run looked at, to tell next time which keys may have changed."""

    view_feed: tuple[int, int]
    ledger_feed: tuple[int, int]
    workers: frozenset[tuple[WorkerId, bool, bool, bool]]
    goals: dict[Key, Goal]
    again: frozenset[Key]
    """Keys with a suggestion the core turned down: looked at again every run."""
    asked: dict[int, list[Key]]
    """Keys whose suggestions were all taken, by the directives of each the ledger holds once
    their drops are sent: looked at again if it holds fewer (some never reached it, as when the
    cycle failed part way through sending). Lists by count, not a dict by key: a few distinct
    counts between 100k keys, and 8 bytes a key instead of the dict's 37."""


class _Replicated:
    """``view.replicated`` as a container, each key looked up in its record: the view keeps no
    set of them, and making one whole would hold the AMM's loop (``sorted_in_steps`` reads what
    it filters in slices)."""

    __slots__ = ("_records",)

    def __init__(self, records: Mapping[Key, KeyView]) -> None:
        self._records = records

    def __contains__(self, key: object) -> bool:
        kv = self._records.get(Key(key)) if isinstance(key, str) else None
        return kv is not None and replicated(kv)


def _workers(
    workers: Mapping[WorkerId, WorkerView],
) -> frozenset[tuple[WorkerId, bool, bool, bool]]:
    """What this policy reads of the workers: a key's verdict depends on nothing else of them."""
    return frozenset((w, ws.durable, ws.serves, ws.accepts_replicas) for w, ws in workers.items())


class ReduceReplicas:
    """Suggest dropping every replica beyond what readers and goals need.

    Incremental: a key's verdict depends only on its record, its work in flight, its goal and
    the workers' statuses, so after a complete run the next one looks only at the keys whose
    record changed (``ClusterView.changed_since``), whose work in flight may ask more
    (``TrackedPending.changed_since``), that earlier policies of the cycle picked, or whose
    suggestion was turned down; any change of the workers' statuses or the goals, or a journal
    that forgot, means every key again. A cycle with no change looks at no key.
    """

    def __init__(self, *, name: str = "ReduceReplicas") -> None:
        self.name = name
        self._looked: _Looked | None = None

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        looked, self._looked = self._looked, None  # a run cut short leaves none: look at all
        tracked = pending if isinstance(pending, TrackedPending) else None
        ledger_feed = tracked.feed if tracked is not None else None
        workers = _workers(view.workers)
        goals = view.goals
        keys: list[Key] | None = None
        records = view.keys
        others: Set[Key] = frozenset()
        if tracked is not None and ledger_feed is not None:
            others = tracked.picked()  # by earlier policies of this cycle
            todo = (
                None if looked is None else (yield from self._todo(looked, view, tracked, workers))
            )
            if todo is not None:
                # ``(todo | others) & view.replicated``, read in slices (made whole, 20 ms).
                either = itertools.chain(todo, (k for k in others if k not in todo))
                keys = yield from sorted_in_steps(either, within=_Replicated(records))
            # Not held while the keys are looked at: the last run's ``asked`` (100k keys after a
            # big cycle) alongside this run's doubled the policy's share of the AMM's peak.
            looked = todo = None
        if keys is None:  # ``view.replicated``, read in slices
            keys = yield from sorted_in_steps(records, within=_Replicated(records))
        counter = GoalCounter(view.workers)
        durable = counter.durable  # ``counter.live``, inlined: it runs for every key
        leaving = frozenset(w for w, ws in view.workers.items() if ws.serves and not ws.durable)
        reasons: dict[tuple[int, int], str] = {}
        again: set[Key] = set(others)  # what lands in the ledger for them is not all ours
        asked: dict[int, list[Key]] = {}
        in_flight_of = pending.in_flight
        for n, key in enumerate(keys, 1):
            if not n % SCAN_STEP:
                yield None  # a pause (see ``PolicyRun``): most keys may have nothing to drop
            kv = records[key]
            holders = kv.holders
            # The holders' own set when all are durable (the usual key): no set made, and the
            # core's pick of the holders to drop finds it known (``droppers``).
            live = holders if holders <= durable else holders & durable
            in_flight = in_flight_of(key)
            desired = (len(kv.pinned_on & live) or 1) if kv.pinned_on else 1
            if key in goals:
                desired = max(desired, counter.target(goals[key], kv))
            kept = len(live - in_flight.dropping) if in_flight.dropping else len(live)
            extra = (
                (kv.holders & leaving) - kv.pinned_on - in_flight.dropping
                if leaving and kept >= desired
                else _NONE
            )
            ndrop = kept + len(in_flight.replicating) - desired
            if not extra and ndrop <= 0:
                continue
            # In flight once this key's drops are sent: fewer next cycle means some never were.
            expected = tracked.count(key) if tracked is not None else 0
            for worker in sorted(extra):
                taken = yield drop(key, frozenset((worker,)), reason="copy on a retiring worker")
                if taken is None:
                    again.add(key)
                expected += 1
            if ndrop > 0:  # one suggestion for all of them: the core picks them in one pass
                reason = reasons.get((kept, desired))
                if reason is None:  # one string per distinct reason, not one per key
                    reason = reasons[kept, desired] = f"{kept} live copies, {desired} needed"
                # Every field, as a plain tuple: skips the NamedTuple's Python ``__new__``.
                suggestion = _new(Suggestion, (_DROP, key, live, reason, ndrop))
                if (yield suggestion) is None:
                    again.add(key)
                expected += ndrop
            if key not in again:
                of_count = asked.get(expected)
                if of_count is None:
                    asked[expected] = [key]
                else:
                    of_count.append(key)
        if ledger_feed is not None:
            self._looked = _Looked(
                view.feed, ledger_feed, workers, dict(goals), frozenset(again), asked
            )

    @staticmethod
    def _todo(
        looked: _Looked,
        view: ClusterView,
        pending: TrackedPending,
        workers: frozenset[tuple[WorkerId, bool, bool, bool]],
    ) -> Generator[None, None, set[Key] | None]:
        """The keys that may have changed since ``looked``; None: any may have. With pauses
        (``None``, see ``PolicyRun``): checking the 100k keys asked last time in one go held the
        AMM's loop for 50 ms."""
        if workers != looked.workers or view.goals != looked.goals:
            return None
        changed = view.noted_since(*looked.view_feed)
        flown = pending.noted_since(*looked.ledger_feed)
        if changed is None or flown is None:
            return None
        todo = set(looked.again)
        for keys in (changed, flown):  # hundreds of thousands noted in a big cycle
            for start in range(0, len(keys), SORT_STEP):
                yield None
                todo.update(keys[start : start + SORT_STEP])
        count = pending.count
        for n, asked in looked.asked.items():
            for start in range(0, len(asked), SCAN_STEP):
                yield None
                todo.update(key for key in asked[start : start + SCAN_STEP] if count(key) < n)
        return todo

    def __repr__(self) -> str:
        return f"ReduceReplicas(name={self.name!r})"

"""Tombstones: a forgotten key stays forgotten, whatever copies of it were under way.

``Forget`` deletes every copy the AMM knows of, but a copy can be under way at that moment: a
REPLICATE an agent is carrying out, a read through a worker that lacks the key (it fetches it and
keeps a replica). Landing after the deletes, such copies brought forgotten keys back. So a Forget
leaves a tombstone per key, with an id no other Forget has (persisted in the state file):

1. the AMM plans no copy of a key with a live tombstone (the core rejects it);
2. every poll carries the tombstones the agent has not acknowledged yet (``PollRequest.forgotten``)
   and the Forget itself polls every agent before it answers. An agent takes each tombstone once:
   it deletes its copy unless a reader pinned it, discards copies whose transfer was under way,
   and refuses REPLICATEs of the key, until the key is put again;
3. a later explicit Put of the key undoes the Forget. The AMM learns of it when a worker that took
   the tombstone (and then held no copy) reports the key again: the tombstone is marked put again
   and that mark travels to every agent in turn, so copies of the key are taken again. A worker
   that has not taken the tombstone yet and holds the key (it was unreachable during the Forget,
   or restarted) has a leftover, which the tombstone deletes at its next poll.

Bounded: a tombstone lives ``ttl`` (2 minutes by default: four times the 30 s an agent's fetch
or a directive may take, and any worker silent that long is dead and gone), at most
``MAX_TOMBSTONES`` are kept, the oldest going first. What an agent acknowledged is kept in
memory only: an AMM that restarts sends every tombstone again, and agents, which keep them
longer (3 minutes by default), recognise them by id.

Not covered: which workers to delete on and how the Forget answers (``queries``), what the agents
do (``worker_agent.store``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.runtime.records.state import StateStore

log = logging.getLogger(__name__)

#: Tombstones kept at most; the oldest go first.
MAX_TOMBSTONES = 100_000
#: Tombstones sent with one poll call at most, and about as many bytes of keys.
PUSH_KEYS = 10_000
PUSH_BYTES = 4 * 1024 * 1024
#: What an agent that takes tombstones reports in ``PollResponse.features``.
FEATURE = "tombstones"


@dataclass(slots=True)
class Tombstone:
    """One forgotten key: ``seq`` orders the changes agents are told about; ``lingering`` are
    the workers (with their incarnation) that kept a pinned copy when they took it."""

    key: Key
    id: int
    at: float
    put_again: bool
    seq: int
    lingering: dict[WorkerId, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Push:
    """The tombstones sent to one worker with a poll: ``(key, id, put_again)`` each, all of
    those changed after ``since`` up to ``upto``, computed for the worker's ``incarnation``."""

    incarnation: str
    since: int
    upto: int
    items: tuple[tuple[Key, int, bool], ...]


NOTHING = Push("", 0, 0, ())


class TombstoneBook:
    """The AMM's tombstones and what each worker has taken of them."""

    def __init__(
        self,
        store: StateStore,
        *,
        ttl: float,
        clock: Callable[[], float],
        limit: int = MAX_TOMBSTONES,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._limit = limit
        # In ``seq`` order (a changed tombstone moves to the end); ``at`` follows the same order.
        self._stones: OrderedDict[Key, Tombstone] = OrderedDict()
        self._seq = 0
        self._taken: dict[WorkerId, tuple[str, int]] = {}
        self._live: frozenset[Key] | None = frozenset()

    def load(self) -> None:
        """Take back the tombstones of earlier runs; every agent is sent them again."""
        self._stones.clear()
        self._taken.clear()
        for record in self._store.tombstones():
            self._seq += 1
            key = Key(record.key)
            self._stones[key] = Tombstone(key, record.id, record.at, record.put_again, self._seq)
        self._live = None
        self.expire()

    def __len__(self) -> int:
        return len(self._stones)

    def __bool__(self) -> bool:
        return bool(self._stones)

    def __contains__(self, key: object) -> bool:
        return key in self._stones

    @property
    def live(self) -> frozenset[Key]:
        """The keys forgotten and not put again since: no copy of them is planned."""
        if self._live is None:
            self._live = frozenset(k for k, t in self._stones.items() if not t.put_again)
        return self._live

    def bury(self, keys: Sequence[str]) -> None:
        """A tombstone for each of ``keys`` (a new one for a key forgotten again), persisted."""
        wanted = list(dict.fromkeys(Key(k) for k in keys))
        for record in self._store.bury(wanted, self._clock()):
            key = Key(record.key)
            self._seq += 1
            self._stones.pop(key, None)
            self._stones[key] = Tombstone(key, record.id, record.at, False, self._seq)
        self._live = None
        self._trim()

    def expire(self) -> None:
        """Drop the tombstones older than ``ttl``."""
        cutoff = self._clock() - self._ttl
        old = []
        for key, stone in self._stones.items():
            if stone.at > cutoff:
                break
            old.append(key)
        self._drop(old)

    def _trim(self) -> None:
        excess = len(self._stones) - self._limit
        if excess > 0:
            oldest = list(self._stones)[:excess]
            log.warning("over %d tombstones: forgetting the %d oldest", self._limit, excess)
            self._drop(oldest)

    def _drop(self, keys: list[Key]) -> None:
        if not keys:
            return
        self._store.unbury(keys)
        for key in keys:
            del self._stones[key]
        if not self._stones:  # a dict keeps its table after deletions: hundreds of KiB
            self._stones = OrderedDict()
        self._live = None

    # -- telling the agents ----------------------------------------------------------------

    def pending(
        self, worker: WorkerId, incarnation: str, features: frozenset[str] | None = None
    ) -> Push:
        """The tombstones to send with the next poll of ``worker``, oldest change first; none
        to an agent whose ``features`` (once known) show that it ignores them."""
        if not self._stones or (features and FEATURE not in features):
            return NOTHING
        taken_by, taken = self._taken.get(worker, ("", 0))
        since = taken if incarnation and taken_by == incarnation else 0
        if since >= self._seq:
            return NOTHING
        newer: list[Tombstone] = []
        for stone in reversed(self._stones.values()):
            if stone.seq <= since:
                break
            newer.append(stone)
        if not newer:
            return NOTHING
        newer.reverse()
        items: list[tuple[Key, int, bool]] = []
        size = 0
        for stone in newer:
            size += len(stone.key.encode()) + 16
            if items and (len(items) >= PUSH_KEYS or size > PUSH_BYTES):
                break
            items.append((stone.key, stone.id, stone.put_again))
        return Push(incarnation, since, newer[len(items) - 1].seq, tuple(items))

    def polled(
        self,
        worker: WorkerId,
        push: Push,
        state: ClusterState,
        seen: Iterable[Key],
        gone: Iterable[Key],
    ) -> None:
        """After a poll of ``worker`` that carried ``push``: note what it took, which copies it
        kept (pinned), and which tombstoned keys it reports anew (``seen``; ``gone``: removed).

        The push counts as taken when the agent takes tombstones and it holds every tombstone
        changed up to ``push.upto``: the push started from nothing, or from what this very
        incarnation had taken. A tombstoned key it reports anew, once it had taken that
        tombstone and without a pinned copy kept, was put again there: the Forget is undone.
        So is one it keeps unpinned as it takes a tombstone: it had taken that tombstone before.
        """
        known = state.worker(worker)
        if known is None:
            return
        incarnation = known.incarnation
        for key in gone:
            stone = self._stones.get(key)
            if stone is not None:
                stone.lingering.pop(worker, None)
        taken_now = (
            bool(push.items)
            and FEATURE in known.features
            and (push.since == 0 or push.incarnation == incarnation)
        )
        if taken_now:
            self._taken[worker] = (incarnation, push.upto)
            holding = state.keys
            for key, _, put_again in push.items:
                kv = holding.get(key)
                stone = self._stones.get(key)
                if put_again or stone is None or stone.put_again or kv is None:
                    continue
                if worker in kv.pinned_on:
                    stone.lingering[worker] = incarnation  # the Forget reported it
                elif worker in kv.holders:
                    # Kept unpinned: the agent had taken this very tombstone before (an AMM
                    # that restarted sends them all again) and the key was put there since.
                    self._put_again(stone, worker)
        pushed = {key for key, _, _ in push.items}
        taken_by, taken = self._taken.get(worker, ("", 0))
        for key in seen:
            stone = self._stones.get(key)
            if stone is None or stone.put_again or key in pushed:
                continue
            if stone.lingering.get(worker) == incarnation:
                continue
            if taken_by == incarnation and taken >= stone.seq:
                self._put_again(stone, worker)

    def forget_worker(self, worker: WorkerId) -> None:
        self._taken.pop(worker, None)

    def _put_again(self, stone: Tombstone, worker: WorkerId) -> None:
        log.info(
            "%r was put again on %s after it was forgotten: copies of it are taken again",
            stone.key,
            worker,
        )
        stone.put_again = True
        stone.at = self._clock()
        stone.lingering.clear()
        self._seq += 1
        stone.seq = self._seq
        self._stones.move_to_end(stone.key)
        self._store.mark_put_again(stone.key, stone.at)
        self._live = None

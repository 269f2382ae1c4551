"""The lost keys: every key whose last copy went away, reported and kept until it is back.

A key is lost when the last worker holding it goes away before a copy was made elsewhere, however
it went: declared dead, unregistered (an agent shut down, drained or not, or closed by force),
restarted as a new process (a new incarnation, whether it registered again or a poll found it),
or while the AMM itself was down. ``Losses`` calls ``add`` for the first four (and reports them);
this book finds the last one itself:

1. The names of the keys the cluster holds are kept in the state file, brought up to date after
   every round of polls (``save_held``, with ``ClusterState.take_changes``): a key that appears
   is added, one that no worker holds any more is removed.
2. A restarted AMM loads those names as *unseen* and crosses off every key a poll shows. Once
   every worker it knew from its state file has reported (or left: declared dead, unregistered),
   the keys still unseen are held by nobody: the workers that held them came back without them
   or never came back. They are lost (``settle``).

A lost key is reported (``GetStatus`` totals, ``ListLost``, events) until a worker holds it again
(``recovered``: a lost key held again is among the keys that appeared since the last round) or
an operator forgets it (``discard``). The lost keys are kept in the state file
too, so an AMM restart does not forget them. A key deleted on purpose straight on the agents
(not through the AMM's ``Forget``) while the AMM was down cannot be told from a lost one: it is
reported lost, and ``Forget`` clears it.

Not covered: deciding when a worker is gone (``decisions.liveness`` and
``runtime.workers.liveness``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from amm_service.decisions.events import EventLog
from amm_service.decisions.liveness import lost_after_removal
from amm_service.decisions.view import ClusterState, Key, WorkerId
from amm_service.runtime.loop.pacing import Budget
from amm_service.runtime.records.goals import GoalBook
from amm_service.runtime.records.state import LostRecord, StateError, StateStore
from amm_service.runtime.records.storing import Storing

log = logging.getLogger(__name__)

#: Keys written to the state file in one transaction, the loop let in between (5,000 held the
#: AMM's loop for 25 ms of CPU at the first poll round after a 100k-key Put).
SAVE_STEP = 1_000
#: Keys sorted at once before a save (``_chunks``): about 1.5 ms of CPU.
SORT_RUN = 5_000
#: The reason recorded for keys missing after a restart.
MISSING = (
    "no worker held it after the AMM restarted: the workers that held it came back without it "
    "or never came back"
)


@dataclass(frozen=True, slots=True)
class LostKey:
    """A key lost: the worker that held its last copy ("" when not known), when it was found lost
    (Unix seconds) and how, for people."""

    key: Key
    worker: str
    at: float
    reason: str


class LostBook:
    """The lost keys of one AMM and the persisted names of the keys its cluster holds; used from
    the event loop only. ``clock`` is the wall clock stamped on lost keys."""

    def __init__(self, store: StateStore, *, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._lost: dict[Key, LostKey] = {}
        self._unseen: set[Key] = set()
        self._saving = asyncio.Lock()
        self._unsaved: tuple[set[Key], set[Key]] = (set(), set())
        """What a failed save left to write: (keys held, keys gone)."""
        self._unsaved_logged = False

    def load(self) -> None:
        """Take back the lost keys and, as unseen, the keys held before the restart."""
        self._lost = {
            Key(r.key): LostKey(Key(r.key), r.worker, r.at, r.reason) for r in self._store.lost()
        }
        self._unseen = {Key(k) for k in self._store.held_keys()} - self._lost.keys()

    # -- what is lost ----------------------------------------------------------------------

    def add(self, keys: Iterable[Key], *, worker: str, reason: str) -> list[Key]:
        """Record ``keys`` as lost with ``worker``; returns those not lost already, sorted."""
        now = self._clock()
        new = sorted(k for k in set(keys) if k not in self._lost)
        if not new:
            return []
        records = [LostKey(k, worker, now, reason) for k in new]
        self._store.save_lost(LostRecord(r.key, r.worker, r.at, r.reason) for r in records)
        self._store.remove_keys(new)
        self._unseen.difference_update(new)
        self._lost.update((r.key, r) for r in records)
        return new

    def recovered(self, appeared: Iterable[Key]) -> list[Key]:
        """Forget and return (sorted) the lost keys among ``appeared``, the keys that are held
        again (a lost key is held by nobody: it can only come back by appearing)."""
        if not self._lost:  # as usual: no need to look through the keys a big poll brought
            return []
        back = sorted(k for k in appeared if k in self._lost)
        if back:
            self._store.forget_lost(back)
            for key in back:
                del self._lost[key]
        return back

    def discard(self, keys: Iterable[Key]) -> list[Key]:
        """An operator forgot ``keys``: they are neither lost nor awaited any more; returns
        those that were lost."""
        wanted = set(keys)
        self._unseen.difference_update(wanted)
        gone = sorted(k for k in wanted if k in self._lost)
        if gone:
            self._store.forget_lost(gone)
            for key in gone:
                del self._lost[key]
        return gone

    def count(self) -> int:
        """How many are lost (a return counts once the round of polls that saw it is over)."""
        return len(self._lost)

    def __contains__(self, key: object) -> bool:
        return key in self._lost

    def knows(self, key: Key) -> bool:
        """Whether ``key`` is lost, or held before a restart and not seen since."""
        return key in self._lost or key in self._unseen

    def __len__(self) -> int:
        return len(self._lost)

    def listed(
        self,
        keys: Collection[Key] = (),
        *,
        present: Mapping[Key, object],
        after: str = "",
        limit: int,
    ) -> tuple[list[LostKey], int]:
        """(up to ``limit`` lost keys ordered by key, after ``after``, and how many are lost in
        all) among ``keys`` (every lost key when empty); a key held again is not lost."""
        wanted = {k for k in (keys or self._lost) if k in self._lost and k not in present}
        total = len(wanted)
        chosen = sorted(k for k in wanted if k > after)[:limit]
        return [self._lost[k] for k in chosen], total

    # -- what the cluster holds, across restarts -------------------------------------------

    @property
    def unseen(self) -> int:
        """Keys held before the restart that no poll has shown yet."""
        return len(self._unseen)

    def settle(self, present: Mapping[Key, object], *, all_reported: bool) -> list[Key]:
        """Cross off the unseen keys held again; once ``all_reported`` (every worker known before
        the restart has reported or left), record those still unseen as lost and return them."""
        if not self._unseen:
            return []
        self._unseen = {k for k in self._unseen if k not in present}
        if not all_reported or not self._unseen:
            return []
        missing, self._unseen = self._unseen, set()
        return self.add(missing, worker="", reason=MISSING)

    async def save_held(self, born: set[Key], gone: set[Key]) -> None:
        """Record in the state file that the keys ``born`` are held and the keys ``gone`` are
        not (``ClusterState.take_changes``).

        In steps of ``SAVE_STEP`` keys with the loop let in between; one save at a time, so the
        file ends as the state did. A failure to write is logged once (until a save works
        again), not raised: a poll's answer must not be lost for it; only the accounting of
        keys lost while the AMM is down falls behind.
        """
        async with self._saving:
            new_born, new_gone = born, gone
            old_born, old_gone = self._unsaved
            if old_born or old_gone:
                # What changed since wins over what a failed save left to do (writes are
                # idempotent). Only then: 200k keys copied so held the loop for 10 ms.
                born = (old_born - new_gone) | new_born
                gone = (old_gone - new_born) | new_gone
            pace = Budget()
            try:
                async for chunk in _chunks(gone, pace):
                    self._store.remove_keys(chunk)
                    await pace()
                async for chunk in _chunks(born, pace):
                    self._store.add_keys(chunk)
                    await pace()
            except StateError as err:
                if not self._unsaved_logged:
                    log.warning("cannot record the keys held (%s); will try again", err)
                self._unsaved, self._unsaved_logged = (born, gone), True
                return
            self._unsaved, self._unsaved_logged = (set(), set()), False


async def _chunks(keys: set[Key], pace: Budget) -> AsyncIterator[list[Key]]:
    """``keys`` in order, a ``SAVE_STEP`` a transaction: in the order of a set, each of the
    100 transactions of a 100k-key save touched nearly every page of the table (and wrote it
    to the WAL again); sorted, each touches its own few (half the CPU, a third of the time).

    Sorted in runs of ``SORT_RUN`` with the loop let in between (``pace``), merged as the
    chunks are taken: one sort of 100k keys held the AMM's loop for 55 ms of CPU (the first
    poll round of a 100k-key cycle, ``loop_probe``)."""
    items = list(keys)
    runs: list[list[Key]] = []
    for start in range(0, len(items), SORT_RUN):
        runs.append(sorted(items[start : start + SORT_RUN]))
        await pace()
    merged = heapq.merge(*runs)
    while chunk := list(itertools.islice(merged, SAVE_STEP)):
        yield chunk


class Losses:
    """Finds and reports the keys lost as workers go away or after a restart, into ``book``:
    the ``key-lost``, ``goal-lost`` and ``key-recovered`` events go with every record."""

    def __init__(
        self,
        book: LostBook,
        state: ClusterState,
        events: EventLog,
        goals: GoalBook,
        storing: Storing,
    ) -> None:
        self.book = book
        self._state = state
        self._events = events
        self._goals = goals
        self._storing = storing
        self._restored: set[WorkerId] = set()
        """Workers known from the state file that have neither reported nor left yet."""

    def awaiting(self, workers: Iterable[WorkerId]) -> None:
        """The workers known from the state file, taken back: none has reported yet."""
        self._restored = set(workers)

    def losing(self, worker: WorkerId, held: frozenset[Key], cause: str) -> list[Key]:
        """``worker`` went away (``cause``) holding ``held``: record and report the keys no
        other worker holds as lost; returns them."""
        lost = lost_after_removal(held, self._state.keys)
        if lost:
            new = self.book.add(
                lost, worker=worker, reason=f"{worker} {cause} before a copy was made elsewhere"
            )
            self.report(new, f"had no copy left when {worker} {cause}", worker)
        return lost

    def report(self, keys: list[Key], how: str, worker: str = "") -> None:
        """The events of newly lost ``keys``: ``key-lost``, and ``goal-lost`` for those with a
        replication goal (recorded once, when they are lost)."""
        if not keys:
            return
        self._events.record("key-lost", f"{len(keys)} key(s) {how}", worker=worker, keys=keys)
        with_goal = [k for k in keys if k in self._goals]
        if with_goal:
            self._events.record(
                "goal-lost",
                f"{len(with_goal)} key(s) with a replication goal are lost: no copy is left to "
                "make copies from; the goals stay until the keys are put again or forgotten",
                keys=with_goal,
            )

    def replaced(self, worker: WorkerId, held: frozenset[Key]) -> None:
        """A poll found ``worker`` restarted as a new process, which reported ``held`` no more."""
        ws = self._state.worker(worker)
        current = ws.incarnation if ws is not None else None
        storing = self._storing.take(worker, other_than=current)
        self.losing(worker, held | storing, "restarted (a poll found a new process)")

    def recovered(self, born: set[Key]) -> None:
        """Lost keys among ``born`` (held again) are lost no more."""
        back = self.book.recovered(born)
        if back:
            self._events.record(
                "key-recovered", f"{len(back)} lost key(s) are held again", keys=back
            )

    def settle(self) -> None:
        """After a restart: once every worker known from the state file has reported or left,
        the keys held before the restart that no worker holds now are lost."""
        if not self.book.unseen:
            self._restored.clear()
            return
        self._restored = {
            w
            for w in self._restored
            if (ws := self._state.worker(w)) is not None and ws.last_poll is None
        }
        missing = self.book.settle(self._state.keys, all_reported=not self._restored)
        self.report(
            missing,
            "were held before the AMM restarted and no worker holds them now: the workers that "
            "held them came back without them or never came back",
        )

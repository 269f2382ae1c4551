"""Keys that agents are storing for a Put and that no poll has listed yet.

An agent asks the AMM about a Put's keys (``LookupKeys`` with ``storing``) before it stores
them, and acknowledges the Put once they are stored; the AMM learns they are there only at that
agent's next poll. An agent killed in between took acknowledged keys with it that the AMM never
knew of, so nothing reported them lost. The AMM notes them here, and the removal of a worker
counts its notes as held (``Losses.losing``): a key no other worker holds is then reported
lost. A note ends when a poll lists the key, or when a poll answered after the longest a Put
may take shows the key did not arrive (the Put failed): that key was never acknowledged.
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Callable, Iterable

from amm_service.decisions.view import ClusterState, Key, KeyView, WorkerId
from amm_service.runtime.loop.pacing import Budget

log = logging.getLogger(__name__)

#: How long after its question an agent may still store a Put's keys, in seconds: a note is
#: kept at least this long (plus a poll) before a poll without the key ends it.
PUT_WINDOW = 60.0
#: Most keys noted per worker; beyond it, further keys are not noted (and it is logged): a
#: bound on what one agent's questions can make the AMM keep.
MAX_NOTED = 200_000
#: Notes judged in one slice of ``Storing.polled``.
POLLED_STEP = 2_000

#: A key the state does not list; whether a worker is among its holders; the holders of one.
_NOTHING = itertools.repeat(KeyView(Key(""), 0, "", frozenset()))
_HOLDERS = operator.itemgetter(3)


class Storing:
    """Per worker and incarnation, the keys it is storing and when it said so."""

    def __init__(self, clock: Callable[[], float], *, window: float = PUT_WINDOW) -> None:
        self._clock = clock
        self._window = window
        self._notes: dict[WorkerId, tuple[str, dict[Key, float]]] = {}
        #: Per worker, how many times notes were made: whether any was while a round judged.
        self._made: dict[WorkerId, int] = {}
        self._judging = False

    def note(self, state: ClusterState, worker: str, incarnation: str, keys: Iterable[str]) -> int:
        """``worker`` (as ``incarnation``) is about to store ``keys``; how many were noted. A
        worker or incarnation the AMM does not know is ignored: its removal would not be seen
        as this process's."""
        ws = state.worker(WorkerId(worker))
        if ws is None or ws.incarnation != incarnation or not incarnation:
            return 0
        address = WorkerId(worker)
        known = self._notes.get(address)
        if known is None:
            known = (incarnation, {})
            self._notes[address] = known
        elif known[0] != incarnation:
            return 0  # the replaced process's notes are taken first (``take``)
        notes = known[1]
        now = self._clock()
        noted = 0
        for key in keys:
            if len(notes) >= MAX_NOTED and key not in notes:
                log.warning(
                    "%s is storing more than %d keys no poll has listed yet: further ones are "
                    "not noted, and would not be reported lost if it died before a poll",
                    address,
                    MAX_NOTED,
                )
                break
            notes[Key(key)] = now
            noted += 1
        self._made[address] = self._made.get(address, 0) + 1
        return noted

    async def polled(self, state: ClusterState) -> None:
        """After a round of polls: end the notes of keys their worker now lists, and of keys
        whose Put window passed before the worker's last poll without them.

        ``POLLED_STEP`` notes at a time, the event loop let in between (``pacing.Budget``):
        all at once, the first poll round after a Put of 100k keys on 4 workers held the AMM's
        loop for 80-100 ms of CPU. A note made again meanwhile is judged at the next round.

        The usual slice (no note made meanwhile, none past its window) is judged in C-level
        passes: a Python step per note took 0.4 CPU-s for the 400k notes of a 100k x 4 Put,
        every one of them before the first cycle after it could plan.

        One round judges at a time: a round that ends while another judges leaves it to that
        one and the next (a cycle's round, ending with a round of polls made while the AMM was
        stopped, judged the same 400k notes twice over, side by side)."""
        if self._judging:
            return
        self._judging = True
        try:
            await self._judge(state)
        finally:
            self._judging = False

    async def _judge(self, state: ClusterState) -> None:
        pace = Budget()
        for address in list(self._notes):
            known = self._notes.get(address)
            if known is None:
                continue
            incarnation, notes = known
            ws = state.worker(address)
            if ws is None or ws.incarnation != incarnation:
                continue  # its removal or restart takes the notes (``take``)
            if ws.last_poll is None:
                continue
            settled = ws.last_poll - self._window
            # A copy and its keys, not its items: 100k (key, time) pairs made the garbage
            # collector run a hundred times, holding the AMM's loop for 20 ms (``loop_probe``).
            noted = notes.copy()
            keys = list(noted)
            expiring = bool(noted) and min(noted.values()) < settled
            made = self._made.get(address, 0)
            for start in range(0, len(keys), POLLED_STEP):
                if start:
                    await pace()
                    if self._notes.get(address) is not known:
                        break  # taken meanwhile
                listed = state.keys
                chunk = keys[start : start + POLLED_STEP]
                if not expiring and self._made.get(address, 0) == made:
                    holders = map(_HOLDERS, map(listed.get, chunk, _NOTHING))
                    held = map(frozenset.__contains__, holders, itertools.repeat(address))
                    for key in itertools.compress(chunk, held):
                        notes.pop(key, None)
                    continue
                for key in chunk:
                    at = noted[key]
                    if notes.get(key) != at:
                        continue
                    if at < settled or ((kv := listed.get(key)) and address in kv.holders):
                        del notes[key]
            if not notes and self._notes.get(address) is known:
                del self._notes[address]

    def take(
        self, worker: WorkerId, *, incarnation: str | None = None, other_than: str | None = None
    ) -> frozenset[Key]:
        """The keys ``worker`` was storing, now that it went away, or that its ``incarnation``
        (or any but ``other_than``) was replaced by a new process; the notes end."""
        known = self._notes.get(worker)
        if known is None:
            return frozenset()
        if (incarnation is not None and known[0] != incarnation) or known[0] == other_than:
            return frozenset()
        del self._notes[worker]
        self._made.pop(worker, None)
        return frozenset(known[1])

    def __len__(self) -> int:
        return sum(len(notes) for _, notes in self._notes.values())

"""Keys that agents are storing for a Put and that no poll has listed yet.

An agent asks the AMM about a Put's keys (``LookupKeys`` with ``storing``) before it stores
them, and acknowledges the Put once they are stored; the AMM learns they are there only at that
agent's next poll. An agent killed in between took acknowledged keys with it that the AMM never
knew of, so nothing reported them lost. The AMM notes them here, and the removal of a worker
counts its notes as held (``Losses.losing``): a key no other worker holds is then reported
lost. A note ends when a poll lists the key, or when a poll answered after the longest a Put
may take shows the key did not arrive (the Put failed): that key was never acknowledged.

The keys of one question are noted together, packed in one string (``_Batch``): a dictionary
entry and a string object per key and worker made the notes of a Put of 100k keys on 4 workers
43 MiB of the AMM's memory, as much as its whole view of those keys, and still held when the
first poll after the Put filled the view (the AMM's peak).
"""

from __future__ import annotations

import itertools
import logging
import operator
from collections.abc import Callable, Iterable, Sequence

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

#: What separates the keys of a batch packed in one string. A key may hold it (keys are any
#: UTF-8): a batch with such a key keeps its keys as they came.
SEP = "\x00"

#: A key the state does not list; whether a worker is among its holders; the holders of one.
_NOTHING = itertools.repeat(KeyView(Key(""), 0, "", frozenset()))
_HOLDERS = operator.itemgetter(3)


class _Batch:
    """The keys of one question, noted at one time."""

    __slots__ = ("at", "count", "packed")

    def __init__(self, at: float, keys: Sequence[str]) -> None:
        self.at = at
        self.count = 0
        self.packed: str | tuple[str, ...] = ""
        self.hold(keys)

    def hold(self, keys: Sequence[str]) -> None:
        if not keys:
            self.packed, self.count = "", 0
            return
        packed = SEP.join(keys)
        # One separator fewer than keys, or a key holds one: then the keys as they came.
        self.packed = packed if packed.count(SEP) == len(keys) - 1 else tuple(keys)
        self.count = len(keys)

    def keys(self) -> list[Key]:
        if not self.count:
            return []
        if isinstance(self.packed, tuple):
            return list(map(Key, self.packed))
        return self.packed.split(SEP)  # type: ignore[return-value]  # Key is a str


class _Notes:
    """One worker process's notes: its batches, oldest first, and how many keys they name (a
    key noted twice counts twice)."""

    __slots__ = ("batches", "count", "incarnation")

    def __init__(self, incarnation: str) -> None:
        self.incarnation = incarnation
        self.batches: list[_Batch] = []
        self.count = 0

    def keys(self) -> set[Key]:
        return set().union(*(batch.keys() for batch in self.batches))


class Storing:
    """Per worker and incarnation, the keys it is storing and when it said so."""

    def __init__(self, clock: Callable[[], float], *, window: float = PUT_WINDOW) -> None:
        self._clock = clock
        self._window = window
        self._notes: dict[WorkerId, _Notes] = {}
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
            known = self._notes[address] = _Notes(incarnation)
        elif known.incarnation != incarnation:
            return 0  # the replaced process's notes are taken first (``take``)
        wanted = list(keys)
        room = MAX_NOTED - known.count
        if len(wanted) > room:
            log.warning(
                "%s is storing more than %d keys no poll has listed yet: further ones are "
                "not noted, and would not be reported lost if it died before a poll",
                address,
                MAX_NOTED,
            )
            wanted = wanted[: max(0, room)]
        if wanted:
            known.batches.append(_Batch(self._clock(), wanted))
            known.count += len(wanted)
        return len(wanted)

    async def polled(self, state: ClusterState) -> None:
        """After a round of polls: end the notes of keys their worker now lists, and of keys
        whose Put window passed before the worker's last poll without them.

        ``POLLED_STEP`` notes at a time, in C-level passes, the event loop let in between
        (``pacing.Budget``): all at once, the first poll round after a Put of 100k keys on 4
        workers held the AMM's loop for 80-100 ms of CPU, and a Python step per note took 0.4
        CPU-s for its 400k notes, every one of them before the first cycle after it could plan.
        The batches noted while a round judges are judged at the next round.

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
            ws = state.worker(address)
            if ws is None or ws.incarnation != known.incarnation:
                continue  # its removal or restart takes the notes (``take``)
            if ws.last_poll is None:
                continue
            if not await self._judge_notes(state, address, known, ws.last_poll, pace):
                continue  # taken meanwhile: the other workers' notes are judged all the same
            # Batches noted meanwhile were appended: they stay (a remove each would be a pass
            # over all the batches, and a Put of one key is a batch).
            known.batches = [batch for batch in known.batches if batch.count]
            if not known.batches:
                del self._notes[address]

    async def _judge_notes(
        self, state: ClusterState, address: WorkerId, known: _Notes, last_poll: float, pace: Budget
    ) -> bool:
        """End the notes of ``known``'s batches whose keys ``address`` now lists, or whose Put
        window passed before its last poll; False when its notes were taken meanwhile."""
        settled = last_poll - self._window
        for batch in list(known.batches):
            if batch.at < settled:
                self._end(known, batch, [])  # the Put's window passed: listed or failed
                continue
            keys = batch.keys()
            left: list[Key] = []
            for start in range(0, len(keys), POLLED_STEP):
                if start and await pace() and self._notes.get(address) is not known:
                    return False
                chunk = keys[start : start + POLLED_STEP]
                holders = map(_HOLDERS, map(state.keys.get, chunk, _NOTHING))
                held = map(frozenset.__contains__, holders, itertools.repeat(address))
                left += itertools.compress(chunk, map(operator.not_, held))
            self._end(known, batch, left)
            if await pace() and self._notes.get(address) is not known:
                return False
        return True

    @staticmethod
    def _end(known: _Notes, batch: _Batch, left: list[Key]) -> None:
        """End the notes of ``batch`` but those of ``left`` (none left: the batch is empty, and
        dropped at the end of the round)."""
        known.count -= batch.count - len(left)
        batch.hold(left)

    def take(
        self, worker: WorkerId, *, incarnation: str | None = None, other_than: str | None = None
    ) -> frozenset[Key]:
        """The keys ``worker`` was storing, now that it went away, or that its ``incarnation``
        (or any but ``other_than``) was replaced by a new process; the notes end."""
        known = self._notes.get(worker)
        if known is None:
            return frozenset()
        if (incarnation is not None and known.incarnation != incarnation) or (
            known.incarnation == other_than
        ):
            return frozenset()
        del self._notes[worker]
        return frozenset(known.keys())

    def __len__(self) -> int:
        """Keys noted, each once per worker (for tests and reports: it unpacks every batch)."""
        return sum(len(notes.keys()) for notes in self._notes.values())

"""Keys in the order they changed, so that a policy re-plans only the keys that changed since it
last looked instead of every key every cycle.

The cluster state notes each key whose record (holders, pins, conflicts) changed; the ledger notes
each key whose work in flight may ask more of a policy. A reader keeps the ``(uid, position)`` it
read up to and asks ``since`` for the keys noted after it. The journal holds at most about
``limit`` keys: past that it forgets its oldest half, and a reader whose position was forgotten
(or who read another journal) gets None, meaning "anything may have changed: look at every key".
So forgetting costs a reader one full scan, never a missed change. Pure: no I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_uids = itertools.count(1)
#: Keys a journal holds at least before it forgets its oldest half. Its owner raises the limit
#: with its size (twice its keys): beyond that, reading the journal costs more than the full
#: scan that forgetting costs a reader. Kept small, so that a small cluster under churn does not
#: keep the names of thousands of forgotten keys alive (200,000 held 30 MiB in a soak).
MIN_LIMIT = 16_384


class Journal(Generic[K]):
    """An append-only list of changed keys, with a bounded memory of the past."""

    __slots__ = ("_base", "_keys", "limit", "uid")

    def __init__(self, limit: int = MIN_LIMIT) -> None:
        self.uid = next(_uids)
        """Tells this journal from any other (a position means nothing in another one)."""
        self.limit = limit
        self._keys: list[K] = []
        self._base = 0

    @property
    def position(self) -> int:
        """Where the next key noted goes: read up to here, a reader has seen everything."""
        return self._base + len(self._keys)

    def note(self, key: K) -> None:
        keys = self._keys
        keys.append(key)
        if len(keys) > self.limit:
            drop = len(keys) - self.limit // 2
            del keys[:drop]
            self._base += drop

    def extend(self, keys: Iterable[K]) -> None:
        """``note`` each of ``keys``, in order, trimming once (a poll step notes hundreds at
        once, a worker leaving 100k)."""
        mine = self._keys
        mine.extend(keys)
        if len(mine) > self.limit:
            drop = len(mine) - self.limit // 2
            del mine[:drop]
            self._base += drop

    def since(self, uid: int, start: int, end: int | None = None) -> set[K] | None:
        """The keys noted from ``start`` up to ``end`` (now, if None); None when ``uid`` is
        another journal's or the journal has forgotten part of that stretch."""
        noted = self.noted(uid, start, end)
        return None if noted is None else set(noted)

    def noted(self, uid: int, start: int, end: int | None = None) -> list[K] | None:
        """``since`` as noted, in order and with repeats: a copy of part of a list, cheap even
        for hundreds of thousands of keys, for a caller that makes a set of them in steps (in
        one go, the set held the AMM's loop for 30-90 ms in a 100k-key cycle)."""
        if uid != self.uid or start < self._base:
            return None
        stop = self.position if end is None else min(end, self.position)
        return self._keys[start - self._base : stop - self._base]

    def __len__(self) -> int:
        return len(self._keys)

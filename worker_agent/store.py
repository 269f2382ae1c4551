"""The agent's in-memory keyed store and the bookkeeping the integrity rules read.

What it covers: immutable values with their size and checksum; an inventory ``version`` with a
bounded changelog, so that the AMM's polls carry only what changed; pages of both (a poll answer
is one message, capped at 16 MiB); pin counts; counters of readers and senders per key; the keys
this agent is dropping right now; keep-promise leases; the tombstones of forgotten keys.

What it does not: deciding whether an operation is allowed (``integrity``), I/O or waiting. It is
synchronous and never reads a clock: lease expiries are compared with the ``now`` the caller passes.
A precondition the caller should have checked (pinning a key not held) raises ``KeyError``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple, NewType

from sortedcontainers import SortedList

Key = NewType("Key", str)

#: How many inventory changes the changelog remembers at most; an older poll gets a full
#: snapshot. A million (8 MB of references, and the keys they keep alive): an AMM busy with a big
#: cycle may poll after hundreds of thousands of drops, and a full snapshot of a big inventory
#: costs far more than the log. Changes the AMM has acknowledged are let go sooner
#: (``release_changes``): the log then holds about what changed between two polls.
CHANGELOG_LIMIT = 1_000_000
#: Longest key, in bytes of UTF-8.
MAX_KEY_BYTES = 1024
#: What one key costs in a poll answer besides its own bytes (checksum, size, flags, framing),
#: rounded up: pages are cut by bytes as well as by count.
KEY_INFO_OVERHEAD = 96
#: Tombstones remembered at most (about 250 bytes each); the oldest go first.
MAX_TOMBSTONES = 200_000
#: Removed keys the sorted index may still list before it is rebuilt without them (and at least
#: as many as it lists held keys): removing one from a ``SortedList`` costs microseconds of
#: Python, rebuilding it a C pass per key, and a batch of drops removes thousands.
STALE_SORTED_MIN = 4_096
#: Keys of the sorted index filtered in one step of a compaction (``Store.compaction``): a
#: fraction of a millisecond each, where a whole index of 100k keys held the loop 10-16 ms.
COMPACT_SLICE = 2_048
#: Keys of the sorted index read at once for a snapshot page (a few C-level steps each).
PAGE_SLICE = 4_096


@dataclass(slots=True)
class Tombstone:
    """A key forgotten cluster-wide: ``id`` names the Forget, ``generation`` orders it among
    the tombstones this store took (see ``Store.doomed``), ``live`` until the key is put again;
    kept until ``expires`` (the caller's clock)."""

    id: int
    generation: int
    live: bool
    expires: float


@dataclass(frozen=True, slots=True)
class Value:
    """One stored value; bytes are immutable, so handing them out is safe."""

    key: Key
    data: bytes
    checksum: str

    @property
    def size(self) -> int:
        return len(self.data)


#: ``tuple.__new__``: a NamedTuple from a tuple of all its fields, as ``_make`` does, without the
#: Python frame of its ``__new__`` (a poll page or a HoldsKeys answer holds thousands). A pin
#: count is never kept at zero, so ``key in pins`` is whether the key is pinned.
_new_tuple = tuple.__new__


class KeyInfo(NamedTuple):
    """What a poll reports about one key; a NamedTuple, made for each key of every snapshot
    page (a frozen dataclass sets each field through ``object.__setattr__``)."""

    key: Key
    size: int
    checksum: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class Changes:
    """The inventory changes after some version, up to ``version``; ``more`` when the answer
    stopped at a limit and further changes follow ``version``."""

    upserts: tuple[KeyInfo, ...]
    removed: tuple[Key, ...]
    version: int
    more: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """Keys of a snapshot in key order; ``last`` is the last key when more follow, else None."""

    keys: tuple[KeyInfo, ...]
    last: Key | None


class _Budget:
    """At most ``max_keys`` keys and about ``max_bytes`` bytes, but always one key (progress)."""

    def __init__(self, max_keys: int | None, max_bytes: int | None) -> None:
        self._keys = max_keys
        self._bytes = max_bytes
        self._count = 0
        self._used = 0

    def take(self, key: Key) -> bool:
        # An ASCII key's UTF-8 is as long as it is: most keys, not encoded again for each page.
        cost = (len(key) if key.isascii() else len(key.encode())) + KEY_INFO_OVERHEAD
        if self._count and (
            (self._keys is not None and self._count >= self._keys)
            or (self._bytes is not None and self._used + cost > self._bytes)
        ):
            return False
        self._count += 1
        self._used += cost
        return True


def _within(keys: Collection[Key], max_keys: int | None, max_bytes: int | None) -> bool:
    """Whether all of ``keys`` fit the limits ``_Budget`` takes one key at a time by."""
    if max_keys is not None and len(keys) > max_keys:
        return False
    if max_bytes is None:
        return True
    joined = "".join(keys)
    size = len(joined) if joined.isascii() else sum(len(key.encode()) for key in keys)
    return size + KEY_INFO_OVERHEAD * len(keys) <= max_bytes


class Reservation:
    """Bytes counted in flight by a store until ``release`` (idempotent; also on exit)."""

    __slots__ = ("_store", "nbytes")

    def __init__(self, store: Store, nbytes: int) -> None:
        self._store = store
        self.nbytes = nbytes
        store._in_flight += nbytes

    def release(self) -> None:
        self._store._in_flight -= self.nbytes
        self.nbytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Store:
    """Values and their bookkeeping; every change of what a poll reports bumps ``version``."""

    def __init__(self, changelog_limit: int = CHANGELOG_LIMIT) -> None:
        if changelog_limit < 1:
            raise ValueError(f"changelog_limit must be >= 1, got {changelog_limit}")
        self._values: dict[Key, Value] = {}
        #: The values held by key, read-only (``held.get``: ``get`` without a Python call, for
        #: the hottest loops).
        self.held: Mapping[Key, Value] = self._values
        # The keys held, sorted, for snapshot pages; insertions are O(log n), so dropping a
        # whole batch of keys does not move a list once per key. Removed keys stay listed
        # until enough accumulate (``_stale``, ``STALE_SORTED_MIN``): pages skip them.
        self._sorted: SortedList[Key] = SortedList()
        self._stale: set[Key] = set()
        #: The keys listed or removed since a compaction under way took its copy of the index
        #: (``compaction``); None when none is.
        self._touched: set[Key] | None = None
        self._pins: dict[Key, int] = {}
        self._in_use: dict[Key, int] = {}
        self._dropping: set[Key] = set()
        self._leases: dict[Key, float] = {}
        # Oldest first: every tombstone lives as long, so expiry and eviction take the front.
        self._tombstones: OrderedDict[Key, Tombstone] = OrderedDict()
        self._generation = 0
        self._max_tombstones = MAX_TOMBSTONES
        self._total = 0
        #: Bytes of the values removed so far (the agent gives memory back to the system after
        #: large frees).
        self.freed_bytes = 0
        #: Bytes not stored yet but in this process: values being received, values being served.
        self._in_flight = 0
        self._version = 0
        self._limit = changelog_limit
        # Trimming by half the limit at a time keeps appends amortised O(1).
        self._trim_at = changelog_limit + max(1, changelog_limit // 2)
        # _log[i] is the key changed by version _base + i + 1.
        self._log: list[Key] = []
        self._base = 0

    # -- values --------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def total_bytes(self) -> int:
        """Managed memory: the sum of the sizes of the values held."""
        return self._total

    @property
    def in_flight_bytes(self) -> int:
        """Bytes reserved for values being received (Put, PutMany, peer fetches) and served
        (Get, Fetch): not managed, but memory all the same, so the memory limit counts them."""
        return self._in_flight

    def reserve(self, nbytes: int) -> Reservation:
        """Count ``nbytes`` in flight until the reservation is released (judge first: this
        never refuses)."""
        return Reservation(self, nbytes)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __iter__(self) -> Iterator[Key]:
        return iter(self._values)

    def get(self, key: Key) -> Value | None:
        return self._values.get(key)

    def info(self, key: Key) -> KeyInfo | None:
        return self._info(key) if key in self._values else None

    def infos(self, keys: Iterable[Key]) -> list[KeyInfo]:
        """What ``info`` says of each of ``keys`` held, in order (a HoldsKeys call asks for
        10,000, most of them often held elsewhere: those are passed over in C)."""
        return self._infos(list(filter(self._values.__contains__, keys)))

    def _infos(self, held: Sequence[Key]) -> list[KeyInfo]:
        """``info`` of each of ``held`` (all held), made without a Python call each."""
        values, pins = self._values, self._pins
        return [
            _new_tuple(KeyInfo, (key, len(value.data), value.checksum, key in pins))
            for key, value in zip(held, map(values.__getitem__, held), strict=True)
        ]

    def _info(self, key: Key) -> KeyInfo:
        value = self._values[key]
        return KeyInfo(key, value.size, value.checksum, self._pins.get(key, 0) > 0)

    def snapshot(self) -> list[KeyInfo]:
        """Every key held, ordered by key."""
        values = self._values
        return [self._info(key) for key in self._sorted if key in values]

    def snapshot_page(
        self, after: Key | None, *, max_keys: int | None = None, max_bytes: int | None = None
    ) -> Page:
        """The keys after ``after`` (from the first when None) in key order, within the limits."""
        values = self._values
        following = self._sorted.irange(minimum=after, inclusive=(False, True))
        # At least one key (progress), as ``_Budget``; one held key past the limit, if any,
        # tells that more follow. The keys are read a slice at a time, those removed but still
        # listed (``_stale``) passed over in C; no more are read than the limits can take.
        limit = max(1, len(values) if max_keys is None else max_keys)
        most_by_bytes = None if max_bytes is None else max_bytes // KEY_INFO_OVERHEAD + 1
        held: list[Key] = []
        more = False
        while chunk := list(islice(following, min(PAGE_SLICE, limit + 1 - len(held)))):
            held += filter(values.__contains__, chunk)
            if len(held) > limit:
                del held[limit:]
                more = True
                break
            if most_by_bytes is not None and len(held) > most_by_bytes:
                break  # they cannot all fit: cut below, by bytes
        if max_bytes is not None and not _within(held, None, max_bytes):
            budget = _Budget(None, max_bytes)
            fit = next((n for n, key in enumerate(held) if not budget.take(key)), len(held))
            more = more or fit < len(held)
            del held[fit:]
        return Page(tuple(self._infos(held)), held[-1] if more else None)

    def add(self, key: Key, data: bytes, checksum: str) -> bool:
        """Store a verified value; False when the key is already held (the caller compares)."""
        if key in self._values:
            return False
        self._values[key] = Value(key, data, checksum)
        if self._touched is not None:
            self._touched.add(key)
        if key in self._stale:
            self._stale.discard(key)  # still listed
        else:
            self._sorted.add(key)
        self._total += len(data)
        self._changed(key)
        return True

    def add_many(self, values: Iterable[tuple[Key, bytes, str]]) -> int:
        """``add`` for many verified values, skipping keys already held; the bytes stored.

        The key index takes the batch in one bulk update.
        """
        held = self._values
        added: list[Key] = []
        stored = 0
        for key, data, checksum in values:
            if key in held:
                continue
            held[key] = Value(key, data, checksum)
            added.append(key)
            stored += len(data)
        stale = self._stale
        self._sorted.update([key for key in added if key not in stale] if stale else added)
        if self._touched is not None:
            self._touched.update(added)
        stale.difference_update(added)
        self._total += stored
        # One version per key, as ``add`` would: _log[i] stays the key changed by _base + i + 1.
        self._version += len(added)
        self._log += added
        self._trim()
        return stored

    def remove(self, key: Key) -> bool:
        """Forget a value with its pins and leases; False when it was not held."""
        value = self._values.pop(key, None)
        if value is None:
            return False
        stale = self._stale
        stale.add(key)
        if self._touched is not None:
            self._touched.add(key)
        elif len(stale) >= STALE_SORTED_MIN and len(stale) >= len(self._values):
            self._compact()
        size = len(value.data)
        self._total -= size
        self.freed_bytes += size
        if self._pins:
            self._pins.pop(key, None)
        if self._leases:
            self._leases.pop(key, None)
        self._version += 1  # ``_changed``, inline: a batch of drops removes thousands
        self._log.append(key)
        if len(self._log) >= self._trim_at:
            self._trim()
        return True

    def _compact(self) -> None:
        """List only the keys held in the sorted index (one pass, sorted input)."""
        self._sorted = SortedList(filter(self._values.__contains__, self._sorted))
        self._stale = set()

    @property
    def compacting(self) -> bool:
        """Whether a compaction of the sorted index is under way (``compaction``)."""
        return self._touched is not None

    @property
    def compaction_due(self) -> bool:
        """Whether the sorted index lists enough removed keys to be rebuilt a slice at a time
        (``compaction``): at half the stale keys ``remove`` rebuilds it at once for, so that a
        batch of drops that drives compactions never meets one in ``remove``."""
        stale = len(self._stale)
        return (
            self._touched is None and stale >= STALE_SORTED_MIN and 2 * stale >= len(self._values)
        )

    def compaction(self) -> Generator[None]:
        """Rebuild the sorted index without the removed keys, ``COMPACT_SLICE`` keys per step
        (``next``): the caller lets the loop in between, where the store may change. A rebuild
        at once, in ``remove``, held an agent's loop 10-16 ms of CPU with 100k keys, in the
        middle of a batch of drops.

        The index and its stale keys stay as they were, and are kept up to date, until the last
        step swaps the rebuilt index in. Each key is filtered by whether it is held when its
        slice is; the keys listed or removed after the copy (``_touched``) are judged again in
        the last step: listed when held, stale when listed and not held. Abandoned (closed), it
        leaves the index as it was."""
        if self._touched is not None:
            return
        touched: set[Key] = set()
        self._touched = touched
        try:
            listed = list(self._sorted)
            held = self._values.__contains__
            kept: list[Key] = []
            for start in range(0, len(listed), COMPACT_SLICE):
                yield
                kept += filter(held, listed[start : start + COMPACT_SLICE])
            yield
            rebuilt = SortedList(kept)
            in_kept = touched.intersection(kept)
            values = self._values
            rebuilt.update([key for key in touched if key in values and key not in in_kept])
            self._sorted = rebuilt
            self._stale = {key for key in in_kept if key not in values}
        finally:
            self._touched = None

    def clear_to_remove(
        self, key: Key, checksum: str, now: float, *, mine: bool = False
    ) -> Value | None:
        """The value of ``key`` when it is held with ``checksum`` (any, when empty) and nothing
        here guards it: no pin, no reader or sender, no active keep-promise, and not being
        dropped (unless ``mine``: the caller marked it); None otherwise. The all-clear of
        ``integrity.judge_drop`` and ``judge_drop_commit`` in one lookup each, for a batch of
        thousands of drops; on None, those judge why."""
        value = self._values.get(key)
        if value is None or (checksum and checksum != value.checksum):
            return None
        if (not mine and key in self._dropping) or key in self._pins or key in self._in_use:
            return None
        lease = self._leases.get(key)
        return value if lease is None or lease <= now else None

    def mark_if_clear(self, key: Key, checksum: str, now: float) -> Value | None:
        """``clear_to_remove`` and, when clear, ``mark_dropping`` in one step (one call for
        each drop of a batch of thousands)."""
        value = self.clear_to_remove(key, checksum, now)
        if value is not None:
            self._dropping.add(key)
        return value

    def remove_if_clear(self, key: Key, checksum: str, now: float) -> int | None:
        """When ``clear_to_remove(..., mine=True)``: ``remove`` and ``unmark_dropping`` in one
        step, and the version after; None otherwise, and nothing is done (one call for each drop
        of a batch of thousands, instead of four)."""
        if self.clear_to_remove(key, checksum, now, mine=True) is None:
            return None
        self.remove(key)
        self._dropping.discard(key)
        return self._version

    def promise_held(self, key: Key, checksum: str, until: float) -> float | None:
        """``promise`` when ``key`` is held with ``checksum`` (any, when empty) and is not
        being dropped here, in one step (the expiry); None otherwise, and nothing is recorded
        (``integrity.judge_keep`` says why)."""
        return self.promise_held_many([(key, checksum)], until)[0]

    def promise_held_many(
        self, items: Iterable[tuple[Key, str]], until: float
    ) -> list[float | None]:
        """``promise_held`` for each ``(key, checksum)``, in one step: a keeper answers thousands
        of keys at once (a call each cost a fifth of a microsecond more)."""
        values, dropping, leases = self._values, self._dropping, self._leases
        expiries: list[float | None] = []
        append = expiries.append
        for key, checksum in items:
            value = values.get(key)
            if value is None or (checksum and checksum != value.checksum) or key in dropping:
                append(None)
                continue
            known = leases.get(key)
            expires = until if known is None or known < until else known
            leases[key] = expires
            append(expires)
        return expiries

    # -- pins, readers, drops, leases -------------------------------------------------------------

    def pins(self, key: Key) -> int:
        return self._pins.get(key, 0)

    def pin(self, key: Key) -> int:
        """Add a pin; the version moves only when the key becomes pinned (what polls show)."""
        if key not in self._values:
            raise KeyError(key)
        count = self._pins.get(key, 0) + 1
        self._pins[key] = count
        if count == 1:
            self._changed(key)
        return count

    def unpin(self, key: Key) -> int:
        count = self._pins.get(key, 0)
        if count == 0:
            raise KeyError(key)
        if count == 1:
            del self._pins[key]
            self._changed(key)
        else:
            self._pins[key] = count - 1
        return count - 1

    def in_use(self, key: Key) -> int:
        """How many reads or sends of the key are streaming right now."""
        return self._in_use.get(key, 0)

    def begin_use(self, key: Key) -> None:
        if key not in self._values:
            raise KeyError(key)
        self._in_use[key] = self._in_use.get(key, 0) + 1

    def end_use(self, key: Key) -> None:
        count = self._in_use.get(key, 0) - 1
        if count > 0:
            self._in_use[key] = count
        else:
            self._in_use.pop(key, None)

    def is_dropping(self, key: Key) -> bool:
        return key in self._dropping

    def mark_dropping(self, key: Key) -> None:
        self._dropping.add(key)

    def unmark_dropping(self, key: Key) -> None:
        self._dropping.discard(key)

    def promise(self, key: Key, until: float) -> float:
        """Promise to keep a held key until ``until`` (extending, never shortening); the expiry."""
        if key not in self._values:
            raise KeyError(key)
        expires = max(until, self._leases.get(key, until))
        self._leases[key] = expires
        return expires

    def promised_until(self, key: Key, now: float) -> float | None:
        """The expiry of the key's active keep-promise, or None."""
        expires = self._leases.get(key)
        return expires if expires is not None and expires > now else None

    # -- tombstones ----------------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Tombstones taken so far: a transfer notes it when it starts (``doomed``)."""
        return self._generation

    def bury(self, key: Key, tombstone: int, now: float, ttl: float) -> bool:
        """Take the tombstone ``tombstone`` of ``key`` until ``now + ttl``; False when it was
        taken already (the same Forget, sent again), which then changes nothing: a value put
        since it was taken must stay. Removing the held copy is the caller's decision."""
        self._expire(now)
        known = self._tombstones.get(key)
        if known is not None and known.id == tombstone:
            return False
        self._generation += 1
        self._tombstones.pop(key, None)
        self._tombstones[key] = Tombstone(tombstone, self._generation, True, now + ttl)
        while len(self._tombstones) > self._max_tombstones:
            self._tombstones.popitem(last=False)
        return True

    def put_again(self, key: Key, tombstone: int | None = None) -> None:
        """The key was put again (here, or elsewhere after the Forget ``tombstone``): copies of
        it are taken again. The tombstone stays, to discard transfers begun before it."""
        known = self._tombstones.get(key)
        if known is not None and (tombstone is None or known.id == tombstone):
            known.live = False

    def forgotten(self, key: Key, now: float) -> bool:
        """Whether ``key`` is forgotten and was not put again since: no copy of it is taken."""
        known = self._tombstones.get(key)
        return known is not None and known.live and known.expires > now

    def doomed(self, key: Key, since: int, now: float) -> bool:
        """Whether a copy of ``key`` whose transfer began at generation ``since`` must be
        discarded: the key is forgotten, or was forgotten after the transfer began."""
        known = self._tombstones.get(key)
        return (
            known is not None and known.expires > now and (known.live or known.generation > since)
        )

    @property
    def tombstones(self) -> int:
        """Tombstones kept (expired ones included until ``expire_tombstones``)."""
        return len(self._tombstones)

    def expire_tombstones(self, now: float) -> int:
        """Let go of the tombstones expired at ``now``; how many. Taking a tombstone does this
        too; an agent that takes none calls it from time to time."""
        before = len(self._tombstones)
        self._expire(now)
        return before - len(self._tombstones)

    def _expire(self, now: float) -> None:
        tombstones = self._tombstones
        while tombstones:
            key, oldest = next(iter(tombstones.items()))
            if oldest.expires > now:
                return
            del tombstones[key]
        # A dict keeps its table after deletions (hundreds of KiB after a burst of forgets).
        self._tombstones = OrderedDict()

    # -- inventory versioning -----------------------------------------------------------------

    def changes_since(
        self, since: int, *, max_keys: int | None = None, max_bytes: int | None = None
    ) -> Changes | None:
        """What changed after version ``since``; None when the changelog no longer reaches back
        that far (or ``since`` is from the future), so the caller needs a full snapshot.

        Within the limits, the answer takes the changelog in order and stops before the first
        key that does not fit: ``version`` is then the version up to which it is complete, and
        ``more`` is set. Each key is reported as it is now, which may already include later
        changes; those are reported again after ``version``, so applying the answers in turn
        ends at the current inventory.
        """
        if since < self._base or since > self._version:
            return None
        version, more = self._version, False
        # The usual answer holds every change since: deduplicated in C, checked against the
        # limits as a whole (a poll during a big batch of drops reports thousands of keys).
        start = since - self._base
        changed: dict[Key, None] | None = None
        if max_keys is None or len(self._log) - start <= 2 * max_keys:
            changed = dict.fromkeys(self._log[start:])
        if changed is None or not _within(changed, max_keys, max_bytes):
            budget = _Budget(max_keys, max_bytes)
            changed = {}
            for index in range(start, len(self._log)):
                key = self._log[index]
                if key in changed:
                    continue
                if not budget.take(key):
                    # _log[index] is the change that made version _base + index + 1.
                    version, more = self._base + index, True
                    break
                changed[key] = None
        values = self._values
        removed = [key for key in changed if key not in values]
        upserts: list[KeyInfo] = []
        if len(removed) < len(changed):
            upserts = self._infos([key for key in changed if key in values])
        return Changes(tuple(upserts), tuple(removed), version, more)

    def release_changes(self, upto: int) -> None:
        """Let go of the changes up to version ``upto``: the only caller that asks for changes
        (the agent's AMM) has acknowledged them by polling since a later version. An older
        ``since`` then gets a full snapshot (``changes_since`` answers None), as one from before
        the changelog's limit does."""
        cut = min(upto, self._version) - self._base
        if cut > 0:
            del self._log[:cut]
            self._base += cut

    @property
    def changelog_length(self) -> int:
        return len(self._log)

    def _changed(self, key: Key) -> None:
        self._version += 1
        self._log.append(key)
        if len(self._log) >= self._trim_at:
            self._trim()

    def _trim(self) -> None:
        if len(self._log) >= self._trim_at:
            cut = len(self._log) - self._limit
            del self._log[:cut]
            self._base += cut

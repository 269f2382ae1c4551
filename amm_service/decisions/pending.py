"""The ledger of directives in flight, kept across cycles.

Dask forgets its pending replications and drops at the end of every cycle (dask/distributed#5759),
so a slow transfer invites the next cycle to ask again, or to drop a replica that a transfer is
still relying on. Here a directive stays in flight until

1. the agent refused or failed it (nothing changed on the agent), or
2. it was applied *and* the view a cycle plans on shows the agent at the outcome's inventory
   version or later (``observe``, called right before the snapshot: an entry settled by a poll
   made while a cycle plans on an older view would let that cycle plan the same work again), or
3. no outcome arrived within the directive timeout and the worker is not answering (it stopped
   answering polls, or its directive stream is gone), or
4. the worker left or restarted, or
5. it is a copy applied on a worker that is gone before a poll showed it (``forget_copies``):
   it failed a poll and its directive stream broke (a SIGKILLed agent). Counted in flight until
   the worker was dropped, such a copy kept the key from being copied again, and let
   ReduceReplicas drop a real replica in its place. Only copies: an applied DROP stays until a
   poll or the worker's removal, since its worker is still listed as a holder and would count
   as a copy again.

A directive is never planned again while its worker may still hold it: re-planning it would send
a second directive with a new id for the same work, and at scale (hundreds of thousands of
directives queued on agents) those re-sends were most of the traffic. A worker that answers polls
and keeps its stream open answers every directive in the end (its transfers and promises have
deadlines, and a broken stream fails what it left unanswered at once); one whose directive is
overdue is sent the same directive again (``overdue``): the agent answers a repeated id with the
outcome it gave, or waits for the run under way, so that costs one message, never the work twice.

The core reads the ledger through ``InFlight`` to count pending replicas and drops. Pure: the
caller supplies the clock.

Stored in columns, not as objects: a big cycle has 300,000 drops in flight at once, and as a
``Directive`` (136 bytes), its id string (78), an ``Entry`` and the ledger's maps each cost about
375 bytes (1.1 KB per key with three drops each, more than the cluster state of the key). Each
directive is a slot of a chunk of arrays (op, key, worker, size, checksum, peers, policy and
reason, id number, sent time, cycle: about 60 bytes), its id a number under a prefix shared by
the run (``ids``) and found again through runs of consecutive numbers (no map per id). A
``Directive`` and an ``Entry`` are built again only when asked for: to send it again, when its
outcome arrives, when it leaves. Slots never move (a directive sent again moves to a new one and
its id is then looked up in a small map); a chunk is freed when its last directive left.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.ids import split_id
from amm_service.decisions.journal import Journal
from amm_service.decisions.view import Key, WorkerId


class Entry(NamedTuple):
    """A directive in flight as the ledger knew it when asked: sent at ``sent_at``; ``applied``
    once the agent applied it. Its ``directive`` is built from the ledger's columns only when
    read (most outcomes need only ``op`` and ``cycle``); the columns it reads stay as they were
    after the directive left the ledger. A tuple: a big cycle settles 300,000."""

    ledger: Ledger
    chunk: _Chunk
    at: int
    """Its slot in ``chunk``."""
    known_id: str | None
    """The directive's id if the caller had it (else built from the columns)."""
    sent_at: float
    applied: bool
    cycle: int
    """The number of the cycle that sent it (0: none known)."""

    @property
    def directive(self) -> Directive:
        return self.ledger.build(self.chunk, self.at, self.known_id)

    @property
    def op(self) -> Op:
        return Op.DROP if self.chunk.ops[self.at] else Op.REPLICATE


@dataclass(frozen=True, slots=True)
class InFlight:
    """Pending replications and drops of one key: the workers concerned."""

    replicating: frozenset[WorkerId] = frozenset()
    dropping: frozenset[WorkerId] = frozenset()


_NONE = InFlight()
_NOBODY: frozenset[WorkerId] = frozenset()
_new_directive = tuple.__new__
_new_entry = tuple.__new__

#: Slots per chunk (a power of two: a slot's chunk is ``slot >> CHUNK_BITS``).
CHUNK_BITS = 12
CHUNK = 1 << CHUNK_BITS
_LOW = CHUNK - 1
#: A slot's state.
_GONE, _PENDING, _APPLIED = 0, 1, 2
#: ``_by_key`` codes a run of consecutive slots as ``first << 4 | count`` (count up to 15).
_RUN_BITS = 4
_RUN_MAX = (1 << _RUN_BITS) - 1
#: (policy, reason) pairs shared between slots; the cache is emptied past this size (it only
#: shares, nothing is looked up in it by index).
_NOTES_CACHED = 4_096


class _Chunk:
    """``CHUNK`` slots of directives, one array (or list) per field."""

    __slots__ = (
        "checksums",
        "cycles",
        "keys",
        "live",
        "notes",
        "ops",
        "peers",
        "sent",
        "seqs",
        "shapes",
        "sizes",
        "state",
        "workers",
    )

    def __init__(self) -> None:
        self.state = bytearray()
        self.ops = bytearray()
        """1 for DROP, 0 for REPLICATE."""
        self.keys: list[Key] = []
        self.workers = array("I")
        """Index into the ledger's worker table."""
        self.sizes = array("q")
        self.checksums: list[str] = []
        self.peers: list[tuple[WorkerId, ...]] = []
        """``sources`` of a REPLICATE, ``holders`` of a DROP (shared tuples)."""
        self.notes: list[tuple[str, str]] = []
        """``(policy, reason)``, shared."""
        self.shapes = array("I")
        """Index into the ledger's ``(id prefix, epoch)`` table."""
        self.seqs = array("q")
        """The id's number after its prefix; -1: the id is kept whole (``Ledger._whole``)."""
        self.sent = array("d")
        self.cycles = array("q")
        self.live = 0


class _Runs:
    """The slots of the ids of one prefix: run ``i`` puts ids ``seq[i] ..`` on consecutive slots
    from ``slot[i]`` on (``length[i]`` of them). Ids are issued in increasing order and entered
    in that order, so a cycle's directives make one run or a few."""

    __slots__ = ("end", "length", "seq", "slot")

    def __init__(self) -> None:
        self.seq = array("q")
        self.slot = array("q")
        self.length = array("q")
        self.end = 0
        """Past the last id put on the runs (kept when runs are pruned)."""


def _decode(code: int | tuple[int, ...]) -> list[int]:
    codes = (code,) if isinstance(code, int) else code
    return [s for c in codes for s in range(c >> _RUN_BITS, (c >> _RUN_BITS) + (c & _RUN_MAX))]


def _encode(slots: Iterable[int]) -> int | tuple[int, ...] | None:
    codes: list[int] = []
    for slot in slots:
        if codes:
            last = codes[-1]
            n = last & _RUN_MAX
            if n < _RUN_MAX and slot == (last >> _RUN_BITS) + n:
                codes[-1] = last + 1
                continue
        codes.append(slot << _RUN_BITS | 1)
    if not codes:
        return None
    return codes[0] if len(codes) == 1 else tuple(codes)


class Ledger:
    """Directives sent and not yet settled, indexed by id and by key."""

    def __init__(self) -> None:
        self._chunks: dict[int, _Chunk] = {}
        """By chunk number, in slot order (a chunk whose directives all left is deleted)."""
        self._next = 0
        """The next slot."""
        self._count = 0
        self._prefixes: list[tuple[str, int]] = []
        """``(id prefix, epoch)`` of the slots' ``shapes``."""
        self._prefix_index: dict[tuple[str, int], int] = {}
        self._runs: dict[str, _Runs] = {}
        self._moved: dict[str, int] = {}
        """Ids not on their prefix's runs: sent again (moved to a new slot), entered out of
        order, or with no number; checked first."""
        self._whole: dict[int, str] = {}
        """The ids with no number, by slot."""
        self._worker_ids: list[WorkerId] = []
        self._worker_index: dict[WorkerId, int] = {}
        self._live_of: list[int] = []
        """Directives in flight per worker index."""
        self._notes: dict[tuple[str, str], tuple[str, str]] = {}
        self._last_notes: tuple[str, str] = ("", "")
        self._last_shape: tuple[str, int, int] = ("\0", -1, -1)
        """``(prefix, epoch, shape)`` of the last directive entered (the next is alike)."""
        self._by_key: dict[Key, int | tuple[int, ...]] = {}
        """A key's slots, as runs of consecutive slots (``_encode``): one int for the few drops
        of a key a cycle sends (28 bytes, where a tuple of three entries cost 64 and more)."""
        self._keys_peak = 0
        """The most keys ``_by_key`` held since it was last rebuilt."""
        self._applied: dict[WorkerId, array[int]] = {}
        """Per worker, the slots applied, in the order they were answered: nearly always in
        inventory version order (``_unsorted`` names those that are not), so ``observing``
        settles a prefix instead of checking every applied entry each cycle."""
        self._versions: dict[WorkerId, array[int]] = {}
        """Per worker, the inventory version each slot of ``_applied`` was answered with."""
        self._unsorted: set[WorkerId] = set()
        self.journal: Journal[Key] = Journal()
        """The keys whose work in flight may ask more of a policy than it did: an entry left
        the ledger (settled, refused, failed, expired, its worker gone), or a replication was
        added. A drop added is not noted: it only lessens what is left to do for its key."""

    def __len__(self) -> int:
        return self._count

    def __contains__(self, directive_id: object) -> bool:
        return isinstance(directive_id, str) and self._find(directive_id) is not None

    def __iter__(self) -> Iterator[Entry]:
        return iter([self._entry(slot) for slot in self._live()])

    def add(self, directive: Directive, now: float, cycle: int = 0) -> None:
        self._append(directive, now, cycle, True)

    def add_many(self, directives: Iterable[Directive], now: float, cycle: int = 0) -> None:
        """``add`` of each of ``directives``."""
        append = self._append
        for directive in directives:
            append(directive, now, cycle, True)

    def settle(self, outcome: Outcome) -> Entry | None:
        """Record an outcome; returns the entry it concerned, or None if unknown (expired) or
        answered already (a directive sent again is answered again). A refused or failed
        directive leaves the ledger; an applied one stays until ``observe`` sees its effect."""
        directive_id = outcome.directive_id
        slot = self._slot_of(directive_id)
        if slot is None:
            return None
        chunk = self._chunks.get(slot >> CHUNK_BITS)
        i = slot & _LOW
        if chunk is None or chunk.state[i] != _PENDING:
            return None
        applied = outcome.status is OutcomeStatus.APPLIED
        entry = _new_entry(
            Entry, (self, chunk, i, directive_id, chunk.sent[i], applied, chunk.cycles[i])
        )
        if not applied:
            self._kill(slot, note=True)
            return entry
        chunk.state[i] = _APPLIED
        version = outcome.inventory_version
        worker = self._worker_ids[chunk.workers[i]]
        slots = self._applied.get(worker)
        versions = self._versions.get(worker)
        if slots is None or versions is None:
            slots = self._applied[worker] = array("q")
            versions = self._versions[worker] = array("q")
        elif versions and version < versions[-1]:
            self._unsorted.add(worker)
        slots.append(slot)
        versions.append(version)
        return entry

    def observe(self, versions: Callable[[WorkerId], int | None]) -> None:
        """Settle the applied directives whose effect the cluster view shows: ``versions``
        gives each worker's inventory version in the view (None: not known)."""
        for _ in self.observing(versions):
            pass

    def observing(
        self, versions: Callable[[WorkerId], int | None], step: int = 5_000
    ) -> Iterator[None]:
        """``observe`` in steps of ``step`` entries, yielding in between (a big cycle has
        hundreds of thousands applied at once).

        Per worker, only the applied entries at or below the version seen are visited; entries
        that left the ledger meanwhile (expired, or settled by an observation under way) are
        skipped."""
        applied_now = self._applied_now
        for worker in list(self._applied):
            seen = versions(worker)
            applied = self._applied.get(worker)
            answered = self._versions.get(worker)
            if seen is None or applied is None or answered is None:
                continue
            if worker in self._unsorted:
                # Settled in steps too, not sorted first: sorting 75k entries in one go held
                # the AMM's loop for 25-33 ms. What is left stays unsorted (few entries).
                n = len(applied)
                kept = array("q")
                kept_versions = array("q")
                for start in range(0, n, step):
                    for i in range(start, min(n, start + step)):
                        slot, version = applied[i], answered[i]
                        if version > seen:
                            kept.append(slot)
                            kept_versions.append(version)
                        elif applied_now(slot):
                            self._remove(slot)
                    yield
                applied[:n] = kept  # answers that arrived meanwhile were appended
                answered[:n] = kept_versions
                if not applied and self._applied.get(worker) is applied:
                    del self._applied[worker]
                    self._versions.pop(worker, None)
                    self._unsorted.discard(worker)
                continue
            done = bisect.bisect_right(answered, seen)
            for start in range(0, done, step):
                for slot in applied[start : min(done, start + step)]:
                    if applied_now(slot):
                        self._remove(slot)
                yield
            # Settled: what came after stays (answers that arrived meanwhile were appended).
            del applied[:done]
            del answered[:done]
            if not applied and self._applied.get(worker) is applied:
                del self._applied[worker]
                self._versions.pop(worker, None)
                self._unsorted.discard(worker)

    def forget_worker(self, worker: WorkerId) -> list[Entry]:
        """Drop every entry sent to ``worker`` (it unregistered or restarted)."""
        gone: list[Entry] = []
        index = self._worker_index.get(worker)
        if index is not None and self._live_of[index]:
            slots = [s for s in self._live() if self._worker_at(s) == index]
            gone = [self._entry(s) for s in slots]
            for slot in slots:
                self._remove(slot)
        self._applied.pop(worker, None)
        self._versions.pop(worker, None)
        self._unsorted.discard(worker)
        return gone

    def forget_copies(self, gone: Callable[[WorkerId], bool]) -> list[Entry]:
        """Remove and return the applied REPLICATEs, not yet seen by a poll, of workers that
        are ``gone`` (see the module doc, 5). Counting fewer copies than exist costs at worst
        a copy made again; counting one that is gone lets a drop go ahead in its place."""
        settled: list[int] = []
        chunks = self._chunks
        for worker in [w for w in self._applied if gone(w)]:
            for slot in self._applied.get(worker, ()):
                chunk = chunks.get(slot >> CHUNK_BITS)
                i = slot & _LOW
                if chunk is not None and chunk.state[i] == _APPLIED and not chunk.ops[i]:
                    settled.append(slot)
        entries = [self._entry(slot) for slot in settled]
        for slot in settled:
            self._remove(slot)  # skipped in ``_applied`` from now on
        return entries

    def expire(
        self,
        now: float,
        timeout: float,
        answering: Callable[[WorkerId], bool] = lambda worker: False,
    ) -> list[Entry]:
        """Remove and return the entries older than ``timeout`` whose worker is not
        ``answering``; the others stay (see ``overdue``).

        Applied entries whose effect no poll has shown yet are expired too: the worker stopped
        answering polls, so the view cannot be trusted to catch up.
        """
        verdicts: dict[int, bool] = {}  # asked once per worker, not once per entry
        old: list[int] = []
        for slot in self._older(now, timeout):
            index = self._worker_at(slot)
            ok = verdicts.get(index)
            if ok is None:
                ok = verdicts[index] = answering(self._worker_ids[index])
            if not ok:
                old.append(slot)
        entries = [self._entry(slot) for slot in old]
        for slot in old:
            self._remove(slot)
        return entries

    def overdue(self, now: float, timeout: float) -> list[Directive]:
        """The unanswered directives older than ``timeout`` (their workers are answering), to
        be sent again under the same id; their clocks start over."""
        late = [s for s in self._older(now, timeout) if self._state_at(s) == _PENDING]
        directives = []
        for slot in late:  # to the end: the oldest stay first
            chunk = self._chunks[slot >> CHUNK_BITS]
            cycle = chunk.cycles[slot & _LOW]
            directive = self._directive(slot)
            directives.append(directive)
            self._kill(slot, note=False)
            self._append(directive, now, cycle, False)
        return directives

    def _older(self, now: float, timeout: float) -> list[int]:
        """The slots of entries sent more than ``timeout`` ago: the first ones, as slots are in
        the order their directives were (last) sent."""
        old: list[int] = []
        for number, chunk in list(self._chunks.items()):
            state, sent = chunk.state, chunk.sent
            first = number << CHUNK_BITS
            for i in range(len(state)):
                if state[i]:
                    if now - sent[i] <= timeout:
                        return old
                    old.append(first + i)
        return old

    def in_flight(self, key: Key) -> InFlight:
        code = self._by_key.get(key)
        if code is None:
            return _NONE
        chunks, ids = self._chunks, self._worker_ids
        if isinstance(code, int) and code & _RUN_MAX == 1:
            slot = code >> _RUN_BITS
            chunk = chunks[slot >> CHUNK_BITS]
            i = slot & _LOW
            one = frozenset((ids[chunk.workers[i]],))
            return InFlight(_NOBODY, one) if chunk.ops[i] else InFlight(one, _NOBODY)
        repl: list[WorkerId] = []
        drop: list[WorkerId] = []
        for slot in _decode(code):
            chunk = chunks[slot >> CHUNK_BITS]
            i = slot & _LOW
            (drop if chunk.ops[i] else repl).append(ids[chunk.workers[i]])
        return InFlight(frozenset(repl), frozenset(drop))

    def count(self, key: Key) -> int:
        """How many directives of ``key`` are in flight."""
        code = self._by_key.get(key)
        if code is None:
            return 0
        if isinstance(code, int):
            return code & _RUN_MAX
        return sum(c & _RUN_MAX for c in code)

    def workers(self) -> set[WorkerId]:
        """The workers with a directive in flight."""
        return {self._worker_ids[i] for i, n in enumerate(self._live_of) if n}

    def busy(self, worker: WorkerId) -> bool:
        """Whether ``worker`` has a directive in flight."""
        index = self._worker_index.get(worker)
        return index is not None and self._live_of[index] > 0

    def changed_since(self, uid: int, position: int) -> set[Key] | None:
        """The keys ``journal`` noted since ``position`` (None: not known, see ``Journal``)."""
        return self.journal.since(uid, position)

    def noted_since(self, uid: int, position: int) -> list[Key] | None:
        """``changed_since`` as ``journal`` noted it, in order and with repeats (cheap)."""
        return self.journal.noted(uid, position)

    @property
    def feed(self) -> tuple[int, int]:
        """``(uid, position)`` of ``journal`` now, to hand back to ``changed_since`` later."""
        return self.journal.uid, self.journal.position

    def directives(self) -> Iterator[Directive]:
        """Every directive in flight, for the core's memory estimates: built one at a time, of
        those in flight now that are still in flight when reached (the ledger may change while
        the caller iterates)."""
        return self._directives(self._live())

    def _directives(self, slots: array[int]) -> Iterator[Directive]:
        for slot in slots:
            if self._state_at(slot):
                yield self._directive(slot)

    # The columns.

    def _live(self) -> array[int]:
        """The slots in flight, in order."""
        live = array("q")
        for number, chunk in self._chunks.items():
            first, state = number << CHUNK_BITS, chunk.state
            live.extend(first + i for i in range(len(state)) if state[i])
        return live

    def _state_at(self, slot: int) -> int:
        chunk = self._chunks.get(slot >> CHUNK_BITS)
        return _GONE if chunk is None else chunk.state[slot & _LOW]

    def _applied_now(self, slot: int) -> bool:
        return self._state_at(slot) == _APPLIED

    def _worker_at(self, slot: int) -> int:
        return self._chunks[slot >> CHUNK_BITS].workers[slot & _LOW]

    def _find(self, directive_id: str) -> int | None:
        """The slot of ``directive_id`` if it is in flight."""
        slot = self._slot_of(directive_id)
        return slot if slot is not None and self._state_at(slot) else None

    def _slot_of(self, directive_id: str) -> int | None:
        """The slot ``directive_id`` was last given (in flight or not), if any is known."""
        slot = self._moved.get(directive_id) if self._moved else None
        if slot is not None:
            return slot
        split = split_id(directive_id)
        if split is None:
            return None
        runs = self._runs.get(split[0])
        if runs is None:
            return None
        seq = split[1]
        starts = runs.seq
        at = len(starts) - 1
        if at < 0:
            return None
        if seq < starts[at]:  # not on the last run (most answers are)
            at = bisect.bisect_right(starts, seq) - 1
            if at < 0:
                return None
        offset = seq - starts[at]
        if offset >= runs.length[at]:
            return None
        return runs.slot[at] + offset

    def _id(self, slot: int) -> str:
        chunk = self._chunks[slot >> CHUNK_BITS]
        i = slot & _LOW
        seq = chunk.seqs[i]
        if seq < 0:
            return self._whole[slot]
        return self._prefixes[chunk.shapes[i]][0] + str(seq)

    def _directive(self, slot: int, directive_id: str | None = None) -> Directive:
        chunk = self._chunks[slot >> CHUNK_BITS]
        i = slot & _LOW
        if directive_id is None:
            directive_id = self._id(slot)
        return self.build(chunk, i, directive_id)

    def build(self, chunk: _Chunk, i: int, directive_id: str | None) -> Directive:
        """The directive of slot ``i`` of ``chunk`` (``directive_id`` None: it has a number);
        for ``Entry``."""
        drop = chunk.ops[i]
        peers = chunk.peers[i]
        policy, reason = chunk.notes[i]
        prefix, epoch = self._prefixes[chunk.shapes[i]]
        return _new_directive(
            Directive,
            (
                prefix + str(chunk.seqs[i]) if directive_id is None else directive_id,
                epoch,
                Op.DROP if drop else Op.REPLICATE,
                chunk.keys[i],
                self._worker_ids[chunk.workers[i]],
                chunk.sizes[i],
                chunk.checksums[i],
                () if drop else peers,
                peers if drop else (),
                policy,
                reason,
            ),
        )

    def _entry(self, slot: int, directive_id: str | None = None) -> Entry:
        chunk = self._chunks[slot >> CHUNK_BITS]
        i = slot & _LOW
        if directive_id is None and chunk.seqs[i] < 0:
            directive_id = self._whole[slot]  # dropped when the directive leaves
        return _new_entry(
            Entry,
            (
                self,
                chunk,
                i,
                directive_id,
                chunk.sent[i],
                chunk.state[i] == _APPLIED,
                chunk.cycles[i],
            ),
        )

    def _append(self, directive: Directive, now: float, cycle: int, fresh: bool) -> None:
        """Put ``directive`` in a new slot; ``fresh``: newly sent (not sent again)."""
        directive_id = directive.id
        split = split_id(directive_id)
        runs = None
        if split is not None:
            prefix, seq = split
            runs = self._runs.get(prefix)
            if runs is None:
                runs = self._runs[prefix] = _Runs()
            elif seq < runs.end:
                runs = None  # not after every id of its prefix: looked up in ``_moved``
        else:
            prefix, seq = "", -1
        if fresh and runs is None:
            old = self._find(directive_id)  # entered again under the same id: replaces it
            if old is not None:
                self._remove(old)
        slot = self._next
        self._next = slot + 1
        number = slot >> CHUNK_BITS
        chunk = self._chunks.get(number)
        if chunk is None:
            chunk = self._chunks[number] = _Chunk()
        epoch = directive.epoch
        last = self._last_shape
        if last[0] is prefix and last[1] == epoch:
            shape = last[2]
        else:
            shape_key = (prefix, epoch)
            found = self._prefix_index.get(shape_key)
            if found is None:
                found = self._prefix_index[shape_key] = len(self._prefixes)
                self._prefixes.append(shape_key)
            shape = found
            self._last_shape = (prefix, epoch, shape)
        worker = directive.worker
        index = self._worker_index.get(worker)
        if index is None:
            index = self._worker_index[worker] = len(self._worker_ids)
            self._worker_ids.append(worker)
            self._live_of.append(0)
        policy, reason = directive.policy, directive.reason
        shared = self._last_notes
        if shared[0] is not policy or shared[1] is not reason:
            notes = (policy, reason)
            shared = self._notes.get(notes) or notes
            if shared is notes:
                if len(self._notes) >= _NOTES_CACHED:
                    self._notes.clear()
                self._notes[notes] = notes
            self._last_notes = shared
        drop = directive.op is Op.DROP
        chunk.state.append(_PENDING)
        chunk.ops.append(drop)
        key = directive.key
        chunk.keys.append(key)
        chunk.workers.append(index)
        chunk.sizes.append(directive.size)
        chunk.checksums.append(directive.checksum)
        chunk.peers.append(directive.holders if drop else directive.sources)
        chunk.notes.append(shared)
        chunk.shapes.append(shape)
        chunk.seqs.append(seq)
        chunk.sent.append(now)
        chunk.cycles.append(cycle)
        chunk.live += 1
        self._live_of[index] += 1
        self._count += 1
        if split is None:
            self._whole[slot] = directive_id
            self._moved[directive_id] = slot
        elif runs is None or not fresh:
            self._moved[directive_id] = slot
        else:  # on its prefix's runs
            n = len(runs.seq) - 1
            if n >= 0 and seq == runs.end and slot == runs.slot[n] + runs.length[n]:
                runs.length[n] += 1
            else:
                runs.seq.append(seq)
                runs.slot.append(slot)
                runs.length.append(1)
            runs.end = seq + 1
        if self._count > self.journal.limit // 2:  # room for the removals of all of them
            self.journal.limit = 2 * self._count
        if fresh and not drop:
            self.journal.note(key)
        by_key = self._by_key
        code = by_key.get(key)
        if code is None:
            by_key[key] = slot << _RUN_BITS | 1
            if len(by_key) > self._keys_peak:
                self._keys_peak = len(by_key)
        else:
            last_code = code if isinstance(code, int) else code[-1]
            n = last_code & _RUN_MAX
            if n < _RUN_MAX and slot == (last_code >> _RUN_BITS) + n:
                last_code += 1
                by_key[key] = last_code if isinstance(code, int) else (*code[:-1], last_code)
            else:
                new = slot << _RUN_BITS | 1
                by_key[key] = (code, new) if isinstance(code, int) else (*code, new)

    def _remove(self, slot: int) -> None:
        """Take ``slot`` out of the ledger (applied ones stay in ``_applied`` until
        ``observing`` or ``forget_worker`` passes them: they are skipped there)."""
        if self._state_at(slot):
            self._kill(slot, note=True)

    def _kill(self, slot: int, note: bool) -> None:
        number = slot >> CHUNK_BITS
        chunk = self._chunks[number]
        i = slot & _LOW
        chunk.state[i] = _GONE
        chunk.live -= 1
        self._live_of[chunk.workers[i]] -= 1
        self._count -= 1
        key = chunk.keys[i]
        if note:
            self.journal.note(key)
        code = self._by_key.get(key)
        if code is not None:
            if code == slot << _RUN_BITS | 1:
                del self._by_key[key]
                if len(self._by_key) * 4 < self._keys_peak and self._keys_peak > 1_024:
                    # A dict never shrinks by deletions: the 100k keys of a big cycle would
                    # keep their table (~4 MiB) once all settled.
                    self._by_key = dict(self._by_key)
                    self._keys_peak = len(self._by_key)
            elif isinstance(code, int) and slot == code >> _RUN_BITS:  # the first of a run
                self._by_key[key] = code + (1 << _RUN_BITS) - 1
            elif isinstance(code, int) and slot == (code >> _RUN_BITS) + (code & _RUN_MAX) - 1:
                self._by_key[key] = code - 1  # the last of a run
            else:
                rest = _encode(s for s in _decode(code) if s != slot)
                if rest is None:
                    del self._by_key[key]
                else:
                    self._by_key[key] = rest
        if self._moved:
            whole = self._whole.pop(slot, None)
            directive_id = whole if whole is not None else self._id(slot)
            if self._moved.get(directive_id) == slot:
                del self._moved[directive_id]
        if chunk.live == 0:
            del self._chunks[number]
            if number == (self._next - 1) >> CHUNK_BITS:  # the last: new slots start a new one
                self._next = (number + 1) << CHUNK_BITS
            self._prune()

    def _prune(self) -> None:
        """Forget the runs wholly before the first chunk left (their slots are all gone)."""
        first = self._next if not self._chunks else next(iter(self._chunks)) << CHUNK_BITS
        for runs in self._runs.values():
            drop = 0
            while drop < len(runs.seq) and runs.slot[drop] + runs.length[drop] <= first:
                drop += 1
            if drop:
                del runs.seq[:drop]
                del runs.slot[:drop]
                del runs.length[:drop]

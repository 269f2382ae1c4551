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
5. it is an applied DROP that the cluster view shows already (``drops_shown``: the outcome
   said when the key was gone, and ``ClusterState.apply_drops`` took it in, or a poll did; a
   batch of outcomes, ``settle_many``, never lists such a drop for the poll at all), or
6. it is a copy applied on a worker that is gone before a poll showed it (``forget_copies``):
   it failed a poll and its directive stream broke (a SIGKILLed agent). Counted in flight until
   the worker was dropped, such a copy kept the key from being copied again, and let
   ReduceReplicas drop a real replica in its place. Only copies: an applied DROP stays until a
   poll, the view taking it in (5) or the worker's removal, since its worker is still listed as
   a holder and would count as a copy again.

Settling a drop the view shows is safe only where nobody reads the ledger with an older view: a
cycle plans (and supervises retirements) on the snapshot it took, which may still list the
holder. While a cycle's snapshot is in use (``viewing`` to ``viewed``), that cycle's own drops
leave the ledger but go on counting as dropping in ``in_flight`` and ``count`` (``_masked``, a
key and a worker, not the directive and its entry: 300k drops of a big cycle are applied while
it still plans), and the drops of other cycles wait for ``viewed``.

A directive is never planned again while its worker may still hold it: re-planning it would send
a second directive with a new id for the same work, and at scale (hundreds of thousands of
directives queued on agents) those re-sends were most of the traffic. A worker that answers polls
and keeps its stream open answers every directive in the end (its transfers and promises have
deadlines, and a broken stream fails what it left unanswered at once); one whose directive is
overdue is sent the same directive again (``overdue``): the agent answers a repeated id with the
outcome it gave, or waits for the run under way, so that costs one message, never the work twice.

The core reads the ledger through ``InFlight`` to count pending replicas and drops. Pure: the
caller supplies the clock.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.journal import Journal
from amm_service.decisions.view import Key, WorkerId

#: The members read once: ``Op.REPLICATE`` is a lookup through ``EnumType`` (ten times a plain
#: class attribute on Python 3.11), read for every directive entered or key looked up.
_DROP, _REPLICATE = Op.DROP, Op.REPLICATE
_APPLIED = OutcomeStatus.APPLIED
_ID, _OP, _KEY = attrgetter("id"), attrgetter("op"), attrgetter("key")
"""A directive's fields, read through ``map``: no Python step per directive."""


@dataclass(slots=True)
class Entry:
    """A directive in flight: sent at ``sent_at``; ``applied`` once the agent applied it (the
    inventory version it answered with is kept in the ledger's ``_applied``). Only the ledger
    changes it."""

    directive: Directive
    sent_at: float
    applied: bool = False
    cycle: int = 0
    """The number of the cycle that sent it (0: none known)."""


@dataclass(frozen=True, slots=True)
class InFlight:
    """Pending replications and drops of one key: the workers concerned."""

    replicating: frozenset[WorkerId] = frozenset()
    dropping: frozenset[WorkerId] = frozenset()


_NONE = InFlight()
_NOBODY: frozenset[WorkerId] = frozenset()


class Ledger:
    """Directives sent and not yet settled, indexed by id and by key."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._by_key: dict[Key, Entry | tuple[Entry, ...]] = {}
        """A key's entries: one entry, or a tuple of them (most keys have one or a few: a dict per
        key cost 230 bytes each, for 100k keys in a big cycle, and a list of three 120, a tuple
        64; a tuple is rebuilt on each change, which costs little for a few entries)."""
        self._applied: dict[WorkerId, list[Entry]] = {}
        """Per worker, the entries applied, in the order they were answered: nearly always in
        inventory version order (``_unsorted`` names those that are not), so ``observing``
        settles a prefix instead of checking every applied entry each cycle. (The entries
        themselves, not (version, id) pairs: a pair cost 64 bytes more per directive.)"""
        self._versions: dict[WorkerId, array[int]] = {}
        """Per worker, the inventory version each entry of ``_applied`` was answered with, in
        the same order: 8 bytes each in an array, where the int of each outcome kept in its
        entry cost 32 (300k drops are applied before a poll shows them)."""
        self._unsorted: set[WorkerId] = set()
        self._stale: dict[WorkerId, int] = {}
        """Per worker, how many entries of ``_applied`` ``drops_shown`` settled since its list
        was last rebuilt: it is rebuilt once they are half of it, so that settled entries do not
        stay there till the next poll."""
        self._viewing: int | None = None
        """The cycle planning on a snapshot now (``viewing``), None between cycles."""
        self._masked: dict[Key, tuple[WorkerId, ...]] = {}
        """The workers of the ``_viewing`` cycle's drops settled by ``drops_shown`` while its
        snapshot is in use: still dropping for ``in_flight`` and ``count`` until ``viewed``."""
        self._shared: dict[tuple[WorkerId, ...], tuple[WorkerId, ...]] = {}
        """One tuple for equal ``_masked`` values (a few distinct ones for all keys)."""
        self._deferred: list[Entry] = []
        """Applied drops of other cycles the view showed while a snapshot is in use: settled
        at ``viewed``."""
        self._deferred_unlisted: list[Entry] = []
        """The same, of those ``settle_many`` held (not in ``_applied``)."""
        self.journal: Journal[Key] = Journal()
        """The keys whose work in flight may ask more of a policy than it did: an entry left
        the ledger (settled, refused, failed, expired, its worker gone), or a replication was
        added. A drop added is not noted: it only lessens what is left to do for its key."""

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, directive_id: object) -> bool:
        return directive_id in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def add(self, directive: Directive, now: float, cycle: int = 0) -> None:
        self._put(Entry(directive, now, False, cycle))

    def add_many(self, directives: Sequence[Directive], now: float, cycle: int = 0) -> None:
        """``add`` of each of ``directives``, in order: a big cycle enters 300,000, and one
        ``_put`` call each was a tenth of its sending."""
        entries, by_key = self._entries, self._by_key
        needed = len(entries) + len(directives)
        if needed > self.journal.limit // 2:  # as ``_put`` would have raised it by the end
            self.journal.limit = 2 * needed
        ids = list(map(_ID, directives))
        if not entries.keys().isdisjoint(ids) or len(set(ids)) < len(ids):
            for directive in directives:  # an id entered again replaces its entry (rare)
                self._put(Entry(directive, now, False, cycle))
            return
        made = list(map(Entry, directives, repeat(now), repeat(False), repeat(cycle)))
        entries.update(zip(ids, made, strict=True))
        ops = list(map(_OP, directives))
        keys = list(map(_KEY, directives))
        if _REPLICATE in ops:
            self.journal.extend(
                [key for key, op in zip(keys, ops, strict=True) if op is _REPLICATE]
            )
        get = by_key.get
        for key, entry in zip(keys, made, strict=True):
            of_key = get(key)
            if of_key is None:
                by_key[key] = entry
            elif isinstance(of_key, Entry):
                by_key[key] = (of_key, entry)
            else:
                by_key[key] = (*of_key, entry)

    def settle(self, outcome: Outcome) -> Entry | None:
        """Record an outcome; returns the entry it concerned, or None if unknown (expired) or
        answered already (a directive sent again is answered again). A refused or failed
        directive leaves the ledger; an applied one stays until ``observe`` sees its effect."""
        entry = self._entries.get(outcome.directive_id)
        if entry is None or entry.applied:
            return None
        if outcome.status is _APPLIED:
            entry.applied = True
            self._list_applied(entry, outcome.inventory_version)
        else:
            self._remove(entry)
        return entry

    def settle_many(
        self, outcomes: Iterable[Outcome], held: list[tuple[Entry, Outcome]] | None = None
    ) -> list[tuple[Entry, Outcome]]:
        """``settle`` of each of ``outcomes``, in one pass: the entries settled, each with its
        outcome, in order.

        With ``held``, an applied DROP whose outcome says at which version its key was gone
        (``dropped_version``, for an ``incarnation``) is marked applied but not listed among the
        entries a poll settles: it goes to ``held``, and the caller hands each back, before
        anything else reads the ledger, to ``drops_shown(..., listed=False)`` once the view
        shows it (``ClusterState.apply_drops``), else to ``list_applied``. The view shows nearly
        all of a big cycle's at once: listed, they were unlisted again right after
        (``_compact``), 300,000 times."""
        live, remove, listed = self._entries, self._remove, self._list_applied
        settled: list[tuple[Entry, Outcome]] = []
        append = settled.append
        for outcome in outcomes:
            entry = live.get(outcome.directive_id)
            if entry is None or entry.applied:
                continue
            append((entry, outcome))
            if outcome.status is not _APPLIED:
                remove(entry)
                continue
            entry.applied = True
            if (
                held is not None
                and outcome.dropped_version
                and outcome.incarnation
                and entry.directive.op is _DROP
            ):
                held.append((entry, outcome))
            else:
                listed(entry, outcome.inventory_version)
        return settled

    def list_applied(self, held: Iterable[tuple[Entry, Outcome]]) -> None:
        """List the ``held`` entries of ``settle_many`` the view does not show (yet), to be
        settled by the poll that shows them, at their outcome's inventory version."""
        live, listed = self._entries, self._list_applied
        for entry, outcome in held:
            if live.get(entry.directive.id) is entry:
                listed(entry, outcome.inventory_version)

    def _list_applied(self, entry: Entry, version: int) -> None:
        """``entry`` applied at inventory ``version``: settled once a poll shows it."""
        worker = entry.directive.worker
        applied = self._applied.get(worker)
        versions = self._versions.get(worker)
        if applied is None or versions is None:
            applied = self._applied[worker] = []
            versions = self._versions[worker] = array("q")
        elif versions and version < versions[-1]:
            self._unsorted.add(worker)
        applied.append(entry)
        versions.append(version)

    def viewing(self, cycle: int) -> None:
        """Cycle ``cycle`` plans on a snapshot taken now, and reads the ledger with it until
        ``viewed`` (see the module doc)."""
        self._viewing = cycle

    def viewed(self) -> None:
        """The snapshot of ``viewing`` is no longer in use: the drops it still listed leave."""
        self._viewing = None
        self._masked, self._shared = {}, {}  # new dicts: a big cycle's are freed
        deferred, self._deferred = self._deferred, []
        unlisted, self._deferred_unlisted = self._deferred_unlisted, []
        self.drops_shown(deferred)
        self.drops_shown(unlisted, listed=False)
        # An empty dict keeps the table of its peak (10 MB after a big cycle's 300k entries):
        # new ones once empty. Here, as no ``observing`` is under way between cycles.
        if not self._entries:
            self._entries = {}
        if not self._by_key:
            self._by_key = {}

    def drops_shown(self, entries: Iterable[Entry], listed: bool = True) -> None:
        """Settle the applied DROPs of ``entries`` whose effect the cluster view shows now
        (``ClusterState.apply_drops``), rather than at the poll that shows it: at once between
        cycles; while a cycle's snapshot is in use, as the module doc says. Not ``listed``:
        entries ``settle_many`` held, not in ``_applied``."""
        live, viewing, stale = self._entries, self._viewing, self._stale
        deferred = self._deferred if listed else self._deferred_unlisted
        settled: list[Entry] = []
        touched: set[WorkerId] = set()
        if viewing is None and not listed:
            # Between cycles, entries held a moment ago (nearly all of a big cycle's drops):
            # settled as they are, nothing to mask, defer or unlist (``_remove_many`` skips
            # those that left the ledger meanwhile).
            self._remove_many(entries if isinstance(entries, list) else list(entries))
            return
        if not listed:
            # While a cycle's snapshot is in use (most of a big cycle's drops are applied while
            # it still plans and sends): nothing to unlist, so no count per worker.
            masked_of, shared = self._masked, self._shared
            for entry in entries:
                directive = entry.directive
                if live.get(directive.id) is not entry or not entry.applied:
                    continue
                if entry.cycle != viewing or directive.op is not _DROP:
                    if directive.op is _DROP:
                        deferred.append(entry)
                    continue
                key = directive.key
                masked = (*masked_of.get(key, ()), directive.worker)
                masked_of[key] = shared.setdefault(masked, masked)
                settled.append(entry)
            self._remove_many(settled)
            return
        for entry in entries:
            directive = entry.directive
            if (
                not entry.applied
                or directive.op is not _DROP
                or live.get(directive.id) is not entry
            ):
                continue
            if viewing is not None and entry.cycle != viewing:
                deferred.append(entry)
                continue
            settled.append(entry)
            worker = directive.worker
            if viewing is not None:
                masked = (*self._masked.get(directive.key, ()), worker)
                self._masked[directive.key] = self._shared.setdefault(masked, masked)
            if listed:
                stale[worker] = stale.get(worker, 0) + 1
                touched.add(worker)
        self._remove_many(settled)
        for worker in touched:
            self._compact(worker)

    def _compact(self, worker: WorkerId) -> None:
        """Rebuild ``worker``'s applied entries without the settled ones once they are half of
        them. New lists: an ``observing`` under way goes on with the old ones (what it settles
        in the new ones is skipped there later, as any entry that left the ledger)."""
        applied, versions = self._applied.get(worker), self._versions.get(worker)
        if applied is None or versions is None:
            self._stale.pop(worker, None)
            return
        if 2 * self._stale.get(worker, 0) < len(applied):
            return
        self._stale.pop(worker, None)
        live = self._entries
        kept = [i for i, entry in enumerate(applied) if live.get(entry.directive.id) is entry]
        if kept:
            self._applied[worker] = [applied[i] for i in kept]
            self._versions[worker] = array("q", [versions[i] for i in kept])
        else:
            del self._applied[worker], self._versions[worker]
            self._unsorted.discard(worker)

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
        entries = self._entries
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
                kept: list[Entry] = []
                kept_versions = array("q")
                for start in range(0, n, step):
                    for i in range(start, min(n, start + step)):
                        entry, version = applied[i], answered[i]
                        if version > seen:
                            kept.append(entry)
                            kept_versions.append(version)
                        elif entries.get(entry.directive.id) is entry:
                            self._remove(entry)
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
                self._remove_many(applied[start : min(done, start + step)])
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
        gone = [e for e in self._entries.values() if e.directive.worker == worker]
        for entry in gone:
            self._remove(entry)
        self._applied.pop(worker, None)
        self._versions.pop(worker, None)
        self._unsorted.discard(worker)
        self._stale.pop(worker, None)
        for key, workers in list(self._masked.items()):
            if worker in workers:
                rest = tuple(w for w in workers if w != worker)
                if rest:
                    self._masked[key] = rest
                else:
                    del self._masked[key]
        return gone

    def forget_copies(self, gone: Callable[[WorkerId], bool]) -> list[Entry]:
        """Remove and return the applied REPLICATEs, not yet seen by a poll, of workers that
        are ``gone`` (see the module doc, 5). Counting fewer copies than exist costs at worst
        a copy made again; counting one that is gone lets a drop go ahead in its place."""
        settled = []
        entries = self._entries
        for worker in [w for w in self._applied if gone(w)]:
            for entry in self._applied.get(worker, ()):
                if entry.directive.op is _REPLICATE and entries.get(entry.directive.id) is entry:
                    settled.append(entry)
        for entry in settled:
            self._remove(entry)  # skipped in ``_applied`` from now on (see ``_remove``)
        return settled

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
        verdicts: dict[WorkerId, bool] = {}  # asked once per worker, not once per entry
        old = []
        for entry in self._older(now, timeout):
            worker = entry.directive.worker
            ok = verdicts.get(worker)
            if ok is None:
                ok = verdicts[worker] = answering(worker)
            if not ok:
                old.append(entry)
        for entry in old:
            self._remove(entry)
        return old

    def overdue(self, now: float, timeout: float) -> list[Directive]:
        """The unanswered directives older than ``timeout`` (their workers are answering), to
        be sent again under the same id; their clocks start over."""
        late = [e for e in self._older(now, timeout) if not e.applied]
        for entry in late:
            entry.sent_at = now
            del self._entries[entry.directive.id]  # to the end: the oldest stay first
            self._entries[entry.directive.id] = entry
        return [e.directive for e in late]

    def _older(self, now: float, timeout: float) -> list[Entry]:
        """The entries sent more than ``timeout`` ago: the first ones, as ``_entries`` is kept
        in the order they were (last) sent."""
        old = []
        for entry in self._entries.values():
            if now - entry.sent_at <= timeout:
                break
            old.append(entry)
        return old

    def in_flight(self, key: Key) -> InFlight:
        if self._masked:
            masked = self._masked.get(key)
            if masked is not None:
                base = self._in_flight(key)
                return InFlight(base.replicating, base.dropping.union(masked))
        if key not in self._by_key:  # most keys a policy looks at: no call for them
            return _NONE
        return self._in_flight(key)

    def _in_flight(self, key: Key) -> InFlight:
        entries = self._by_key.get(key)
        if entries is None:
            return _NONE
        if isinstance(entries, Entry):
            d = entries.directive
            one = frozenset((d.worker,))
            return InFlight(one, _NOBODY) if d.op is _REPLICATE else InFlight(_NOBODY, one)
        repl = [e.directive.worker for e in entries if e.directive.op is _REPLICATE]
        drop = [e.directive.worker for e in entries if e.directive.op is _DROP]
        return InFlight(frozenset(repl), frozenset(drop))

    def count(self, key: Key) -> int:
        """How many directives of ``key`` are in flight."""
        masked = len(self._masked.get(key, ())) if self._masked else 0
        entries = self._by_key.get(key)
        if entries is None:
            return masked
        return masked + (1 if isinstance(entries, Entry) else len(entries))

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
        """Every directive in flight, for the core's memory estimates."""
        return (e.directive for e in self._entries.values())

    def _put(self, entry: Entry) -> None:
        directive = entry.directive
        entries = self._entries
        stale = entries.get(directive.id)
        if stale is not None:  # an id entered again replaces its entry, in every map
            self._remove(stale)
        entries[directive.id] = entry
        if len(entries) > self.journal.limit // 2:  # room for the removals of all of them
            self.journal.limit = 2 * len(entries)
        key = directive.key
        if directive.op is _REPLICATE:
            self.journal.note(key)
        of_key = self._by_key.get(key)
        if of_key is None:
            self._by_key[key] = entry
        elif isinstance(of_key, Entry):
            self._by_key[key] = (of_key, entry)
        else:
            self._by_key[key] = (*of_key, entry)

    def _remove_many(self, run: list[Entry]) -> None:
        """``_remove`` of each of ``run`` still in the ledger (a big cycle's observation settles
        300,000 applied entries: a call and a note each were a quarter of it)."""
        entries, by_key, keys = self._entries, self._by_key, []
        for entry in run:
            directive = entry.directive
            if entries.get(directive.id) is not entry:
                continue  # it left the ledger meanwhile (expired), or was entered again
            del entries[directive.id]
            key = directive.key
            keys.append(key)
            of_key = by_key.get(key)
            if of_key is entry:
                del by_key[key]
            elif isinstance(of_key, tuple):
                if len(of_key) == 2 and of_key[0] is entry:  # a key's last two drops, in order
                    by_key[key] = of_key[1]
                    continue
                rest = tuple([e for e in of_key if e is not entry])
                by_key[key] = rest[0] if len(rest) == 1 else rest
        self.journal.extend(keys)

    def _remove(self, entry: Entry) -> None:
        """Take ``entry`` out of the ledger (applied ones stay in ``_applied`` until
        ``observing`` or ``forget_worker`` passes them: they are skipped there)."""
        directive = entry.directive
        if self._entries.pop(directive.id, None) is None:
            return
        key = directive.key
        self.journal.note(key)
        of_key = self._by_key.get(key)
        if of_key is entry:
            del self._by_key[key]
        elif isinstance(of_key, tuple):
            rest = tuple(e for e in of_key if e is not entry)
            self._by_key[key] = rest[0] if len(rest) == 1 else rest

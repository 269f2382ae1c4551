"""The AMM's model of the cluster: who holds which key, and each worker's memory and status.

``ClusterState`` is the one mutable copy, fed by the poller with each agent's inventory changes
and by the outcomes of applied drops (``apply_drops``).
``ClusterView`` is the frozen snapshot a cycle plans on; policies and the core see only views.
Records are immutable and replaced on change, so a snapshot is a shallow copy of two dicts and a
set, cheap even with a million keys. No I/O here.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, NamedTuple, NewType

from amm_service.decisions.journal import MIN_LIMIT, Journal

Key = NewType("Key", str)
WorkerId = NewType("WorkerId", str)
Measure = Literal["process", "managed", "optimistic"]
MEASURES: tuple[Measure, ...] = ("process", "managed", "optimistic")


class WorkerStatus(enum.Enum):
    """A worker's status as the AMM sees it; only RUNNING workers receive new replicas.

    Agents report RUNNING, PAUSED or CLOSING; RETIRING, RETIRED and STALE are the AMM's own
    verdicts and override what the agent reports (see ``WorkerView.effective_status``).
    """

    UNKNOWN = "unknown"
    RUNNING = "running"
    PAUSED = "paused"
    CLOSING = "closing"
    RETIRING = "retiring"
    RETIRED = "retired"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Memory:
    """A worker's memory report, in bytes."""

    process: int = 0
    managed: int = 0
    unmanaged_old: int = 0
    optimistic: int = 0
    limit: int = 0

    def by(self, measure: Measure) -> int:
        if measure == "process":
            return self.process
        if measure == "managed":
            return self.managed
        return self.optimistic


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One registered worker."""

    address: WorkerId
    name: str
    status: WorkerStatus = WorkerStatus.UNKNOWN
    memory: Memory = field(default_factory=Memory)
    nkeys: int = 0
    registered_at: float = 0.0
    last_poll: float | None = None
    incarnation: str = ""
    version: int = 0
    missed_polls: int = 0
    zone: str = ""
    """Its failure domain; empty when it declared none."""
    retiring: bool = False
    """Set by the AMM while it retires the worker."""
    retired: bool = False
    """Set by the AMM once the worker is retired."""
    stale: bool = False
    """Set by the AMM once the worker has not answered polls for ``stale-after``."""
    status_since: float = 0.0
    """When ``effective_status`` last changed (wall clock)."""
    features: frozenset[str] = frozenset()
    """The optional parts of the contract its agent serves (``PollResponse.features``)."""

    @property
    def effective_status(self) -> WorkerStatus:
        """The AMM's verdict (retired, retiring, stale) over the status the agent reported."""
        if self.retired:
            return WorkerStatus.RETIRED
        if self.retiring:
            return WorkerStatus.RETIRING
        if self.stale:
            return WorkerStatus.STALE
        return self.status

    @property
    def confirmed(self) -> bool:
        """Whether its agent registered or answered a poll since this AMM started: a worker
        taken back from the state file has no incarnation until then, and may be long dead."""
        return bool(self.incarnation)

    @property
    def last_seen(self) -> float:
        """When it last answered a poll, or registered if it never did."""
        return self.last_poll if self.last_poll is not None else self.registered_at

    @property
    def reachable(self) -> bool:
        """False once it failed to answer a poll, until it answers again."""
        return self.missed_polls == 0 and not self.stale

    @property
    def accepts_replicas(self) -> bool:
        return self.effective_status is WorkerStatus.RUNNING and self.reachable

    @property
    def durable(self) -> bool:
        """Whether its copies can be counted on to stay: not closing, retiring or retired, and
        still answering."""
        return (
            self.status is not WorkerStatus.CLOSING
            and not self.retiring
            and not self.retired
            and self.reachable
        )

    @property
    def serves(self) -> bool:
        """Whether peers can fetch from it: answering and not shutting down."""
        return self.reachable and self.status is not WorkerStatus.CLOSING


class KeyView(NamedTuple):
    """One key: its size, checksum, holders and the holders where a reader pinned it.

    ``conflicting`` holders hold other content under the same key (keys are immutable per
    agent, but two agents can each be given different values): they are not replicas of
    ``checksum``, and nothing of the key is dropped or copied until an operator resolves it.

    A NamedTuple, not a frozen dataclass: the state makes one whenever a key's holders change
    (each of the 300k drops of a 100k-key cycle, as polls show them), and a tuple is built in
    half the time; it is as immutable.
    """

    key: Key
    size: int
    checksum: str
    holders: frozenset[WorkerId]
    pinned_on: frozenset[WorkerId] = frozenset()
    conflicting: frozenset[WorkerId] = frozenset()


class KeyReport(NamedTuple):
    """One key as an agent reports it (a NamedTuple: a poll brings up to 10,000 at a time)."""

    key: Key
    size: int
    checksum: str
    pinned: bool = False


Goal = int | None
"""A replication goal: copies to keep, or None for every worker (including future ones)."""

_NO_GOALS: Mapping[Key, Goal] = MappingProxyType({})
_NO_HOLDINGS: Mapping[WorkerId, frozenset[Key]] = MappingProxyType({})
_NO_KEYS: frozenset[Key] = frozenset()


class Holdings(Mapping[WorkerId, frozenset[Key]]):
    """The keys each worker holds, worked out from a snapshot's key records the first time
    anyone asks (one pass over the keys for every worker).

    Only a retirement and the Rebalance policy read them: frozen at every snapshot, they were a
    second copy of the state's holding sets (16 MiB for 100k keys x 4 holders) that most cycles
    never looked at. Read from the snapshot's own records, they are as frozen as the rest."""

    __slots__ = ("_keys", "_sets", "_workers")

    def __init__(self, keys: Mapping[Key, KeyView], workers: Iterable[WorkerId]) -> None:
        self._keys = keys
        self._workers = tuple(workers)
        self._sets: dict[WorkerId, frozenset[Key]] | None = None

    def _all(self) -> dict[WorkerId, frozenset[Key]]:
        sets = self._sets
        if sets is None:
            held: dict[WorkerId, list[Key]] = {w: [] for w in self._workers}
            for key, kv in self._keys.items():
                for worker in kv.holders:
                    of_worker = held.get(worker)
                    if of_worker is not None:
                        of_worker.append(key)
            sets = self._sets = {w: frozenset(keys) for w, keys in held.items()}
        return sets

    def __getitem__(self, worker: WorkerId) -> frozenset[Key]:
        return self._all()[worker]

    def __iter__(self) -> Iterator[WorkerId]:
        return iter(self._workers)

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker: object) -> bool:
        return worker in self._workers


def replicated(kv: KeyView) -> bool:
    """Whether a drop can concern ``kv``: two or more workers hold the same content."""
    return len(kv.holders) > 1 and not kv.conflicting


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A frozen snapshot of the cluster for one cycle."""

    workers: Mapping[WorkerId, WorkerView]
    keys: Mapping[Key, KeyView]
    goals: Mapping[Key, Goal] = field(default_factory=lambda: _NO_GOALS)
    """Tracked replication goals (the Replicate policy keeps them; ReduceReplicas respects them).
    May name keys that no worker holds any more."""
    holdings: Mapping[WorkerId, frozenset[Key]] = field(default_factory=lambda: _NO_HOLDINGS)
    """The keys each worker holds (the inverse of ``KeyView.holders``; a snapshot's are worked
    out when first read, see ``Holdings``)."""
    taken_at: float = 0.0
    """When the snapshot was taken (wall clock), for policies that reason about durations."""
    forgotten: frozenset[Key] = frozenset()
    """Keys an operator forgot (and nobody put again since): never copied, whatever a policy
    asks; copies of them still under way are discarded by the agents."""
    journal: Journal[Key] | None = field(default=None, compare=False, repr=False)
    """The state's journal of changed keys (None: not known), read up to ``position``."""
    position: int = field(default=0, compare=False, repr=False)

    def changed_since(self, uid: int, position: int) -> set[Key] | None:
        """The keys whose record changed between ``position`` of journal ``uid`` and this view
        (a view of the same state taken later), or None when that is not known: then any key
        may have changed."""
        if self.journal is None:
            return None
        return self.journal.since(uid, position, self.position)

    def noted_since(self, uid: int, position: int) -> list[Key] | None:
        """``changed_since`` as the journal noted it, in order and with repeats (cheap: see
        ``Journal.noted``)."""
        if self.journal is None:
            return None
        return self.journal.noted(uid, position, self.position)

    @property
    def feed(self) -> tuple[int, int]:
        """``(uid, position)`` to hand back to ``changed_since`` on a later view (uid 0: this
        view has no journal)."""
        return (self.journal.uid, self.position) if self.journal is not None else (0, 0)

    @property
    def replicated(self) -> frozenset[Key]:
        """Keys held by two or more workers with the same content: the only ones a drop can
        concern. A set: policies that want a reproducible order sort it. Worked out from
        ``keys`` at each read (a scan of every record): the state keeps no index of them (4 MiB
        with 100k keys) and a snapshot no copy of one (as much again, for as long as its cycle
        runs)."""
        return frozenset(k for k, kv in self.keys.items() if replicated(kv))

    def held_by(self, worker: WorkerId) -> frozenset[Key]:
        return self.holdings.get(worker, frozenset())

    def durable(self, workers: Iterable[WorkerId]) -> frozenset[WorkerId]:
        """Those of ``workers`` whose copies can be counted on (``WorkerView.durable``)."""
        known = self.workers
        return frozenset(w for w in workers if w in known and known[w].durable)


class Departure:
    """The records the keys of a leaving worker will have once it is gone, worked out ahead of
    its removal in steps (``ClusterState.depart``, ``prepare``) and taken in at once by
    ``unregister`` or ``register``: one key at a time, a worker leaving with 100k keys held the
    AMM's loop for 0.15-0.7 s, and every control call waited.

    Until it is taken in, nothing changes: the worker is listed, and holds what it held, in
    every snapshot and answer. Records that changed meanwhile (the state's journal says which)
    are worked out again when it is taken in, one at a time."""

    __slots__ = (
        "_next",
        "_position",
        "_registration",
        "_todo",
        "_uid",
        "emptied",
        "made",
        "replaced",
        "steps",
        "tangled",
        "worker",
    )

    def __init__(
        self, worker: WorkerId, registration: object, todo: list[Key], journal: Journal[Key]
    ) -> None:
        self.worker = worker
        self._registration = registration
        """The state's token of the worker's registration: another one means it registered
        again."""
        self._todo = todo
        """The keys to look at: every key of the state when it began, or those the worker held
        then (others are passed over; a key it was given since is in the journal)."""
        self._next = 0
        self._uid, self._position = journal.uid, journal.position
        self.made: dict[Key, KeyView] = {}
        """The new record of each key that keeps a holder."""
        self.emptied: list[Key] = []
        """Keys it is the last holder of: they leave the cluster with it."""
        self.tangled: list[Key] = []
        """Keys with conflicting content (rare): removed one at a time (``_remove_holding``)."""
        self.replaced: list[KeyView] = []
        """The records ``made`` and ``emptied`` replace, kept alive so that freeing them (half
        the cost of taking the departure in) can wait (``release``)."""
        self.steps: dict[
            tuple[frozenset[WorkerId], frozenset[WorkerId]],
            tuple[frozenset[WorkerId], frozenset[WorkerId]],
        ] = {}
        """(holders, pinned) -> the same without the worker, and the index the key goes to:
        the records share a few such sets (``ClusterState._one``), so each step is worked out
        once."""

    @property
    def done(self) -> bool:
        return self._next >= len(self._todo)

    @property
    def keys(self) -> Sequence[Key]:
        """The keys it looks at: every key of the state when it began, or those its worker
        held then (``ClusterState.depart_each``)."""
        return self._todo

    def begun_under(self, registration: object) -> bool:
        """Whether it began under ``registration`` (the state's token of the worker's)."""
        return registration is self._registration

    def current(self, registration: object, journal: Journal[Key]) -> set[Key] | None:
        """The keys whose records may have changed since it began (to work out again), or None
        when it cannot be used: the worker registered again, or the journal forgot."""
        if not self.begun_under(registration):
            return None
        noted = journal.noted(self._uid, self._position)
        return None if noted is None else set(noted)

    def release(self, count: int) -> bool:
        """Free ``count`` more of the records it replaced; whether none is left."""
        del self.replaced[-count:]
        return not self.replaced

    def take(self, count: int | None) -> list[Key]:
        """The next ``count`` keys to work out (all that are left if None)."""
        start = self._next
        stop = len(self._todo) if count is None else min(len(self._todo), start + count)
        self._next = stop
        return self._todo[start:stop]


#: Distinct sets of workers ``ClusterState`` shares between keys, at most.
MAX_SHARED_SETS = 100_000
_NOBODY: frozenset[WorkerId] = frozenset()
#: Builds a NamedTuple from a tuple of its fields without the Python call its constructor is.
_new = tuple.__new__


class ClusterState:
    """The mutable cluster model: registration, poll results, snapshots.

    With ``track_changes``, it also notes the keys that appeared in the cluster (a first holder)
    and those that left it (no holder left) since ``take_changes`` was last called: what the AMM
    persists to tell, after a restart, which keys no worker holds any more.
    """

    def __init__(self, *, track_changes: bool = False) -> None:
        self._workers: dict[WorkerId, WorkerView] = {}
        self._keys: dict[Key, KeyView] = {}
        self._held: dict[WorkerId, int] = {}
        """How many keys each worker holds. The keys themselves are those whose records name
        it: a set of them per worker cost 168 bytes per key on 4 workers (16 MiB for 100k keys,
        a tenth of the AMM's peak), for what only a worker leaving or retiring reads."""
        self._registrations: dict[WorkerId, object] = {}
        """A token per registration of each worker (a ``Departure`` begun under another one
        cannot be used)."""
        self._odd: dict[Key, dict[WorkerId, KeyReport]] = {}
        """Per key with conflicting content: what each odd holder reported."""
        self._sets: dict[frozenset[WorkerId], frozenset[WorkerId]] = {}
        """One instance of each set of workers the keys' records hold (see ``_one``)."""
        self._plus: dict[tuple[frozenset[WorkerId], WorkerId], frozenset[WorkerId]] = {}
        self._minus: dict[tuple[frozenset[WorkerId], WorkerId], frozenset[WorkerId]] = {}
        """The results of ``_with`` and ``_without``, emptied with ``_sets``."""
        self._track = track_changes
        self.journal: Journal[Key] = Journal()
        """Every key whose record was made, replaced or removed, in order (``ClusterView
        .changed_since``)."""
        self._born: set[Key] = set()
        self._gone: set[Key] = set()

    # -- workers ---------------------------------------------------------------------------

    def register(
        self,
        address: WorkerId,
        name: str,
        incarnation: str,
        now: float,
        zone: str = "",
        *,
        departure: Departure | None = None,
    ) -> bool:
        """Add a worker, or refresh it; returns True when it is new or a new incarnation.

        A new incarnation (the agent restarted) loses what the old one held (through
        ``departure`` if given, see ``depart``).
        """
        old = self._workers.get(address)
        if old is not None and old.incarnation == incarnation:
            self._workers[address] = replace(old, name=name or old.name, zone=zone or old.zone)
            return False
        if old is not None:
            self._forget_holdings(address, departure)
        self._workers[address] = WorkerView(
            address=address,
            name=name or address,
            registered_at=now,
            incarnation=incarnation,
            zone=zone,
            status_since=now,
        )
        self._held[address] = 0
        self._registrations[address] = object()
        return True

    def unregister(self, address: WorkerId, departure: Departure | None = None) -> bool:
        """Remove a worker and its holdings (through ``departure`` if given, see ``depart``)."""
        if address not in self._workers:
            return False
        self._forget_holdings(address, departure)
        del self._workers[address]
        del self._held[address]
        del self._registrations[address]
        return True

    def worker(self, address: WorkerId) -> WorkerView | None:
        return self._workers.get(address)

    @property
    def worker_ids(self) -> list[WorkerId]:
        return list(self._workers)

    @property
    def workers(self) -> list[WorkerView]:
        return list(self._workers.values())

    @property
    def keys(self) -> Mapping[Key, KeyView]:
        """The live keys, read-only: for answers built without awaiting in between."""
        return MappingProxyType(self._keys)

    # -- polls -----------------------------------------------------------------------------

    def apply_poll(
        self,
        address: WorkerId,
        *,
        incarnation: str,
        version: int,
        full: bool,
        keys: Iterable[KeyReport],
        removed: Iterable[Key],
        memory: Memory,
        status: WorkerStatus,
        name: str,
        now: float,
        zone: str = "",
        features: frozenset[str] | None = None,
    ) -> None:
        """Merge one poll answer. Unknown workers are ignored (they unregistered meanwhile)."""
        old = self._workers.get(address)
        if old is None:
            return
        if full or incarnation != old.incarnation:
            self._forget_holdings(address)
        self._merge_holdings(address, keys, removed)
        new = replace(
            old,
            name=name or old.name,
            zone=zone or old.zone,
            status=status,
            stale=False,
            memory=memory,
            nkeys=self._held[address],
            last_poll=now,
            incarnation=incarnation,
            version=version,
            missed_polls=0,
            features=old.features if features is None else features,
        )
        if new.effective_status is not old.effective_status:
            new = replace(new, status_since=now)
        self._workers[address] = new

    def apply_lookup(
        self,
        address: WorkerId,
        *,
        incarnation: str,
        held: Iterable[KeyReport],
        absent: Iterable[Key],
    ) -> None:
        """Merge what a worker said of a few keys (``HoldsKeys``): those it holds, and those asked
        about that it does not. Not a poll: its inventory version, liveness and memory stay as the
        last poll left them, so the next poll (since that version) brings whatever changed since,
        over this. Ignored for an unknown worker or another incarnation."""
        old = self._workers.get(address)
        if old is None or incarnation != old.incarnation:
            return
        if self._merge_holdings(address, held, absent):
            self._workers[address] = replace(old, nkeys=self._held[address])

    def apply_drops(
        self,
        address: WorkerId,
        incarnation: str,
        dropped: Iterable[tuple[Key, int]],
        shown: list[int] | None = None,
    ) -> int:
        """Take ``address`` off the holders of the keys its agent says it dropped, each with a
        version at which the key was gone there (``Outcome.dropped_version``), instead of
        waiting for the poll that brings the removal; how many records changed.

        Each one is a poll of one key at that version, merged only where it is news: for the
        worker's ``incarnation`` (another process counts its versions anew), and only while the
        worker's poll cursor is older. The next poll, since that cursor, reports the key as it is
        by then (put again, say), over this; a poll at that version or later said already what
        the outcome says, or something newer, and is left alone. So a late outcome neither
        forgets a copy a poll showed since, nor brings one back.

        Only plain copies with another holder left: the last holder of a key (whose removal
        means a lost key), pinned and conflicting keys are left to the poll, as are keys the
        view does not list on the worker.

        ``shown`` gets the position in ``dropped`` of each drop the view shows now: taken in
        here, or not newer than the poll cursor with the worker not listed (a poll showed it),
        so that the ledger can settle it (``Ledger.drops_shown``)."""
        old = self._workers.get(address)
        if old is None or not incarnation or incarnation != old.incarnation:
            return 0
        cursor = old.version
        keys, odd, minus = self._keys, self._odd, self._minus
        noted: list[Key] = []
        for position, (key, version) in enumerate(dropped):
            kv = keys.get(key)
            if version <= cursor:
                if shown is not None and (kv is None or address not in kv.holders):
                    shown.append(position)
                continue
            if kv is None:
                continue
            holders = kv[3]
            if (
                address not in holders
                or len(holders) < 2
                or kv[4]  # pinned_on
                or kv[5]  # conflicting
                or key in odd
            ):
                continue
            # ``_drop_copy``, inlined: it runs for each of a big cycle's 300,000 drops.
            holders = minus.get((holders, address)) or self._without(holders, address)
            key = kv[0]  # the record's string, not the outcome's copy
            keys[key] = _new(KeyView, (key, kv[1], kv[2], holders, kv[4], kv[5]))
            noted.append(key)
            if shown is not None:
                shown.append(position)
        if noted:
            self.journal.extend(noted)
            self._held[address] -= len(noted)
            self._workers[address] = replace(old, nkeys=self._held[address])
        return len(noted)

    def _drop_copy(self, kv: KeyView, address: WorkerId) -> Key:
        """``address`` no longer holds a plain copy of ``kv`` (no pin, no conflict, another
        holder left): its record without it; the key, to note in the journal."""
        holders = self._minus.get((kv.holders, address)) or self._without(kv.holders, address)
        key = kv.key
        self._keys[key] = _new(
            KeyView, (key, kv.size, kv.checksum, holders, kv.pinned_on, kv.conflicting)
        )
        return key

    def _merge_holdings(
        self, address: WorkerId, held: Iterable[KeyReport], gone: Iterable[Key]
    ) -> bool:
        """Record the keys ``address`` holds and those it no longer holds; whether any
        changed.

        The common cases of a big poll (a plain key gaining or losing a holder, or reported
        again as it was) are taken here without a call per key, and the keys changed are noted
        in the journal a step at a time: a snapshot of 100k keys on 4 workers and the removal of
        300k dropped replicas went through ``_set_holding`` and ``_remove_holding`` once per
        key. Anything else (a new key, pins, conflicting content, the last holder leaving)
        takes the general path."""
        changed = False
        counts = self._held
        gained = lost = 0
        keys, journal = self._keys, self.journal
        plus, odd = self._plus, self._odd
        noted: list[Key] = []
        alone = self._with(_NOBODY, address)
        born = self._born if self._track else None
        for report in held:
            changed = True
            kv = keys.get(report[0])
            if kv is None and not report[3]:
                # A key new to the cluster, as ``_set_holding`` would take it: the first
                # snapshot of a cold view brings 100k of them.
                key = report[0]
                keys[key] = _new(KeyView, (key, report[1], report[2], alone, _NOBODY, _NOBODY))
                noted.append(key)
                gained += 1
                if born is not None:
                    born.add(key)
                    self._gone.discard(key)
                continue
            if (
                kv is None
                or report[3]
                or kv.pinned_on
                or kv.conflicting
                or (kv.checksum is not report[2] and kv.checksum != report[2])
            ):
                if noted:  # in order with what the general path notes
                    journal.extend(noted)
                    noted = []
                self._set_holding(address, report)
                continue
            holders = kv.holders
            if address not in holders:
                holders = plus.get((holders, address)) or self._with(holders, address)
                key = kv.key
                keys[key] = _new(
                    KeyView, (key, kv.size, kv.checksum, holders, kv.pinned_on, kv.conflicting)
                )
                noted.append(key)
                gained += 1
        if gained:
            counts[address] += gained
        for key in gone:
            kv = keys.get(key)
            if kv is None or address not in kv.holders:
                continue
            changed = True
            if kv.pinned_on or kv.conflicting or key in odd or len(kv.holders) < 2:
                if noted:
                    journal.extend(noted)
                    noted = []
                self._remove_holding(address, key)
                continue
            noted.append(self._drop_copy(kv, address))  # ``_remove_holding``'s common case
            lost += 1
        if lost:
            counts[address] -= lost
        if noted:
            journal.extend(noted)
        return changed

    def missed_poll(self, address: WorkerId) -> None:
        old = self._workers.get(address)
        if old is not None:
            self._workers[address] = replace(old, missed_polls=old.missed_polls + 1)

    def _set_holding(self, worker: WorkerId, report: KeyReport) -> None:
        """Record that ``worker`` holds ``report``."""
        kv = self._keys.get(report.key)
        if kv is None:
            self._held[worker] += 1
            if self._track:
                self._gone.discard(report.key)
                self._born.add(report.key)
            alone = self._with(_NOBODY, worker)
            self.journal.note(report.key)
            self._keys[report.key] = KeyView(
                report.key,
                report.size,
                report.checksum,
                alone,
                alone if report.pinned else _NOBODY,
            )
            return
        if (
            worker in kv.holders
            and not kv.conflicting
            and report.checksum == kv.checksum
            and (worker in kv.pinned_on) == report.pinned
        ):
            return  # reported again as it was (a snapshot re-reads every key)
        if worker not in kv.holders:
            self._held[worker] += 1
        add, remove = self._with, self._without
        holders = add(kv.holders, worker)
        pinned = add(kv.pinned_on, worker) if report.pinned else remove(kv.pinned_on, worker)
        conflicting = (
            add(kv.conflicting, worker)
            if report.checksum != kv.checksum
            else remove(kv.conflicting, worker)
        )
        if conflicting:
            self._odd.setdefault(report.key, {})[worker] = report
        else:  # resolved: ``conflicts`` no longer lists it
            self._odd.pop(report.key, None)
        if (holders, pinned, conflicting) != (kv.holders, kv.pinned_on, kv.conflicting):
            # Built directly: dataclasses.replace costs several times more, per key per poll.
            kv = KeyView(kv.key, kv.size, kv.checksum, holders, pinned, conflicting)
            self._keys[kv.key] = kv
            self.journal.note(kv.key)

    def _remove_holding(self, worker: WorkerId, key: Key) -> None:
        kv = self._keys.get(key)
        if kv is None or worker not in kv.holders:
            return
        self._held[worker] -= 1
        remove = self._without
        holders = remove(kv.holders, worker)
        pinned, conflicting = kv.pinned_on, kv.conflicting
        if holders and not pinned and not conflicting and key not in self._odd:
            # The common case, in short: a plain copy dropped.
            self.journal.note(kv.key)
            self._keys[key] = KeyView(kv.key, kv.size, kv.checksum, holders, pinned, conflicting)
            return
        odd = self._odd.get(key)
        if odd is not None:
            odd.pop(worker, None)
        self.journal.note(key)
        if not holders:
            del self._keys[key]
            self._odd.pop(key, None)
            if self._track:
                self._born.discard(key)
                self._gone.add(key)
            return
        kv = KeyView(
            kv.key,
            kv.size,
            kv.checksum,
            holders,
            remove(kv.pinned_on, worker),
            remove(kv.conflicting, worker),
        )
        if kv.conflicting and kv.conflicting == kv.holders:
            # The holders of the reference content are gone: the odd ones out are the reference now.
            kv = self._rebase(kv, odd or {})
        if not kv.conflicting:
            self._odd.pop(key, None)
        self._keys[key] = kv

    def _one(self, workers: frozenset[WorkerId]) -> frozenset[WorkerId]:
        """The one instance kept of the set ``workers``.

        A cluster of N workers has 100k keys held by a handful of distinct sets of holders, and
        an empty or small frozenset costs 216 bytes: sharing them saves that much per key. The
        table is emptied when it outgrows ``MAX_SHARED_SETS`` (sets no key uses any more are
        dropped with it; those in use are shared again as they change)."""
        shared = self._sets.get(workers)
        if shared is not None:
            return shared
        if len(self._sets) >= MAX_SHARED_SETS:
            self._sets.clear()
            self._plus.clear()
            self._minus.clear()
        self._sets[workers] = workers
        return workers

    def _with(self, workers: frozenset[WorkerId], worker: WorkerId) -> frozenset[WorkerId]:
        """``_one(workers | {worker})``, remembered: a snapshot of 100k keys makes the same few
        steps from one shared set to another 100k times, and building and hashing a new set
        each time was a quarter of merging it."""
        if worker in workers:
            return workers
        found = self._plus.get((workers, worker))
        if found is None:
            found = self._plus[workers, worker] = self._one(workers | {worker})
        return found

    def _without(self, workers: frozenset[WorkerId], worker: WorkerId) -> frozenset[WorkerId]:
        """``_one(workers - {worker})``, remembered (see ``_with``)."""
        if worker not in workers:
            return workers
        found = self._minus.get((workers, worker))
        if found is None:
            found = self._minus[workers, worker] = self._one(workers - {worker})
        return found

    def _rebase(self, kv: KeyView, odd: dict[WorkerId, KeyReport]) -> KeyView:
        first = odd[min(kv.holders)]
        conflicting = frozenset(w for w in kv.holders if odd[w].checksum != first.checksum)
        for w in kv.holders - conflicting:
            odd.pop(w, None)
        return kv._replace(size=first.size, checksum=first.checksum, conflicting=conflicting)

    def depart(self, worker: WorkerId) -> Departure:
        """Begin working out the records the keys of ``worker`` will have without it, for
        ``unregister`` or ``register`` of a new incarnation (see ``Departure``)."""
        todo = list(self._keys) if self._held.get(worker) else []
        return Departure(worker, self._registrations.get(worker), todo, self.journal)

    def depart_each(self, workers: Iterable[WorkerId]) -> dict[WorkerId, Departure]:
        """``depart`` of each of ``workers``, in one pass over every key (``held_by_each``):
        each departure looks only at the keys its worker holds now, not at every key (the
        journal names those it is given later). A thousand workers leaving at once each made
        two passes over 100k keys, 15 s of the AMM's loop in all."""
        held = self.held_by_each(workers)
        return {
            worker: Departure(worker, self._registrations.get(worker), keys, self.journal)
            for worker, keys in held.items()
        }

    def held_through(self, departure: Departure) -> frozenset[Key]:
        """``held_by(departure.worker)``, from the keys the departure worked out (see
        ``_overtaken``), not a pass over every key unless it cannot tell."""
        overtaken = self._overtaken(departure)
        if overtaken is None:
            return self.held_by(departure.worker)
        return frozenset(overtaken[0])

    def _overtaken(self, departure: Departure) -> tuple[list[Key], set[Key]] | None:
        """(the keys its worker holds now, the keys it worked out whose records changed since),
        once it is worked out to the end; None when its worker may hold a key it did not look
        at (it was given one since: it holds more than it counts) or registered again.

        One look at each key it worked out, not at each key the journal noted since it began:
        a thousand departures begun together each saw every key the others took out, a
        million keys and more to look at in all."""
        worker, records = departure.worker, self._keys
        if not departure.begun_under(self._registrations.get(worker)):
            return None
        self.prepare(departure)
        changed = {kv.key for kv in departure.replaced if records.get(kv.key) is not kv}
        held = [kv.key for kv in departure.replaced if kv.key not in changed]
        for key in itertools.chain(changed, departure.tangled):
            kv = records.get(key)
            if kv is not None and worker in kv.holders:
                held.append(key)
        if len(held) != self._held.get(worker, 0):
            return None
        return held, changed

    def prepare(self, departure: Departure, count: int | None = None) -> bool:
        """Work out ``count`` more keys of ``departure`` (all that are left if None); whether
        it is done. Nothing in the state changes."""
        worker, records, odd = departure.worker, self._keys, self._odd
        steps, made, remove = departure.steps, departure.made, self._without
        emptied, tangled, replaced = departure.emptied, departure.tangled, departure.replaced
        for key in departure.take(count):
            kv = records.get(key)
            if kv is None or worker not in kv.holders:
                continue
            if kv.conflicting or key in odd:
                tangled.append(key)
                continue
            pair = (kv.holders, kv.pinned_on)
            step = steps.get(pair)
            if step is None:
                step = steps[pair] = (remove(kv.holders, worker), remove(kv.pinned_on, worker))
            replaced.append(kv)
            if not step[0]:
                emptied.append(key)
                continue
            made[key] = KeyView(key, kv.size, kv.checksum, step[0], step[1], _NOBODY)
        return departure.done

    def _forget_holdings(self, worker: WorkerId, departure: Departure | None = None) -> None:
        """Take ``worker`` out of the holders of every key it holds, as ``_remove_holding`` of
        each would, through a ``Departure`` (``departure`` if it can still be used, else one
        worked out now): the new records go in with a few bulk operations."""
        registration = self._registrations.get(worker)
        redo = None
        if departure is not None:
            overtaken = self._overtaken(departure)
            if overtaken is not None:
                redo = overtaken[1]
            else:
                redo = departure.current(registration, self.journal)
        if departure is None or redo is None:
            departure, redo = self.depart(worker), set()
        self.prepare(departure)
        made, emptied = departure.made, departure.emptied
        if redo:
            for key in redo:
                made.pop(key, None)
            emptied = [key for key in emptied if key not in redo]
        records = self._keys
        records.update(made)
        for key in emptied:
            del records[key]
        self.journal.extend(made)
        self.journal.extend(emptied)
        if self._track:
            self._born.difference_update(emptied)
            self._gone.update(emptied)
        # One at a time: the tangled keys, and those whose records changed since it began
        # (among them any key the worker was given meanwhile).
        for key in redo.union(departure.tangled):
            self._remove_holding(worker, key)
        if worker in self._held:
            self._held[worker] = 0

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(
        self,
        *,
        goals: Mapping[Key, Goal] = _NO_GOALS,
        now: float = 0.0,
        forgotten: frozenset[Key] = frozenset(),
    ) -> ClusterView:
        self.journal.limit = max(MIN_LIMIT, 2 * len(self._keys))
        keys = MappingProxyType(dict(self._keys))
        return ClusterView(
            workers=MappingProxyType(dict(self._workers)),
            keys=keys,
            goals=MappingProxyType(dict(goals)) if goals else _NO_GOALS,
            holdings=Holdings(keys, self._held),
            taken_at=now,
            forgotten=forgotten,
            journal=self.journal,
            position=self.journal.position,
        )

    def set_flags(
        self,
        address: WorkerId,
        now: float,
        *,
        retiring: bool | None = None,
        retired: bool | None = None,
        stale: bool | None = None,
    ) -> bool:
        """Set the AMM's own flags on a worker (None leaves one as it is); returns False for an
        unknown worker. ``status_since`` moves when the effective status changes."""
        old = self._workers.get(address)
        if old is None:
            return False
        new = replace(
            old,
            retiring=old.retiring if retiring is None else retiring,
            retired=old.retired if retired is None else retired,
            stale=old.stale if stale is None else stale,
        )
        if new.effective_status is not old.effective_status:
            new = replace(new, status_since=now)
        self._workers[address] = new
        return True

    def held_by(self, worker: WorkerId) -> frozenset[Key]:
        """The keys ``worker`` holds: one pass over every key (see ``_held``), none when it
        holds nothing."""
        if not self._held.get(worker):
            return _NO_KEYS
        return frozenset([key for key, kv in self._keys.items() if worker in kv.holders])

    def held_by_each(self, workers: Iterable[WorkerId]) -> dict[WorkerId, list[Key]]:
        """The keys each of ``workers`` holds (an empty list for one unknown or holding
        nothing), in one pass over every key: ``held_by`` of each would make one per worker."""
        held: dict[WorkerId, list[Key]] = {w: [] for w in workers}
        if any(self._held.get(w) for w in held):
            for key, kv in self._keys.items():
                for worker in kv.holders:
                    of_worker = held.get(worker)
                    if of_worker is not None:
                        of_worker.append(key)
        return held

    def holding(self, worker: WorkerId) -> int:
        """How many keys ``worker`` holds (without listing them, unlike ``held_by``)."""
        return self._held.get(worker, 0)

    def take_changes(self) -> tuple[set[Key], set[Key]]:
        """(keys that appeared, keys that left) since the last call, with ``track_changes``; a
        key that came and went in between is only in the one it did last."""
        born, gone = self._born, self._gone
        self._born, self._gone = set(), set()
        return born, gone

    @property
    def nkeys(self) -> int:
        return len(self._keys)

    @property
    def conflicts(self) -> list[Key]:
        return sorted(self._odd)

    @property
    def nreplicas(self) -> int:
        return sum(self._held.values())

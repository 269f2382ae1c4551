"""The AMM's model of the cluster: who holds which key, and each worker's memory and status.

``ClusterState`` is the one mutable copy, fed by the poller with each agent's inventory changes.
``ClusterView`` is the frozen snapshot a cycle plans on; policies and the core see only views.
Records are immutable and replaced on change, so a snapshot is a shallow copy of two dicts and a
set, cheap even with a million keys. No I/O here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, NewType

Key = NewType("Key", str)
WorkerId = NewType("WorkerId", str)
Measure = Literal["process", "managed", "optimistic"]
MEASURES: tuple[Measure, ...] = ("process", "managed", "optimistic")


class WorkerStatus(enum.Enum):
    """A worker's status as the AMM sees it; only RUNNING workers receive new replicas."""

    UNKNOWN = "unknown"
    RUNNING = "running"
    PAUSED = "paused"
    CLOSING = "closing"


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

    @property
    def reachable(self) -> bool:
        """False once it failed to answer a poll, until it answers again."""
        return self.missed_polls == 0

    @property
    def accepts_replicas(self) -> bool:
        return self.status is WorkerStatus.RUNNING and self.reachable

    @property
    def durable(self) -> bool:
        """Whether its copies can be counted on to stay: not closing, still answering."""
        return self.status is not WorkerStatus.CLOSING and self.reachable


@dataclass(frozen=True, slots=True)
class KeyView:
    """One key: its size, checksum, holders and the holders where a reader pinned it.

    ``conflicting`` holders hold other content under the same key (keys are immutable per
    agent, but two agents can each be given different values): they are not replicas of
    ``checksum``, and nothing of the key is dropped or copied until an operator resolves it.
    """

    key: Key
    size: int
    checksum: str
    holders: frozenset[WorkerId]
    pinned_on: frozenset[WorkerId] = frozenset()
    conflicting: frozenset[WorkerId] = frozenset()


@dataclass(frozen=True, slots=True)
class KeyReport:
    """One key as an agent reports it."""

    key: Key
    size: int
    checksum: str
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A frozen snapshot of the cluster for one cycle."""

    workers: Mapping[WorkerId, WorkerView]
    keys: Mapping[Key, KeyView]
    replicated: frozenset[Key]
    """Keys held by two or more workers with the same content: the only ones a drop can concern.
    A set: policies that want a reproducible order sort it."""


class ClusterState:
    """The mutable cluster model: registration, poll results, snapshots."""

    def __init__(self) -> None:
        self._workers: dict[WorkerId, WorkerView] = {}
        self._keys: dict[Key, KeyView] = {}
        self._held: dict[WorkerId, set[Key]] = {}
        self._replicated: set[Key] = set()
        self._odd: dict[Key, dict[WorkerId, KeyReport]] = {}
        """Per key with conflicting content: what each odd holder reported."""

    # -- workers ---------------------------------------------------------------------------

    def register(self, address: WorkerId, name: str, incarnation: str, now: float) -> bool:
        """Add a worker, or refresh it; returns True when it is new or a new incarnation.

        A new incarnation (the agent restarted) loses what the old one held.
        """
        old = self._workers.get(address)
        if old is not None and old.incarnation == incarnation:
            self._workers[address] = replace(old, name=name or old.name)
            return False
        if old is not None:
            self._forget_holdings(address)
        self._workers[address] = WorkerView(
            address=address, name=name or address, registered_at=now, incarnation=incarnation
        )
        self._held[address] = set()
        return True

    def unregister(self, address: WorkerId) -> bool:
        if address not in self._workers:
            return False
        self._forget_holdings(address)
        del self._workers[address]
        del self._held[address]
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
    ) -> None:
        """Merge one poll answer. Unknown workers are ignored (they unregistered meanwhile)."""
        old = self._workers.get(address)
        if old is None:
            return
        if full or incarnation != old.incarnation:
            self._forget_holdings(address)
        held = self._held[address]
        for report in keys:
            self._set_holding(address, report)
            held.add(report.key)
        for key in removed:
            if key in held:
                held.discard(key)
                self._remove_holding(address, key)
        self._workers[address] = replace(
            old,
            name=name or old.name,
            status=status,
            memory=memory,
            nkeys=len(held),
            last_poll=now,
            incarnation=incarnation,
            version=version,
            missed_polls=0,
        )

    def missed_poll(self, address: WorkerId) -> None:
        old = self._workers.get(address)
        if old is not None:
            self._workers[address] = replace(old, missed_polls=old.missed_polls + 1)

    def _set_holding(self, worker: WorkerId, report: KeyReport) -> None:
        kv = self._keys.get(report.key)
        if kv is None:
            self._keys[report.key] = KeyView(
                report.key,
                report.size,
                report.checksum,
                frozenset((worker,)),
                frozenset((worker,)) if report.pinned else frozenset(),
            )
            return
        holders = kv.holders | {worker}
        pinned = kv.pinned_on | {worker} if report.pinned else kv.pinned_on - {worker}
        conflicting = (
            kv.conflicting | {worker}
            if report.checksum != kv.checksum
            else kv.conflicting - {worker}
        )
        if conflicting:
            self._odd.setdefault(report.key, {})[worker] = report
        if (holders, pinned, conflicting) != (kv.holders, kv.pinned_on, kv.conflicting):
            kv = replace(kv, holders=holders, pinned_on=pinned, conflicting=conflicting)
            self._keys[report.key] = kv
        self._index_replicated(kv)

    def _remove_holding(self, worker: WorkerId, key: Key) -> None:
        kv = self._keys.get(key)
        if kv is None or worker not in kv.holders:
            return
        holders = kv.holders - {worker}
        odd = self._odd.get(key, {})
        odd.pop(worker, None)
        if not holders:
            del self._keys[key]
            self._odd.pop(key, None)
            self._replicated.discard(key)
            return
        kv = replace(
            kv,
            holders=holders,
            pinned_on=kv.pinned_on - {worker},
            conflicting=kv.conflicting - {worker},
        )
        if kv.conflicting == kv.holders:
            # The holders of the reference content are gone: the odd ones out are the reference now.
            kv = self._rebase(kv, odd)
        if not kv.conflicting:
            self._odd.pop(key, None)
        self._keys[key] = kv
        self._index_replicated(kv)

    def _rebase(self, kv: KeyView, odd: dict[WorkerId, KeyReport]) -> KeyView:
        first = odd[min(kv.holders)]
        conflicting = frozenset(w for w in kv.holders if odd[w].checksum != first.checksum)
        for w in kv.holders - conflicting:
            odd.pop(w, None)
        return replace(kv, size=first.size, checksum=first.checksum, conflicting=conflicting)

    def _index_replicated(self, kv: KeyView) -> None:
        if len(kv.holders) > 1 and not kv.conflicting:
            self._replicated.add(kv.key)
        else:
            self._replicated.discard(kv.key)

    def _forget_holdings(self, worker: WorkerId) -> None:
        for key in self._held.get(worker, set()):
            self._remove_holding(worker, key)
        self._held[worker] = set()

    # -- snapshots -------------------------------------------------------------------------

    def snapshot(self) -> ClusterView:
        return ClusterView(
            workers=MappingProxyType(dict(self._workers)),
            keys=MappingProxyType(dict(self._keys)),
            replicated=frozenset(self._replicated),
        )

    def held_by(self, worker: WorkerId) -> frozenset[Key]:
        return frozenset(self._held.get(worker, ()))

    @property
    def nkeys(self) -> int:
        return len(self._keys)

    @property
    def conflicts(self) -> list[Key]:
        return sorted(self._odd)

    @property
    def nreplicas(self) -> int:
        return sum(len(h) for h in self._held.values())

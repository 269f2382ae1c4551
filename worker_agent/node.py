"""The agent's state and the operations its gRPC calls map onto, without servers or tasks.

``Node`` ties the store, the memory monitor, the peer channels and the directive runner together
and answers each call with one method: ``poll``, ``put``, ``reading``, ``pin``, ``unpin``,
``delete``, ``promise_keep``, ``run_directive``. User-facing failures raise the domain errors of
``errors``; the servicer maps them to status codes. Owning the server and the background tasks
is ``agent``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from worker_agent import integrity
from worker_agent.config import AgentConfig
from worker_agent.directives import DirectiveRunner, KeyLocks, Outcome
from worker_agent.errors import (
    ContentConflict,
    DataLoss,
    InvalidRequest,
    Refused,
    TooLarge,
    Unavailable,
    UnknownKey,
)
from worker_agent.integrity import Conditions, Directive, Reason, Refuse
from worker_agent.memory import MemoryMonitor, MemoryProbe, MemoryReport
from worker_agent.store import Key, KeyInfo, Store, Value
from worker_agent.transfer import FetchFailure, Peers

log = logging.getLogger(__name__)

WhoHas = Callable[[Key], Awaitable[list[str]]]


class WorkerStatus(enum.Enum):
    RUNNING = 1
    PAUSED = 2
    CLOSING = 3


@dataclass(frozen=True, slots=True)
class Inventory:
    """A poll's answer (``amm.v1.PollResponse``)."""

    incarnation: str
    version: int
    full: bool
    keys: tuple[KeyInfo, ...]
    removed: tuple[Key, ...]
    memory: MemoryReport
    status: WorkerStatus
    name: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Reading:
    """A value being streamed out; ``replicated`` when it was fetched for this read and kept."""

    value: Value
    replicated: bool


@dataclass(frozen=True, slots=True)
class Promise:
    """A keep-promise granted: the lease ends ``remaining`` seconds from now."""

    remaining: float


class Node:
    """One worker's keys, memory and directives; the address is set once the server is bound."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        probe: MemoryProbe,
        clock: Callable[[], float],
        who_has: WhoHas | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.incarnation = uuid.uuid4().hex
        self.address = ""
        self.closing = False
        self.newest_epoch = 0
        self.polled = asyncio.Event()
        self.shutdown = asyncio.Event()
        self.store = Store()
        self.locks = KeyLocks()
        self.peers = Peers(
            fetch_timeout=config.fetch_timeout,
            max_value_bytes=config.max_value_bytes,
            max_channels=config.max_peer_channels,
        )
        self.memory = MemoryMonitor(
            probe,
            window=config.unmanaged_window,
            limit=config.memory_limit,
            pause_fraction=config.pause_fraction,
        )
        self._who_has = who_has
        self.runner = DirectiveRunner(
            config=config,
            store=self.store,
            peers=self.peers,
            locks=self.locks,
            conditions=self.conditions,
            observe_epoch=self.observe_epoch,
            address=lambda: self.address,
            clock=clock,
        )

    @property
    def name(self) -> str:
        return self.config.name or self.address

    def observe_epoch(self, epoch: int) -> None:
        """Remember the newest AMM epoch seen; directives from older epochs are refused."""
        self.newest_epoch = max(self.newest_epoch, epoch)

    def sample_memory(self) -> MemoryReport:
        return self.memory.sample(self.store.total_bytes, self.clock())

    def status(self, report: MemoryReport | None = None) -> WorkerStatus:
        if self.closing:
            return WorkerStatus.CLOSING
        if self.memory.paused(report or self.sample_memory()):
            return WorkerStatus.PAUSED
        return WorkerStatus.RUNNING

    def conditions(self) -> Conditions:
        return Conditions(
            newest_epoch=self.newest_epoch,
            paused=self.status() is WorkerStatus.PAUSED,
            closing=self.closing,
            memory_limit=self.config.memory_limit,
            max_value_bytes=self.config.max_value_bytes,
        )

    def poll(self, *, since: int, incarnation: str, full: bool, epoch: int) -> Inventory:
        """The changes since ``since``, or everything when asked, when the caller knew another
        incarnation, or when the changelog no longer reaches back that far."""
        self.observe_epoch(epoch)
        self.polled.set()
        changes = None
        keys: tuple[KeyInfo, ...]
        removed: tuple[Key, ...]
        if not full and since > 0 and incarnation == self.incarnation:
            changes = self.store.changes_since(since)
        if changes is None:
            keys, removed, version = tuple(self.store.snapshot()), (), self.store.version
        else:
            keys, removed, version = changes.upserts, changes.removed, changes.version
        report = self.sample_memory()
        return Inventory(
            incarnation=self.incarnation,
            version=version,
            full=changes is None,
            keys=keys,
            removed=removed,
            memory=report,
            status=self.status(report),
            name=self.name,
            epoch=self.newest_epoch,
        )

    async def run_directive(self, directive: Directive) -> Outcome:
        return await self.runner.run(directive)

    def check_put(self, key: Key, size: int, checksum: str) -> None:
        """Fail early, before the value is received, when it cannot be stored."""
        self._refuse_if_closing()
        held = self.store.get(key)
        if held is not None and (held.size != size or (checksum and checksum != held.checksum)):
            raise ContentConflict(f"{key!r} already holds other content; keys are immutable")
        verdict = integrity.judge_put(self.store, key, size, self.conditions())
        if isinstance(verdict, Refuse):
            raise TooLarge(verdict.message)

    def put(self, key: Key, data: bytes, checksum: str) -> tuple[KeyInfo, bool]:
        """Store a verified value; ``created`` is False when the same content was there.

        Refused while the agent shuts down: a value acknowledged now would be lost at exit.
        """
        self._refuse_if_closing()
        held = self.store.get(key)
        if held is not None:
            if held.checksum != checksum:
                raise ContentConflict(f"{key!r} already holds other content; keys are immutable")
        else:
            verdict = integrity.judge_put(self.store, key, len(data), self.conditions())
            if isinstance(verdict, Refuse):
                raise TooLarge(verdict.message)
            self.store.add(key, data, checksum)
        return KeyInfo(key, len(data), checksum, self.store.pins(key) > 0), held is None

    def _refuse_if_closing(self) -> None:
        if self.closing:
            raise Unavailable("agent is shutting down")

    @contextlib.asynccontextmanager
    async def reading(
        self, key: Key, *, fetch: bool = False, sources: Sequence[str] = ()
    ) -> AsyncIterator[Reading]:
        """Hold ``key`` as in use while the caller streams it out.

        With ``fetch``, a key not held is fetched first, from ``sources`` or else from the holders
        the AMM names, and kept when the worker has room for it (as a Dask worker keeps a task's
        input); otherwise it is served once and forgotten.
        """
        value = self.store.get(key)
        replicated = False
        if value is None:
            if not fetch:
                raise UnknownKey(f"{key!r} is not held here")
            async with self.locks.hold(key):
                value = self.store.get(key)
                if value is None:
                    value, replicated = await self._fetch_missing(key, sources)
                # A replica not kept (no room) is streamed from this call's copy: nothing to mark.
                using = key in self.store
                if using:
                    self.store.begin_use(key)
        else:
            using = True
            self.store.begin_use(key)
        try:
            yield Reading(value, replicated)
        finally:
            if using:
                self.store.end_use(key)

    async def _fetch_missing(self, key: Key, sources: Sequence[str]) -> tuple[Value, bool]:
        candidates = [s for s in sources if s != self.address]
        if not sources:
            if self._who_has is None:
                raise UnknownKey(f"{key!r} is not held here, and no source or AMM to ask")
            named = await self._who_has(key)
            candidates = [s for s in named if s != self.address and integrity.is_peer_address(s)]
            if not candidates:
                raise UnknownKey(f"no worker holds {key!r}")
        result = await self.peers.fetch(
            key, candidates, expected_size=None, expected_checksum="", requester=self.address
        )
        if isinstance(result, FetchFailure):
            if result.reason is Reason.CHECKSUM_MISMATCH:
                raise DataLoss(result.message)
            if result.missing:
                raise UnknownKey(result.message)
            raise Unavailable(result.message)
        value = Value(key, result.data, result.checksum)
        cond = self.conditions()
        verdict = integrity.judge_put(self.store, key, value.size, cond)
        if isinstance(verdict, Refuse):
            why = verdict.message
        elif cond.closing or cond.paused:
            why = "the worker is closing" if cond.closing else "the worker is paused"
        else:
            self.store.add(key, value.data, value.checksum)
            return value, True
        log.info("serving %r without keeping a replica: %s", key, why)
        return value, False

    def pin(self, key: Key) -> int:
        if key not in self.store:
            raise UnknownKey(f"{key!r} is not held here")
        return self.store.pin(key)

    def unpin(self, key: Key) -> int:
        if key not in self.store:
            raise UnknownKey(f"{key!r} is not held here")
        if self.store.pins(key) == 0:
            raise Refused(None, f"{key!r} is not pinned")
        return self.store.unpin(key)

    def delete(self, key: Key, *, forget: bool = False) -> bool:
        verdict = integrity.judge_delete(self.store, key, self.clock(), forget=forget)
        if isinstance(verdict, Refuse):
            raise Refused(verdict.reason, f"cannot delete: {verdict.message}")
        return self.store.remove(key)

    def promise_keep(self, key: Key, checksum: str, lease: float | None) -> Promise | Refuse:
        """Promise a peer to keep ``key`` for ``lease`` seconds (None: the configured lease),
        at most ``max_lease``. A lease of zero or less is an invalid request."""
        if lease is not None and not lease > 0:
            raise InvalidRequest(f"a lease must be positive, got {lease:g} s")
        verdict = integrity.judge_keep(self.store, key, checksum, self.conditions())
        if isinstance(verdict, Refuse):
            return verdict
        seconds = min(self.config.lease if lease is None else lease, self.config.max_lease)
        now = self.clock()
        return Promise(self.store.promise(key, now + seconds) - now)

    async def close(self) -> None:
        await self.peers.close()

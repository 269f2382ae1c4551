"""The agent's state and the operations its gRPC calls map onto, without servers or tasks.

``Node`` ties the store, the memory monitor, the peer channels and the directive runner together
and answers each call with one method: ``poll``, ``put``, ``put_many``, ``reading``, ``pin``,
``unpin``, ``delete``, ``promise_keep``, ``run_directive``. User-facing failures raise the domain
errors of ``errors``; the servicer maps them to status codes. Owning the server and the background
tasks is ``agent``'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from amm.base.security.identity import SHARED_AGENT_NAME
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
from worker_agent.store import Key, KeyInfo, Page, Store, Value
from worker_agent.transfer import FetchFailure, Peers

log = logging.getLogger(__name__)

WhoHas = Callable[[Key], Awaitable[list[str]]]

#: Keys in a poll answer when the caller asks for no particular number (PollRequest.max_keys 0).
DEFAULT_POLL_KEYS = 10_000
#: Most keys in a poll answer, whatever the caller asks.
MAX_POLL_KEYS = 50_000
#: Most bytes of keys in a poll answer, about, well below the 16 MiB message cap: 50,000 keys
#: of 1 KiB would not fit in one message, so answers are cut by bytes too.
POLL_BYTES = 8 * 1024 * 1024


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
    #: The worker's failure domain; empty when none.
    zone: str = ""
    #: A snapshot continues after this key (empty when it does not).
    next_cursor: str = ""
    #: An incremental answer stopped short: more changes follow ``version``.
    more: bool = False


@dataclass(frozen=True, slots=True)
class Reading:
    """A value being streamed out; ``replicated`` when it was fetched for this read and kept."""

    value: Value
    replicated: bool


@dataclass(frozen=True, slots=True)
class Stored:
    """What a batch of puts did: values ``created``, values already held with the same content
    (``unchanged``), and the bytes created (``nbytes``)."""

    created: int
    unchanged: int
    nbytes: int


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
        #: The epoch of the AMM this agent last registered with: only its polls (or a newer
        #: AMM's) show that it still knows this agent.
        self.registered_epoch = 0
        self.polled = asyncio.Event()
        self.shutdown = asyncio.Event()
        #: Set when the AMM (or an operator) asked the agent to shut down (``request_close``).
        self.close_requested = asyncio.Event()
        self.store = Store()
        self.locks = KeyLocks()
        self.peers = Peers(
            fetch_timeout=config.fetch_timeout,
            max_value_bytes=config.max_value_bytes,
            max_channels=config.max_peer_channels,
            security=config.security,
        )
        self.memory = MemoryMonitor(
            probe,
            window=config.unmanaged_window,
            limit=config.memory_limit,
            pause_fraction=config.pause_fraction,
        )
        self._who_has = who_has
        identity = config.security.identity() if config.security is not None else None
        #: A named agent certificate's name: the only one the AMM lets this agent register as.
        self._certified_name = (
            identity.name if identity is not None and identity.name != SHARED_AGENT_NAME else None
        )
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
        """``config.name``, else a named certificate's, else the advertised address."""
        return self.config.name or self._certified_name or self.address

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

    def poll(
        self,
        *,
        since: int,
        incarnation: str,
        full: bool,
        epoch: int,
        max_keys: int = 0,
        cursor: str = "",
    ) -> Inventory:
        """The inventory, in pages of at most ``max_keys`` keys (0: ``DEFAULT_POLL_KEYS``; never
        more than ``MAX_POLL_KEYS``, nor about ``POLL_BYTES``). Three kinds of answer:

        1. Incremental, when ``since`` > 0 from this incarnation and the changelog reaches back
           that far: the keys changed and removed since, in changelog order. ``version`` is the
           version up to which the answer is complete; ``more`` is set when it stopped short of
           the current version: poll again since ``version``.
        2. A snapshot's first page, otherwise (``full``, ``since`` 0, another incarnation, or a
           caller too far behind): keys in key order from the first, with ``full`` set, and
           ``next_cursor`` (the page's last key) when more follow.
        3. A snapshot's next page, when ``cursor`` is set (``since`` and ``full`` are ignored):
           the keys after the cursor in key order, ``full`` set again, and ``next_cursor`` while
           more follow. A cursor sent with another incarnation than this one (the agent
           restarted while the caller paged) is ignored: the answer is a new first page.

        The agent keeps no state per caller, so it cannot tell when a caller's snapshot began:
        every snapshot page carries the version current when that page is served. The caller
        must keep the version of the FIRST page and, once the last page is in, poll
        incrementally since it: that answer holds whatever changed while paging (keys added
        behind the cursor, keys removed from pages already read).
        """
        self.observe_epoch(epoch)
        if epoch >= self.registered_epoch:
            # A superseded AMM (or a person with grpcurl) still polling must not keep this
            # agent from registering again with the AMM that forgot it.
            self.polled.set()
        limit = min(max_keys or DEFAULT_POLL_KEYS, MAX_POLL_KEYS)
        current = self.store.version
        same = incarnation == self.incarnation
        changes = None
        if cursor and (same or not incarnation):
            page = self.store.snapshot_page(Key(cursor), max_keys=limit, max_bytes=POLL_BYTES)
        else:
            if not full and since > 0 and same:
                changes = self.store.changes_since(since, max_keys=limit, max_bytes=POLL_BYTES)
            page = (
                self.store.snapshot_page(None, max_keys=limit, max_bytes=POLL_BYTES)
                if changes is None
                else Page((), None)
            )
        report = self.sample_memory()
        return Inventory(
            incarnation=self.incarnation,
            version=current if changes is None else changes.version,
            full=changes is None,
            keys=page.keys if changes is None else changes.upserts,
            removed=() if changes is None else changes.removed,
            memory=report,
            status=self.status(report),
            name=self.name,
            zone=self.config.zone,
            epoch=self.newest_epoch,
            next_cursor=page.last or "",
            more=changes is not None and changes.more,
        )

    async def run_directive(self, directive: Directive) -> Outcome:
        return await self.runner.run(directive)

    async def run_directive_batch(
        self, directives: Sequence[Directive], emit: Callable[[list[Outcome]], None]
    ) -> None:
        await self.runner.run_batch(directives, emit)

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

    def put_many(self, values: Sequence[tuple[Key, bytes, str]]) -> Stored:
        """Store verified values, each ``(key, data, checksum)``, all of them or none.

        The rules of ``put``, judged for the batch as a whole before anything is stored:

        1. a key held with other content, or given twice with different content:
           ``ContentConflict``; the same content again counts as ``unchanged``;
        2. a value larger than ``max_value_bytes``, or new values that together would exceed
           the memory limit: ``TooLarge`` (memory is judged once, for their sum);
        3. the agent shutting down: ``Unavailable``.
        """
        self._refuse_if_closing()
        held_value = self.store.get
        new: dict[Key, tuple[Key, bytes, str]] = {}
        unchanged = total = largest = 0
        for value in values:
            key, data, checksum = value
            held = held_value(key)
            if held is None:
                given = new.get(key)
                if given is None:
                    new[key] = value
                    size = len(data)
                    total += size
                    largest = max(largest, size)
                    continue
                if given[2] != checksum:
                    raise ContentConflict(f"{key!r} is given twice with different content")
            elif held.checksum != checksum:
                raise ContentConflict(f"{key!r} already holds other content; keys are immutable")
            unchanged += 1
        if not new:
            return Stored(0, unchanged, 0)
        cond = self.conditions()
        some = next(iter(new))
        # The per-value cap holds when the largest value is within it; then the same rule judges
        # the room for all of them, as one value of their total size.
        verdict = integrity.judge_put(self.store, some, largest, cond)
        if not isinstance(verdict, Refuse):
            whole = dataclasses.replace(cond, max_value_bytes=max(total, cond.max_value_bytes))
            verdict = integrity.judge_put(self.store, some, total, whole)
        if isinstance(verdict, Refuse):
            raise TooLarge(verdict.message)
        return Stored(len(new), unchanged, self.store.add_many(new.values()))

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
        held = self.store.get(key)
        if held is not None:
            # A Put stored the key meanwhile (Puts take no key lock): serve what is stored, and
            # never stream content other than the key's.
            if held.checksum != value.checksum:
                raise ContentConflict(
                    f"{key!r} was stored with other content while it was being fetched; "
                    "keys are immutable"
                )
            return held, False
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
        return self.promise_keep_batch([(key, checksum)], lease)[0]

    def promise_keep_batch(
        self, items: Sequence[tuple[Key, str]], lease: float | None
    ) -> list[Promise | Refuse]:
        """``promise_keep`` for each ``(key, checksum)``, under one sample of the conditions."""
        if lease is not None and not lease > 0:
            raise InvalidRequest(f"a lease must be positive, got {lease:g} s")
        cond = self.conditions()
        seconds = min(self.config.lease if lease is None else lease, self.config.max_lease)
        now = self.clock()
        answers: list[Promise | Refuse] = []
        for key, checksum in items:
            verdict = integrity.judge_keep(self.store, key, checksum, cond)
            if isinstance(verdict, Refuse):
                answers.append(verdict)
            else:
                answers.append(Promise(self.store.promise(key, now + seconds) - now))
        return answers

    def request_close(self, reason: str, *, force: bool = False) -> None:
        """Agree to shut down: refused while any key is held, unless ``force``, since an agent
        never loses data on someone else's word. From here on the agent reports CLOSING and takes
        no new data; the agent owning this node stops once ``close_requested`` is set."""
        held = len(self.store)
        if held and not force:
            raise Refused(
                None, f"holds {held} key(s): it closes only when empty (or with force set)"
            )
        log.info(
            "closing on request%s%s",
            f": {reason}" if reason else "",
            f" (force: {held} key(s) dropped)" if held else "",
        )
        self.closing = True
        self.close_requested.set()

    async def close(self) -> None:
        await self.peers.close()

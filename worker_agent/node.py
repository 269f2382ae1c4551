"""The agent's state and the operations its gRPC calls map onto, without servers or tasks.

``Node`` ties the store, the memory monitor, the peer channels and the directive runner together
and answers each call with one method: ``poll``, ``put``, ``put_many``, ``reading``, ``pin``,
``unpin``, ``delete``, ``promise_keep``, ``run_directive``. User-facing failures raise the domain
errors of ``errors``; the servicer maps them to status codes. Owning the server and the background
tasks is ``agent``'s job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from amm.base.malloc import trim
from amm.base.security.identity import SHARED_AGENT_NAME
from amm.base.validation import epoch_problem
from worker_agent import integrity
from worker_agent.bulk import BulkServer
from worker_agent.config import AgentConfig
from worker_agent.confirm import AmmPort, Confirmations
from worker_agent.directives import DirectiveRunner, KeyLocks, Outcome, OutcomeStatus
from worker_agent.errors import (
    AgentError,
    ContentConflict,
    DataLoss,
    InvalidRequest,
    Refused,
    TooLarge,
    Unavailable,
    UnknownKey,
)
from worker_agent.integrity import Conditions, Directive, Reason, Refuse
from worker_agent.memory import ByteBudget, MemoryMonitor, MemoryProbe, MemoryReport
from worker_agent.store import Key, KeyInfo, Page, Reservation, Store, Value
from worker_agent.traffic import Traffic
from worker_agent.transfer import FetchFailure, Peers

log = logging.getLogger(__name__)

#: Reasons of refused puts besides the integrity rules' (``Node.refusals``): other content
#: under the key, here or elsewhere in the cluster; the AMM could not be asked.
CONTENT_CONFLICT = "content_conflict"
AMM_UNAVAILABLE = "amm_unavailable"
#: Bytes of values removed since the last trim after which ``housekeeping`` trims the heap;
#: it does anyway after ``TRIM_EVERY`` seconds (memory that gRPC and the event loop freed since).
TRIM_AFTER_BYTES = 1024 * 1024
TRIM_EVERY = 60.0
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
class Holdings:
    """Which of some keys the agent holds (``amm.v1.HoldsKeysResponse``)."""

    incarnation: str
    version: int
    keys: tuple[KeyInfo, ...]


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


class Promise(NamedTuple):
    """A keep-promise granted: the lease ends ``remaining`` seconds from now. A NamedTuple: a
    batch makes thousands, and answers alike are told apart by hashing them."""

    remaining: float


@dataclass(frozen=True, slots=True)
class Forgotten:
    """A tombstone the AMM sends (``amm.v1.ForgottenKey``)."""

    key: Key
    tombstone: int
    put_again: bool = False


class Node:
    """One worker's keys, memory and directives; the address is set once the server is bound."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        probe: MemoryProbe,
        clock: Callable[[], float],
        amm: AmmPort | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.incarnation = uuid.uuid4().hex
        self.address = ""
        self.closing = False
        #: Shutting down, but first draining (SIGTERM): still RUNNING to the AMM, so that it
        #: serves as a source while the AMM copies its keys elsewhere; takes nothing new.
        self.draining = False
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
        #: Bytes in and out and transfer durations, for the metrics.
        self.traffic = Traffic()
        #: The bulk port values are fetched from by peers (set by ``Agent.start``); None: every
        #: Fetch streams chunks over gRPC.
        self.bulk: BulkServer | None = None
        #: Requests refused, by (request, reason): ``put`` (a Put or PutMany call, once),
        #: ``promise_keep`` (each key of PromiseKeep or PromiseKeepBatch); directives are
        #: counted by the runner.
        self.refusals: collections.Counter[tuple[str, str]] = collections.Counter()
        # The since of the AMM's last incremental poll (``_release_changes``).
        self._acknowledged = 0
        # ``store.freed_bytes`` and the clock at the last malloc trim (``housekeeping``).
        self._trimmed_at = 0
        self._trimmed_when = clock()
        self.peers = Peers(
            bulk=config.bulk and config.security is None,
            fetch_timeout=config.fetch_timeout,
            source_timeout=config.source_timeout,
            max_value_bytes=config.max_value_bytes,
            max_channels=config.max_peer_channels,
            traffic=self.traffic,
            security=config.security,
        )
        #: Bytes of values being served (Get, Fetch), bounded: what gRPC buffers for readers.
        self.serving_budget = ByteBudget(config.serving_budget)
        self.memory = MemoryMonitor(
            probe,
            window=config.unmanaged_window,
            limit=config.memory_limit,
            pause_fraction=config.pause_fraction,
        )
        #: What the agent's AMM confirms (epochs, registered peers); None without an AMM, when
        #: the agent takes epochs and peers as its callers give them.
        self.confirmations = (
            None
            if amm is None
            else Confirmations(amm, epoch=lambda: self.newest_epoch, adopt=self.observe_epoch)
        )
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
            confirmations=self.confirmations,
        )

    @property
    def name(self) -> str:
        """``config.name``, else a named certificate's, else the advertised address."""
        return self.config.name or self._certified_name or self.address

    def observe_epoch(self, epoch: int) -> None:
        """Remember the newest AMM epoch seen (with an AMM: confirmed by it); directives from
        older epochs are refused."""
        self.newest_epoch = max(self.newest_epoch, epoch)

    def sample_memory(self) -> MemoryReport:
        return self.memory.sample(self.store.total_bytes, self.clock())

    def status(self, report: MemoryReport | None = None) -> WorkerStatus:
        if self.closing:
            return WorkerStatus.CLOSING
        if not self.memory.may_pause:  # no sample needed (a read of /proc each)
            return WorkerStatus.RUNNING
        if self.memory.paused(report or self.sample_memory()):
            return WorkerStatus.PAUSED
        return WorkerStatus.RUNNING

    def conditions(self) -> Conditions:
        return Conditions(
            newest_epoch=self.newest_epoch,
            confirms_epochs=self.confirmations is not None,
            paused=self.status() is WorkerStatus.PAUSED,
            closing=self.closing,
            draining=self.draining,
            memory_limit=self.config.memory_limit,
            max_value_bytes=self.config.max_value_bytes,
        )

    def holds(self, keys: Sequence[Key]) -> Holdings:
        """Which of ``keys`` are held now (each once, in the order asked): a read of the store in
        one step, so it is answered between two steps of any bulk work under way."""
        found = self.store.infos(dict.fromkeys(keys))
        return Holdings(self.incarnation, self.store.version, tuple(found))

    def poll(
        self,
        *,
        since: int,
        incarnation: str,
        full: bool,
        epoch: int,
        max_keys: int = 0,
        cursor: str = "",
        membership_version: int = 0,
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

        ``epoch`` above ``MAX_EPOCH`` is an invalid request. With an AMM, a poll's epoch is
        taken only once the AMM confirms it (``confirm``); until then the poll does not count as
        the AMM's, so a stranger polling with a huge epoch neither fences the AMM off nor keeps
        the agent from registering again.
        """
        problem = epoch_problem("epoch", epoch)
        if problem is not None:
            raise InvalidRequest(problem)
        if self.confirmations is None:
            self.observe_epoch(epoch)
            confirmed = True
        else:
            confirmed = self.confirmations.note_poll(epoch, membership_version)
        same = incarnation == self.incarnation
        if confirmed and epoch >= self.registered_epoch:
            # A superseded AMM (or a person with grpcurl) still polling must not keep this
            # agent from registering again with the AMM that forgot it.
            self.polled.set()
            if same and since > 0 and not full and not cursor:
                self._release_changes(since)
        limit = min(max_keys or DEFAULT_POLL_KEYS, MAX_POLL_KEYS)
        current = self.store.version
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

    async def admit(self, values: Sequence[tuple[Key, str]]) -> None:
        """Keys are immutable cluster-wide: refuse to store a ``(key, checksum)`` this agent
        lacks when the AMM knows other content under the key (``ContentConflict``, ALREADY_EXISTS
        on the wire), or when the AMM cannot be asked (``Unavailable``). One call for all of
        them; without an AMM, only the local rule holds (``put``)."""
        if self.confirmations is None:
            return
        held = self.store.get
        new = {key: digest for key, digest in values if held(key) is None}
        if not new:
            return
        try:
            known = await self.confirmations.lookup(
                list(new), storing=(self.address, self.incarnation)
            )
        except Unavailable:
            self.refusals["put", AMM_UNAVAILABLE] += 1
            raise
        for key, digest in new.items():
            other = known.get(key)
            if other is None or (other.checksum == digest and other.holders):
                continue
            where = ", ".join((*other.holders, *other.conflicting)[:3])
            self.refusals["put", CONTENT_CONFLICT] += 1
            raise ContentConflict(
                f"{key!r} already exists in the cluster with other content (checksum "
                f"{other.checksum[:12]}, on {where}); keys are immutable cluster-wide"
            )

    def reserve_put(self, key: Key, size: int, checksum: str) -> Reservation:
        """``check_put``, then count the ``size`` bytes about to be received against the
        memory limit (in one step: concurrent Puts each see the others' bytes). Release it just
        before ``put``."""
        self.check_put(key, size, checksum)
        return self.store.reserve(size)

    def check_put(self, key: Key, size: int, checksum: str) -> None:
        """Fail early, before the value is received, when it cannot be stored."""
        self._refuse_if_closing()
        held = self.store.get(key)
        if held is not None and (held.size != size or (checksum and checksum != held.checksum)):
            raise self._refused(
                CONTENT_CONFLICT,
                ContentConflict(f"{key!r} already holds other content; keys are immutable"),
            )
        verdict = integrity.judge_put(self.store, key, size, self.conditions())
        if isinstance(verdict, Refuse):
            raise self._refused(verdict.reason, TooLarge(verdict.message))

    def put(self, key: Key, data: bytes, checksum: str) -> tuple[KeyInfo, bool]:
        """Store a verified value; ``created`` is False when the same content was there.

        Refused while the agent shuts down: a value acknowledged now would be lost at exit.
        """
        self._refuse_if_closing()
        held = self.store.get(key)
        if held is not None:
            if held.checksum != checksum:
                raise self._refused(
                    CONTENT_CONFLICT,
                    ContentConflict(f"{key!r} already holds other content; keys are immutable"),
                )
        else:
            verdict = integrity.judge_put(self.store, key, len(data), self.conditions())
            if isinstance(verdict, Refuse):
                raise self._refused(verdict.reason, TooLarge(verdict.message))
            self.store.add(key, data, checksum)
        self.store.put_again(key)  # an explicit Put undoes a Forget
        self.traffic.received["put"] += len(data)
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
        unchanged = total = largest = received = 0
        for value in values:
            key, data, checksum = value
            received += len(data)
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
                    raise self._refused(
                        CONTENT_CONFLICT,
                        ContentConflict(f"{key!r} is given twice with different content"),
                    )
            elif held.checksum != checksum:
                raise self._refused(
                    CONTENT_CONFLICT,
                    ContentConflict(f"{key!r} already holds other content; keys are immutable"),
                )
            unchanged += 1
        if not new:
            self._put_again(values)
            self.traffic.received["put_many"] += received
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
            raise self._refused(verdict.reason, TooLarge(verdict.message))
        stored = self.store.add_many(new.values())
        self._put_again(values)
        self.traffic.received["put_many"] += received
        return Stored(len(new), unchanged, stored)

    def _put_again(self, values: Sequence[tuple[Key, bytes, str]]) -> None:
        """An explicit Put undoes a Forget: copies of the keys are taken again."""
        for key, _, _ in values:
            self.store.put_again(key)

    def _refuse_if_closing(self) -> None:
        if self.closing or self.draining:
            raise self._refused(Reason.CLOSING, Unavailable("agent is shutting down"))

    def _refused(self, reason: Reason | str, error: AgentError) -> AgentError:
        """Count a refused put by ``reason`` (``refusals``); the error to raise."""
        label = reason if isinstance(reason, str) else reason.name.lower()
        self.refusals["put", label] += 1
        return error

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
            await self._vet_sources(sources)
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

    @contextlib.asynccontextmanager
    async def serving(self, nbytes: int) -> AsyncIterator[None]:
        """Count a value of ``nbytes`` being served within ``serving_budget`` and against the
        memory limit; wait up to ``stream_idle_timeout`` for room, then ``TooLarge``."""
        budget = self.serving_budget
        charge = budget.charge(nbytes)
        if not await budget.take(charge, self.config.stream_idle_timeout):
            raise TooLarge(
                f"{budget.used} bytes are being served, the most at once is {budget.limit}; "
                "try again later"
            )
        try:
            with self.store.reserve(charge):
                yield
        finally:
            budget.give_back(charge)

    async def _vet_sources(self, sources: Sequence[str]) -> None:
        """With an AMM, a Get fetches only from workers registered with it: not from a server
        that would hand over other bytes under a real key, and not from any address a caller
        wants probed from here. Judged before anything is dialled; ``InvalidRequest`` names
        the strangers."""
        if self.confirmations is None or not sources:
            return
        unknown = await self.confirmations.strangers(s for s in sources if s != self.address)
        if unknown:
            shown = ", ".join(repr(s[:100]) for s in unknown[:3])
            raise InvalidRequest(
                f"sources must be workers registered with the AMM at {self.confirmations.amm}; "
                f"not registered: {shown}"
            )

    async def _fetch_missing(self, key: Key, sources: Sequence[str]) -> tuple[Value, bool]:
        """The value of ``key`` from a peer, and whether it was kept here.

        With an AMM, it is asked what content the cluster holds under the key (and, when no
        source is named, who holds it, after a fresh poll), and only that content is taken: a
        source holding other content answers NOT_FOUND and the next one is asked, so a fetched
        replica never shadows the key's content."""
        candidates = [s for s in sources if s != self.address]
        expected_size: int | None = None
        expected = ""
        if self.confirmations is not None:
            known = (await self.confirmations.lookup([key], fresh=not sources)).get(key)
            if known is not None:
                expected_size, expected = known.size, known.checksum
            if not sources:
                named = known.holders if known is not None else ()
                candidates = [
                    s for s in named if s != self.address and integrity.is_peer_address(s)
                ]
                if not candidates:
                    raise UnknownKey(f"no worker holds {key!r}")
        elif not sources:
            raise UnknownKey(f"{key!r} is not held here, and no source or AMM to ask")
        began = self.store.generation
        # Counted while it arrives; served anyway when there is no room to keep it (judged below).
        with self.store.reserve(expected_size or 0):
            result = await self.peers.fetch(
                key,
                candidates,
                expected_size=expected_size,
                expected_checksum=expected,
                requester=self.address,
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
        if self.store.doomed(key, began, self.clock()):
            why = "it was forgotten cluster-wide"  # before or while it was fetched
        elif isinstance(verdict, Refuse):
            why = verdict.message
        elif cond.closing or cond.draining or cond.paused:
            why = "the worker is paused" if cond.paused else "the worker is shutting down"
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

    def _release_changes(self, since: int) -> None:
        """The AMM polls ``since``: it holds every change up to there, so the changelog lets
        them go. Up to the ``since`` of the poll before, not this one: a fresh query of the AMM
        may poll at the same time as its cycle, from a version a little older."""
        previous, self._acknowledged = self._acknowledged, since
        self.store.release_changes(min(previous, since))

    def housekeeping(self) -> None:
        """From time to time: let go of expired tombstones and directive outcomes, and give
        the heap's free memory back to the system (``malloc.trim``) once values were removed,
        or a minute after the last time: freed in the middle of the heap, it stays in the
        process otherwise."""
        now = self.clock()
        self.store.expire_tombstones(now)
        self.runner.expire_history(now)
        freed = self.store.freed_bytes
        if freed - self._trimmed_at >= TRIM_AFTER_BYTES or now - self._trimmed_when >= TRIM_EVERY:
            self._trimmed_at, self._trimmed_when = freed, now
            trim()

    def bury(self, tombstones: Sequence[Forgotten]) -> int:
        """Apply the AMM's tombstones (sent with a poll); returns the copies deleted.

        A tombstone new to this agent deletes the copy held, unless a reader pinned it (as
        ``Delete`` with ``forget``: the AMM reports that copy to the operator), and from then on
        copies of the key whose transfer was under way are discarded and no REPLICATE of it is
        carried out, until the key is put again. One taken already changes nothing, so that a
        value put since stays when an AMM that restarted sends its tombstones again.
        """
        now, ttl = self.clock(), self.config.tombstone_ttl
        deleted = 0
        for t in tombstones:
            if t.put_again:
                self.store.put_again(t.key, t.tombstone)
                continue
            if not self.store.bury(t.key, t.tombstone, now, ttl):
                continue
            verdict = integrity.judge_delete(self.store, t.key, now, forget=True)
            if isinstance(verdict, Refuse):
                log.info("forgotten %r stays here for now: %s", t.key, verdict.message)
            elif self.store.remove(t.key):
                deleted += 1
        if deleted:
            log.info("deleted %d forgotten key(s)", deleted)
        return deleted

    async def delete(self, key: Key, *, forget: bool = False) -> bool:
        """Delete the local replica; False when it was not held.

        Without ``forget``, an agent with an AMM deletes only as it drops: once a holder of the
        same content that the AMM lists (asked again after a fresh poll when it lists none)
        promised to keep the key, so the last copy of a key, or the last two deleted at once,
        are refused, not lost. ``forget`` is the AMM's Forget deleting every replica: local
        pins still refuse it. Without an AMM, only the local rules hold."""
        verdict = integrity.judge_delete(self.store, key, self.clock(), forget=forget)
        if isinstance(verdict, Refuse):
            raise Refused(verdict.reason, f"cannot delete: {verdict.message}")
        held = self.store.get(key)
        if held is None:
            return False
        if forget or self.confirmations is None:
            return self.store.remove(key)
        keepers = await self._other_holders(key, held.checksum)
        if not keepers:
            raise Refused(
                None,
                f"cannot delete {key!r}: this is its only copy as far as the AMM at "
                f"{self.confirmations.amm} knows, and it would be lost; forget the key "
                "everywhere through the AMM (amm forget), or copy it elsewhere first",
            )
        outcome = await self.runner.drop_for_delete(key, held.checksum, keepers)
        if outcome.status is not OutcomeStatus.APPLIED:
            raise Refused(outcome.reason, f"cannot delete: {outcome.message}")
        return key not in self.store

    async def _other_holders(self, key: Key, checksum: str) -> list[str]:
        """The other workers the AMM lists as holding ``key`` with ``checksum``: as it last
        polled, or, when that names none, after a fresh poll."""
        assert self.confirmations is not None
        for fresh in (False, True):
            known = (await self.confirmations.lookup([key], fresh=fresh)).get(key)
            if known is not None and known.checksum == checksum:
                others = [h for h in known.holders if h != self.address]
                if others:
                    return others
        return []

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
        store, until = self.store, now + seconds
        granted = Promise(until - now)  # the answer of every key not promised longer already
        # The usual keys in one step (``Store.promise_held_many``); any other judged in full.
        if cond.closing or cond.draining:
            expiries: list[float | None] = [None] * len(items)
        else:
            expiries = store.promise_held_many(items, until)
            if expiries.count(until) == len(items):  # each promised for the lease asked
                return [granted] * len(items)
        for (key, checksum), expires in zip(items, expiries, strict=True):
            if expires is not None:
                answers.append(granted if expires == until else Promise(expires - now))
                continue
            verdict = integrity.judge_keep(store, key, checksum, cond)
            if isinstance(verdict, Refuse):
                self.refusals["promise_keep", verdict.reason.name.lower()] += 1
                answers.append(verdict)
                continue
            expires = store.promise(key, until)
            answers.append(granted if expires == until else Promise(expires - now))
        return answers

    async def request_close(self, reason: str, *, force: bool = False) -> int:
        """Agree to shut down: refused while any key is held, unless ``force``, since an agent
        never loses data on someone else's word. From here on the agent reports CLOSING and takes
        no new data; the agent owning this node stops once ``close_requested`` is set.

        Returns how many keys are lost with the agent: with ``force``, those of the keys held
        that no other worker held as far as the AMM knew (all of them without an AMM, or when
        it cannot be asked), also logged as a warning: never lost silently."""
        held = len(self.store)
        if held and not force:
            raise Refused(
                None, f"holds {held} key(s): it closes only when empty (or with force set)"
            )
        self.closing = True  # no Put lands while the keys are counted
        lost = await self._keys_only_here() if held else 0
        if lost:
            log.warning(
                "closing on request (force%s): %d key(s) held, %d of them with no copy on another "
                "worker as far as the AMM knew: those are lost",
                f"; {reason}" if reason else "",
                held,
                lost,
            )
        else:
            log.info(
                "closing on request%s%s",
                f": {reason}" if reason else "",
                f" (force: {held} key(s) dropped, each held elsewhere)" if held else "",
            )
        self.close_requested.set()
        return lost

    async def _keys_only_here(self) -> int:
        """How many keys held here no other worker holds with the same content, as the AMM
        knows; every key held when there is no AMM to ask, or it cannot be asked."""
        held = {key: value.checksum for key in self.store if (value := self.store.get(key))}
        if self.confirmations is None:
            return len(held)
        try:
            known = await self.confirmations.lookup(list(held))
        except Unavailable as err:
            log.warning("cannot ask the AMM which keys exist elsewhere: %s", err.message)
            return len(held)
        me = self.address
        return sum(
            1
            for key, digest in held.items()
            if (k := known.get(key)) is None
            or k.checksum != digest
            or not any(h != me for h in k.holders)
        )

    async def close(self) -> None:
        if self.bulk is not None:
            await self.bulk.close()
        if self.confirmations is not None:
            await self.confirmations.close()
        await self.peers.close()

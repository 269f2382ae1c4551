"""Carrying out the AMM's directives: REPLICATE and DROP, idempotent, one key at a time.

What it covers: the procedures themselves (judge, mark, ask, re-judge, apply), their idempotency by
directive id, per-key serialisation and a bound on concurrency. What it does not: deciding (the
rules are in ``integrity``), the wire (``servicer`` converts messages), peer I/O (``transfer``).
Outcomes are values: ``Outcome(status, reason, message, inventory_version)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import logging
import math
import operator
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import NamedTuple

from amm.base.validation import MAX_EPOCH
from worker_agent import integrity
from worker_agent.config import AgentConfig
from worker_agent.confirm import Confirmations
from worker_agent.errors import Unavailable
from worker_agent.integrity import Accept, Conditions, Directive, Op, Reason, Refuse
from worker_agent.pacing import Pace, parts
from worker_agent.store import Key, Store
from worker_agent.transfer import FetchFailure, Peers, PromiseAnswer

log = logging.getLogger(__name__)

#: How many directive outcomes are remembered for idempotency, at most.
HISTORY_LIMIT = 100_000
#: How long an outcome is remembered, in seconds: the AMM sends a directive again only while it
#: waits for its outcome, up to its directive deadline (``--directive-timeout``, 30 s by
#: default). Each costs about 450 bytes: kept for as long as the count allows, a steady stream
#: of directives held 45 MB.
HISTORY_TTL = 120.0
#: Most keys asked of one keeper in one PromiseKeepBatch call.
KEEP_BATCH = 10_000
#: Most drops joined into one ``_drop_batch`` from the batches waiting their turn at once
#: (``DirectiveRunner._drop_joined``).
JOIN_DROPS = 8_192
#: Keys per extra ``promise_timeout`` a batch of promises may take to be answered: a keeper
#: busy with its own work answers thousands of keys later than one, and waiting for it costs
#: far less than refusing thousands of drops to plan them again.
KEYS_PER_TIMEOUT = 500
#: The longest a batch of promises may take, in seconds.
MAX_KEEP_WAIT = 8.0
#: The lease asked of keepers is at least this many times the time their recent answers took
#: to be settled (within ``2.5 x`` the wait for them): see ``DirectiveRunner._keep_terms``.
ROUND_TRIPS_PER_LEASE = 4.0


class OutcomeStatus(enum.Enum):
    __hash__ = object.__hash__  # by identity, as it compares (see ``integrity.Reason``)

    APPLIED = 1
    REFUSED = 2
    FAILED = 3


#: ``.value`` of each status and reason, looked up (an Enum's ``value`` is a Python property).
_STATUS_VALUES = {status: status.value for status in OutcomeStatus}
_REASON_VALUES: dict[Reason | None, int | None] = {reason: reason.value for reason in Reason}
_REASON_VALUES[None] = None


class Outcome(NamedTuple):
    """How a directive ended (``amm.v1.DirectiveOutcome``); a NamedTuple, as a batch of drops
    ends thousands at once."""

    directive_id: str
    status: OutcomeStatus
    reason: Reason | None
    message: str
    inventory_version: int
    duplicate: bool = False
    dropped_version: int = 0
    """An applied DROP: the store's version read in the same step that found the key gone
    (``DirectiveOutcome.dropped_version``), so the AMM may take it into its view before it
    polls; 0 otherwise."""


@functools.lru_cache(maxsize=256)
def _kept_by(keeper: str) -> Accept:
    """The verdict of a drop that ``keeper`` promised to keep, made once per keeper."""
    return Accept(message=f"dropped; {keeper} keeps it")


def _describe(answer: PromiseAnswer) -> str:
    if answer.kept:
        return f"{answer.address}: kept but granted no lease (an older agent?), not relied on"
    reason = answer.reason.name if answer.reason else "unreachable"
    return f"{answer.address}: {reason} {answer.message}".strip()


class _Drop(NamedTuple):
    """A drop waiting for a keep-promise: the holders to ask (a NamedTuple, made without a
    Python frame: a batch waits on thousands)."""

    directive: Directive
    checksum: str
    keepers: tuple[str, ...]


class _Waiting(dict[str, _Drop]):
    """The drops of a batch waiting for a keep-promise, by directive id, and what their keepers
    said when they refused (kept apart: most drops are settled by their first answer)."""

    def __init__(self) -> None:
        super().__init__()
        self._heard: dict[str, dict[str, str]] = {}

    def answered(self, drop: _Drop, keeper: str, said: str) -> bool:
        """Note what ``keeper`` said of ``drop``; whether every keeper has answered now."""
        answers = self._heard.setdefault(drop.directive.id, {})
        answers[keeper] = said
        return len(answers) == len(drop.keepers)

    def refusal(self, drop: _Drop) -> Refuse:
        answers = self._heard.get(drop.directive.id, {})
        said = [answers.get(k, f"{k}: no answer in time") for k in drop.keepers]
        return Refuse(
            Reason.NO_CONFIRMED_HOLDER,
            f"no holder promised to keep {drop.directive.key!r} ({'; '.join(said)})",
        )


#: A finished directive as the history keeps it: (key, op, id, status, reason, message, inventory
#: version, when it ended by the runner's clock), plain values in a plain tuple, which the cyclic GC
#: stops tracking. Kept as objects (a subject and an outcome), the 100,000 entries of a busy agent
#: were most of the objects its full collections walked, each a stall of the loop of about 100 ms.
_Done = tuple[str, int, str, int, int | None, str, int, float]


def _outcome_of(done: _Done) -> Outcome:
    _, op, directive_id, status, reason, message, version, _ = done
    applied = OutcomeStatus(status)
    return Outcome(
        directive_id,
        applied,
        None if reason is None else Reason(reason),
        message,
        version,
        dropped_version=version if op == _DROP and applied is OutcomeStatus.APPLIED else 0,
    )


#: ``tuple.__new__``: makes a NamedTuple from a tuple of all its fields, as ``_make`` does,
#: without the Python frame of its ``__new__`` (for the thousands of a batch).
_new_tuple = tuple.__new__
#: Drops of a batch registered, and remembered, in one step (C-level bulk operations).
BULK = 1024
#: A directive's holders, read in C.
_HOLDERS = operator.attrgetter("holders")
#: ``Op.DROP.value``, as the history keeps it.
_DROP = Op.DROP.value


class _Joinable(NamedTuple):
    """A batch of drops waiting for its turn (``DirectiveRunner._drop_joined``), and the future
    of its outcomes (in order) when another batch's turn carries it out."""

    drops: list[Directive]
    outcomes: asyncio.Future[list[Outcome]]


class _Subject(NamedTuple):
    """What a directive id stands for: a repeated id must name the same key and op."""

    key: Key
    op: Op


class KeyLocks:
    """One asyncio lock per key, created on demand and forgotten when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Key, tuple[asyncio.Lock, list[int]]] = {}
        #: The keys someone holds or awaits the lock of (``in``: ``__contains__`` without a call,
        #: asked for each drop of a batch).
        self.held: Mapping[Key, object] = self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: Key) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)

    def __contains__(self, key: object) -> bool:
        """Whether someone holds or awaits the lock of ``key``."""
        return key in self._locks


class DirectiveRunner:
    """Runs directives against the store; ``run`` never raises except on cancellation."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        store: Store,
        peers: Peers,
        locks: KeyLocks,
        conditions: Callable[[], Conditions],
        observe_epoch: Callable[[int], None],
        address: Callable[[], str],
        clock: Callable[[], float],
        confirmations: Confirmations | None = None,
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        self._config = config
        #: None without an AMM: the agent then takes epochs and peers as they come.
        self._confirmations = confirmations
        self._store = store
        self._peers = peers
        self._locks = locks
        self._conditions = conditions
        self._observe_epoch = observe_epoch
        self._address = address
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_concurrent_directives)
        # By id: what the directive was about (key, op), how it ended and when (``_Done``).
        self._history: collections.OrderedDict[str, _Done] = collections.OrderedDict()
        self._history_limit = history_limit
        # By id: the directive (what it is about) and the future of its outcome (a
        # batch of drops shares one future, set once for all its ids).
        self._running: dict[str, tuple[Directive, asyncio.Future[dict[str, Outcome]]]] = {}
        # How long keepers' answers took to be settled lately, in seconds (``_keep_terms``).
        self._keep_round_trip = 0.0
        # One batch of drops at a time: they are CPU work on this loop and on the keepers',
        # and run side by side they only slowed each other past their promise deadlines.
        self._dropping = asyncio.Lock()
        # The batches of drops waiting for ``_dropping``, in the order they asked: whoever
        # takes the lock carries out every one it can join to its own (``_drop_joined``).
        self._joinable: collections.deque[_Joinable] = collections.deque()
        #: Directives carried out (repeated ids not counted again), by (op, status, reason):
        #: read by the metrics.
        self.counts: collections.Counter[tuple[Op, OutcomeStatus, Reason | None]] = (
            collections.Counter()
        )

    async def run(self, directive: Directive) -> Outcome:
        """Carry out ``directive`` once per id; a repeated id gets the same outcome back.

        Judged before the history of ids, so that no remembered outcome is handed out:

        1. Malformed: refused INVALID.
        2. From an epoch older than the newest seen: refused STALE_EPOCH, even when its id was
           seen (a superseded AMM must learn that it is superseded, not get old outcomes back).
        3. Its id was seen for another key or op (an AMM that lost its state and reuses ids):
           refused INVALID; the remembered outcome stays.

        With an AMM, a directive of a newer epoch than confirmed waits for the AMM to be asked
        (``confirm``) before 2 is judged, and is refused UNCONFIRMED_EPOCH unless the AMM runs
        that epoch (FAILED when it cannot be asked). A directive refused as invalid (1, 3)
        tells nothing trustworthy: its epoch does not count as the newest seen. Otherwise, by
        id:

        4. Seen and finished: the stored outcome, marked duplicate.
        5. Seen and still running: wait for that run's outcome, marked duplicate.
        6. The first run was cancelled (its stream ended): run it here after all.
        """
        refused = integrity.validate(directive)
        if refused is None:
            try:
                await self._confirm_epoch(directive.epoch)
            except Unavailable as err:
                return self._outcome(
                    directive,
                    Refuse(Reason.UNCONFIRMED_EPOCH, err.message),
                    OutcomeStatus.FAILED,
                )
            refused = integrity.judge_epoch(directive, self._conditions())
        if refused is not None:
            return self._outcome(directive, refused)
        subject = _Subject(directive.key, directive.op)
        seen = self._subject_of(directive.id)
        if seen is not None and seen != subject:
            return self._reused(directive, seen)
        self._observe_epoch(directive.epoch)
        while True:
            done = self._history.get(directive.id)
            if done is not None:
                self._history.move_to_end(directive.id)
                return _outcome_of(done)._replace(duplicate=True)
            entry = self._running.get(directive.id)
            if entry is None:
                break
            running = entry[1]
            try:
                outcomes = await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if running.cancelled() and task is not None and not task.cancelling():
                    continue
                raise
            return outcomes[directive.id]._replace(duplicate=True)

        future: asyncio.Future[dict[str, Outcome]] = asyncio.get_running_loop().create_future()
        self._running[directive.id] = (directive, future)
        try:
            outcome = await self._execute(directive)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as err:
            log.exception("directive %s failed unexpectedly", directive.id)
            self.counts[directive.op, OutcomeStatus.FAILED, None] += 1
            outcome = Outcome(
                directive.id,
                OutcomeStatus.FAILED,
                None,
                f"internal error: {type(err).__name__}",
                self._store.version,
            )
        finally:
            del self._running[directive.id]
        future.set_result({directive.id: outcome})
        self._remember(subject, outcome)
        return outcome

    async def run_batch(
        self, directives: Sequence[Directive], emit: Callable[[list[Outcome]], None]
    ) -> None:
        """Carry out a batch as if each directive had come alone; ``emit`` gets the outcomes in
        groups as they end.

        The DROPs that are new, well formed, current and of distinct keys nothing else here is
        working on run as one ``_drop_batch`` (each keeper asked once for all its keys);
        everything else (replicates, repeated ids, refusals) runs through ``run``, concurrently.
        A newer epoch is confirmed with the AMM once for the batch, before it is sorted.

        Every loop over the batch lets the event loop in (``pacing``), so polls and reads are
        answered while a batch of thousands is carried out; which drops form the group (ids and
        keys nothing else holds) is decided in one step with their registration as running.
        """
        newer = [d.epoch for d in directives if d.epoch <= MAX_EPOCH]
        if newer:
            # Failing that, each directive of the epoch is failed on its own, saying why.
            with contextlib.suppress(Unavailable):
                await self._confirm_epoch(max(newer))
        cond = self._conditions()
        pace = Pace()
        candidates: list[Directive] = []
        alone: list[Directive] = []
        current_drop, held = integrity.current_drop, self._store.held
        peers_checked: dict[tuple[str, ...], bool] = {}
        for part in parts(directives, BULK):
            if await pace.breathe():
                cond = self._conditions()
            if integrity.current_drops(part, cond, peers_checked):  # the usual part, at once
                candidates += part
                continue
            for directive in part:
                if current_drop(directive, cond, peers_checked, held):
                    candidates.append(directive)
                else:
                    alone.append(directive)

        async def one(directive: Directive) -> None:
            emit([await self.run(directive)])

        tasks = [asyncio.create_task(one(d), name=f"directive {d.id!r}") for d in alone]

        def aside(directive: Directive) -> None:
            tasks.append(asyncio.create_task(one(directive), name=f"directive {directive.id!r}"))

        try:
            if candidates:
                outcomes = await self._run_drops(candidates, aside, pace)
                if outcomes:
                    emit(outcomes)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_drops(
        self, candidates: list[Directive], aside: Callable[[Directive], None], pace: Pace
    ) -> list[Outcome]:
        """``_drop_batch`` with the bookkeeping ``run`` keeps per id: a repeated id arriving
        meanwhile waits for this outcome, and each outcome is remembered.

        A candidate joins the batch if its id is new and its key is not taken (by an earlier
        candidate or a directive in hand), checked and registered as running in one synchronous
        step; the others are handed to ``aside`` (run alone, as if sent alone). Registration and
        settling pause between directives, never within one. The batch's ids share one future of
        their outcomes (a future per drop was a tenth of the batch's bookkeeping)."""
        batch: asyncio.Future[dict[str, Outcome]] = asyncio.get_running_loop().create_future()
        running, history, locked = self._running, self._history, self._locks.held
        drops: list[Directive] = []
        keys: set[Key] = set()
        outcomes: list[Outcome] = []
        try:
            for part in parts(candidates, BULK):
                await pace.breathe()
                ids = [d.id for d in part]
                fresh = {d.key for d in part}
                # The usual part (ids new, keys distinct and free) is checked and registered
                # in a few C-level steps; one with any conflict goes directive by directive.
                if (
                    len(fresh) == len(part)
                    and fresh.isdisjoint(keys)
                    and fresh.isdisjoint(locked)
                    and history.keys().isdisjoint(ids)
                    and running.keys().isdisjoint(ids)
                    and len(set(ids)) == len(ids)
                ):
                    keys |= fresh
                    entries = zip(part, [batch] * len(part), strict=True)
                    running.update(zip(ids, entries, strict=True))
                    drops += part
                    self._observe_epoch(max(d.epoch for d in part))
                    continue
                for directive in part:
                    key, directive_id = directive.key, directive.id
                    if (
                        key in keys
                        or key in locked
                        or directive_id in history
                        or directive_id in running
                    ):
                        aside(directive)
                        continue
                    keys.add(key)
                    self._observe_epoch(directive.epoch)
                    running[directive_id] = (directive, batch)
                    drops.append(directive)
            if not drops:
                batch.cancel()
                return []
            vetted, outcome_of = await self._vet_peers(drops)
            if vetted:
                results = await self._drop_joined(vetted)
                if not outcome_of:  # every drop vetted, in order: its outcomes as they are
                    outcomes = results
                else:
                    outcome_of.update(zip([d.id for d in vetted], results, strict=True))
            if outcome_of:
                outcomes = [outcome_of[d.id] for d in drops]
        except asyncio.CancelledError:
            for directive in drops:
                del running[directive.id]
            batch.cancel()
            raise
        except Exception as err:
            log.exception("a batch of %d drops failed unexpectedly", len(drops))
            message = f"internal error: {type(err).__name__}"
            version = self._store.version
            outcomes = [Outcome(d.id, OutcomeStatus.FAILED, None, message, version) for d in drops]
            self.counts[Op.DROP, OutcomeStatus.FAILED, None] += len(drops)
        # The outcomes are known to whoever waits on the batch before any id leaves the running;
        # then each part's ids enter the history and leave the running in one step: a repeated
        # id finds one or the other, never neither. Cancelled during a pause, the rest is
        # settled at once.
        ids = [d.id for d in drops]
        batch.set_result(dict(zip(ids, outcomes, strict=True)))
        settled, remember = 0, self._remember_drops
        now = self._clock()
        try:
            while settled < len(drops):
                if settled and await pace.breathe():
                    now = self._clock()
                end = settled + BULK
                remember(drops[settled:end], ids[settled:end], outcomes[settled:end], now)
                settled = min(end, len(drops))
        finally:
            if settled < len(drops):
                remember(drops[settled:], ids[settled:], outcomes[settled:], self._clock())
            self._limit_history()
            self.expire_history(self._clock())
        return outcomes

    async def _drop_joined(self, drops: list[Directive]) -> list[Outcome]:
        """``_drop_batch`` of ``drops`` in turn (one batch at a time), joined with the batches
        that wait for their turn meanwhile.

        The AMM sends a cycle's drops as messages of a few hundred; while one batch runs the
        next ones queue here. Carried out as one, they cost one PromiseKeepBatch per keeper
        instead of one per keeper and message, and the batch's fixed costs once (a tenth of an
        agent's CPU per drop with messages of 500). Each drop is judged exactly as in a batch of
        its own: a batch sharing a key with one already taken is left for the next turn (two
        drops of one key run one after the other, as before), and the joined batch never
        exceeds ``JOIN_DROPS``. Whoever takes the lock finds its own batch in line (first, as
        the lock and the line are both first come, first served), or already carried out by an
        earlier holder. A batch whose owner was cancelled while waiting leaves the line; one
        already taken is carried out (each drop stays as safe as any: judged, promised and
        removed in its own steps) and its outcomes are not read. If the holder is cancelled
        mid-batch, the batches it took for others go back to the head of the line, and their
        owners carry them out (their drops judged anew: one that went through is found gone).
        """
        mine = _Joinable(drops, asyncio.get_running_loop().create_future())
        line = self._joinable
        line.append(mine)
        try:
            async with self._dropping:
                if mine.outcomes.done():
                    return mine.outcomes.result()
                line.remove(mine)
                taken = [mine]
                keys = {d.key for d in drops}
                count = len(drops)
                while line and count + len(line[0].drops) <= JOIN_DROPS:
                    theirs = {d.key for d in line[0].drops}
                    if not keys.isdisjoint(theirs):
                        break
                    keys |= theirs
                    count += len(line[0].drops)
                    taken.append(line.popleft())
                joined = drops if len(taken) == 1 else [d for t in taken for d in t.drops]
                try:
                    async with self._slots:
                        results = await self._drop_batch(joined)
                except BaseException:
                    line.extendleft(reversed([t for t in taken[1:] if not t.outcomes.done()]))
                    raise
                start = 0
                for joinable in taken:
                    end = start + len(joinable.drops)
                    if not joinable.outcomes.done():
                        joinable.outcomes.set_result(results[start:end])
                    start = end
                return results[: len(drops)]
        finally:
            if not mine.outcomes.done():
                mine.outcomes.cancel()
                with contextlib.suppress(ValueError):
                    line.remove(mine)

    def _remember_drops(
        self, drops: Sequence[Directive], ids: list[str], outcomes: Sequence[Outcome], now: float
    ) -> None:
        """``_remember`` for drops of a batch, then out of the running: the history's entries
        (``_Done``) made column by column, in C (the limit and the expiry are the caller's)."""
        count = len(ids)
        entries = zip(
            [d.key for d in drops],
            [_DROP] * count,
            ids,
            map(_STATUS_VALUES.__getitem__, [o.status for o in outcomes]),
            map(_REASON_VALUES.__getitem__, [o.reason for o in outcomes]),
            [o.message for o in outcomes],
            [o.inventory_version for o in outcomes],
            [now] * count,
            strict=True,
        )
        self._history.update(zip(ids, entries, strict=True))
        collections.deque(map(self._running.__delitem__, ids), maxlen=0)

    async def drop_for_delete(self, key: Key, checksum: str, keepers: Sequence[str]) -> Outcome:
        """Drop ``key`` as a DROP naming ``keepers`` would (a user's Delete with the holders
        the AMM lists): once one of them promised to keep it. Not an AMM's directive, so it
        has no id to remember; it takes the key lock and a slot like one."""
        directive = Directive(
            id=f"delete {key!r}",
            epoch=self._conditions().newest_epoch,
            op=Op.DROP,
            key=key,
            checksum=checksum,
            holders=tuple(keepers),
        )
        refused = integrity.validate(directive)
        if refused is not None:
            return self._outcome(directive, refused)
        return await self._execute(directive)

    def _subject_of(self, directive_id: str) -> _Subject | None:
        """What a known id stood for (finished or running), or None for a new id."""
        done = self._history.get(directive_id)
        if done is not None:
            return _Subject(Key(done[0]), Op(done[1]))
        running = self._running.get(directive_id)
        return None if running is None else _Subject(running[0].key, running[0].op)

    def _reused(self, directive: Directive, seen: _Subject) -> Outcome:
        return self._outcome(
            directive,
            Refuse(
                Reason.INVALID,
                f"directive id {directive.id!r} reused for another key/op: it was "
                f"{seen.op.name} {seen.key!r}, now {directive.op.name} {directive.key!r}",
            ),
        )

    async def _confirm_epoch(self, epoch: int) -> None:
        """Have the AMM confirm a newer ``epoch`` (a no-op without an AMM)."""
        if self._confirmations is not None:
            await self._confirmations.confirm_epoch(epoch)

    async def _vet_peers(
        self, directives: Sequence[Directive]
    ) -> tuple[list[Directive], dict[str, Outcome]]:
        """The directives whose peers (REPLICATE sources, DROP holders) to use, each narrowed to
        the registered workers, and outcomes for those that name none.

        Judged before any key lock or directive slot is taken, so a directive naming strangers
        (a silent server, an attacker's keeper) holds nothing up. Without an AMM every peer
        named is used, as before."""
        if self._confirmations is None:
            return list(directives), {}

        def peers(d: Directive) -> tuple[str, ...]:
            return d.sources if d.op is Op.REPLICATE else d.holders

        # The sets of peers named first (a batch of thousands names few), then their peers; a
        # batch of drops names its holders (read in C, without a call of ``peers`` each).
        if all(d.op is Op.DROP for d in directives):
            groups = set(map(_HOLDERS, directives))
        else:
            groups = set(map(peers, directives))
        named = {peer for group in groups for peer in group}
        try:
            unknown = set(await self._confirmations.strangers(named))
        except Unavailable as err:
            failed = Refuse(Reason.UNKNOWN_PEER, f"cannot check the peers named: {err.message}")
            return [], {d.id: self._outcome(d, failed, OutcomeStatus.FAILED) for d in directives}
        if not unknown:
            return list(directives), {}
        amm = self._confirmations.amm
        vetted: list[Directive] = []
        refused: dict[str, Outcome] = {}
        for d in directives:
            named_here = peers(d)
            kept = tuple(peer for peer in named_here if peer not in unknown)
            if len(kept) == len(named_here):
                vetted.append(d)
                continue
            strangers = ", ".join(sorted(set(named_here) - set(kept))[:3])
            if not kept:
                refused[d.id] = self._outcome(
                    d,
                    Refuse(
                        Reason.UNKNOWN_PEER,
                        f"no peer named is a worker registered with the AMM at {amm}: {strangers}",
                    ),
                )
                continue
            log.info("directive %s: ignoring peers the AMM does not list: %s", d.id, strangers)
            vetted.append(
                d._replace(sources=kept) if d.op is Op.REPLICATE else d._replace(holders=kept)
            )
        return vetted, refused

    async def _execute(self, directive: Directive) -> Outcome:
        vetted, refused = await self._vet_peers([directive])
        if not vetted:
            return refused[directive.id]
        directive = vetted[0]
        async with self._locks.hold(directive.key), self._slots:
            verdict = integrity.judge(self._store, directive, self._conditions(), self._clock())
            if isinstance(verdict, Refuse) or verdict.noop:
                return self._outcome(directive, verdict)
            if directive.op is Op.DROP:
                return await self._drop(directive)
            return await self._replicate(directive)

    async def _drop(self, directive: Directive) -> Outcome:
        """Drop the local replica once another holder promised to keep it (a batch of one)."""
        return (await self._drop_batch([directive]))[0]

    async def _drop_batch(self, drops: Sequence[Directive]) -> list[Outcome]:
        """Drop local replicas, each once one of its named holders promised to keep it.

        Every holder is asked once for all the keys of the batch it is named for (one
        PromiseKeepBatch call, in chunks), all holders at once, within one ``promise_timeout``:
        the first usable promise for a key wins. The AMM names as holders only the copies its
        plan keeps, so siblings dropping the same key in the same cycle do not ask each other.

        Two agents told at once to drop the last two replicas, each naming the other, must not
        both succeed. Two independent guards see to it:

        1. A key is judged and marked DROPPING in one synchronous step before asking, and this
           agent refuses to promise a key it is dropping: the two refuse each other.
        2. A holder that did promise recorded a lease, and the final re-judge (synchronous with
           the removal) refuses to drop a key promised to a peer.

        A promise is only relied on while it surely holds: the keeper's lease started after we
        asked, and it may be shorter than the one asked for (the keeper caps it at its
        ``max_lease`` and says what it granted). So if half of the shorter of the two has passed
        since we asked (a stalled loop, a slow answer), the drop is refused rather than trusting
        a promise that may have lapsed.
        """
        store = self._store
        done: dict[str, Outcome] = {}
        waiting = _Waiting()
        pace = Pace()
        try:
            await self._mark_drops(drops, done, waiting, pace)
            await self._ask_keepers(waiting, done, pace)
        finally:
            for drop in waiting.values():
                store.unmark_dropping(drop.directive.key)
                done[drop.directive.id] = self._outcome(drop.directive, waiting.refusal(drop))
        return [done[directive.id] for directive in drops]

    async def _mark_drops(
        self,
        drops: Sequence[Directive],
        done: dict[str, Outcome],
        waiting: _Waiting,
        pace: Pace,
    ) -> None:
        """Judge each drop and mark its key DROPPING in one synchronous step (moving it into
        ``waiting``), or settle it at once (into ``done``); the loop is let in between keys, and
        conditions and clock are read again after each pause."""
        store, me = self._store, self._address()
        cond, now = self._conditions(), self._clock()
        mark_if_clear, get, mark = store.mark_if_clear, store.get, store.mark_dropping
        # The holders named, without this agent, by the tuple named: a batch names few sets.
        keepers_of: dict[tuple[str, ...], tuple[str, ...]] = {}
        for part in parts(drops):
            if await pace.breathe():
                cond, now = self._conditions(), self._clock()
            for directive in part:
                # Validated and judged for its epoch already (``run_batch``, ``_execute``). The
                # usual drop (keepers named, the store's all-clear) is judged and marked in one
                # call; any other is judged in full.
                key, holders = directive.key, directive.holders
                keepers = keepers_of.get(holders)
                if keepers is None:
                    keepers = keepers_of[holders] = tuple(
                        holder for holder in dict.fromkeys(holders) if holder != me
                    )
                if keepers and not cond.closing:
                    held = mark_if_clear(key, directive.checksum, now)
                    if held is not None:
                        waiting[directive.id] = _new_tuple(
                            _Drop, (directive, held.checksum, keepers)
                        )
                        continue
                verdict = integrity.judge_drop(store, directive, cond, now)
                if isinstance(verdict, Refuse) or verdict.noop:
                    done[directive.id] = self._outcome(directive, verdict)
                    continue
                held = get(key)
                if not keepers or held is None:
                    done[directive.id] = self._outcome(
                        directive,
                        Refuse(
                            Reason.NO_CONFIRMED_HOLDER,
                            f"no holder promised to keep {directive.key!r} "
                            "(no holder other than this agent was named)",
                        ),
                    )
                    continue
                mark(key)
                waiting[directive.id] = _new_tuple(_Drop, (directive, held.checksum, keepers))

    async def _ask_keepers(self, waiting: _Waiting, done: dict[str, Outcome], pace: Pace) -> None:
        """Ask every named keeper for its keys at once; settle each drop at its first usable
        promise (removing it from ``waiting`` into ``done``), or once all its keepers refused."""
        if not waiting:
            return
        me = self._address()
        by_keeper: dict[str, list[_Drop]] = {}
        for drop in waiting.values():
            for keeper in drop.keepers:
                by_keeper.setdefault(keeper, []).append(drop)
        wait, lease = self._keep_terms(max(map(len, by_keeper.values())))
        asked_at = self._clock()
        asks: dict[asyncio.Task[list[PromiseAnswer]], tuple[str, list[_Drop]]] = {}
        for keeper, group in by_keeper.items():
            for start in range(0, len(group), KEEP_BATCH):
                chunk = group[start : start + KEEP_BATCH]
                task = asyncio.create_task(
                    self._peers.promise_keep_batch(
                        keeper,
                        [(drop.directive.key, drop.checksum) for drop in chunk],
                        lease=lease,
                        requester=me,
                        deadline=wait,
                    ),
                    name=f"promises {keeper} x{len(chunk)}",
                )
                asks[task] = (keeper, chunk)
        pending = set(asks)
        try:
            async with asyncio.timeout(wait):
                while pending and waiting:
                    finished, pending = await asyncio.wait(
                        pending, return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in finished:
                        keeper, chunk = asks[task]
                        await self._settle_drops(
                            keeper, chunk, task.result(), waiting, done, asked_at, lease, pace
                        )
                        self._note_keep_round_trip(self._clock() - asked_at)
        except TimeoutError:
            pass
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _settle_drops(
        self,
        keeper: str,
        chunk: list[_Drop],
        answers: list[PromiseAnswer],
        waiting: _Waiting,
        done: dict[str, Outcome],
        asked_at: float,
        lease: float,
        pace: Pace,
    ) -> None:
        """Settle the drops of ``chunk`` still waiting on ``keeper``'s answers: each is
        re-judged and removed in one synchronous step, so pausing between them is safe.

        The usual case (a promise in time, the store's all-clear) is ``_settle_drop`` inline,
        counted once for the chunk: a keeper answers thousands at once."""
        store = self._store
        clock, unmark, remove_if_clear = self._clock, store.unmark_dropping, store.remove_if_clear
        status, kept_by = OutcomeStatus.APPLIED, _kept_by(keeper).message
        # How long after asking each kind of answer (alike answers are one object) may be relied
        # on: within half its lease (``_settle_drop``); never, for a refusal.
        usable_for: dict[int, float] = {}
        count = 0
        try:
            for part in parts(list(zip(chunk, answers, strict=True))):
                await pace.breathe()
                if store.compaction_due:
                    await self._compact(pace)
                for drop, answer in part:
                    directive = drop.directive
                    directive_id = directive.id
                    if directive_id not in waiting:
                        continue
                    usable = usable_for.get(id(answer))
                    if usable is None:
                        usable = usable_for[id(answer)] = (
                            min(lease, answer.lease) / 2
                            if answer.kept and answer.lease is not None
                            else -math.inf
                        )
                    now = clock()
                    if now - asked_at < usable:
                        version = remove_if_clear(directive.key, drop.checksum, now)
                        if version is not None:
                            del waiting[directive_id]
                            # ``Outcome(...)`` without its Python ``__new__``: thousands a chunk.
                            done[directive_id] = _new_tuple(
                                Outcome,
                                (directive_id, status, None, kept_by, version, False, version),
                            )
                            count += 1
                            continue
                    verdict = self._settle_drop(drop, keeper, answer, waiting, asked_at, lease)
                    if verdict is not None:
                        del waiting[directive_id]
                        unmark(directive.key)
                        done[directive_id] = self._outcome(directive, verdict)
        finally:
            self.counts[Op.DROP, status, None] += count

    async def _compact(self, pace: Pace) -> None:
        """Rebuild the store's sorted index a slice at a time, paced with the drops that left
        it stale (``Store.compaction``), before ``remove`` would rebuild it at once."""
        with contextlib.closing(self._store.compaction()) as steps:
            for _ in steps:
                await pace.breathe()

    def _keep_terms(self, most: int) -> tuple[float, float]:
        """How long to wait for promises when a keeper is asked for ``most`` keys at most, and
        the lease to ask for. Up to ``KEYS_PER_TIMEOUT`` keys: ``promise_timeout`` and the
        configured lease. Beyond, one more ``promise_timeout`` per ``KEYS_PER_TIMEOUT`` keys (at
        most ``MAX_KEEP_WAIT``), and a lease long enough that a promise arriving by then can
        still be relied on (half of it must remain, see ``_settle_drop``)."""
        timeout, lease = self._config.promise_timeout, self._config.lease
        if most <= KEYS_PER_TIMEOUT:
            wait = timeout
        else:
            wait = min(timeout * math.ceil(most / KEYS_PER_TIMEOUT), max(timeout, MAX_KEEP_WAIT))
            lease = max(lease, 2.5 * wait)
        # Promises that came back as late as the recent ones must still be usable (half the
        # lease must remain when one is relied on): a loaded keeper or loop refused every drop
        # as "too late" under the configured lease while answering well within ``wait``. A
        # longer lease costs no safety (a promise is relied on only within half of it, counted
        # from before asking); it only keeps the keeper's copy for longer, hence the bound.
        adapted = min(ROUND_TRIPS_PER_LEASE * self._keep_round_trip, 2.5 * wait)
        return wait, max(lease, adapted)

    def _note_keep_round_trip(self, seconds: float) -> None:
        """Note how long a keeper's answers took to be settled: a slower one is taken at once,
        a faster one eases the estimate down (``_keep_terms``)."""
        known = self._keep_round_trip
        self._keep_round_trip = seconds if seconds > known else 0.8 * known + 0.2 * seconds

    def _settle_drop(
        self,
        drop: _Drop,
        keeper: str,
        answer: PromiseAnswer,
        waiting: _Waiting,
        asked_at: float,
        lease: float,
    ) -> integrity.Verdict | None:
        """What ``keeper``'s answer decides for ``drop``: None while other keepers may still
        promise."""
        if not (answer.kept and answer.lease is not None):
            if waiting.answered(drop, keeper, _describe(answer)):
                return waiting.refusal(drop)
            return None
        if self._clock() - asked_at >= min(lease, answer.lease) / 2:
            return Refuse(
                Reason.NO_CONFIRMED_HOLDER,
                f"{keeper}'s promise came too late to rely on; try again",
            )
        key = drop.directive.key
        verdict = integrity.judge_drop_commit(self._store, key, drop.checksum, self._clock())
        if isinstance(verdict, Accept) and not verdict.noop:
            self._store.remove(key)
            verdict = _kept_by(keeper)
        return verdict

    async def _replicate(self, directive: Directive) -> Outcome:
        """Fetch, verify, re-judge (memory may have filled meanwhile), then store.

        The key becomes visible only once its data is verified and stored in one step.
        """
        began = self._store.generation
        # The bytes under way count against the memory limit until they are stored (judged
        # again below, without them) or abandoned.
        with self._store.reserve(directive.size):
            result = await self._peers.fetch(
                directive.key,
                list(directive.sources),
                expected_size=directive.size,
                expected_checksum=directive.checksum,
                requester=self._address(),
            )
        if isinstance(result, FetchFailure):
            status = (
                OutcomeStatus.REFUSED
                if result.reason is Reason.CHECKSUM_MISMATCH
                else OutcomeStatus.FAILED
            )
            return self._outcome(directive, Refuse(result.reason, result.message), status)
        verdict = integrity.judge_replicate(
            self._store,
            directive,
            self._conditions(),
            received=len(result.data),
            now=self._clock(),
            since=began,
        )
        if isinstance(verdict, Accept) and not verdict.noop:
            self._store.add(directive.key, result.data, result.checksum)
            verdict = Accept(message=f"replicated from {result.source}")
        return self._outcome(directive, verdict)

    def _outcome(
        self,
        directive: Directive,
        verdict: integrity.Verdict,
        status: OutcomeStatus = OutcomeStatus.REFUSED,
    ) -> Outcome:
        version = self._store.version
        if isinstance(verdict, Accept):
            self.counts[directive.op, OutcomeStatus.APPLIED, None] += 1
            # A DROP is accepted only once its key is gone (removed, or found not held) in
            # this very step: the version read above is one at which it was gone.
            dropped = version if directive.op is Op.DROP else 0
            return Outcome(
                directive.id, OutcomeStatus.APPLIED, None, verdict.message, version, False, dropped
            )
        self.counts[directive.op, status, verdict.reason] += 1
        return Outcome(directive.id, status, verdict.reason, verdict.message, version)

    def _remember(
        self, subject: _Subject, outcome: Outcome, now: float | None = None, *, expire: bool = True
    ) -> None:
        """Note how ``outcome`` ended, at ``now`` (the clock by default); ``expire`` False leaves
        letting go of old outcomes to the caller (``expire_history``, once for a batch)."""
        reason = outcome.reason
        if now is None:
            now = self._clock()
        self._history[outcome.directive_id] = (
            subject.key,
            subject.op.value,
            outcome.directive_id,
            outcome.status.value,
            None if reason is None else reason.value,
            outcome.message,
            outcome.inventory_version,
            now,
        )
        if expire:
            self._limit_history()
            self.expire_history(now)

    def _limit_history(self) -> None:
        """Let go of the oldest outcomes beyond ``history_limit``."""
        history = self._history
        while len(history) > self._history_limit:
            history.popitem(last=False)

    def expire_history(self, now: float) -> None:
        """Let go of the outcomes older than ``HISTORY_TTL``, oldest first."""
        history, cutoff = self._history, now - HISTORY_TTL
        while history:
            if next(iter(history.values()))[-1] > cutoff:
                return
            history.popitem(last=False)
        # A dict keeps its table after deletions (hundreds of KiB after a burst of directives).
        self._history = collections.OrderedDict()

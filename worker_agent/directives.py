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
import dataclasses
import enum
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import NamedTuple

from worker_agent import integrity
from worker_agent.config import AgentConfig
from worker_agent.integrity import Accept, Conditions, Directive, Op, Reason, Refuse
from worker_agent.store import Key, Store
from worker_agent.transfer import FetchFailure, Peers, PromiseAnswer

log = logging.getLogger(__name__)

#: How many directive outcomes are remembered for idempotency.
HISTORY_LIMIT = 100_000


class OutcomeStatus(enum.Enum):
    APPLIED = 1
    REFUSED = 2
    FAILED = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a directive ended (``amm.v1.DirectiveOutcome``)."""

    directive_id: str
    status: OutcomeStatus
    reason: Reason | None
    message: str
    inventory_version: int
    duplicate: bool = False


def _describe(answer: PromiseAnswer) -> str:
    if answer.kept:
        return f"{answer.address}: kept but granted no lease (an older agent?), not relied on"
    reason = answer.reason.name if answer.reason else "unreachable"
    return f"{answer.address}: {reason} {answer.message}".strip()


class _Subject(NamedTuple):
    """What a directive id stands for: a repeated id must name the same key and op."""

    key: Key
    op: Op


class KeyLocks:
    """One asyncio lock per key, created on demand and forgotten when nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Key, tuple[asyncio.Lock, list[int]]] = {}

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
        history_limit: int = HISTORY_LIMIT,
    ) -> None:
        self._config = config
        self._store = store
        self._peers = peers
        self._locks = locks
        self._conditions = conditions
        self._observe_epoch = observe_epoch
        self._address = address
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_concurrent_directives)
        # By id: what the directive was about (key, op) and how it ended.
        self._history: collections.OrderedDict[str, tuple[_Subject, Outcome]] = (
            collections.OrderedDict()
        )
        self._history_limit = history_limit
        self._running: dict[str, tuple[_Subject, asyncio.Future[Outcome]]] = {}

    async def run(self, directive: Directive) -> Outcome:
        """Carry out ``directive`` once per id; a repeated id gets the same outcome back.

        Judged before the history of ids, so that no remembered outcome is handed out:

        1. Malformed: refused INVALID.
        2. From an epoch older than the newest seen: refused STALE_EPOCH, even when its id was
           seen (a superseded AMM must learn that it is superseded, not get old outcomes back).
        3. Its id was seen for another key or op (an AMM that lost its state and reuses ids):
           refused INVALID; the remembered outcome stays.

        A directive refused as invalid (1, 3) tells nothing trustworthy: its epoch does not
        count as the newest seen. Otherwise, by id:

        4. Seen and finished: the stored outcome, marked duplicate.
        5. Seen and still running: wait for that run's outcome, marked duplicate.
        6. The first run was cancelled (its stream ended): run it here after all.
        """
        refused = integrity.validate(directive) or integrity.judge_epoch(
            directive, self._conditions()
        )
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
                return dataclasses.replace(done[1], duplicate=True)
            entry = self._running.get(directive.id)
            if entry is None:
                break
            running = entry[1]
            try:
                outcome = await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if running.cancelled() and task is not None and not task.cancelling():
                    continue
                raise
            return dataclasses.replace(outcome, duplicate=True)

        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._running[directive.id] = (subject, future)
        try:
            outcome = await self._execute(directive)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as err:
            log.exception("directive %s failed unexpectedly", directive.id)
            outcome = Outcome(
                directive.id,
                OutcomeStatus.FAILED,
                None,
                f"internal error: {type(err).__name__}",
                self._store.version,
            )
        finally:
            del self._running[directive.id]
        future.set_result(outcome)
        self._remember(subject, outcome)
        return outcome

    def _subject_of(self, directive_id: str) -> _Subject | None:
        """What a known id stood for (finished or running), or None for a new id."""
        done = self._history.get(directive_id)
        if done is not None:
            return done[0]
        running = self._running.get(directive_id)
        return running[0] if running is not None else None

    def _reused(self, directive: Directive, seen: _Subject) -> Outcome:
        return self._outcome(
            directive,
            Refuse(
                Reason.INVALID,
                f"directive id {directive.id!r} reused for another key/op: it was "
                f"{seen.op.name} {seen.key!r}, now {directive.op.name} {directive.key!r}",
            ),
        )

    async def _execute(self, directive: Directive) -> Outcome:
        async with self._locks.hold(directive.key), self._slots:
            verdict = integrity.judge(self._store, directive, self._conditions(), self._clock())
            if isinstance(verdict, Refuse) or verdict.noop:
                return self._outcome(directive, verdict)
            if directive.op is Op.DROP:
                return await self._drop(directive)
            return await self._replicate(directive)

    async def _drop(self, directive: Directive) -> Outcome:
        """Drop the local replica once another holder promised to keep it.

        Two agents told at once to drop the last two replicas, each naming the other, must not
        both succeed. Two independent guards see to it:

        1. The key is judged and marked DROPPING in one synchronous step before asking, and this
           agent refuses to promise a key it is dropping: the two refuse each other.
        2. A holder that did promise recorded a lease, and the final re-judge (synchronous with
           the removal) refuses to drop a key promised to a peer.

        The promise is only relied on while it surely holds: the keeper's lease started after we
        asked, and it may be shorter than the one asked for (the keeper caps it at its
        ``max_lease`` and says what it granted). So if half of the shorter of the two has passed
        since we asked (a stalled loop, a slow answer), the drop is refused rather than trusting
        a promise that may have lapsed.
        """
        key = directive.key
        held = self._store.get(key)
        if held is None:
            return self._outcome(directive, Accept(noop=True, message="not held"))
        self._store.mark_dropping(key)
        try:
            keeper = await self._find_keeper(directive, held.checksum)
            if isinstance(keeper, Refuse):
                return self._outcome(directive, keeper)
            holder, asked_at, granted = keeper
            if self._clock() - asked_at >= min(self._config.lease, granted) / 2:
                return self._outcome(
                    directive,
                    Refuse(
                        Reason.NO_CONFIRMED_HOLDER,
                        f"{holder}'s promise came too late to rely on; try again",
                    ),
                )
            verdict = integrity.judge_drop_commit(self._store, key, held.checksum, self._clock())
            if isinstance(verdict, Accept) and not verdict.noop:
                self._store.remove(key)
                verdict = Accept(message=f"dropped; {holder} keeps it")
            return self._outcome(directive, verdict)
        finally:
            self._store.unmark_dropping(key)

    async def _find_keeper(
        self, directive: Directive, checksum: str
    ) -> tuple[str, float, float] | Refuse:
        """The first holder that promises to keep the key, when we asked and the lease it
        granted, or a refusal listing every answer.

        All holders are asked at once, within one ``promise_timeout``: asked in turn, each
        unreachable holder would cost a whole timeout. The first usable promise wins and the
        other requests are cancelled; a second holder that promised all the same only keeps its
        copy a little longer. A promise that names no lease (an older agent) is not usable:
        nothing says how long it lasts.
        """
        me = self._address()
        holders = [holder for holder in dict.fromkeys(directive.holders) if holder != me]
        if not holders:
            return Refuse(
                Reason.NO_CONFIRMED_HOLDER,
                f"no holder promised to keep {directive.key!r} "
                "(no holder other than this agent was named)",
            )
        asked_at = self._clock()
        asks = {
            asyncio.create_task(
                self._peers.promise_keep(
                    holder,
                    key=directive.key,
                    checksum=checksum,
                    lease=self._config.lease,
                    requester=me,
                    directive_id=directive.id,
                    deadline=self._config.promise_timeout,
                ),
                name=f"promise {directive.id!r} {holder}",
            ): holder
            for holder in holders
        }
        answers = {holder: f"{holder}: no answer in time" for holder in holders}
        pending = set(asks)
        try:
            async with asyncio.timeout(self._config.promise_timeout):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        answer = task.result()
                        if answer.kept and answer.lease is not None:
                            return answer.address, asked_at, answer.lease
                        answers[asks[task]] = _describe(answer)
        except TimeoutError:
            pass
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return Refuse(
            Reason.NO_CONFIRMED_HOLDER,
            f"no holder promised to keep {directive.key!r} ({'; '.join(answers.values())})",
        )

    async def _replicate(self, directive: Directive) -> Outcome:
        """Fetch, verify, re-judge (memory may have filled meanwhile), then store.

        The key becomes visible only once its data is verified and stored in one step.
        """
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
            self._store, directive, self._conditions(), received=len(result.data)
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
            return Outcome(directive.id, OutcomeStatus.APPLIED, None, verdict.message, version)
        return Outcome(directive.id, status, verdict.reason, verdict.message, version)

    def _remember(self, subject: _Subject, outcome: Outcome) -> None:
        self._history[outcome.directive_id] = (subject, outcome)
        if len(self._history) > self._history_limit:
            self._history.popitem(last=False)

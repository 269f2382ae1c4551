"""Retiring workers: which are being retired, how each retirement ends, and resuming them.

The RetireWorker policy empties the workers flagged RETIRING; this module owns the rest:

- starting a retirement: flag the worker, persist the retirement (a restarted AMM resumes it),
  record an event;
- judging every retirement under way once per cycle, after planning (``review``, pure):

  1. the worker answered the cycle's poll, holds nothing and no directive to it is in flight:
     retired (and, with ``close``, the AMM asks its agent to shut down). A worker *leaving* (its
     agent is shutting down and asked to be drained) is done sooner: once every key it holds has
     a copy on a worker that stays, since its own copies go with it anyway;
  2. RetireWorker's suggestion for a key it holds was rejected for want of a recipient or of
     room, or for conflicting content: abandoned with that reason (never when throttled: that
     only delays). A copy shared by several retiring workers keeps only one of them, so the
     others can drop theirs and retire;
  3. the deadline passed: abandoned ("timeout");
  4. the worker left (unregistered, or did not answer an AMM restarting): abandoned (``left``).

  Abandoning clears the flag, so the worker returns to the status its agent reports. Nothing is
  lost either way: RetireWorker drops a key from a retiring worker only where a copy survives.
- setting the flags again after an agent restarted (a new incarnation starts unflagged) or the
  AMM restarted;
- retire requests made by policies (PauseToRetire): an event per decision, a declined verdict
  recorded once rather than every cycle;
- the callers waiting for results.

Which workers are cheapest to retire (``cheapest``) is decided here too. Between cycles, the
handover (``handover``) drops keys as copies are confirmed and ends a retirement (``end``) as
soon as its worker is emptied.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from amm_service.decisions.core import Plan, Rejection, RetireDecision, Why
from amm_service.decisions.events import EventLog
from amm_service.decisions.view import ClusterState, ClusterView, Key, WorkerId, WorkerStatus
from amm_service.errors import Unavailable
from amm_service.policies import PendingView, Policy
from amm_service.policies.retire_worker import RetireWorker
from amm_service.runtime.links.addresses import address_order
from amm_service.runtime.records.state import RetirementRecord, StateStore

log = logging.getLogger(__name__)

ABANDON_ON = frozenset({Why.NO_RECIPIENT, Why.NO_ROOM, Why.CONFLICT})
"""Rejections of RetireWorker's suggestions that no later cycle would change by itself."""


@dataclass(frozen=True, slots=True)
class Retirement:
    """A retirement under way, or a worker retired and not closed; times are Unix seconds."""

    worker: WorkerId
    close: bool
    started_at: float
    deadline: float | None
    reason: str
    """Who asked for it and why."""
    leaving: bool = False
    """Its agent is shutting down (``DrainWorker``): done once every key it holds has a copy
    elsewhere. Not persisted: an AMM restarted meanwhile resumes it as an ordinary one."""


@dataclass(frozen=True, slots=True)
class Result:
    """How the retirement of one worker ended."""

    worker: WorkerId
    retired: bool
    reason: str
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """``review``'s judgement of one retirement: over (retired) or to abandon, and why."""

    worker: WorkerId
    retired: bool
    reason: str


def review(
    retirements: Iterable[Retirement],
    view: ClusterView,
    rejections: Iterable[Rejection],
    *,
    busy: Collection[WorkerId],
    retirers: Collection[str],
    now: float,
    pending: PendingView | None = None,
) -> list[Verdict]:
    """Judge each retirement under way (see the module docstring); those still going on are
    left out. ``busy`` holds the workers with directives in flight to them, ``retirers`` the
    names of the RetireWorker policies whose rejections count, ``pending`` what is in flight
    (a copy being dropped does not count as one that stays)."""
    blocked = _blocked(view, rejections, retirers)
    verdicts = []
    for retirement in retirements:
        worker = retirement.worker
        if worker not in view.workers:
            verdicts.append(Verdict(worker, False, "the worker left"))
        elif not view.held_by(worker) and worker not in busy and _inventory_known(view, worker):
            verdicts.append(Verdict(worker, True, "holds nothing that exists nowhere else"))
        elif (
            retirement.leaving
            and _inventory_known(view, worker)
            and not unique(view, worker, pending)
        ):
            verdicts.append(
                Verdict(worker, True, "every key it holds has a copy on a worker that stays")
            )
        elif worker in blocked and view.workers[worker].retiring:
            verdicts.append(Verdict(worker, False, blocked[worker]))
        elif retirement.deadline is not None and now >= retirement.deadline:
            held = len(view.held_by(worker))
            verdicts.append(Verdict(worker, False, f"timeout: still holds {held} key(s)"))
    return verdicts


def _blocked(
    view: ClusterView, rejections: Iterable[Rejection], retirers: Collection[str]
) -> dict[WorkerId, str]:
    """The retiring workers that must stay, each with the first key that keeps it.

    A key that cannot go anywhere else keeps every holder of conflicting content, but only one
    holder of a copy that several retiring workers share: that one stays (abandoned) and the
    copies on the others may then be dropped, as Dask retires all but one of them. The one kept
    is a holder already kept for another key if there is one, else one that answers polls, else
    the last by address.
    """
    stuck: dict[Key, Rejection] = {}
    for r in rejections:
        if r.policy in retirers and r.why in ABANDON_ON and r.key in view.keys:
            stuck.setdefault(r.key, r)
    blocked: dict[WorkerId, str] = {}
    shared: list[tuple[Key, list[WorkerId]]] = []
    for key, r in stuck.items():
        kv = view.keys[key]
        holders = sorted(kv.holders, key=address_order)
        retiring = [w for w in holders if view.workers[w].retiring]
        if r.why is Why.CONFLICT or len(retiring) < 2:
            for worker in holders:
                blocked.setdefault(worker, f"cannot move {key!r} elsewhere: {r.reason}")
        else:
            shared.append((key, retiring))
    for key, retiring in shared:
        if any(w in blocked for w in retiring):
            continue
        keeper = max(retiring, key=lambda w: (view.workers[w].reachable, address_order(w)))
        blocked[keeper] = f"cannot move {key!r} elsewhere: {stuck[key].reason}"
    return blocked


def unique(
    view: ClusterView, worker: WorkerId, pending: PendingView | None = None, *, strict: bool = True
) -> list[Key]:
    """The keys ``worker`` holds that have no copy elsewhere, sorted: with ``strict``, no copy
    that stays (on a durable worker, with the same content, not being dropped); otherwise no
    copy at all (what is lost if the worker leaves now)."""
    found = []
    for key in view.held_by(worker):
        kv = view.keys.get(key)
        if kv is None:
            continue
        others = kv.holders - {worker}
        if strict:
            if kv.conflicting:
                found.append(key)  # which content is whose is for an operator to settle
                continue
            if pending is not None:
                others = others - pending.in_flight(key).dropping
            others = view.durable(others)
        if not others:
            found.append(key)
    return sorted(found)


def _inventory_known(view: ClusterView, worker: WorkerId) -> bool:
    """Whether the view shows what ``worker`` holds now: it answered the cycle's poll, and has
    answered one since it registered (a worker restored after an AMM restart, or re-registered,
    holds nothing in the view until then)."""
    ws = view.workers[worker]
    return ws.reachable and ws.last_poll is not None


def cheapest(state: ClusterState, n: int) -> list[WorkerId]:
    """The ``n`` workers cheapest to retire: idle (nothing pinned on them) first, then those
    holding the fewest managed bytes, then by address. Only workers that answer and are neither
    retiring, retired nor closing are candidates."""
    pinned: set[WorkerId] = set()  # one pass over the keys, not one per worker
    for kv in state.keys.values():
        if kv.pinned_on:
            pinned.update(kv.pinned_on)
    candidates = [
        w
        for w in state.workers
        if not (w.retiring or w.retired)
        and w.reachable
        and w.status in (WorkerStatus.RUNNING, WorkerStatus.PAUSED)
    ]
    ranked = sorted(
        candidates,
        key=lambda w: (w.address in pinned, w.memory.managed, address_order(w.address)),
    )
    return [w.address for w in ranked[:n]]


def _gist(verdict: str) -> str:
    """A verdict without its figures: the same refusal with other byte counts is the same."""
    return re.sub(r"\d+", "#", verdict)


class Retirements:
    """The retirements under way and the workers retired but not closed, persisted in ``store``.

    Used from the event loop only. ``clock`` is the wall clock stamped on retirements.
    """

    def __init__(
        self,
        state: ClusterState,
        store: StateStore,
        events: EventLog,
        policies: Sequence[Policy],
        *,
        clock: Callable[[], float],
    ) -> None:
        self.retirers = frozenset(p.name for p in policies if isinstance(p, RetireWorker))
        """The names of the configured RetireWorker policies; retiring needs one."""
        self._event_kinds = {
            p.name: kind
            for p in policies
            if isinstance(kind := getattr(p, "retire_event", None), str) and kind
        }
        self._state = state
        self._store = store
        self._events = events
        self._clock = clock
        self._active: dict[WorkerId, Retirement] = {}
        self._retired: dict[WorkerId, Retirement] = {}
        self._done: dict[WorkerId, asyncio.Future[Result]] = {}
        self._declined: dict[WorkerId, str] = {}
        self._waiting = 0
        self._closing_agents: set[WorkerId] = set()
        """Workers whose agents are being asked to close: leaving then is closing, not
        abandoning."""
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        #: The last cycle held back copies of a retiring worker's keys for want of a free
        #: transfer slot: the next cycle should follow as soon as a copy ends (``handover``).
        self.throttled = False

    @property
    def active(self) -> Mapping[WorkerId, Retirement]:
        return MappingProxyType(self._active)

    @property
    def waiting(self) -> bool:
        """Whether a caller is waiting for a result."""
        return self._waiting > 0

    def load(self) -> None:
        """Take back what the previous run recorded (before its workers are restored)."""
        for record in self._store.retirements():
            worker = WorkerId(record.worker)
            retirement = Retirement(
                worker, record.close, record.started_at, record.deadline, record.reason
            )
            (self._retired if record.retired else self._active)[worker] = retirement
        if self._active:
            log.info("resuming the retirement of %s", ", ".join(sorted(self._active)))

    def apply_flags(self) -> None:
        """Flag the registered workers as the retirements say (after a restart of either side)."""
        now = self._clock()
        for worker in self._active:
            ws = self._state.worker(worker)
            if ws is not None and not (ws.retiring and not ws.retired):
                self._state.set_flags(worker, now, retiring=True, retired=False)
        for worker in self._retired:
            ws = self._state.worker(worker)
            if ws is not None and not (ws.retired and not ws.retiring):
                self._state.set_flags(worker, now, retiring=False, retired=True)

    def begin(
        self,
        worker: WorkerId,
        *,
        close: bool,
        timeout: float | None,
        reason: str,
        leaving: bool = False,
    ) -> None:
        """Start retiring ``worker``; a retirement already under way goes on (closing the worker
        at the end if either asked for it, done early if either is ``leaving``, and by the
        earlier deadline). The worker must be registered."""
        now = self._clock()
        deadline = None if timeout is None else now + timeout
        current = self._active.get(worker)
        if current is not None:
            if deadline is not None and current.deadline is not None:
                deadline = min(deadline, current.deadline)
            changed = replace(
                current,
                close=current.close or close,
                leaving=current.leaving or leaving,
                deadline=deadline if deadline is not None else current.deadline,
            )
            if changed != current:
                self._save(changed)
            if worker not in self._done:  # resumed after a restart: nobody waited for it yet
                self._done[worker] = asyncio.get_running_loop().create_future()
            return
        self._retired.pop(worker, None)
        self._save(Retirement(worker, close, now, deadline, reason, leaving))
        self._state.set_flags(worker, now, retiring=True, retired=False)
        self._done[worker] = asyncio.get_running_loop().create_future()
        limit = "" if timeout is None else f", timeout {timeout:g} s"
        self._events.record(
            "retire-started", f"{reason}{limit}{', then close' if close else ''}", worker=worker
        )

    def _save(self, retirement: Retirement, *, retired: bool = False) -> None:
        self._store.save_retirement(
            RetirementRecord(
                retirement.worker,
                retirement.close,
                retirement.started_at,
                retirement.deadline,
                retirement.reason,
                retired,
            )
        )
        (self._retired if retired else self._active)[retirement.worker] = retirement

    def conclude(
        self, worker: WorkerId, *, retired: bool, reason: str, closed: bool = False
    ) -> None:
        """End the retirement of ``worker``: retired (``closed`` when its agent agreed to shut
        down) or abandoned, which clears the flag."""
        retirement = self._active.pop(worker, None)
        if retirement is None:
            return
        now = self._clock()
        took = f" after {now - retirement.started_at:.1f} s" if retired else ""
        if retired and not closed:
            self._save(retirement, retired=True)
            self._state.set_flags(worker, now, retiring=False, retired=True)
        else:
            self._store.forget_retirement(worker)
            self._state.set_flags(worker, now, retiring=False)
        if retired:
            message = f"retired{took}: {reason}"
            self._events.record("retired", message, worker=worker)
        else:
            message = reason
            self._events.record("retire-abandoned", f"abandoned: {reason}", worker=worker)
        done = self._done.pop(worker, None)
        if done is not None and not done.done():
            done.set_result(Result(worker, retired, message, closed))

    def left(self, worker: WorkerId) -> None:
        """``worker`` left the registry: its retirement cannot go on."""
        self._declined.pop(worker, None)
        if self._retired.pop(worker, None) is not None:
            self._store.forget_retirement(worker)
        if worker in self._active and worker not in self._closing_agents:
            self.conclude(worker, retired=False, reason="the worker left before it was emptied")

    async def supervise(
        self,
        view: ClusterView,
        plan: Plan,
        *,
        busy: Callable[[], Collection[WorkerId]],
        close: Callable[[WorkerId], Awaitable[str | None]],
        remove: Callable[[WorkerId], Awaitable[object]],
        pending: PendingView | None = None,
    ) -> None:
        """After a cycle's planning: end the retirements that are over or cannot finish, then
        begin those the policies asked for.

        ``busy`` gives the workers with directives in flight to them; ``close`` asks an agent to
        shut down (None: it agreed; "": it refused because it holds keys again, so the
        retirement goes on; otherwise why it failed); ``remove`` takes a closed worker out of the
        registry.
        """
        self.throttled = bool(self._active) and any(
            r.why is Why.THROTTLED and r.policy in self.retirers for r in plan.rejections
        )
        if self._active:
            verdicts = review(
                self._active.values(),
                view,
                plan.rejections,
                busy=busy(),
                retirers=self.retirers,
                now=self._clock(),
                pending=pending,
            )
            for verdict in verdicts:
                await self.end(verdict, close=close, remove=remove)
        self.decided(plan.retirements)  # none at all too: it ends the refusals not asked again

    async def end(
        self,
        verdict: Verdict,
        *,
        close: Callable[[WorkerId], Awaitable[str | None]],
        remove: Callable[[WorkerId], Awaitable[object]],
    ) -> None:
        """Act on ``verdict`` (``supervise``'s arguments): conclude the retirement, or first
        ask the agent of a worker retired with ``close`` to shut down. A retirement that ended
        meanwhile, or whose agent is being asked already, is left alone."""
        worker = verdict.worker
        retirement = self._active.get(worker)
        if retirement is None or worker in self._closing_agents:
            return
        if not (verdict.retired and retirement.close):
            self.conclude(worker, retired=verdict.retired, reason=verdict.reason)
            return
        # A closing agent unregisters at once, maybe before its answer is handled here.
        self._closing_agents.add(worker)
        try:
            failed = await close(worker)
        finally:
            self._closing_agents.discard(worker)
        if failed is None:
            reason = f"{verdict.reason}; its agent is shutting down"
            self.conclude(worker, retired=True, reason=reason, closed=True)
            await remove(worker)
        elif self._state.worker(worker) is None:
            if failed:  # no answer, but it left holding nothing: as good as closed
                reason = f"{verdict.reason}; its agent left ({failed})"
                self.conclude(worker, retired=True, reason=reason)
            self.left(worker)  # refused (it holds keys again), then left: abandoned
        elif failed:
            reason = f"{verdict.reason}; its agent did not close: {failed}"
            self.conclude(worker, retired=True, reason=reason)

    def decided(self, decisions: Sequence[RetireDecision]) -> None:
        """Act on the retire requests policies made in a cycle: begin the accepted ones, record
        each decision as an event (the policy's ``retire_event``, else "retire-requested";
        "-declined" appended for a refusal), and the same refusal of a worker only once while it
        keeps being asked for."""
        asked = set()
        for d in decisions:
            asked.add(d.worker)
            kind = self._event_kinds.get(d.policy, "retire-requested")
            if d.accepted:
                self._declined.pop(d.worker, None)
                self._events.record(kind, f"{d.policy}: {d.reason}; retiring it", worker=d.worker)
                self.begin(d.worker, close=d.close, timeout=None, reason=f"{d.policy}: {d.reason}")
            elif self._declined.get(d.worker) != _gist(d.verdict):
                self._declined[d.worker] = _gist(d.verdict)
                self._events.record(
                    f"{kind}-declined",
                    f"{d.policy}: {d.reason}; not retired: {d.verdict}",
                    worker=d.worker,
                )
        for worker in set(self._declined) - asked:
            del self._declined[worker]

    def result_now(self, worker: WorkerId) -> Result | None:
        """The result for a worker already retired and not closed; None otherwise."""
        if worker in self._retired and worker not in self._active:
            return Result(worker, True, "already retired")
        return None

    def wait(self, workers: Iterable[WorkerId]) -> Awaitable[list[Result]]:
        """The results of the retirements of ``workers`` (begun before), once each ended.

        The retirements are looked up at the call, so one that ends before the caller awaits
        still gives its result. Cancel-safe: a caller that goes away leaves the retirements
        going on. Raises ``Unavailable`` when the AMM shuts down first (a restarted AMM resumes
        them).
        """
        return self._wait([self._done[w] for w in workers if w in self._done])

    async def _wait(self, futures: list[asyncio.Future[Result]]) -> list[Result]:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
            if self._closed:
                self._closing.set_result(None)
        closing = self._closing
        self._waiting += 1
        try:
            while left := [f for f in futures if not f.done()]:
                if closing.done():
                    raise Unavailable(
                        "the AMM is shutting down; it resumes the retirement when it restarts"
                    )
                waits: list[asyncio.Future[Any]] = [*left, closing]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting -= 1
        return [f.result() for f in futures]

    def close(self) -> None:
        """Release every waiter (the AMM is shutting down); idempotent."""
        self._closed = True
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)

"""Handing a retiring worker's keys over as the agents confirm the copies, not a cycle later.

Cycles alone move a retiring worker's keys in three steps, each waiting for a poll: copy the
keys only it holds, drop them from it once a poll shows the copies, and judge it empty once a
poll shows that. Agents busy moving gigabytes answer polls slowly (up to the poll timeout), so
a retirement spent most of its time after its bytes had landed. The handover acts on the
agents' own answers instead, as they arrive:

1. A REPLICATE applied confirms a copy: its destination fetched the value and verified it
   against the directive's checksum before storing it (or already held that content). It
   counts only when that checksum is the key's as the AMM knows it (no conflicting content),
   the directive was issued under our epoch, and its ledger entry is still in flight: the entry
   of a worker that restarted or registered again is forgotten with its directive stream, so an
   answer of the old process confirms nothing. The destination must keep copies (running or
   paused, neither retiring, retired nor closing; missed polls do not count against it, even
   past STALE: its answer has just arrived), and no drop of its copy may be in flight.
   Nothing is dropped while the AMM may not drop (fenced, or in its start-up grace).
2. Every retiring worker holding the key is then told to DROP it, naming the destination and
   the other holders that keep copies: the retiring agent drops its replica only once a keeper
   promised to keep that very content (``worker_agent.directives``), so the last replica is
   never dropped even were the AMM's picture wrong. The drop is entered in the ledger at once
   and sent at once, or, while drops sent to that worker await their answers, with the next
   batch (``_flush``).
3. A copy that ends (however it ends) frees a transfer slot: when the last cycle held back
   copies of a retiring worker's keys for want of one, the next cycle follows at once, so the
   copies stay in flight back to back rather than in batches an interval apart.
4. Once a DROP was applied for every key a retiring worker is known to hold, the worker is
   polled alone and, if it holds nothing and nothing is in flight to it, its retirement ends
   (its agent closed, if asked) as a cycle would end it (``finish``).

A refusal, a failure, an answer that never comes, a key put meanwhile: all are left to the
cycles, which go on as before. The handover only ever saves time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Sequence
from typing import Any

from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.pending import Ledger
from amm_service.decisions.view import ClusterState, Key, WorkerId, WorkerStatus
from amm_service.runtime.links.addresses import address_order

log = logging.getLogger(__name__)

_KEEPS = (WorkerStatus.RUNNING, WorkerStatus.PAUSED)


class Handover:
    """Drops from retiring workers as soon as copies are confirmed, and ends retirements as
    soon as the drops are; used from the event loop only.

    ``retiring`` gives the workers being retired; ``may_drop`` whether the AMM may drop now;
    ``epoch`` our epoch and ``new_id`` a fresh directive id; ``enter`` puts directives in the
    ledger (at once: no cycle may plan the same work meanwhile) and ``dispatch`` sends them;
    ``finish`` polls an emptied worker and ends its retirement if it holds nothing;
    ``throttled`` says whether the last cycle held copies back, ``wake`` runs the next cycle now.
    """

    def __init__(
        self,
        state: ClusterState,
        ledger: Ledger,
        *,
        retiring: Callable[[], Collection[WorkerId]],
        may_drop: Callable[[], bool],
        epoch: Callable[[], int],
        new_id: Callable[[], str],
        enter: Callable[[Sequence[Directive]], None],
        dispatch: Callable[[Sequence[Directive]], Awaitable[None]],
        finish: Callable[[WorkerId], Awaitable[None]],
        throttled: Callable[[], bool] = lambda: False,
        wake: Callable[[], None] = lambda: None,
        policy: str = "RetireWorker",
    ) -> None:
        self._state = state
        self._ledger = ledger
        self._retiring = retiring
        self._may_drop = may_drop
        self._epoch = epoch
        self._new_id = new_id
        self._enter = enter
        self._dispatch = dispatch
        self._finish = finish
        self._throttled = throttled
        self._wake = wake
        self._policy = policy
        self._dropped: dict[WorkerId, set[Key]] = {}
        """Per retiring worker, the keys a DROP was applied for."""
        self._out: dict[WorkerId, set[str]] = {}
        """Per retiring worker, the ids of the drops sent to it and not answered yet."""
        self._queued: dict[WorkerId, list[Directive]] = {}
        """Per retiring worker, drops entered in the ledger that wait for those to be answered."""
        self._finishing: set[WorkerId] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def watching(self) -> bool:
        """Whether outcomes matter to us: some worker is being retired."""
        return not self._closed and bool(self._retiring())

    def on_settled(self, worker: WorkerId, settled: Sequence[tuple[Directive, Outcome]]) -> None:
        """Outcomes of directives in flight to ``worker`` just settled (``Outcomes``)."""
        retiring = self._retiring()
        for gone in set(self._dropped) - set(retiring):
            del self._dropped[gone]
        drops: list[Directive] = []
        emptied = copied = False
        for directive, outcome in settled:
            copied = copied or directive.op is Op.REPLICATE
            if directive.op is Op.DROP and (out := self._out.get(directive.worker)):
                out.discard(directive.id)
            if outcome.status is not OutcomeStatus.APPLIED:
                continue
            if directive.op is Op.REPLICATE:
                made = self._drops_after_copy(directive, retiring)
                if made:
                    self._enter(made)  # in flight now: a second copy of the key drops nothing
                    drops += made
            elif directive.worker in retiring:
                self._dropped.setdefault(directive.worker, set()).add(directive.key)
                emptied = True
        if copied and self._throttled():
            self._wake()  # a transfer slot is free: copies held back can start now
        if drops:
            for drop in drops:
                self._queued.setdefault(drop.worker, []).append(drop)
        self._flush()
        if emptied and worker not in self._finishing:
            dropped = self._dropped.get(worker, set())
            # Counted first: listing what it holds is a pass over every key.
            if self._state.holding(worker) <= len(dropped) and (
                self._state.held_by(worker) <= dropped
            ):
                self._finishing.add(worker)
                self._spawn(self._finish_one(worker), f"amm-handover-finish-{worker}")

    def _drops_after_copy(self, copy: Directive, retiring: Collection[WorkerId]) -> list[Directive]:
        """The DROPs that ``copy``, a REPLICATE just applied, allows (see the module doc)."""
        key, dest = copy.key, copy.worker
        kv = self._state.keys.get(key)
        if (
            kv is None
            or kv.conflicting
            or kv.checksum != copy.checksum
            or copy.epoch != self._epoch()
            or not self._keeps(dest, answered=True)
        ):
            return []
        leaving = [w for w in kv.holders if w in retiring and w != dest]
        if not leaving or not self._may_drop():
            return []
        dropping = self._ledger.in_flight(key).dropping
        if dest in dropping:
            return []
        others = {w for w in kv.holders if w not in dropping and self._keeps(w)}
        keepers = (dest, *sorted(others - {dest}, key=address_order))
        epoch = self._epoch()
        drops = []
        for worker in sorted(leaving, key=address_order):
            if worker in dropping or worker in kv.pinned_on:
                continue
            drops.append(
                Directive(
                    id=self._new_id(),
                    epoch=epoch,
                    op=Op.DROP,
                    key=key,
                    worker=worker,
                    size=kv.size,
                    checksum=kv.checksum,
                    holders=keepers,
                    policy=self._policy,
                    reason=f"{worker} is retiring; {dest} confirmed its copy",
                )
            )
        return drops

    def _flush(self) -> None:
        """Send each worker's queued drops in one message once none sent to it is waiting
        for its answer (or was given up on): an agent carries out one batch of drops at a time,
        each waiting for its keepers' promises, so drops sent one by one as copies land queue
        up there one behind the other, while a batch asks each keeper once for all its keys."""
        ledger = self._ledger
        for worker in list(self._queued):
            out = self._out.pop(worker, set())
            out = {i for i in out if i in ledger}
            if out:
                self._out[worker] = out
                continue
            batch = [d for d in self._queued.pop(worker) if d.id in ledger]
            if batch:
                self._out[worker] = {d.id for d in batch}
                self._spawn(self._send(batch), f"amm-handover-drops-{worker}")

    def _keeps(self, worker: WorkerId, *, answered: bool = False) -> bool:
        """Whether copies on ``worker`` may be counted on to stay: registered and confirmed,
        running or paused, neither retiring nor retired, and answering. A worker that has just
        ``answered`` (the outcome of its copy arrived) counts as answering whatever its polls
        say: an agent busy receiving gigabytes misses polls, sometimes long enough to be
        flagged STALE, while its directive stream shows it alive."""
        ws = self._state.worker(worker)
        return (
            ws is not None
            and ws.confirmed
            and ws.status in _KEEPS
            and not (ws.retiring or ws.retired)
            and (answered or ws.reachable)
        )

    async def _send(self, drops: list[Directive]) -> None:
        log.debug("handover: %d drop(s) from retiring workers after confirmed copies", len(drops))
        try:
            await self._dispatch(drops)
        except RuntimeError as err:  # the dispatcher closed: the AMM is shutting down
            log.debug("handover: drops not sent: %s", err)

    async def _finish_one(self, worker: WorkerId) -> None:
        try:
            await self._finish(worker)
        finally:
            self._finishing.discard(worker)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (err := task.exception()) is not None:
            log.error("handover: %s failed", task.get_name(), exc_info=err)

    async def close(self) -> None:
        """Cancel and await what is under way (the AMM is shutting down); idempotent."""
        self._closed = True
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""Rebalance: move keys from the fullest workers to the emptiest, every cycle, until the cluster's
memory lies within a gap.

Dask's ``Scheduler.rebalance`` (``_rebalance_find_msgs``) made into an AMM policy, with its
thresholds (``distributed.worker.memory.rebalance.*``) as fractions of each worker's limit:

- a *sender* is above the mean by more than half the gap and at least at ``sender_min``;
- a *recipient* is below the mean and below ``recipient_max``, and takes replicas;
- the fullest sender gives its largest key that keeps it at or above the mean to the emptiest
  recipient that stays at or below the mean and below the sender, lacks the key and is not
  receiving it (the largest such key brings the pair closest to the mean); the heaps are
  reordered and it repeats until one side is empty. A sender stops within half the gap of the
  mean, a recipient at the mean.

So senders only lose memory and recipients only gain, no worker crosses the mean, and every
move strictly narrows the gap between its pair: on a cluster whose total does not change no key
moves back, and the policy falls silent once balanced. Where it departs from Dask:

1. Dask stops a recipient within half the gap below the mean, which leaves a lone full worker
   far above it (4 GiB : 0 : 0 : 0 with 8 GiB limits ends at 2.1 : 0.6 : 0.6 : 0.6 GiB); here a
   recipient takes until the mean, so that case ends within the gap.
2. Dask moves the least recently inserted keys; the view has no insertion order, and the
   largest key that fits makes the fewest moves.
3. A move is replicate-then-drop over several cycles: a replica onto the recipient first, the
   drop of the sender's copy only once a poll shows the new copy (ReduceReplicas, which runs
   earlier, often drops it first, since the core drops from the fullest holder). The moves in
   progress are kept here and reconciled with the view every cycle; a move whose replica failed,
   whose key vanished or whose recipient lost the key is forgotten. Losing them (AMM restart)
   at worst leaves duplicates for ReduceReplicas.
4. Memory counts the moves in progress (the recipient as if it held the key, the sender as if it
   had dropped it), so the mean does not drift while keys are held twice and a cycle does not
   plan again what earlier cycles already planned.
5. Dask's single pass takes a sender all the way down to the band, even below ``sender_min``,
   and a recipient up to the mean even past ``recipient_max``. Here moves spread over cycles
   (throttled transfer slots, slow transfers), so a worker that became a sender stays one
   without ``sender_min`` until it reaches the band, and a recipient likewise without
   ``recipient_max`` until it reaches the mean.
6. A worker without a memory limit is measured against the largest limit in the cluster; when
   no worker has one, against the cluster's total memory (by the measure, counting moves in
   progress): then a sender must hold ``sender_min`` of everything, and the gap is a fraction
   of the total.
7. Replication never degrades: the sender's copy is dropped only while at least as many durable
   copies remain as the key had when the move began, a key is not moved if that would leave
   it in fewer zones (a zone's only copy does not go to a worker without a zone: the core would
   drop the new copy rather than that one, and the key would move again every cycle), and keys
   pinned on the sender are not moved (its copy cannot be dropped while a reader holds it, so
   the move would only duplicate the key).

Only reachable workers that are running or paused take part (paused ones send, never receive);
retiring and retired workers are RetireWorker's. Cost per cycle: the keys of the senders, sorted
by size once, plus the moves in progress.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from amm_service.decisions.view import ClusterView, Key, KeyView, Measure, WorkerId, WorkerStatus
from amm_service.policies.base import PendingView, PolicyRun, drop, replicate

_TAKING_PART = (WorkerStatus.RUNNING, WorkerStatus.PAUSED)


@dataclass(frozen=True, slots=True)
class Move:
    """A key on its way from ``sender`` to ``recipient``; ``copies`` durable copies when it began,
    the least the drop of the sender's copy may leave."""

    key: Key
    sender: WorkerId
    recipient: WorkerId
    size: int
    copies: int


class Stage(enum.Enum):
    """Where a move stands in a view."""

    REPLICATING = "replicating"
    """The replica is in flight to the recipient."""
    TO_DROP = "to-drop"
    """The recipient holds the key; the sender's copy is to be dropped."""
    DROPPING = "dropping"
    """The drop of the sender's copy is in flight."""
    DONE = "done"
    """The sender no longer holds the key."""
    FAILED = "failed"
    """The replica failed, the recipient lost the key, or the key or a worker is gone."""


def stage(move: Move, view: ClusterView, pending: PendingView) -> Stage:
    """Where ``move`` stands in ``view``, given what is in flight."""
    kv = view.keys.get(move.key)
    if kv is None or kv.conflicting:
        return Stage.FAILED
    if move.sender not in view.workers or move.recipient not in view.workers:
        return Stage.FAILED
    flight = pending.in_flight(move.key)
    if move.recipient not in kv.holders:
        if move.recipient in flight.replicating and move.sender in kv.holders:
            return Stage.REPLICATING
        return Stage.FAILED
    if move.recipient in flight.dropping:
        return Stage.FAILED  # the new copy is being dropped: the move is undone
    if move.sender not in kv.holders:
        return Stage.DONE
    if move.sender in flight.dropping:
        return Stage.DROPPING
    return Stage.TO_DROP


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number between 0 and 1, not {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} must be between 0 and 1 (a fraction of the memory limit), not {value}"
        )
    return float(value)


class Rebalance:
    """Move keys from workers above the mean memory to workers below it (see the module doc)."""

    priority = 90

    def __init__(
        self,
        *,
        sender_min: float = 0.30,
        recipient_max: float = 0.60,
        sender_recipient_gap: float = 0.10,
        name: str = "Rebalance",
    ) -> None:
        self.sender_min = _fraction("sender_min", sender_min)
        self.recipient_max = _fraction("recipient_max", recipient_max)
        self.sender_recipient_gap = _fraction("sender_recipient_gap", sender_recipient_gap)
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, not {name!r}")
        self.name = name
        self._moves: dict[Key, Move] = {}
        self._senders: set[WorkerId] = set()
        self._recipients: set[WorkerId] = set()

    @property
    def moves(self) -> Mapping[Key, Move]:
        """The moves in progress, by key."""
        return self._moves

    def run(self, view: ClusterView, pending: PendingView, measure: Measure) -> PolicyRun:
        """Advance the moves in progress (drops of copies already moved), then plan new ones."""
        memory = {
            w: float(ws.memory.by(measure))
            for w, ws in view.workers.items()
            if ws.reachable and ws.effective_status in _TAKING_PART
        }
        for move in list(self._moves.values()):
            now = stage(move, view, pending)
            if now in (Stage.DONE, Stage.FAILED):
                del self._moves[move.key]
                continue
            if now is Stage.TO_DROP and not self._keeps_copies(move, view, pending):
                del self._moves[move.key]  # a copy was lost meanwhile: keep the sender's
                continue
            if now is Stage.TO_DROP:
                # Kept on a rejection (start-up grace, a reader pinned it): asked again next cycle.
                yield drop(
                    move.key,
                    frozenset((move.sender,)),
                    f"rebalance: {move.recipient} holds the moved copy",
                )
            if now is Stage.REPLICATING and move.recipient in memory:
                memory[move.recipient] += move.size
            if move.sender in memory:
                memory[move.sender] -= move.size
        if len(memory) < 2:
            self._senders.clear()
            self._recipients.clear()
            return
        yield from self._balance(view, pending, memory)

    def _balance(
        self, view: ClusterView, pending: PendingView, memory: dict[WorkerId, float]
    ) -> PolicyRun:
        """Plan new moves, Dask's way, over the projected ``memory`` of the workers taking part."""
        mean = sum(memory.values()) / len(memory)
        limits = [view.workers[w].memory.limit for w in memory if view.workers[w].memory.limit]
        fallback = max(limits) if limits else sum(memory.values())
        if fallback <= 0:
            return
        half_gap: dict[WorkerId, float] = {}
        senders: list[tuple[float, WorkerId]] = []
        recipients: list[tuple[float, WorkerId]] = []
        for w, mem in memory.items():
            ws = view.workers[w]
            limit = ws.memory.limit or fallback
            half_gap[w] = self.sender_recipient_gap * limit / 2
            if mem - mean > half_gap[w] and (w in self._senders or mem >= self.sender_min * limit):
                senders.append((mean - mem, w))
            elif (
                mem < mean
                and ws.accepts_replicas
                and (w in self._recipients or mem < self.recipient_max * limit)
            ):
                recipients.append((mem - mean, w))
        self._senders = {w for _, w in senders}
        self._recipients = {w for _, w in recipients}
        heapq.heapify(senders)
        heapq.heapify(recipients)
        keys: dict[WorkerId, Iterator[KeyView]] = {}

        while senders and recipients:
            sender = senders[0][1]
            if sender not in keys:
                keys[sender] = self._candidates(view, sender)
            for kv in keys[sender]:
                if sender in pending.in_flight(kv.key).dropping:
                    continue
                if memory[sender] - kv.size < mean:
                    continue  # it would fall below the mean; smaller keys may still fit
                recipient = _recipient(view, pending, kv, sender, memory, mean, recipients)
                if recipient is None:
                    continue
                reason = (
                    f"rebalance: {sender} at {memory[sender]:.0f} bytes gives to {recipient} at "
                    f"{memory[recipient]:.0f} (mean {mean:.0f})"
                )
                chosen = yield replicate(kv.key, frozenset((recipient,)), reason)
                if chosen is None:
                    # No room, no source or no transfer slot: this pair rests until next cycle.
                    heapq.heappop(senders)
                    break
                dropping = pending.in_flight(kv.key).dropping
                copies = max(1, len(view.durable(kv.holders) - dropping))
                self._moves[kv.key] = Move(kv.key, sender, recipient, kv.size, copies)
                memory[sender] -= kv.size
                memory[recipient] += kv.size
                if memory[sender] - mean > half_gap[sender]:
                    heapq.heapreplace(senders, (mean - memory[sender], sender))
                else:
                    heapq.heappop(senders)
                    self._senders.discard(sender)
                if memory[recipient] < mean:
                    heapq.heappush(recipients, (memory[recipient] - mean, recipient))
                else:
                    self._recipients.discard(recipient)
                break
            else:
                heapq.heappop(senders)  # nothing more it can give this cycle

    def _candidates(self, view: ClusterView, sender: WorkerId) -> Iterator[KeyView]:
        """The sender's movable keys, largest first: not already moving, not pinned there, with
        one content and a size."""
        kvs = [
            kv
            for key in view.held_by(sender)
            if key not in self._moves
            and (kv := view.keys.get(key)) is not None
            and kv.size > 0
            and not kv.conflicting
            and sender not in kv.pinned_on
        ]
        kvs.sort(key=lambda kv: (-kv.size, kv.key))
        return iter(kvs)

    def _keeps_copies(self, move: Move, view: ClusterView, pending: PendingView) -> bool:
        """Whether dropping the sender's copy leaves as many durable copies as the key had."""
        kv = view.keys[move.key]
        others = view.durable(kv.holders) - pending.in_flight(move.key).dropping - {move.sender}
        return len(others) >= move.copies

    def __repr__(self) -> str:
        return (
            f"Rebalance(sender_min={self.sender_min}, recipient_max={self.recipient_max}, "
            f"sender_recipient_gap={self.sender_recipient_gap}, name={self.name!r})"
        )


def _recipient(
    view: ClusterView,
    pending: PendingView,
    kv: KeyView,
    sender: WorkerId,
    memory: Mapping[WorkerId, float],
    mean: float,
    recipients: list[tuple[float, WorkerId]],
) -> WorkerId | None:
    """Pop and return the emptiest recipient that can take ``kv`` from ``sender``, or None.

    It must stay at or below the mean and below the sender after the move (if the emptiest
    cannot, none can), must neither hold the key nor be receiving it, and must not leave the
    key in fewer zones (those skipped for this are pushed back).
    """
    flight = pending.in_flight(kv.key)
    replicating = flight.replicating
    zones = view.workers
    # Zones as the core counts them when it picks the copy to drop: durable copies only.
    durable = view.durable(kv.holders) - flight.dropping
    before = {zones[w].zone for w in durable if zones[w].zone}
    kept = {zones[w].zone for w in durable - {sender} if zones[w].zone}
    skipped: list[tuple[float, WorkerId]] = []
    found: WorkerId | None = None
    while recipients:
        w = recipients[0][1]
        if memory[w] + kv.size > mean or memory[w] + kv.size >= memory[sender] - kv.size:
            break
        zone = zones[w].zone
        narrows_zones = len(kept | ({zone} if zone else set())) < len(before)
        if w in kv.holders or w in replicating or narrows_zones:
            skipped.append(heapq.heappop(recipients))
            continue
        found = heapq.heappop(recipients)[1]
        break
    for entry in skipped:
        heapq.heappush(recipients, entry)
    return found

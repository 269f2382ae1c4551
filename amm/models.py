"""The values the client returns, and their conversion from the wire contract.

Users get frozen dataclasses with plain Python types (``str`` statuses, ``float`` seconds,
``datetime`` in UTC), never protobuf messages, so that results print, compare and serialize like
any other value. Every conversion from ``amm.v1`` lives here, once; the client and the CLI only call
the ``*_from_proto`` functions. Enum values a newer server may send and this client does not know
read as ``"unspecified"``, as the contract asks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from amm.v1 import control_pb2, types_pb2


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A registered worker as the AMM last saw it; sizes in bytes."""

    address: str
    name: str
    status: str
    process_bytes: int
    managed_bytes: int
    unmanaged_old_bytes: int
    optimistic_bytes: int
    limit_bytes: int
    memory_bytes: int
    key_count: int
    last_poll: datetime | None
    registered_at: datetime | None
    missed_polls: int = 0
    """Polls in a row it did not answer; its replicas do not count as durable meanwhile."""
    zone: str = ""
    """Its failure domain; empty when it declared none."""
    reported_status: str = "unspecified"
    """What the agent itself reported (running, paused, closing); ``status`` is the AMM's
    verdict, which may override it (stale, retiring, retired)."""
    status_since: datetime | None = None
    """Since when it has had its current ``status``."""
    unconfirmed: bool = False
    """Known only from the AMM's state file: not heard from since the AMM started (it may be
    long dead); ``has_what`` leaves it out."""


@dataclass(frozen=True, slots=True)
class Unpinned:
    """Pins released of ``key`` on ``worker`` (``amm unpin``), and ``pins`` still held there."""

    key: str
    worker: str
    released: int
    pins: int


@dataclass(frozen=True, slots=True)
class Prefetched:
    """A worker holds a key after ``prefetch``; ``fetched`` when it copied it from a peer for it,
    ``pins`` the key's pins there when the prefetch pinned it."""

    key: str
    worker: str
    size: int
    fetched: bool
    pins: int = 0


@dataclass(frozen=True, slots=True)
class DirectiveRecord:
    """A directive the AMM sent in a cycle and, once known, its outcome."""

    id: str
    op: str
    key: str
    worker: str
    policy: str
    outcome: str | None
    reason: str | None
    message: str
    sent_at: datetime | None
    timed_out: bool
    policy_reason: str = ""
    """Why the policy suggested it (``reason`` is why an agent refused or failed it)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A suggestion the AMM's core turned down, and why."""

    policy: str
    op: str
    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class CycleReport:
    """What one AMM cycle did; durations in seconds."""

    number: int
    started_at: datetime | None
    duration: float
    plan_duration: float
    suggestions: int
    directives_sent: int
    applied: int
    refused: int
    failed: int
    rejected: int
    directives: tuple[DirectiveRecord, ...]
    rejections: tuple[Rejection, ...]
    unreachable_workers: tuple[str, ...]
    dry_run: bool = False
    """Planned only: ``directives`` lists what would have been sent; nothing was."""
    startup_grace: bool = False
    """Drops were held back: the AMM was in its start-up grace."""


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """A configured policy; ``kwargs_json`` is kept verbatim, ``kwargs`` parses it."""

    name: str
    class_path: str
    kwargs_json: str

    @property
    def kwargs(self) -> dict[str, Any]:
        parsed = json.loads(self.kwargs_json) if self.kwargs_json else {}
        return parsed if isinstance(parsed, dict) else {}


@dataclass(frozen=True, slots=True)
class ClusterTotals:
    """Totals over the cluster as the AMM last saw it; sizes in bytes."""

    workers: int
    keys: int
    replicas: int
    memory_bytes: int
    managed_bytes: int
    process_bytes: int
    directives_in_flight: int
    conflicting_keys: int = 0
    unreachable_workers: int = 0
    keys_with_goal: int = 0
    keys_below_goal: int = 0
    """Keys with a replication goal that have fewer live copies than its target."""
    lost_keys: int = 0
    """Keys whose last holder died before a copy was made elsewhere, not seen since."""
    stale_workers: int = 0
    """Workers silent for longer than stale-after (not yet declared dead)."""
    retiring_workers: int = 0
    directives_sent: int = 0
    """Directives sent since the AMM started; the other three count their outcomes."""
    directives_applied: int = 0
    directives_refused: int = 0
    directives_failed: int = 0


@dataclass(frozen=True, slots=True)
class RetirementResult:
    """How the retirement of one worker ended: ``retired``, or abandoned with the ``reason``;
    ``closed`` when its agent was asked to shut down and agreed."""

    worker: str
    retired: bool
    reason: str
    closed: bool


@dataclass(frozen=True, slots=True)
class RefusalRecord:
    """A directive an agent refused or failed."""

    directive_id: str
    op: str
    key: str
    worker: str
    reason: str
    message: str
    at: datetime | None


@dataclass(frozen=True, slots=True)
class Event:
    """Something notable the AMM decided or observed (a worker's death, lost keys, ...)."""

    at: datetime | None
    kind: str
    worker: str
    keys: tuple[str, ...]
    message: str
    seq: int = 0
    """Its place in the AMM's event stream: from 1, one more per event, per run of the AMM."""
    incarnation: str = ""
    """The run of the AMM that recorded it; with ``seq``, a resume point (``events(after=)``)."""


@dataclass(frozen=True, slots=True)
class EventGap:
    """In ``events()``: ``missed`` events that will never be delivered, before the next one (no
    longer retained by the AMM, or dropped because the reader fell behind); ``restarted``: the
    resume point came from an earlier run of the AMM, whose later events are gone, uncounted."""

    missed: int
    restarted: bool = False


@dataclass(frozen=True, slots=True)
class Status:
    """The AMM's configuration, epoch, last cycle and totals; ``interval`` in seconds."""

    running: bool
    interval: float
    measure: str
    policies: tuple[PolicyInfo, ...]
    epoch: int
    cycles: int
    last_cycle: CycleReport | None
    totals: ClusterTotals
    recent_refusals: tuple[RefusalRecord, ...]
    recent_events: tuple[Event, ...] = ()
    """Newest first."""
    startup_grace: bool = False
    """No drops are issued yet: a worker known before the AMM restarted has not reported."""
    fenced_by_epoch: int = 0
    """Nonzero once agents reported this newer epoch: another AMM took over, this one no longer
    cycles until it is restarted."""

    @property
    def fenced(self) -> bool:
        return self.fenced_by_epoch > 0


@dataclass(frozen=True, slots=True)
class ReplicationGoal:
    """A key's tracked replication goal: ``n`` copies asked (None: every worker), ``target``
    copies it should have now (n capped by the workers that can hold it), ``live_copies`` it has
    on reachable workers that are not leaving."""

    key: str
    n: int | None
    target: int
    live_copies: int
    lost: bool = False
    """The key is lost (``Client.lost_keys``): the goal cannot be met until it is put again."""

    @property
    def below(self) -> bool:
        """Short of its target (a key with no live copy at all always is)."""
        return self.live_copies < max(1, self.target)


@dataclass(frozen=True, slots=True)
class LostKey:
    """A key known to be lost: the ``worker`` that held its last copy ("" when not known: it was
    missing after an AMM restart), when the AMM found it lost, how (``reason``) and whether it
    has a replication goal."""

    key: str
    worker: str
    lost_at: datetime | None
    reason: str
    has_goal: bool


@dataclass(frozen=True, slots=True)
class GoalChange:
    """What ``replicate`` changed: goals set or changed, goals removed (keys already at the
    goal asked for count in neither)."""

    goals_set: int
    goals_removed: int


@dataclass(frozen=True, slots=True)
class PutManyResult:
    """What ``put_many`` stored, summed over the ``workers`` it wrote to: values ``created``,
    values a worker already held with the same content (``unchanged``), and the bytes created
    (``nbytes``). A value broadcast to 3 workers counts 3 times."""

    created: int
    unchanged: int
    nbytes: int
    workers: tuple[str, ...]


def enum_name(enum: EnumDescriptor, value: int, prefix: str) -> str:
    """``WORKER_STATUS_RUNNING`` -> ``running``; an unknown value -> ``unspecified``."""
    known = enum.values_by_number.get(value)
    return known.name.removeprefix(prefix).lower() if known else "unspecified"


def address_key(address: str) -> tuple[str, int, str]:
    """Sort key for ``host:port`` addresses: by host, then port numerically."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit():
        return host, int(port), ""
    return address, -1, address


def sort_addresses(addresses: list[str] | tuple[str, ...]) -> list[str]:
    return sorted(addresses, key=address_key)


def _seconds(duration: Duration) -> float:
    return duration.seconds + duration.nanos / 1e9


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    stamp: Timestamp = getattr(message, field)
    return stamp.ToDatetime(tzinfo=UTC)


def _op(value: int) -> str:
    return enum_name(types_pb2.DirectiveOp.DESCRIPTOR, value, "DIRECTIVE_OP_")


def _reason(value: int) -> str:
    return enum_name(types_pb2.RefusalReason.DESCRIPTOR, value, "REFUSAL_REASON_")


def worker_from_proto(msg: control_pb2.WorkerInfo) -> WorkerInfo:
    memory = msg.memory
    return WorkerInfo(
        address=msg.address,
        name=msg.name or msg.address,
        status=enum_name(types_pb2.WorkerStatus.DESCRIPTOR, msg.status, "WORKER_STATUS_"),
        process_bytes=memory.process_bytes,
        managed_bytes=memory.managed_bytes,
        unmanaged_old_bytes=memory.unmanaged_old_bytes,
        optimistic_bytes=memory.optimistic_bytes,
        limit_bytes=memory.limit_bytes,
        memory_bytes=msg.memory_bytes,
        key_count=msg.key_count,
        last_poll=_time(msg, "last_poll"),
        registered_at=_time(msg, "registered_at"),
        missed_polls=msg.missed_polls,
        zone=msg.zone,
        reported_status=enum_name(
            types_pb2.WorkerStatus.DESCRIPTOR, msg.reported_status, "WORKER_STATUS_"
        ),
        status_since=_time(msg, "status_since"),
        unconfirmed=msg.unconfirmed,
    )


def directive_record_from_proto(msg: types_pb2.DirectiveRecord) -> DirectiveRecord:
    known = msg.HasField("outcome") and msg.outcome.status != types_pb2.OUTCOME_STATUS_UNSPECIFIED
    outcome = msg.outcome
    return DirectiveRecord(
        id=msg.directive.id,
        op=_op(msg.directive.op),
        key=msg.directive.key,
        worker=msg.worker,
        policy=msg.policy,
        outcome=enum_name(types_pb2.OutcomeStatus.DESCRIPTOR, outcome.status, "OUTCOME_STATUS_")
        if known
        else None,
        reason=_reason(outcome.reason)
        if known and outcome.reason != types_pb2.REFUSAL_REASON_UNSPECIFIED
        else None,
        message=outcome.message,
        sent_at=_time(msg, "sent_at"),
        timed_out=msg.timed_out,
        policy_reason=msg.directive.reason,
    )


def cycle_from_proto(msg: types_pb2.CycleReport) -> CycleReport:
    return CycleReport(
        number=msg.number,
        started_at=_time(msg, "started_at"),
        duration=_seconds(msg.duration),
        plan_duration=_seconds(msg.plan_duration),
        suggestions=msg.suggestions,
        directives_sent=msg.directives_sent,
        applied=msg.applied,
        refused=msg.refused,
        failed=msg.failed,
        rejected=msg.rejected,
        directives=tuple(directive_record_from_proto(d) for d in msg.directives),
        rejections=tuple(
            Rejection(policy=r.policy, op=_op(r.op), key=r.key, reason=r.reason)
            for r in msg.rejections
        ),
        unreachable_workers=tuple(msg.unreachable_workers),
        dry_run=msg.dry_run,
        startup_grace=msg.startup_grace,
    )


def status_from_proto(msg: control_pb2.GetStatusResponse) -> Status:
    totals = msg.totals
    return Status(
        running=msg.running,
        interval=_seconds(msg.interval),
        measure=enum_name(types_pb2.MemoryMeasure.DESCRIPTOR, msg.measure, "MEMORY_MEASURE_"),
        policies=tuple(
            PolicyInfo(name=p.name, class_path=p.class_path, kwargs_json=p.kwargs_json)
            for p in msg.policies
        ),
        epoch=msg.epoch,
        cycles=msg.cycles,
        last_cycle=cycle_from_proto(msg.last_cycle) if msg.HasField("last_cycle") else None,
        totals=ClusterTotals(
            workers=totals.workers,
            keys=totals.keys,
            replicas=totals.replicas,
            memory_bytes=totals.memory_bytes,
            managed_bytes=totals.managed_bytes,
            process_bytes=totals.process_bytes,
            directives_in_flight=totals.directives_in_flight,
            conflicting_keys=totals.conflicting_keys,
            unreachable_workers=totals.unreachable_workers,
            keys_with_goal=totals.keys_with_goal,
            keys_below_goal=totals.keys_below_goal,
            lost_keys=totals.lost_keys,
            stale_workers=totals.stale_workers,
            retiring_workers=totals.retiring_workers,
            directives_sent=totals.directives_sent,
            directives_applied=totals.directives_applied,
            directives_refused=totals.directives_refused,
            directives_failed=totals.directives_failed,
        ),
        recent_refusals=tuple(
            RefusalRecord(
                directive_id=r.directive.id,
                op=_op(r.directive.op),
                key=r.directive.key,
                worker=r.worker,
                reason=_reason(r.reason),
                message=r.message,
                at=_time(r, "at"),
            )
            for r in msg.recent_refusals
        ),
        recent_events=tuple(event_from_proto(e) for e in msg.recent_events),
        startup_grace=msg.startup_grace,
        fenced_by_epoch=msg.fenced_by_epoch if msg.fenced else 0,
    )


def event_from_proto(e: types_pb2.Event) -> Event:
    return Event(
        at=_time(e, "at"),
        kind=e.kind,
        worker=e.worker,
        keys=tuple(e.keys),
        message=e.message,
        seq=e.seq,
        incarnation=e.incarnation,
    )


def goal_from_proto(msg: control_pb2.ReplicationGoal) -> ReplicationGoal:
    return ReplicationGoal(
        key=msg.key,
        n=msg.n if msg.HasField("n") else None,
        target=msg.target,
        live_copies=msg.live_copies,
        lost=msg.lost,
    )


def lost_from_proto(msg: control_pb2.LostKey) -> LostKey:
    return LostKey(
        key=msg.key,
        worker=msg.worker,
        lost_at=_time(msg, "lost_at"),
        reason=msg.reason,
        has_goal=msg.has_goal,
    )


def retirement_from_proto(msg: control_pb2.RetirementResult) -> RetirementResult:
    return RetirementResult(
        worker=msg.worker, retired=msg.retired, reason=msg.reason, closed=msg.closed
    )

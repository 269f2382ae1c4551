"""Conversions between the service's domain values and the ``amm.v1`` wire messages.

The one place that knows both forms, so the core and the policies never see protobuf and the
servicers never hand-build domain values.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import TypeVar, cast

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from amm.v1 import agent_pb2, types_pb2
from amm_service.decisions.core import Rejection
from amm_service.decisions.directive import Directive, Op, Outcome, OutcomeStatus
from amm_service.decisions.events import Event
from amm_service.decisions.view import Key, KeyReport, Measure, Memory, WorkerStatus

_T = TypeVar("_T")
_DROP = Op.DROP
"""Read once: an Op member is a lookup through ``EnumType`` (ten times a plain attribute)."""
_OPS = {Op.REPLICATE: types_pb2.DIRECTIVE_OP_REPLICATE, Op.DROP: types_pb2.DIRECTIVE_OP_DROP}
_STATUSES = {
    types_pb2.WORKER_STATUS_RUNNING: WorkerStatus.RUNNING,
    types_pb2.WORKER_STATUS_PAUSED: WorkerStatus.PAUSED,
    types_pb2.WORKER_STATUS_CLOSING: WorkerStatus.CLOSING,
}
"""What an agent may report; the AMM's own verdicts (RETIRING, RETIRED, STALE) are not taken from
agents."""
_STATUSES_OUT = {v: k for k, v in _STATUSES.items()} | {
    WorkerStatus.RETIRING: types_pb2.WORKER_STATUS_RETIRING,
    WorkerStatus.RETIRED: types_pb2.WORKER_STATUS_RETIRED,
    WorkerStatus.STALE: types_pb2.WORKER_STATUS_STALE,
}
_OUTCOMES = {
    types_pb2.OUTCOME_STATUS_APPLIED: OutcomeStatus.APPLIED,
    types_pb2.OUTCOME_STATUS_REFUSED: OutcomeStatus.REFUSED,
    types_pb2.OUTCOME_STATUS_FAILED: OutcomeStatus.FAILED,
}
_OUTCOMES_OUT = {v: k for k, v in _OUTCOMES.items()}
MEASURES_OUT: dict[Measure, types_pb2.MemoryMeasure.ValueType] = {
    "process": types_pb2.MEMORY_MEASURE_PROCESS,
    "managed": types_pb2.MEMORY_MEASURE_MANAGED,
    "optimistic": types_pb2.MEMORY_MEASURE_OPTIMISTIC,
}
_REASON_PREFIX = "REFUSAL_REASON_"
_REASONS = {
    number: name.removeprefix(_REASON_PREFIX)
    for name, number in types_pb2.RefusalReason.items()
    if number != types_pb2.REFUSAL_REASON_UNSPECIFIED
}
"""Known refusal reasons by wire number (an unknown one reads as none)."""


def directive_to_pb(d: Directive) -> types_pb2.Directive:
    message = types_pb2.Directive()
    directive_into(d, message)
    return message


def directives_request(
    directives: Iterable[Directive], request: agent_pb2.DirectivesRequest | None = None
) -> agent_pb2.DirectivesRequest:
    """One batch message (or ``request`` with ``directives`` added to its batch); each
    directive is built in place (building them apart and handing the list over copies every
    one).

    The directives of a batch share most fields: all those of one key (a drop of three copies,
    say) have the same keepers, and a big cycle's 300,000 drops have a few distinct reasons and
    keepers between them. So the fields only a directive has are set by name, and the rest are
    merged in from their encoding, made once per distinct set of them (a third less time than
    setting every field by name: ``test_wire_batches`` checks the messages are the same)."""
    if request is None:
        request = agent_pb2.DirectivesRequest()
    add = request.batch.add
    # One table per op, so that no key holds an Op member: its hash is a Python call.
    drops: dict[tuple[object, ...], bytes] = {}
    replicas: dict[tuple[object, ...], bytes] = {}
    last: Directive | None = None
    common = b""
    for d in directives:
        if (
            last is None
            or d.holders is not last.holders
            or d.sources is not last.sources
            or d.reason is not last.reason
            or d.policy is not last.policy
            or d.epoch != last.epoch
            or d.op is not last.op
        ):
            of_op = drops if d.op is _DROP else replicas
            fields = (d.epoch, d.sources, d.holders, d.policy, d.reason)
            found = of_op.get(fields)
            if found is None:
                found = of_op[fields] = _shared_fields(d).SerializeToString()
            common, last = found, d
        add(id=d.id, key=d.key, size=d.size, checksum=d.checksum).MergeFromString(common)
    return request


_OP = operator.attrgetter("op")
_EPOCH = operator.attrgetter("epoch")
_POLICY = operator.attrgetter("policy")
#: The fields a drop has in columns of its own, read in one C call.
_DROP_COLUMNS = operator.attrgetter("id", "key", "size", "checksum", "holders", "reason")


def split_drops(
    directives: Sequence[Directive],
) -> tuple[Sequence[Directive], Sequence[Directive]]:
    """``directives`` parted into the drops that go in columns (``DropColumns``: those of the
    epoch and policy of the first drop, which the columns hold once) and the rest, which go in
    ``batch``. A cycle's slice of drops, the usual case, is told in C-level passes."""
    if (
        all(map(operator.is_, map(_OP, directives), repeat(_DROP)))
        and len(set(map(_EPOCH, directives))) <= 1
        and len(set(map(_POLICY, directives))) <= 1
    ):
        return directives, ()
    first = next((d for d in directives if d.op is _DROP), None)
    if first is None:
        return (), directives
    epoch, policy = first.epoch, first.policy
    columns: list[Directive] = []
    rest: list[Directive] = []
    for d in directives:
        (columns if d.op is _DROP and d.epoch == epoch and d.policy == policy else rest).append(d)
    return columns, rest


class DropColumnsWriter:
    """Writes drops into one ``DropColumns``, a slice at a time (the loop let in between), its
    tables of keepers and reasons shared by every slice. The drops must share an epoch and a
    policy (``split_drops``)."""

    def __init__(self, columns: agent_pb2.DropColumns) -> None:
        self._columns = columns
        self._keepers: dict[tuple[str, ...], int] = {}
        self._reasons: dict[str, int] = {}

    def add(self, drops: Sequence[Directive]) -> None:
        """Append ``drops`` to the columns, each in C-level passes over the slice (``zip`` and
        ``map``): no message per drop."""
        if not drops:
            return
        columns = self._columns
        columns.epoch, columns.policy = drops[0].epoch, drops[0].policy
        ids, keys, sizes, checksums, holders, reasons = zip(*map(_DROP_COLUMNS, drops), strict=True)
        columns.ids.extend(ids)
        columns.keys.extend(keys)
        columns.sizes.extend(sizes)
        columns.checksums.extend(checksums)
        columns.keepers_index.extend(_indexes(holders, self._keepers, _add_keepers(columns)))
        columns.reason_index.extend(_indexes(reasons, self._reasons, columns.reasons.append))

    @property
    def count(self) -> int:
        return len(self._columns.ids)


def _add_keepers(columns: agent_pb2.DropColumns) -> Callable[[tuple[str, ...]], None]:
    def add(holders: tuple[str, ...]) -> None:
        columns.keepers.add().holders.extend(holders)

    return add


def _indexes(
    values: tuple[_T, ...], table: dict[_T, int], add: Callable[[_T], object]
) -> Iterable[int]:
    """Each value's index in ``table``; values new to it are added, and passed to ``add`` in
    the order of their indexes. A few distinct values among thousands: each new one is added
    in Python, the lookups are made in C."""
    for value in dict.fromkeys(values):
        if value not in table:
            table[value] = len(table)
            add(value)
    return map(table.__getitem__, values)


def _shared_fields(d: Directive) -> types_pb2.Directive:
    """The fields of ``d`` that ``directives_request`` merges in (every one but the id, key,
    size and checksum)."""
    return types_pb2.Directive(
        epoch=d.epoch,
        op=_OPS[d.op],
        sources=d.sources,
        holders=d.holders,
        policy=d.policy,
        reason=d.reason,
    )


def directive_into(d: Directive, message: types_pb2.Directive) -> None:
    """``d`` written into ``message`` (a field of another message: no copy)."""
    message.id = d.id
    message.epoch = d.epoch
    message.op = _OPS[d.op]
    message.key = d.key
    message.size = d.size
    message.checksum = d.checksum
    message.policy = d.policy
    message.reason = d.reason
    if d.sources:
        message.sources.extend(d.sources)
    if d.holders:
        message.holders.extend(d.holders)


#: Each reason's wire value by name (a report of 1,000 outcomes looked each one up in a list of
#: every name, built again for each).
_REASONS_OUT = {name: number for number, name in _REASONS.items() if name}


def outcome_from_pb(pb: types_pb2.DirectiveOutcome, incarnation: str = "") -> Outcome:
    """Unknown statuses count as FAILED: whatever happened, the directive is not applied.
    ``incarnation`` is the answering agent's (``DirectivesResponse.incarnation``)."""
    return Outcome(  # positional: a big cycle reads hundreds of thousands
        pb.directive_id,
        _OUTCOMES.get(pb.status, OutcomeStatus.FAILED),
        _REASONS.get(pb.reason, ""),
        pb.message,
        pb.inventory_version,
        pb.duplicate,
        pb.dropped_version,
        incarnation,
    )


def outcomes_from_pb(
    pbs: Iterable[types_pb2.DirectiveOutcome], incarnation: str = ""
) -> list[Outcome]:
    """``outcome_from_pb`` of each, without a call each (a big cycle reads 300,000 in
    batches)."""
    new, statuses, reasons, failed = tuple.__new__, _OUTCOMES, _REASONS, OutcomeStatus.FAILED
    return [
        new(
            Outcome,
            (
                pb.directive_id,
                statuses.get(pb.status, failed),
                reasons.get(pb.reason, ""),
                pb.message,
                pb.inventory_version,
                pb.duplicate,
                pb.dropped_version,
                incarnation,
            ),
        )
        for pb in pbs
    ]


def outcomes_from_applied(applied: agent_pb2.AppliedDrops, incarnation: str = "") -> list[Outcome]:
    """The outcomes of applied drops answered in columns (``AppliedDrops``), each built in C
    (a ``map`` over the columns' ``zip``). Columns that do not line up say nothing reliable of
    any drop: each id is taken as FAILED (not applied; the next poll tells)."""
    ids = applied.ids
    if len(applied.inventory_versions) != len(ids) or len(applied.dropped_versions) != len(ids):
        why = "the agent answered applied drops in columns that do not line up"
        return [Outcome(i, OutcomeStatus.FAILED, message=why) for i in ids]
    fields = zip(
        ids,
        repeat(OutcomeStatus.APPLIED),
        repeat(""),
        repeat(""),
        applied.inventory_versions,
        repeat(False),
        applied.dropped_versions,
        repeat(incarnation),
    )
    return list(map(_new_outcome, fields))


#: An Outcome from a tuple of all its fields, in C (``tuple.__new__``, as ``_make`` does).
_new_outcome = functools.partial(tuple.__new__, Outcome)


def reason_to_pb(reason: str) -> types_pb2.RefusalReason.ValueType:
    return _REASONS_OUT.get(reason, types_pb2.REFUSAL_REASON_UNSPECIFIED)


def outcome_to_pb(o: Outcome) -> types_pb2.DirectiveOutcome:
    message = types_pb2.DirectiveOutcome()
    outcome_into(o, message)
    return message


def outcome_into(o: Outcome, message: types_pb2.DirectiveOutcome) -> None:
    """``o`` written into ``message`` (a field of another message: no copy)."""
    message.directive_id = o.directive_id
    message.status = _OUTCOMES_OUT[o.status]
    message.reason = reason_to_pb(o.reason)
    message.message = o.message
    message.inventory_version = o.inventory_version
    message.duplicate = o.duplicate
    message.dropped_version = o.dropped_version


def status_from_pb(status: types_pb2.WorkerStatus.ValueType) -> WorkerStatus:
    return _STATUSES.get(status, WorkerStatus.UNKNOWN)


def status_to_pb(status: WorkerStatus) -> types_pb2.WorkerStatus.ValueType:
    return _STATUSES_OUT.get(status, types_pb2.WORKER_STATUS_UNSPECIFIED)


def memory_from_pb(pb: types_pb2.MemoryReport) -> Memory:
    return Memory(
        process=pb.process_bytes,
        managed=pb.managed_bytes,
        unmanaged_old=pb.unmanaged_old_bytes,
        optimistic=pb.optimistic_bytes,
        limit=pb.limit_bytes,
    )


def memory_to_pb(m: Memory) -> types_pb2.MemoryReport:
    return types_pb2.MemoryReport(
        process_bytes=m.process,
        managed_bytes=m.managed,
        unmanaged_old_bytes=m.unmanaged_old,
        optimistic_bytes=m.optimistic,
        limit_bytes=m.limit,
    )


def key_reports(
    keys: Iterable[types_pb2.KeyInfo], shared: dict[Key, KeyReport] | None = None
) -> list[KeyReport]:
    """A report of each key; with ``shared``, a key reported as a report there already is that
    report, not a new one (and a key not there yet is added)."""
    new = tuple.__new__  # a KeyReport without its constructor's Python call: 400k in a snapshot
    if shared is None:
        return [new(KeyReport, (k.key, k.size, k.checksum, k.pinned)) for k in keys]
    reports: list[KeyReport] = []
    append, known_as = reports.append, shared.get
    for k in keys:
        key = Key(k.key)
        known = known_as(key)
        if known is None:
            known = shared[key] = new(KeyReport, (key, k.size, k.checksum, k.pinned))
        elif known[2] != k.checksum or known[1] != k.size or known[3] != k.pinned:
            known = new(KeyReport, (key, k.size, k.checksum, k.pinned))
        append(known)
    return reports


def poll_keys_removed(resp: agent_pb2.PollResponse) -> list[Key]:
    return cast("list[Key]", list(resp.removed))  # Key is str at run time: no copy each


def rejection_to_pb(r: Rejection) -> types_pb2.Rejection:
    return types_pb2.Rejection(policy=r.policy, op=_OPS[r.op], key=r.key, reason=r.reason)


def event_to_pb(e: Event) -> types_pb2.Event:
    return types_pb2.Event(
        at=timestamp(e.at),
        kind=e.kind,
        worker=e.worker,
        keys=list(e.keys),
        message=e.message,
        seq=e.seq,
        incarnation=e.incarnation,
    )


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    timestamp_into(seconds, ts)
    return ts


def timestamp_into(seconds: float, message: Timestamp) -> None:
    """``timestamp(seconds)`` written into ``message`` (a field of another message)."""
    nanos = int(seconds * 1e9)  # as ``Timestamp.FromNanoseconds``, without its Python calls
    message.seconds, message.nanos = nanos // 1_000_000_000, nanos % 1_000_000_000


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d

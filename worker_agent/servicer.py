"""The ``amm.v1.WorkerAgent`` gRPC servicer: the agent's wire edge.

Each handler validates its input, calls one ``Node`` method and converts the answer to protobuf.
Domain errors become status codes in one place (``_Edge``); anything unexpected is logged and
answered INTERNAL with a short message, so no traceback crosses the wire. The Directives stream
ends by itself when the node shuts down, since ``server.stop`` does not end long-lived streams
(grpc/grpc#37239).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, cast

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from amm.base.checksum import checksum
from amm.base.guard import Complaints, collect, register_guarded
from amm.base.streams import (
    PUT_ACCEPTED_METADATA,
    Assembly,
    Overflow,
    decoder,
    framed_chunks,
    serialize,
)
from amm.base.validation import bad_addresses
from amm.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from worker_agent import garbled, integrity
from worker_agent.bulk import BulkError, BulkServer
from worker_agent.directives import Outcome, OutcomeStatus
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
from worker_agent.integrity import Directive, Op, Reason, Refuse
from worker_agent.node import Forgotten, Inventory, Node, Promise
from worker_agent.pacing import Pace, parts
from worker_agent.runs import framed
from worker_agent.store import MAX_KEY_BYTES, Key, KeyInfo, Value

log = logging.getLogger(__name__)

SERVICE_NAME: str = agent_pb2.DESCRIPTOR.services_by_name["WorkerAgent"].full_name

_STATUS: dict[type[AgentError], grpc.StatusCode] = {
    UnknownKey: grpc.StatusCode.NOT_FOUND,
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ContentConflict: grpc.StatusCode.ALREADY_EXISTS,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Refused: grpc.StatusCode.FAILED_PRECONDITION,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}
_OUTCOME_STATUS = {
    OutcomeStatus.APPLIED: types_pb2.OUTCOME_STATUS_APPLIED,
    OutcomeStatus.REFUSED: types_pb2.OUTCOME_STATUS_REFUSED,
    OutcomeStatus.FAILED: types_pb2.OUTCOME_STATUS_FAILED,
}
_OPS = {types_pb2.DIRECTIVE_OP_REPLICATE: Op.REPLICATE, types_pb2.DIRECTIVE_OP_DROP: Op.DROP}
#: The optional parts of the contract this agent serves (``PollResponse.features``).
FEATURES = (
    "directive-batches",
    "keep-batches",
    "put-batches",
    "tombstones",
    "key-lookups",
    "drop-columns",
)
#: Most outcomes in one DirectivesResponse batch: each message is built in one step of the loop,
#: and 500 take a few milliseconds.
OUTCOMES_PER_MESSAGE = 500
#: Refused Puts whose rest is read and discarded at the same time (``WorkerAgentServicer._drain``).
DRAINS_AT_ONCE = 2
#: Most keys in one HoldsKeys request.
MAX_HOLDS_KEYS = 10_000
#: Most items in one PromiseKeepBatch request.
MAX_KEEP_BATCH = 100_000
#: Promises of a PromiseKeepBatch made in one step of the loop.
KEEP_SLICE = 256
#: Items of a PromiseKeepBatch read and checked in one step.
KEEP_READ = 1024
#: ``PromiseKeepBatchResponse.answers``: built from bytes (``runs``).
_ANSWERS_FIELD = agent_pb2.PromiseKeepBatchResponse.ANSWERS_FIELD_NUMBER

Context = grpc.aio.ServicerContext[Any, Any]
#: What Get and Fetch write: the header message, then chunks already serialized.
Outgoing = agent_pb2.GetResponse | agent_pb2.FetchResponse | bytes


class _Edge:
    """Turns domain errors into status codes and anything else into a logged INTERNAL."""

    def __init__(self, context: Context, method: str) -> None:
        self._context = context
        self._method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, grpc.aio.AbortError):
            return
        if isinstance(exc, AgentError):
            await self._context.abort(_STATUS[type(exc)], exc.message)
        log.error("%s failed unexpectedly", self._method, exc_info=exc)
        await self._context.abort(grpc.StatusCode.INTERNAL, f"internal error in {self._method}")


#: ``RefusalReason`` by reason, looked up once (an outcome of every drop of a batch needs one).
_REASONS: dict[Reason | None, types_pb2.RefusalReason.ValueType] = {
    None: types_pb2.REFUSAL_REASON_UNSPECIFIED,
    **{r: types_pb2.RefusalReason.Value(f"REFUSAL_REASON_{r.name}") for r in Reason},
}


def reason_to_proto(reason: Reason | None) -> types_pb2.RefusalReason.ValueType:
    return _REASONS[reason]


def directive_from_proto(message: types_pb2.Directive) -> Directive:
    return Directive(  # positional: a batch brings thousands
        message.id,
        message.epoch,
        _OPS.get(message.op, Op.UNSPECIFIED),
        Key(message.key),
        message.size,
        message.checksum,
        tuple(message.sources),
        tuple(message.holders),
    )


#: ``tuple.__new__``: a NamedTuple from a tuple of all its fields, as ``_make`` does, without
#: the Python frame of its ``__new__``.
_new_tuple = tuple.__new__


#: A directive's fields in ``Directive``'s order, read in one C call (eight attribute reads by
#: the interpreter cost a fifth more per directive of a batch).
_DIRECTIVE_FIELDS = operator.attrgetter(
    "id", "epoch", "op", "key", "size", "checksum", "sources", "holders"
)


async def _directives_from_proto(messages: Sequence[types_pb2.Directive]) -> list[Directive]:
    """``directive_from_proto`` for a batch of thousands, inline, letting the loop in
    (``pacing``). Directives naming the same holders share one tuple of them (a batch names
    few sets), so looking them up by it compares by identity first."""
    directives: list[Directive] = []
    append, pace, ops, unknown = directives.append, Pace(), _OPS, Op.UNSPECIFIED
    named: dict[tuple[str, ...], tuple[str, ...]] = {}
    for part in parts(messages):
        await pace.breathe()
        for id_, epoch, op, key, size, digest, sources, holders in map(_DIRECTIVE_FIELDS, part):
            holders = tuple(holders)
            append(
                _new_tuple(
                    Directive,
                    (
                        id_,
                        epoch,
                        ops.get(op, unknown),
                        key,
                        size,
                        digest,
                        # An empty repeated field made into a tuple costs more than the rest
                        # of the directive: a DROP names no sources.
                        tuple(sources) if sources else (),
                        named.setdefault(holders, holders),
                    ),
                )
            )
    return directives


#: A DROP directive from a tuple of its fields, in C (``map`` over the zipped columns).
_new_directive = functools.partial(_new_tuple, Directive)
#: Drops decoded from columns in one step of the loop.
COLUMN_STEP = 4096


def columns_problem(columns: agent_pb2.DropColumns) -> str:
    """Why ``columns`` cannot be read as drops (a column whose length differs from ``ids``', an
    index beyond its table); empty when they can. Judged in C-level passes (``len``, ``max``)."""
    count = len(columns.ids)
    for name, column in (
        ("keys", columns.keys),
        ("sizes", columns.sizes),
        ("checksums", columns.checksums),
        ("keepers_index", columns.keepers_index),
        ("reason_index", columns.reason_index),
    ):
        if len(column) != count:
            return f"drop columns: {len(column)} {name} for {count} ids"
    if count:
        for name, index, table in (
            ("keepers_index", columns.keepers_index, len(columns.keepers)),
            ("reason_index", columns.reason_index, len(columns.reasons)),
        ):
            if max(index) >= table:
                return f"drop columns: {name} {max(index)} beyond the {table} entries of its table"
    return ""


async def drops_from_columns(columns: agent_pb2.DropColumns) -> list[Directive]:
    """The DROP directives of well-formed ``columns`` (``columns_problem`` is empty), each built
    straight from the columns in C (a ``map`` over their ``zip``): no message per drop, and one
    tuple per distinct list of keepers, shared by the drops that name it. The loop is let in
    every ``COLUMN_STEP`` drops."""
    keepers = [tuple(k.holders) for k in columns.keepers]
    fields = zip(
        columns.ids,
        itertools.repeat(columns.epoch),
        itertools.repeat(Op.DROP),
        columns.keys,
        columns.sizes,
        columns.checksums,
        itertools.repeat(()),
        map(keepers.__getitem__, columns.keepers_index),
    )
    built = map(_new_directive, fields)
    directives: list[Directive] = []
    pace = Pace()
    for _ in range(0, len(columns.ids), COLUMN_STEP):
        await pace.breathe()
        directives += itertools.islice(built, COLUMN_STEP)
    return directives


def _usual_items(pairs: list[tuple[str, str]]) -> bool:
    """Whether every ``(key, checksum)`` is well formed as ``_key`` and ``_checksum`` check it,
    judged for the whole in a few C-level passes: keys of 1 to ``MAX_KEY_BYTES // 4``
    characters, checksums of 64 lowercase hexadecimal digits. False when any is not, or when
    it cannot tell so cheaply (a longer key, an empty checksum): the caller checks each."""
    if not pairs:
        return True
    keys, digests = zip(*pairs, strict=True)
    return (
        all(keys) and max(map(len, keys)) * 4 <= MAX_KEY_BYTES and integrity.all_checksums(digests)
    )


def outcome_to_proto(outcome: Outcome) -> types_pb2.DirectiveOutcome:
    return types_pb2.DirectiveOutcome(**_outcome_fields(outcome))


def outcomes_response(
    outcomes: Sequence[Outcome], incarnation: str = "", columns: bool = False
) -> agent_pb2.DirectivesResponse:
    """One batch of outcomes, each built in place (a list handed over is copied), with the
    ``incarnation`` their versions count in. With ``columns`` (a stream that brought drops in
    columns, feature "drop-columns"), the applied drops are answered in columns
    (``DirectivesResponse.applied``), every other outcome in ``batch``."""
    response = agent_pb2.DirectivesResponse(incarnation=incarnation)
    if columns and outcomes:
        # The usual group (every drop of a batch applied) is judged and written in C passes.
        ids, statuses_, reasons_, _, versions, repeated, dropped = zip(*outcomes, strict=True)
        if (
            all(dropped)
            and not any(repeated)
            and set(statuses_) == _APPLIED
            and set(reasons_) == _NO_REASON
        ):
            _answer_applied(response.applied, ids, versions, dropped)
            return response
        mixed = [o for o in outcomes if _applied_drop(o)]
        if mixed:
            outcomes = [o for o in outcomes if not _applied_drop(o)]
            ids, _, _, _, versions, _, dropped = zip(*mixed, strict=True)
            _answer_applied(response.applied, ids, versions, dropped)
    add, statuses, reasons = response.batch.add, _OUTCOME_STATUS, _REASONS
    for o in outcomes:  # fields named here, not through ``_outcome_fields``: a dict less each
        if o.reason is None and not o.duplicate:  # an applied directive: defaults left unset
            add(
                directive_id=o.directive_id,
                status=statuses[o.status],
                message=o.message,
                inventory_version=o.inventory_version,
                dropped_version=o.dropped_version,
            )
            continue
        add(
            directive_id=o.directive_id,
            status=statuses[o.status],
            reason=reasons[o.reason],
            message=o.message,
            inventory_version=o.inventory_version,
            duplicate=o.duplicate,
            dropped_version=o.dropped_version,
        )
    return response


def _answer_applied(
    applied: agent_pb2.AppliedDrops,
    ids: Sequence[str],
    versions: Sequence[int],
    dropped: Sequence[int],
) -> None:
    """Applied drops written in columns: their ids, inventory and dropped versions."""
    applied.ids.extend(ids)
    applied.inventory_versions.extend(versions)
    applied.dropped_versions.extend(dropped)


_APPLIED = {OutcomeStatus.APPLIED}
_NO_REASON = {None}


def _applied_drop(o: Outcome) -> bool:
    """Whether ``o`` is what ``AppliedDrops`` can say: an applied DROP (the only outcome with a
    ``dropped_version``), not a repeated id, with nothing else to tell."""
    return (
        o.dropped_version != 0
        and o.status is OutcomeStatus.APPLIED
        and o.reason is None
        and not o.duplicate
    )


def _outcome_fields(outcome: Outcome) -> dict[str, Any]:
    return {
        "directive_id": outcome.directive_id,
        "status": _OUTCOME_STATUS[outcome.status],
        "reason": reason_to_proto(outcome.reason),
        "message": outcome.message,
        "inventory_version": outcome.inventory_version,
        "duplicate": outcome.duplicate,
        "dropped_version": outcome.dropped_version,
    }


def _poll_response(inv: Inventory) -> agent_pb2.PollResponse:
    memory = inv.memory
    response = agent_pb2.PollResponse(
        incarnation=inv.incarnation,
        version=inv.version,
        full=inv.full,
        removed=inv.removed,
        memory=types_pb2.MemoryReport(
            process_bytes=memory.process,
            managed_bytes=memory.managed,
            unmanaged_old_bytes=memory.unmanaged_old,
            optimistic_bytes=memory.optimistic,
            limit_bytes=memory.limit,
        ),
        status=types_pb2.WorkerStatus.Value(f"WORKER_STATUS_{inv.status.name}"),
        name=inv.name,
        zone=inv.zone,
        epoch=inv.epoch,
        next_cursor=inv.next_cursor,
        more=inv.more,
        features=FEATURES,
    )
    _add_keys(response.keys.add, inv.keys)
    return response


def _add_keys(add: Callable[..., Any], keys: Iterable[KeyInfo]) -> None:
    """Each key's ``amm.v1.KeyInfo``, built in place (a list handed over would be copied): the
    fields unpacked rather than read by name, ``pinned`` set only when true (a poll page or a
    HoldsKeys answer holds thousands)."""
    for key, size, digest, pinned in keys:
        if pinned:
            add(key=key, size=size, checksum=digest, pinned=True)
        else:
            add(key=key, size=size, checksum=digest)


def _key(key: str) -> Key:
    if not key:
        raise InvalidRequest("the key must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise InvalidRequest(f"the key exceeds {MAX_KEY_BYTES} bytes of UTF-8")
    return Key(key)


def _checksum(value: str) -> str:
    value = value.lower()
    if value and not integrity.is_checksum(value):
        raise InvalidRequest("a checksum is 64 hexadecimal digits of SHA-256")
    return value


def _put_items(items: Iterable[agent_pb2.PutItem]) -> list[tuple[Key, bytes, str]]:
    """The ``(key, data, checksum)`` of each item of a PutMany message, checksums verified.

    A message may carry 100,000 values: a declared checksum equal to the one computed is taken
    as it is; only one that differs is looked at for its format and case.
    """
    values = []
    for index, item in enumerate(items):
        try:
            key = _key(item.key)
        except InvalidRequest as err:
            raise InvalidRequest(f"item {index}: {err.message}") from None
        data, declared = item.data, item.checksum
        actual = checksum(data)
        if declared and declared != actual:
            try:
                declared = _checksum(declared)
            except InvalidRequest as err:
                raise InvalidRequest(f"item {index} ({key!r}): {err.message}") from None
            if declared != actual:
                raise InvalidRequest(
                    f"item {index} ({key!r}): the value does not match its checksum"
                )
        values.append((key, data, actual))
    return values


def _keep_answer(answer: Promise | Refuse, now_ns: int) -> agent_pb2.PromiseKeepResponse:
    if isinstance(answer, Refuse):
        return agent_pb2.PromiseKeepResponse(
            kept=False, reason=reason_to_proto(answer.reason), message=answer.message
        )
    expires = Timestamp()
    expires.FromNanoseconds(now_ns + int(answer.remaining * 1e9))
    granted = Duration()
    granted.FromNanoseconds(round(answer.remaining * 1e9))
    return agent_pb2.PromiseKeepResponse(kept=True, lease_expires=expires, lease=granted)


def _requested_lease(
    request: agent_pb2.PromiseKeepRequest | agent_pb2.PromiseKeepBatchRequest, cap: float
) -> float | None:
    """The lease asked for, in seconds and capped at ``cap``; None when unset (the default).

    Read as integer nanoseconds and capped before any conversion: a Duration holds up to 2^63 s,
    which overflows a timedelta. A lease of zero or less would promise nothing while answering
    kept=true, so it is refused.
    """
    if not request.HasField("lease"):
        return None
    nanos = request.lease.ToNanoseconds()
    if nanos <= 0:
        raise InvalidRequest(f"a lease must be positive, got {nanos / 1e9:g} s")
    return min(nanos, round(cap * 1e9)) / 1e9


async def _cancel_all(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel and await tasks, logging any that had failed."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task, result in zip(
        tasks, await asyncio.gather(*tasks, return_exceptions=True), strict=True
    ):
        if isinstance(result, Exception):
            log.error("task %s failed", task.get_name(), exc_info=result)


def _put_chunk(message: agent_pb2.PutRequest | memoryview) -> memoryview | bytes | None:
    """The chunk of a Put message: a ``memoryview`` as ``add_to_server`` registers Put, or a
    protobuf message as the generated registration does; None for anything but a chunk."""
    if isinstance(message, memoryview):
        return message
    return message.chunk if message.WhichOneof("item") == "chunk" else None


def add_to_server(servicer: WorkerAgentServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer``: the generated registration, except that Put's chunks arrive as
    ``memoryview`` and Get and Fetch send chunks already serialized (``amm.base.streams``), so a
    value's bytes are not copied by protobuf on the way in or out (the bytes on the wire are the
    same); that Directives messages that do not decode are salvaged (``garbled``), so each
    directive in them gets an answer; and that every other undecodable request is answered
    INVALID_ARGUMENT (``amm.base.guard``)."""
    handlers = collect(agent_pb2_grpc.add_WorkerAgentServicer_to_server, servicer)
    handlers["Put"] = handlers["Put"]._replace(request_deserializer=decoder(agent_pb2.PutRequest))
    handlers["Directives"] = handlers["Directives"]._replace(
        request_deserializer=garbled.decode_directives
    )
    for method in ("Get", "Fetch"):
        handlers[method] = handlers[method]._replace(response_serializer=serialize)
    servicer.framed = True
    register_guarded(server, SERVICE_NAME, handlers, servicer.complaints)


class WorkerAgentServicer(agent_pb2_grpc.WorkerAgentServicer):
    """Serves one ``Node``."""

    def __init__(self, node: Node) -> None:
        self._node = node
        #: Undecodable requests and directives, logged at most once per client per interval.
        self.complaints = Complaints(log)
        #: Set by ``add_to_server``: Get and Fetch may write chunks already serialized. A servicer
        #: registered with the generated function writes protobuf messages, more slowly.
        self.framed = False
        #: Refused Puts drained at once: the others wait, their clients held back by flow
        #: control, so that refused values do not pass through memory all at the same time.
        self._draining = asyncio.Semaphore(DRAINS_AT_ONCE)

    async def Poll(
        self, request: agent_pb2.PollRequest, context: Context
    ) -> agent_pb2.PollResponse:
        async with _Edge(context, "Poll"):
            if request.forgotten:
                self._bury(request)
            inventory = self._node.poll(
                since=request.since_version,
                incarnation=request.incarnation,
                full=request.full,
                epoch=request.epoch,
                max_keys=request.max_keys,
                cursor=request.cursor,
                membership_version=request.membership_version,
            )
            return _poll_response(inventory)

    async def HoldsKeys(
        self, request: agent_pb2.HoldsKeysRequest, context: Context
    ) -> agent_pb2.HoldsKeysResponse:
        async with _Edge(context, "HoldsKeys"):
            if len(request.keys) > MAX_HOLDS_KEYS:
                raise InvalidRequest(
                    f"{len(request.keys)} keys exceed the {MAX_HOLDS_KEYS} of one request"
                )
            keys = list(request.keys)
            for k in keys:  # checked as ``_key`` does, the usual case without a call each
                if not k or len(k) * 4 > MAX_KEY_BYTES:
                    _key(k)  # raises unless the key is well formed
            held = self._node.holds(cast(list[Key], keys))
            response = agent_pb2.HoldsKeysResponse(
                incarnation=held.incarnation, version=held.version
            )
            _add_keys(response.keys.add, held.keys)
            return response

    def _bury(self, request: agent_pb2.PollRequest) -> None:
        """Apply the tombstones a poll carries, before its inventory is read. Not those of an
        AMM older than the newest seen (it was replaced, and its Forgets with it), nor a key no
        Put could have stored (a bug of the sender, not a reason to fail its poll)."""
        if request.epoch < self._node.newest_epoch:
            log.debug("ignoring the tombstones of a superseded AMM (epoch %d)", request.epoch)
            return
        self._node.bury(
            [
                Forgotten(Key(f.key), f.tombstone, f.put_again)
                for f in request.forgotten
                if f.key and len(f.key.encode()) <= MAX_KEY_BYTES
            ]
        )

    async def Directives(
        self,
        request_iterator: AsyncIterator[agent_pb2.DirectivesRequest | garbled.Garbled],
        context: Context,
    ) -> AsyncIterator[agent_pb2.DirectivesResponse]:
        """Directives in, outcomes out in completion order, one owned task per message.

        A message carries one directive or a batch, its drops perhaps in columns (answered with
        batches of outcomes, applied drops in columns once the stream has brought some). At most
        ``max_concurrent_directives`` messages of a stream are in hand at once: the next one is
        read only when one has been fully answered, so an AMM that sends faster than directives
        complete (or reads no outcomes) is held back by gRPC flow control instead of piling up
        tasks here.

        The stream ends when the AMM stops sending and every directive has an outcome, or at once
        when the agent shuts down (unfinished directives are cancelled; the AMM times them out).
        A message that does not decode is salvaged (``garbled``): each directive in it whose id
        reads is refused INVALID, and one whose id does not ends the stream INVALID_ARGUMENT.
        Columns that do not line up (``columns_problem``) are refused INVALID, every id of them.
        """
        node = self._node
        # (outcomes, as a batch, frees a slot once sent); an error ends the stream with its
        # status, None without one.
        outcomes: asyncio.Queue[tuple[list[Outcome], bool, bool] | AgentError | None] = (
            asyncio.Queue()
        )
        running: set[asyncio.Task[None]] = set()
        slots = asyncio.Semaphore(node.config.max_concurrent_directives)
        # Whether the stream brought drops in columns: only then are applied drops answered in
        # columns (an AMM that never sends them may not read them).
        columns = False

        async def carry_out(directive: Directive) -> None:
            outcomes.put_nowait(([await node.run_directive(directive)], False, True))

        async def carry_out_batch(
            messages: Sequence[types_pb2.Directive], drops: agent_pb2.DropColumns | None = None
        ) -> None:
            directives = await _directives_from_proto(messages)
            if drops is not None:  # after the batch's directives, as if they were among them
                directives += await drops_from_columns(drops)
            await node.run_directive_batch(
                directives, lambda group: outcomes.put_nowait((group, True, False))
            )
            outcomes.put_nowait(([], True, True))

        def refuse_columns(drops: agent_pb2.DropColumns, problem: str) -> None:
            """Refuse every id of malformed columns INVALID (a column that does not line up
            with the ids could pair any id with any key: none is carried out)."""
            self.complaints.note(context.peer(), "Directives message", problem)
            version, refused = node.store.version, OutcomeStatus.REFUSED
            group = [
                Outcome(directive_id, refused, Reason.INVALID, problem, version)
                for directive_id in drops.ids
            ]
            outcomes.put_nowait((group, True, False))

        async def read() -> None:
            nonlocal columns
            ending: AgentError | None = None
            try:
                requests = aiter(request_iterator)
                while True:
                    await slots.acquire()
                    request = await anext(requests, None)
                    if request is None:
                        break
                    salvaged = ""
                    if isinstance(request, garbled.Garbled):
                        self.complaints.note(context.peer(), "Directives message", request.error)
                        if request.fatal:  # once what is in hand is answered
                            ending = InvalidRequest(request.fatal)
                            break
                        refusals = [
                            Outcome(
                                directive_id,
                                OutcomeStatus.REFUSED,
                                Reason.INVALID,
                                f"undecodable directive: {why}",
                                node.store.version,
                            )
                            for directive_id, why in request.refused
                        ]
                        if not request.batch:
                            outcomes.put_nowait((refusals, False, True))
                            continue
                        outcomes.put_nowait((refusals, True, False))
                        request, salvaged = request.request(), " (salvaged)"
                    if request.HasField("drops"):
                        columns = True  # applied drops are answered in columns from now on
                        batch, drops = request.batch, request.drops
                        problem = columns_problem(drops)
                        if problem:
                            refuse_columns(drops, problem)
                            work = carry_out_batch(batch)
                        else:
                            work = carry_out_batch(batch, drops)
                        name = f"directive batch x{len(batch)} + {len(drops.ids)} drops{salvaged}"
                    elif request.batch or salvaged:
                        batch = request.batch
                        work = carry_out_batch(batch)
                        name = f"directive batch x{len(batch)}{salvaged}"
                    else:
                        directive = directive_from_proto(request.directive)
                        work = carry_out(directive)
                        name = f"directive {directive.id!r}"
                    task = asyncio.create_task(work, name=name)
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                outcomes.put_nowait(ending)

        async def watch_shutdown() -> None:
            await node.shutdown.wait()
            outcomes.put_nowait(None)

        helpers = [
            asyncio.create_task(read(), name="directives reader"),
            asyncio.create_task(watch_shutdown(), name="directives shutdown watch"),
        ]
        try:
            async with _Edge(context, "Directives"):
                while (item := await outcomes.get()) is not None:
                    if isinstance(item, AgentError):
                        raise item
                    group, batch, frees = item
                    if batch:
                        for start in range(0, len(group), OUTCOMES_PER_MESSAGE):
                            part = group[start : start + OUTCOMES_PER_MESSAGE]
                            yield outcomes_response(part, node.incarnation, columns)
                    else:
                        yield agent_pb2.DirectivesResponse(
                            outcome=outcome_to_proto(group[0]), incarnation=node.incarnation
                        )
                    if frees:
                        slots.release()
        finally:
            await _cancel_all([*helpers, *running])

    async def Put(
        self,
        request_iterator: AsyncIterator[agent_pb2.PutRequest | memoryview],
        context: Context,
    ) -> agent_pb2.PutResponse:
        """A header, then chunks, verified before the value is stored. The declared size is
        reserved against the memory limit from the header on, until the value is stored or
        abandoned.

        Once the header is accepted, the agent sends its initial metadata with
        ``PUT_ACCEPTED_METADATA``: a client that waits for it before sending chunks (``amm``'s)
        hears a refusal with nothing in flight. Answered while a grpc.aio client is still
        writing, a refusal reached it as ``INTERNAL: Internal error from Core`` instead of the
        status sent (grpc/grpc#36066).
        """
        async with _Edge(context, "Put"):
            messages = aiter(request_iterator)
            first = await anext(messages, None)
            if (
                first is None
                or isinstance(first, memoryview)
                or first.WhichOneof("item") != "header"
            ):
                raise InvalidRequest("the first message of a Put must be its header")
            key, size = _key(first.header.key), first.header.size
            declared = _checksum(first.header.checksum)
            with self._node.reserve_put(key, size, declared) as reservation:
                if declared:  # judged before a byte of the value is received
                    await self._node.admit([(key, declared)])
                await context.send_initial_metadata((PUT_ACCEPTED_METADATA,))
                received = Assembly(size)
                try:
                    async for message in messages:
                        chunk = _put_chunk(message)
                        if chunk is None:
                            raise InvalidRequest("a Put has one header, then only chunks")
                        try:
                            await received.add(chunk)
                        except Overflow:
                            raise InvalidRequest(
                                f"more bytes than the {size} declared in the header"
                            ) from None
                    if received.received != size:
                        raise InvalidRequest(
                            f"received {received.received} bytes, the header declared {size}"
                        )
                    data, actual = await received.finish()
                finally:
                    received.abandon()
                if declared and declared != actual:
                    raise InvalidRequest("the value does not match the checksum in the header")
                if not declared:
                    await self._node.admit([(key, actual)])
                reservation.release()  # judged again without it, and stored, in one step
                info, created = self._node.put(key, data, actual)
            return agent_pb2.PutResponse(
                key=info.key, size=info.size, checksum=info.checksum, created=created
            )

    # Get and Fetch use grpc.aio's writer API (context.write) rather than yielding: a yield
    # cannot be given a deadline, and a reader that stops reading would hold the key in use for
    # as long as its connection lives. The generated base class describes generators only.
    async def Get(  # type: ignore[override]
        self, request: agent_pb2.GetRequest, context: Context
    ) -> None:
        async with _Edge(context, "Get"):
            key = _key(request.key)
            bad = bad_addresses(request.sources)
            if bad is not None:
                raise InvalidRequest(f"sources: {bad}")
            async with (
                self._node.reading(key, fetch=True, sources=request.sources) as reading,
                self._node.serving(reading.value.size),
            ):
                pins = self._pin_for(key) if request.pin else 0
                await self._stream(
                    context, "Get", reading.value, agent_pb2.GetResponse, reading.replicated, pins
                )

    def _pin_for(self, key: Key) -> int:
        """Pin ``key`` for a Get that asked to: while the read holds it, so no drop slips in."""
        if key not in self._node.store:
            raise TooLarge(
                f"no room to keep {key!r} here to pin it (memory limit); try again once memory "
                "is freed"
            )
        return self._node.pin(key)

    async def Fetch(  # type: ignore[override]
        self, request: agent_pb2.FetchRequest, context: Context
    ) -> None:
        async with _Edge(context, "Fetch"):
            key = _key(request.key)
            expected = _checksum(request.checksum)
            async with self._node.reading(key) as reading:
                if expected and expected != reading.value.checksum:
                    raise UnknownKey(f"holds other content under {key!r}")
                async with self._node.serving(reading.value.size):
                    bulk = self._node.bulk
                    if request.bulk and bulk is not None:
                        await self._offer(context, bulk, reading.value)
                    else:
                        await self._stream(context, "Fetch", reading.value, agent_pb2.FetchResponse)

    async def _offer(self, context: Context, bulk: BulkServer, value: Value) -> None:
        """Send ``value``'s header with a bulk offer, then wait while the requester takes the
        bytes over the bulk port (``worker_agent.bulk``); the key stays in use until then."""
        header = types_pb2.ValueHeader(key=value.key, size=value.size, checksum=value.checksum)
        offer = bulk.offer(value.data)
        idle = self._node.config.stream_idle_timeout
        started = time.perf_counter()
        try:
            message = agent_pb2.FetchResponse(
                header=header, bulk=agent_pb2.BulkOffer(port=offer.port, ticket=offer.ticket)
            )
            if not await self._send(context, [message]):
                self._stalled(context, "Fetch", value.key)
                return
            if context.cancelled():  # the reader went away
                return
            await offer.sent(claim_timeout=idle)
        except BulkError as err:
            log.info("Fetch of %r over the bulk port failed: %s", value.key, err)
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"bulk transfer of {value.key!r} failed: {err}")
            return
        finally:
            offer.revoke()
        traffic = self._node.traffic
        traffic.sent["fetch"] += value.size
        traffic.transfers["out"].observe(time.perf_counter() - started)

    async def _stream(
        self,
        context: Context,
        method: str,
        value: Value,
        response: type[agent_pb2.GetResponse] | type[agent_pb2.FetchResponse],
        replicated: bool = False,
        pins: int = 0,
    ) -> None:
        """Send ``value`` as a header and chunks; a reader that stops reading is cut off."""
        header = types_pb2.ValueHeader(
            key=value.key,
            size=value.size,
            checksum=value.checksum,
            replicated=replicated,
            pins=pins,
        )
        size = self._node.config.chunk_size
        chunks: Iterable[Outgoing]
        if self.framed:
            chunks = framed_chunks(value.data, size)
        else:
            view = memoryview(value.data)
            chunks = (
                response(chunk=bytes(view[start : start + size]))
                for start in range(0, len(view), size)
            )
        messages = itertools.chain([response(header=header)], chunks)
        started = time.perf_counter()
        if not await self._send(context, messages):
            self._stalled(context, method, value.key)
            return
        if not context.cancelled():  # the reader hung up before the end
            traffic = self._node.traffic
            traffic.sent[method.lower()] += value.size
            traffic.transfers["out"].observe(time.perf_counter() - started)

    async def _send(
        self,
        context: Context,
        messages: Iterable[Outgoing],
    ) -> bool:
        """Write the messages, each within ``stream_idle_timeout``; False when the reader
        stopped reading (the caller then ends the call, once it released the key).

        A write that fails means the call is over (the reader cancelled or its connection
        dropped): nothing is left to send to anyone, so the stream ends there, logged at DEBUG
        (left to gRPC, the failure would be logged as an error with a traceback).
        """
        idle = self._node.config.stream_idle_timeout
        for message in messages:
            try:
                async with asyncio.timeout(idle):
                    await context.write(message)
            except TimeoutError:
                return False
            except Exception as err:  # grpc raises a private ExecuteBatchError
                log.debug("%s: the reader went away (%s)", context.peer(), type(err).__name__)
                return True
        return True

    def _stalled(self, context: Context, method: str, key: Key) -> None:
        """End a call whose reader stopped reading. Not with ``abort``: it would wait behind the
        unread messages for the reader; the status set here follows them without a wait."""
        idle = self._node.config.stream_idle_timeout
        log.info(
            "%s of %r: the reader accepted nothing for %g s; ending the call", method, key, idle
        )
        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
        context.set_details(f"the reader accepted no data for {idle:g} s")

    async def Pin(self, request: agent_pb2.PinRequest, context: Context) -> agent_pb2.PinResponse:
        async with _Edge(context, "Pin"):
            return agent_pb2.PinResponse(pins=self._node.pin(_key(request.key)))

    async def Unpin(
        self, request: agent_pb2.UnpinRequest, context: Context
    ) -> agent_pb2.UnpinResponse:
        async with _Edge(context, "Unpin"):
            return agent_pb2.UnpinResponse(pins=self._node.unpin(_key(request.key)))

    async def Delete(
        self, request: agent_pb2.DeleteRequest, context: Context
    ) -> agent_pb2.DeleteResponse:
        async with _Edge(context, "Delete"):
            deleted = await self._node.delete(_key(request.key), forget=request.forget)
            return agent_pb2.DeleteResponse(deleted=deleted)

    async def PromiseKeep(
        self, request: agent_pb2.PromiseKeepRequest, context: Context
    ) -> agent_pb2.PromiseKeepResponse:
        async with _Edge(context, "PromiseKeep"):
            key = _key(request.key)
            lease = _requested_lease(request, self._node.config.max_lease)
            answer = self._node.promise_keep(key, _checksum(request.checksum), lease)
            if not isinstance(answer, Refuse):
                log.debug(
                    "promised %s to keep %r (directive %s)",
                    request.requester,
                    key,
                    request.directive_id,
                )
            return _keep_answer(answer, time.time_ns())

    async def PromiseKeepBatch(
        self, request: agent_pb2.PromiseKeepBatchRequest, context: Context
    ) -> agent_pb2.PromiseKeepBatchResponse:
        async with _Edge(context, "PromiseKeepBatch"):
            if len(request.items) > MAX_KEEP_BATCH:
                raise InvalidRequest(
                    f"{len(request.items)} items exceed the {MAX_KEEP_BATCH} of one request"
                )
            pace = Pace()
            items: list[tuple[Key, str]] = []
            append, held = items.append, self._node.store.held.get
            for part in parts(request.items, KEEP_READ):
                await pace.breathe()
                pairs = [(item.key, item.checksum) for item in part]
                if _usual_items(pairs):  # checked as a whole, in C
                    items += pairs  # type: ignore[arg-type]  # Keys: checked
                    continue
                for key, digest in pairs:
                    # Checked as ``_key`` and ``_checksum`` do, the usual case without a call
                    # each: a checksum equal to the one held is well formed (each was computed
                    # here).
                    if not key or len(key) * 4 > MAX_KEY_BYTES:
                        key = _key(key)
                    if digest:
                        value = held(key)  # type: ignore[call-overload]  # a Key: checked above
                        if (
                            value is None or value.checksum != digest
                        ) and not integrity.is_checksum(digest):
                            digest = _checksum(digest)
                    append((key, digest))  # type: ignore[arg-type]  # a Key: checked above
            lease = _requested_lease(request, self._node.config.max_lease)
            log.debug("%s asked to keep %d keys", request.requester, len(items))
            response = agent_pb2.PromiseKeepBatchResponse()
            # Promised a slice at a time, the loop let in between: each promise is judged and
            # recorded in one step. Expiries are told from a clock read before the first slice
            # (never later than the lease recorded), so that alike answers are alike bytes all
            # through the answer (``runs``: the asker reads them a run at a time).
            now_ns = time.time_ns()
            # Most answers are alike (the same lease granted): each kind is built and
            # serialized once, and a slice's answers are joined as bytes and parsed in one call
            # (adding a message per answer cost a microsecond and a half each).
            kinds: dict[Promise | Refuse, bytes] = {}
            for start in range(0, len(items), KEEP_SLICE):
                await pace.breathe()  # a slice is many items: the clock is read for each
                answers = self._node.promise_keep_batch(items[start : start + KEEP_SLICE], lease)
                for answer in set(answers).difference(kinds):
                    kinds[answer] = framed(
                        _ANSWERS_FIELD, _keep_answer(answer, now_ns).SerializeToString()
                    )
                response.MergeFromString(b"".join(map(kinds.__getitem__, answers)))
            return response

    async def PutMany(
        self, request_iterator: AsyncIterator[agent_pb2.PutManyRequest], context: Context
    ) -> agent_pb2.PutManyResponse:
        """Each message is verified and stored as a whole, or not at all: a failure ends the
        call, and the values of the messages before it stay stored."""
        async with _Edge(context, "PutMany"):
            created = unchanged = stored = 0
            async for message in request_iterator:
                items = _put_items(message.items)
                # Received already: counted against the memory limit while the AMM is asked.
                with self._node.store.reserve(sum(len(data) for _, data, _ in items)):
                    await self._node.admit([(key, digest) for key, _, digest in items])
                batch = self._node.put_many(items)
                created += batch.created
                unchanged += batch.unchanged
                stored += batch.nbytes
            return agent_pb2.PutManyResponse(created=created, unchanged=unchanged, bytes=stored)

    async def Close(
        self, request: agent_pb2.CloseRequest, context: Context
    ) -> agent_pb2.CloseResponse:
        async with _Edge(context, "Close"):
            lost = await self._node.request_close(request.reason, force=request.force)
            return agent_pb2.CloseResponse(closing=True, keys_lost=lost)

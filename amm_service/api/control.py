"""The ``amm.v1.ActiveMemoryManager`` servicer: thin edges over ``ActiveMemoryManager``.

Each handler validates its request, calls one manager method and converts the result. Expected
failures (``AmmServiceError``) become their gRPC status with the message; anything unexpected is
logged and answered INTERNAL with a short message, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from amm.base.security import caller, may_act_as
from amm.v1 import control_pb2, control_pb2_grpc, types_pb2
from amm_service import wire
from amm_service.decisions.core import Rejection
from amm_service.decisions.directive import Outcome, OutcomeStatus
from amm_service.decisions.view import Measure, WorkerId, WorkerView
from amm_service.errors import AmmServiceError, InvalidArgument, PermissionDenied
from amm_service.runtime.links.addresses import address_order
from amm_service.runtime.loop.pacing import arrived
from amm_service.runtime.manager import ActiveMemoryManager
from amm_service.runtime.observe.event_feed import Gap
from amm_service.runtime.records.cycle import CycleRecord, DirectiveRecord

log = logging.getLogger(__name__)

MAX_KEYS_PER_REQUEST = 100_000
MAX_EVENTS_REPORTED = 100
#: Keys listed in an UnregisterWorker or DrainWorker answer, at most (the count says the rest).
MAX_KEYS_LISTED = 1_000
#: ListLost entries when the request sets no limit.
DEFAULT_LOST_LISTED = 10_000
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]


def _edge(handler: _Handler[_Resp]) -> _Handler[_Resp]:
    """Map domain errors to statuses; keep tracebacks off the wire. The call has arrived: bulk
    work no longer hurries for it (``pacing.watch_arrivals``)."""

    @functools.wraps(handler)
    async def wrapped(
        self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Resp:
        arrived()
        try:
            return await handler(self, request, context)
        except AmmServiceError as err:
            await context.abort(err.status, str(err))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{handler.__name__} failed; see AMM log")
        raise AssertionError("unreachable")

    return wrapped


def _check_keys(keys: Any) -> list[str]:
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise InvalidArgument(f"too many keys: {len(keys)} > {MAX_KEYS_PER_REQUEST} per request")
    if any(not k for k in keys):
        raise InvalidArgument("keys must not be empty strings")
    return list(keys)


def _check_acts_as(worker_name: str, what: str) -> None:
    """Under TLS an agent (un)registers only the worker its certificate names: ``w7`` as
    ``w7``, the shared ``agent`` identity as any. Without TLS there is no caller: as before."""
    identity = caller()
    if identity is None or may_act_as(identity, worker_name):
        return
    raise PermissionDenied(
        f"{identity} may not {what} worker {worker_name or '(unnamed)'!r}: an agent with its own "
        "certificate acts only under that certificate's name"
    )


class ControlServicer(control_pb2_grpc.ActiveMemoryManagerServicer):
    """Serves the AMM's control API."""

    def __init__(self, manager: ActiveMemoryManager) -> None:
        self._amm = manager
        self._reported: tuple[tuple[int, int, int, int, int], types_pb2.CycleReport] | None = None
        self._parts = ReportParts()

    def _last_cycle_pb(self, record: CycleRecord) -> types_pb2.CycleReport:
        """The last cycle's report, built again only when it changed: monitors call GetStatus
        often, and a report lists up to 1,000 directives. While a big cycle's outcomes come in
        it changes at every call: only the records of directives answered since are built
        again (``ReportParts``)."""
        progress = _progress(record)
        if self._reported is None or self._reported[0] != progress:
            previous = None if self._reported is None else self._reported[1]
            self._reported = (progress, cycle_to_pb(record, self._parts, previous))
        return self._reported[1]

    @_edge
    async def Start(
        self, request: control_pb2.StartRequest, context: Any
    ) -> control_pb2.StartResponse:
        await self._amm.start()
        return control_pb2.StartResponse(running=self._amm.running)

    @_edge
    async def Stop(
        self, request: control_pb2.StopRequest, context: Any
    ) -> control_pb2.StopResponse:
        await self._amm.stop()
        return control_pb2.StopResponse(running=self._amm.running)

    @_edge
    async def Running(
        self, request: control_pb2.RunningRequest, context: Any
    ) -> control_pb2.RunningResponse:
        return control_pb2.RunningResponse(running=self._amm.running, fenced=self._amm.fenced)

    @_edge
    async def RunOnce(
        self, request: control_pb2.RunOnceRequest, context: Any
    ) -> control_pb2.RunOnceResponse:
        remaining = context.time_remaining()
        # Answer before the caller's deadline, with whatever outcomes are in by then.
        limit = None if remaining is None else max(0.0, remaining * 0.9 - 0.1)
        record = await self._amm.run_cycle(
            wait=request.wait, wait_limit=limit, dry_run=request.dry_run
        )
        return control_pb2.RunOnceResponse(cycle=cycle_to_pb(record))

    @_edge
    async def GetStatus(
        self, request: control_pb2.GetStatusRequest, context: Any
    ) -> control_pb2.GetStatusResponse:
        amm = self._amm
        cfg = amm.config
        state = amm.state
        workers = state.workers  # counted in place: no snapshot of every key for a status
        with_goal, below_goal = amm.goals.totals(state)
        response = control_pb2.GetStatusResponse(
            running=amm.running,
            fenced=amm.fenced,
            fenced_by_epoch=amm.fenced_by_epoch,
            interval=wire.duration(cfg.interval),
            measure=wire.MEASURES_OUT[cfg.measure],
            epoch=amm.epoch,
            cycles=amm.cycles,
            policies=[
                control_pb2.PolicyInfo(
                    name=policy.name,
                    class_path=spec.class_path,
                    kwargs_json=json.dumps(dict(spec.kwargs), default=str, sort_keys=True),
                )
                for policy, spec in zip(amm.policies, cfg.policies, strict=False)
            ],
            totals=control_pb2.ClusterTotals(
                workers=len(workers),
                keys=state.nkeys,
                replicas=state.nreplicas,
                memory_bytes=sum(w.memory.by(cfg.measure) for w in workers),
                managed_bytes=sum(w.memory.managed for w in workers),
                process_bytes=sum(w.memory.process for w in workers),
                directives_in_flight=len(amm.ledger),
                conflicting_keys=len(state.conflicts),
                unreachable_workers=sum(1 for w in workers if not w.reachable),
                keys_with_goal=with_goal,
                keys_below_goal=below_goal,
                stale_workers=sum(1 for w in workers if w.stale),
                lost_keys=amm.lost_keys,
                retiring_workers=sum(1 for w in workers if w.retiring),
                directives_sent=amm.outcomes.totals.sent,
                directives_applied=amm.outcomes.totals.applied,
                directives_refused=amm.outcomes.totals.refused,
                directives_failed=amm.outcomes.totals.failed,
            ),
            recent_refusals=[
                control_pb2.RefusalRecord(
                    directive=wire.directive_to_pb(r.directive),
                    worker=r.directive.worker,
                    reason=wire.reason_to_pb(r.outcome.reason),
                    message=r.outcome.message,
                    at=wire.timestamp(r.at),
                )
                for r in amm.outcomes.refusals
            ],
            recent_events=[wire.event_to_pb(e) for e in amm.events.recent(MAX_EVENTS_REPORTED)],
            startup_grace=amm.in_startup_grace(),
        )
        if amm.last_cycle is not None:
            response.last_cycle.CopyFrom(self._last_cycle_pb(amm.last_cycle))
        return response

    @_edge
    async def RegisterWorker(
        self, request: control_pb2.RegisterWorkerRequest, context: Any
    ) -> control_pb2.RegisterWorkerResponse:
        _check_acts_as(request.name, "register as")
        # Nor may it take over an address another worker holds (the same name may: a restart).
        held = self._amm.state.worker(WorkerId(request.address))
        if held is not None:
            _check_acts_as(held.name, "replace")
        await self._amm.register(
            request.address, request.name, request.incarnation, request.epoch, request.zone
        )
        return control_pb2.RegisterWorkerResponse(
            epoch=self._amm.epoch, interval=wire.duration(self._amm.config.interval)
        )

    @_edge
    async def UnregisterWorker(
        self, request: control_pb2.UnregisterWorkerRequest, context: Any
    ) -> control_pb2.UnregisterWorkerResponse:
        if not request.address:
            raise InvalidArgument("address is required")
        held = self._amm.state.worker(WorkerId(request.address))
        if held is not None:
            _check_acts_as(held.name, "unregister")
        removed, lost = await self._amm.unregister(request.address)
        return control_pb2.UnregisterWorkerResponse(
            removed=removed, lost_keys=lost[:MAX_KEYS_LISTED], lost_key_count=len(lost)
        )

    @_edge
    async def GetMembership(
        self, request: control_pb2.GetMembershipRequest, context: Any
    ) -> control_pb2.GetMembershipResponse:
        epoch, version, workers = self._amm.membership(request.epoch, request.version)
        if workers is None:
            return control_pb2.GetMembershipResponse(epoch=epoch, version=version, unchanged=True)
        return control_pb2.GetMembershipResponse(epoch=epoch, version=version, workers=workers)

    @_edge
    async def ListWorkers(
        self, request: control_pb2.ListWorkersRequest, context: Any
    ) -> control_pb2.ListWorkersResponse:
        workers = await self._amm.queries.workers(fresh=request.fresh)
        measure = self._amm.config.measure
        return control_pb2.ListWorkersResponse(workers=[worker_to_pb(w, measure) for w in workers])

    @_edge
    async def WhoHas(
        self, request: control_pb2.WhoHasRequest, context: Any
    ) -> control_pb2.WhoHasResponse:
        entries = await self._amm.queries.who_has(_check_keys(request.keys), fresh=request.fresh)
        return control_pb2.WhoHasResponse(
            entries=[control_pb2.KeyHolders(key=k, workers=list(ws)) for k, ws in entries]
        )

    @_edge
    async def LookupKeys(
        self, request: control_pb2.LookupKeysRequest, context: Any
    ) -> control_pb2.LookupKeysResponse:
        keys = _check_keys(request.keys)
        if request.HasField("storing"):
            intent = request.storing
            held = self._amm.state.worker(WorkerId(intent.worker))
            if held is not None:
                _check_acts_as(held.name, "note a Put on")
                self._amm.storing.note(self._amm.state, intent.worker, intent.incarnation, keys)
        known = await self._amm.queries.lookup(keys, fresh=request.fresh)
        response = control_pb2.LookupKeysResponse()
        add = response.keys.add
        for kv in known:
            add(
                key=kv.key,
                size=kv.size,
                checksum=kv.checksum,
                holders=sorted(kv.holders - kv.conflicting, key=address_order),
                conflicting=sorted(kv.conflicting, key=address_order),
            )
        return response

    @_edge
    async def HasWhat(
        self, request: control_pb2.HasWhatRequest, context: Any
    ) -> control_pb2.HasWhatResponse:
        entries = await self._amm.queries.has_what(list(request.workers), fresh=request.fresh)
        return control_pb2.HasWhatResponse(
            entries=[control_pb2.WorkerKeys(worker=w, keys=list(ks)) for w, ks in entries]
        )

    @_edge
    async def Forget(
        self, request: control_pb2.ForgetRequest, context: Any
    ) -> control_pb2.ForgetResponse:
        deleted = await self._amm.queries.forget(_check_keys(request.keys))
        return control_pb2.ForgetResponse(replicas_deleted=deleted)

    @_edge
    async def RetireWorkers(
        self, request: control_pb2.RetireWorkersRequest, context: Any
    ) -> control_pb2.RetireWorkersResponse:
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout <= 0:
                raise InvalidArgument("timeout must be positive; leave it unset for no limit")
        results = await self._amm.retirement_driver.retire_workers(
            list(request.workers),
            n=request.n if request.HasField("n") else None,
            close=request.close,
            timeout=timeout,
        )
        return control_pb2.RetireWorkersResponse(
            results=[
                control_pb2.RetirementResult(
                    worker=r.worker, retired=r.retired, reason=r.reason, closed=r.closed
                )
                for r in results
            ]
        )

    @_edge
    async def Replicate(
        self, request: control_pb2.ReplicateRequest, context: Any
    ) -> control_pb2.ReplicateResponse:
        n = request.n if request.HasField("n") else None
        changed, removed = await self._amm.queries.replicate(_check_keys(request.keys), n)
        return control_pb2.ReplicateResponse(goals_set=changed, goals_removed=removed)

    @_edge
    async def ListGoals(
        self, request: control_pb2.ListGoalsRequest, context: Any
    ) -> control_pb2.ListGoalsResponse:
        statuses = await self._amm.queries.goal_statuses(
            _check_keys(request.keys), fresh=request.fresh
        )
        return control_pb2.ListGoalsResponse(
            goals=[
                control_pb2.ReplicationGoal(
                    key=s.key, n=s.n, target=s.target, live_copies=s.live, lost=s.lost
                )
                for s in statuses
            ]
        )

    @_edge
    async def ListLost(
        self, request: control_pb2.ListLostRequest, context: Any
    ) -> control_pb2.ListLostResponse:
        limit = request.limit or DEFAULT_LOST_LISTED
        if limit > MAX_KEYS_PER_REQUEST:
            raise InvalidArgument(f"limit {limit} is above {MAX_KEYS_PER_REQUEST} per request")
        found, total = await self._amm.queries.lost(
            _check_keys(request.keys), after=request.after, limit=limit
        )
        return control_pb2.ListLostResponse(
            lost=[
                control_pb2.LostKey(
                    key=r.key,
                    worker=r.worker,
                    lost_at=wire.timestamp(r.at),
                    reason=r.reason,
                    has_goal=has_goal,
                )
                for r, has_goal in found
            ],
            total=total,
        )

    @_edge
    async def DrainWorker(
        self, request: control_pb2.DrainWorkerRequest, context: Any
    ) -> control_pb2.DrainWorkerResponse:
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout <= 0:
                raise InvalidArgument("timeout must be positive; leave it unset for no limit")
        held = self._amm.state.worker(WorkerId(request.address))
        if held is not None:
            _check_acts_as(held.name, "drain")
        result = await self._amm.retirement_driver.drain(request.address, timeout=timeout)
        return control_pb2.DrainWorkerResponse(
            drained=result.drained,
            reason=result.reason,
            unique_keys=result.unique[:MAX_KEYS_LISTED],
            unique_key_count=len(result.unique),
        )

    async def WatchEvents(
        self, request: control_pb2.WatchEventsRequest, context: Any
    ) -> AsyncIterator[control_pb2.WatchEventsResponse]:
        """Not under ``_edge``, which wraps coroutines: the same mapping, for a stream."""
        try:
            subscription = self._amm.event_feed.subscribe(
                request.after if request.HasField("after") else None,
                incarnation=request.incarnation,
                kinds=list(request.kinds),
                follow=request.follow,
            )
        except AmmServiceError as err:
            await context.abort(err.status, str(err))
        if request.follow and not subscription.following:
            subscription.close()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the AMM is shutting down")
        try:
            async for item in subscription:
                if isinstance(item, Gap):
                    yield control_pb2.WatchEventsResponse(
                        missed=item.missed, restarted=item.restarted
                    )
                else:
                    yield control_pb2.WatchEventsResponse(event=wire.event_to_pb(item))
        finally:
            subscription.close()
        if request.follow:  # the feed closed under a follower: the AMM is going away
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the AMM is shutting down")


def worker_to_pb(w: WorkerView, measure: Measure) -> control_pb2.WorkerInfo:
    info = control_pb2.WorkerInfo(
        address=w.address,
        name=w.name,
        status=wire.status_to_pb(w.effective_status),
        reported_status=wire.status_to_pb(w.status),
        status_since=wire.timestamp(w.status_since),
        zone=w.zone,
        memory=wire.memory_to_pb(w.memory),
        memory_bytes=w.memory.by(measure),
        key_count=w.nkeys,
        registered_at=wire.timestamp(w.registered_at),
        missed_polls=w.missed_polls,
        unconfirmed=not w.confirmed,
    )
    if w.last_poll is not None:
        info.last_poll.CopyFrom(wire.timestamp(w.last_poll))
    return info


def _progress(record: CycleRecord) -> tuple[int, int, int, int, int]:
    """What changes in a cycle's report once the cycle is over."""
    return (record.number, record.applied, record.refused, record.failed, record.timed_out)


class ReportParts:
    """What the report of one cycle reuses from its last build: the record of each directive
    whose outcome did not change since, and the rejections (fixed once planned). Building all
    1,000 records again at each GetStatus while a 100k-key cycle's outcomes came in held the
    AMM's loop for 27 ms (loop_probe), in the call itself."""

    def __init__(self) -> None:
        self.number = -1
        #: Records built so far (none were when it did not move over a report).
        self.built = 0
        self.records: dict[str, tuple[Outcome | None, bool, float, types_pb2.DirectiveRecord]] = {}
        self.rejections: tuple[tuple[Rejection, ...], list[types_pb2.Rejection]] | None = None

    def of(self, record: CycleRecord) -> ReportParts:
        """These parts, for ``record`` (emptied when it is another cycle's)."""
        if record.number != self.number:
            self.number, self.rejections = record.number, None
            self.records.clear()
        return self

    def directive(self, record: DirectiveRecord, dry_run: bool) -> types_pb2.DirectiveRecord:
        key = record.directive.id
        known = self.records.get(key)
        if (
            known is not None
            and known[0] is record.outcome
            and known[1] == record.timed_out
            and known[2] == record.sent_at
        ):
            return known[3]
        built = _directive_record_pb(record, dry_run)
        self.records[key] = (record.outcome, record.timed_out, record.sent_at, built)
        self.built += 1
        return built

    def rejected(self, rejections: tuple[Rejection, ...]) -> list[types_pb2.Rejection]:
        if self.rejections is None or self.rejections[0] is not rejections:
            self.built += 1
            self.rejections = (rejections, [wire.rejection_to_pb(r) for r in rejections])
        return self.rejections[1]


def _directive_record_pb(r: DirectiveRecord, dry_run: bool) -> types_pb2.DirectiveRecord:
    """Built in place (nested messages built apart are copied in, a third of the cost of a
    report of 1,000 records)."""
    d, outcome = r.directive, r.outcome
    pb = types_pb2.DirectiveRecord(worker=d.worker, policy=d.policy, timed_out=r.timed_out)
    wire.directive_into(d, pb.directive)
    if outcome is not None:
        wire.outcome_into(outcome, pb.outcome)
    if not dry_run:
        wire.timestamp_into(r.sent_at, pb.sent_at)
    return pb


def cycle_to_pb(
    record: CycleRecord,
    parts: ReportParts | None = None,
    previous: types_pb2.CycleReport | None = None,
) -> types_pb2.CycleReport:
    """``record`` as reported; with ``parts``, what did not change since the last report of the
    same cycle is reused, and ``previous`` (that report) itself, its figures updated, when none
    of the directives it lists changed (a big cycle's outcomes change its counts at every call,
    rarely the first 1,000 directives it lists)."""
    directives = list(record.directives.values())
    if parts is None:
        rejections = [wire.rejection_to_pb(r) for r in record.rejections]
        records = [_directive_record_pb(r, record.dry_run) for r in directives]
    else:
        parts = parts.of(record)
        built = parts.built
        rejections = parts.rejected(record.rejections)
        records = [parts.directive(r, record.dry_run) for r in directives]
        if (
            previous is not None
            and parts.built == built
            and previous.number == record.number
            and len(previous.directives) == len(records)
            and len(previous.rejections) == len(rejections)
        ):
            _figures_into(record, previous)
            return previous
    report = types_pb2.CycleReport(rejections=rejections, directives=records)
    _figures_into(record, report)
    return report


def _figures_into(record: CycleRecord, report: types_pb2.CycleReport) -> None:
    """Every field of ``record``'s report but its directives and rejections, set in place."""
    report.number = record.number
    wire.timestamp_into(record.started_at, report.started_at)
    report.duration.CopyFrom(wire.duration(record.duration))
    report.plan_duration.CopyFrom(wire.duration(record.plan_duration))
    report.suggestions = record.suggestions
    report.directives_sent = 0 if record.dry_run else record.planned_count
    report.applied = record.count(OutcomeStatus.APPLIED)
    report.refused = record.count(OutcomeStatus.REFUSED)
    report.failed = record.count(OutcomeStatus.FAILED)
    report.rejected = record.rejected
    if list(report.unreachable_workers) != list(record.unreachable):
        del report.unreachable_workers[:]
        report.unreachable_workers.extend(record.unreachable)
    report.dry_run = record.dry_run
    report.startup_grace = record.startup_grace

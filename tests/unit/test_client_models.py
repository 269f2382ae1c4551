"""Conversion of wire messages into the client's dataclasses, and address ordering."""

from __future__ import annotations

from datetime import UTC, datetime

from amm.models import (
    ReplicationGoal,
    RetirementResult,
    address_key,
    cycle_from_proto,
    enum_name,
    goal_from_proto,
    retirement_from_proto,
    sort_addresses,
    status_from_proto,
    worker_from_proto,
)
from amm.v1 import control_pb2, types_pb2


def test_addresses_sort_by_host_then_port_numerically() -> None:
    addresses = ["127.0.0.1:10000", "127.0.0.1:9000", "10.0.0.2:1", "[::1]:80", "127.0.0.1:900"]
    assert sort_addresses(addresses) == [
        "10.0.0.2:1",
        "127.0.0.1:900",
        "127.0.0.1:9000",
        "127.0.0.1:10000",
        "[::1]:80",
    ]
    assert address_key("no-port") < address_key("no-port-either")


def test_enum_names_are_short_lowercase_and_tolerate_unknown_values() -> None:
    descriptor = types_pb2.WorkerStatus.DESCRIPTOR
    assert enum_name(descriptor, types_pb2.WORKER_STATUS_PAUSED, "WORKER_STATUS_") == "paused"
    assert enum_name(descriptor, 99, "WORKER_STATUS_") == "unspecified"


def test_worker_info() -> None:
    msg = control_pb2.WorkerInfo(address="h:1", status=types_pb2.WORKER_STATUS_RUNNING)
    msg.memory.managed_bytes = 10
    msg.memory.limit_bytes = 100
    msg.memory_bytes = 12
    msg.last_poll.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    info = worker_from_proto(msg)
    assert info.name == "h:1"
    assert info.status == "running"
    assert (info.managed_bytes, info.limit_bytes, info.memory_bytes) == (10, 100, 12)
    assert info.last_poll == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert info.registered_at is None
    assert (info.zone, info.reported_status, info.status_since) == ("", "unspecified", None)


def test_worker_info_with_a_zone_and_the_amms_verdict() -> None:
    msg = control_pb2.WorkerInfo(
        address="h:1",
        zone="rack-b",
        status=types_pb2.WORKER_STATUS_STALE,
        reported_status=types_pb2.WORKER_STATUS_RUNNING,
    )
    msg.status_since.FromDatetime(datetime(2026, 1, 2, tzinfo=UTC))
    info = worker_from_proto(msg)
    assert (info.zone, info.status, info.reported_status) == ("rack-b", "stale", "running")
    assert info.status_since == datetime(2026, 1, 2, tzinfo=UTC)


def test_cycle_report_with_directives_and_rejections() -> None:
    msg = types_pb2.CycleReport(number=4, suggestions=3, directives_sent=2, applied=1, rejected=1)
    msg.duration.FromMilliseconds(1500)
    pending = msg.directives.add(worker="h:1", policy="ReduceReplicas")
    pending.directive.CopyFrom(
        types_pb2.Directive(id="d1", op=types_pb2.DIRECTIVE_OP_DROP, key="x")
    )
    done = msg.directives.add(worker="h:2", policy="ReduceReplicas")
    done.directive.CopyFrom(types_pb2.Directive(id="d2", op=types_pb2.DIRECTIVE_OP_REPLICATE))
    done.outcome.status = types_pb2.OUTCOME_STATUS_REFUSED
    done.outcome.reason = types_pb2.REFUSAL_REASON_PINNED
    msg.rejections.add(policy="p", op=types_pb2.DIRECTIVE_OP_DROP, key="y", reason="last replica")
    msg.unreachable_workers.append("h:3")

    report = cycle_from_proto(msg)
    assert report.number == 4
    assert report.duration == 1.5
    assert report.started_at is None
    first, second = report.directives
    assert (first.op, first.key, first.outcome, first.reason) == ("drop", "x", None, None)
    assert (second.op, second.outcome, second.reason) == ("replicate", "refused", "pinned")
    assert report.rejections[0].op == "drop"
    assert report.unreachable_workers == ("h:3",)
    assert (report.dry_run, report.startup_grace) == (False, False)


def test_a_dry_run_report_carries_each_directives_policy_and_reason() -> None:
    msg = types_pb2.CycleReport(number=2, dry_run=True, startup_grace=True)
    planned = msg.directives.add(worker="h:1", policy="TopUp")
    planned.directive.CopyFrom(
        types_pb2.Directive(
            id="d1",
            op=types_pb2.DIRECTIVE_OP_REPLICATE,
            key="x",
            policy="TopUp",
            reason="below 2 copies",
        )
    )
    report = cycle_from_proto(msg)
    assert (report.dry_run, report.startup_grace) == (True, True)
    (directive,) = report.directives
    assert (directive.policy, directive.policy_reason) == ("TopUp", "below 2 copies")
    assert directive.outcome is None
    assert directive.sent_at is None


def test_status() -> None:
    msg = control_pb2.GetStatusResponse(
        running=True, epoch=2, cycles=7, measure=types_pb2.MEMORY_MEASURE_MANAGED
    )
    msg.interval.FromMilliseconds(250)
    msg.policies.add(name="ReduceReplicas", class_path="a.B", kwargs_json='{"n": 1}')
    msg.totals.replicas = 5
    msg.totals.keys_with_goal = 4
    msg.totals.keys_below_goal = 1
    refusal = msg.recent_refusals.add(worker="h:1", reason=types_pb2.REFUSAL_REASON_IN_USE)
    refusal.directive.key = "x"
    status = status_from_proto(msg)
    assert (status.running, status.interval, status.measure) == (True, 0.25, "managed")
    assert status.last_cycle is None
    assert status.policies[0].kwargs == {"n": 1}
    assert status.totals.replicas == 5
    assert (status.totals.keys_with_goal, status.totals.keys_below_goal) == (4, 1)
    assert status.recent_refusals[0].reason == "in_use"
    assert status.recent_refusals[0].op == "unspecified"
    assert (status.recent_events, status.startup_grace) == ((), False)
    assert (status.totals.lost_keys, status.totals.stale_workers) == (0, 0)

    msg.startup_grace = True
    msg.totals.lost_keys = 4
    msg.totals.stale_workers = 1
    event = msg.recent_events.add(kind="key-lost", worker="h:2", keys=["a"], message="lost")
    event.at.FromDatetime(datetime(2026, 1, 3, tzinfo=UTC))
    again = status_from_proto(msg)
    assert again.startup_grace
    assert (again.totals.lost_keys, again.totals.stale_workers) == (4, 1)
    (got,) = again.recent_events
    assert (got.kind, got.worker, got.keys, got.message) == ("key-lost", "h:2", ("a",), "lost")
    assert got.at == datetime(2026, 1, 3, tzinfo=UTC)

    msg.last_cycle.number = 7
    last_cycle = status_from_proto(msg).last_cycle
    assert last_cycle is not None
    assert last_cycle.number == 7


def test_replication_goal() -> None:
    every = goal_from_proto(control_pb2.ReplicationGoal(key="x", target=3, live_copies=2))
    assert every == ReplicationGoal("x", n=None, target=3, live_copies=2)
    assert every.below
    met = goal_from_proto(control_pb2.ReplicationGoal(key="y", n=2, target=2, live_copies=2))
    assert (met.n, met.below) == (2, False)
    assert ReplicationGoal("lost", n=2, target=0, live_copies=0).below


def test_retirement_results_and_retiring_totals() -> None:
    result = control_pb2.RetirementResult(worker="h:1", retired=True, reason="r", closed=True)
    assert retirement_from_proto(result) == RetirementResult("h:1", True, "r", True)
    msg = control_pb2.GetStatusResponse()
    msg.totals.retiring_workers = 2
    assert status_from_proto(msg).totals.retiring_workers == 2

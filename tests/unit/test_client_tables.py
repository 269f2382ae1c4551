"""Plain-text rendering of results for the CLI and the demo."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from amm.models import (
    ClusterTotals,
    CycleReport,
    DirectiveRecord,
    Rejection,
    RetirementResult,
    Status,
    WorkerInfo,
)
from amm.tables import (
    render_cycle,
    render_mapping,
    render_retirements,
    render_status,
    render_table,
    render_workers,
    summarize_cycle,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _worker(address: str, **changes: Any) -> WorkerInfo:
    worker = WorkerInfo(
        address=address,
        name="w",
        status="running",
        process_bytes=50 * 1024**2,
        managed_bytes=1536,
        unmanaged_old_bytes=0,
        optimistic_bytes=1536,
        limit_bytes=0,
        memory_bytes=1536,
        key_count=3,
        last_poll=NOW - timedelta(seconds=2),
        registered_at=None,
    )
    return dataclasses.replace(worker, **changes)


def _cycle(**changes: Any) -> CycleReport:
    report = CycleReport(
        number=3,
        started_at=None,
        duration=0.0123,
        plan_duration=0.0001,
        suggestions=1,
        directives_sent=1,
        applied=1,
        refused=0,
        failed=0,
        rejected=0,
        directives=(),
        rejections=(),
        unreachable_workers=(),
    )
    return dataclasses.replace(report, **changes)


def test_table_pads_columns_and_right_aligns_numbers() -> None:
    text = render_table(("NAME", "N"), [("a", 1), ("long name", 100)], right=[1])
    assert text.splitlines() == ["NAME         N", "a            1", "long name  100"]


def test_workers_table() -> None:
    text = render_workers(
        [_worker("h:1"), _worker("h:2", limit_bytes=2 * 1024**3, last_poll=None)], now=NOW
    )
    header, first, second = text.splitlines()
    assert header.split() == [
        "ADDRESS", "NAME", "STATUS", "KEYS", "MEMORY", "MANAGED", "PROCESS", "LIMIT", "LAST", "POLL"
    ]  # fmt: skip
    assert "1.50 KiB" in first
    assert "50.00 MiB" in first
    assert first.endswith("2.00 s ago")
    assert "2.00 GiB" in second
    assert second.endswith("never")
    assert render_workers([]) == "no workers"
    (_, gone) = render_workers([_worker("h:3", missed_polls=4)], now=NOW).splitlines()
    assert "unreachable (4)" in gone


def test_mapping_shows_empty_entries_as_dash() -> None:
    text = render_mapping(("WORKER", "KEYS"), {"h:1": ("x", "y"), "h:22": ()})
    assert text.splitlines() == ["WORKER  KEYS", "h:1     x, y", "h:22    -"]


def test_cycle_summary_and_tables() -> None:
    record = DirectiveRecord(
        id="d1",
        op="drop",
        key="x",
        worker="h:1",
        policy="ReduceReplicas",
        outcome=None,
        reason=None,
        message="",
        sent_at=None,
        timed_out=True,
    )
    report = _cycle(
        directives=(record,),
        rejections=(Rejection(policy="ReduceReplicas", op="drop", key="y", reason="last replica"),),
        rejected=3,
        unreachable_workers=("h:9",),
    )
    assert summarize_cycle(report) == (
        "cycle 3: 1 suggestion, 1 directive sent (1 applied, 0 refused, 0 failed), "
        "3 rejected, in 12.3 ms (planning 100 µs)"
    )
    text = render_cycle(report)
    assert "unreachable: h:9" in text
    assert "timed out" in text
    assert "last replica" in text
    assert text.endswith("... and 2 more")


def test_status_block() -> None:
    status = Status(
        running=False,
        interval=2.0,
        measure="optimistic",
        policies=(),
        epoch=1,
        cycles=0,
        last_cycle=None,
        totals=ClusterTotals(
            workers=2,
            keys=1,
            replicas=2,
            memory_bytes=0,
            managed_bytes=0,
            process_bytes=0,
            directives_in_flight=0,
        ),
        recent_refusals=(),
    )
    lines = render_status("h:50051", status, now=NOW).splitlines()
    assert lines[0] == "AMM        h:50051"
    assert "running    no" in lines
    assert "keys       1 (2 replicas)" in lines
    assert lines[-1] == "no cycle yet"
    assert not any(line.startswith(("unreachable", "conflicts")) for line in lines)
    troubled = dataclasses.replace(
        status, totals=dataclasses.replace(status.totals, conflicting_keys=2, unreachable_workers=1)
    )
    lines = render_status("h:50051", troubled, now=NOW).splitlines()
    assert "unreachable  1 worker" in lines
    assert "conflicts    2 keys left alone" in lines


def test_retirements_table() -> None:
    results = [
        RetirementResult("h:1", True, "retired after 0.2 s", True),
        RetirementResult("h:22", False, "timeout: still holds 1 key(s)", False),
    ]
    assert render_retirements(results) == "\n".join(
        [
            "WORKER  RETIRED  CLOSED  REASON",
            "h:1     yes      yes     retired after 0.2 s",
            "h:22    no       no      timeout: still holds 1 key(s)",
        ]
    )
    assert render_retirements([]) == "no worker to retire"

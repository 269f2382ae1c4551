"""Plain-text rendering of results for the CLI and the demo."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from amm.models import (
    ClusterTotals,
    CycleReport,
    DirectiveRecord,
    Event,
    GoalChange,
    LostKey,
    Rejection,
    ReplicationGoal,
    RetirementResult,
    Status,
    WorkerInfo,
)
from amm.tables import (
    render_cycle,
    render_goal_change,
    render_goals,
    render_lost,
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
        "ADDRESS", "NAME", "ZONE", "STATUS", "KEYS", "MEMORY", "MANAGED", "PROCESS", "LIMIT",
        "LAST", "POLL",
    ]  # fmt: skip
    assert "1.50 KiB" in first
    assert "50.00 MiB" in first
    assert first.endswith("2.00 s ago")
    assert "2.00 GiB" in second
    assert second.endswith("never")
    assert render_workers([]) == "no workers"
    (_, gone) = render_workers([_worker("h:3", missed_polls=4)], now=NOW).splitlines()
    assert "unreachable (4)" in gone


def test_workers_table_shows_zones_and_the_amms_verdict() -> None:
    text = render_workers(
        [
            _worker("h:1", zone="rack-a"),
            _worker("h:2", status="stale", reported_status="running", missed_polls=7),
            _worker("h:3", status="retiring", reported_status="running"),
        ],
        now=NOW,
    )
    _, first, second, third = text.splitlines()
    assert first.split()[:4] == ["h:1", "w", "rack-a", "running"]
    assert second.split()[:5] == ["h:2", "w", "-", "stale", "(7"]
    assert "stale (7 missed)" in second
    assert third.split()[3] == "retiring"


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


def _planned(op: str, key: str, worker: str, why: str) -> DirectiveRecord:
    return DirectiveRecord(
        id=f"d-{key}",
        op=op,
        key=key,
        worker=worker,
        policy="TopUp",
        outcome=None,
        reason=None,
        message="",
        sent_at=None,
        timed_out=False,
        policy_reason=why,
    )


def test_a_dry_run_lists_what_would_be_sent_with_policy_and_reason() -> None:
    report = _cycle(
        dry_run=True,
        startup_grace=True,
        directives_sent=0,
        applied=0,
        directives=(_planned("replicate", "x", "h:2", "below 2 copies"),),
    )
    assert summarize_cycle(report) == (
        "dry run 3: 1 suggestion, 1 directive would be sent (nothing was), 0 rejected, "
        "in 12.3 ms (planning 100 µs); drops held back (start-up grace)"
    )
    _, _, header, row = render_cycle(report).splitlines()
    assert header.split() == ["OP", "KEY", "WORKER", "POLICY", "REASON"]
    assert row.split(maxsplit=4) == ["replicate", "x", "h:2", "TopUp", "below 2 copies"]


def test_a_cycle_shows_the_policies_reasons_when_they_gave_any() -> None:
    report = _cycle(directives=(_planned("drop", "x", "h:1", "excess copy"),))
    _, _, header, row = render_cycle(report).splitlines()
    assert header.split()[-2:] == ["REASON", "WHY"]
    assert row.endswith("excess copy")
    assert "WHY" not in render_cycle(_cycle(directives=(_planned("drop", "x", "h:1", ""),)))


def _status(running: bool = False, cycles: int = 0, **totals: int) -> Status:
    """A status of two workers holding one key, with ``totals`` overriding the cluster totals."""
    base = ClusterTotals(
        workers=2,
        keys=1,
        replicas=2,
        memory_bytes=0,
        managed_bytes=0,
        process_bytes=0,
        directives_in_flight=0,
    )
    return Status(
        running=running,
        interval=2.0,
        measure="optimistic",
        policies=(),
        epoch=1,
        cycles=cycles,
        last_cycle=None,
        totals=dataclasses.replace(base, **totals),
        recent_refusals=(),
    )


def test_status_block() -> None:
    status = _status()
    lines = render_status("h:50051", status, now=NOW).splitlines()
    assert lines[0] == "AMM        h:50051"
    assert "running    no" in lines
    assert "keys       1 (2 replicas)" in lines
    assert lines[-1] == "no cycle yet"
    assert not any(line.startswith(("unreachable", "conflicts", "goals")) for line in lines)
    troubled = _status(
        conflicting_keys=2, unreachable_workers=1, keys_with_goal=3, keys_below_goal=1
    )
    lines = render_status("h:50051", troubled, now=NOW).splitlines()
    assert "unreachable  1 worker" in lines
    assert "conflicts    2 keys left alone" in lines
    assert "goals        3 keys (1 below)" in lines
    fenced = dataclasses.replace(_status(running=False), fenced_by_epoch=42)
    words = [" ".join(line.split()) for line in render_status("h:50051", fenced).splitlines()]
    assert "running no: fenced off by epoch 42 (another AMM is in charge)" in words


def test_goals_table_and_changes() -> None:
    goals = [
        ReplicationGoal("a", n=3, target=3, live_copies=3),
        ReplicationGoal("bb", n=None, target=4, live_copies=2),
        ReplicationGoal("gone", n=2, target=0, live_copies=0),
        ReplicationGoal("lost", n=2, target=2, live_copies=0, lost=True),
    ]
    assert render_goals(goals).splitlines() == [
        "KEY   GOAL  TARGET  LIVE  STATE",
        "a        3       3     3  met",
        "bb     all       4     2  below",
        "gone     2       0     0  below",
        "lost     2       2     0  lost",
    ]
    assert render_goals([]) == "no goals"
    assert render_goal_change(GoalChange(2, 0), 3) == "goal of 3 copies set for 2 keys"
    assert render_goal_change(GoalChange(1, 0), None) == "goal of every worker set for 1 key"
    assert render_goal_change(GoalChange(0, 1), 1) == "goal removed for 1 key"


def test_lost_keys_table() -> None:
    lost = [
        LostKey("a", "h:1", NOW - timedelta(seconds=3), "h:1 unregistered before ...", False),
        LostKey("bb", "", None, "no worker held it after the AMM restarted", True),
    ]
    assert render_lost(lost, now=NOW).splitlines() == [
        "KEY  LAST HOLDER  LOST        GOAL  HOW",
        "a    h:1          3.00 s ago  no    h:1 unregistered before ...",
        "bb   -            never       yes   no worker held it after the AMM restarted",
    ]
    assert render_lost(lost[:1], more=True, now=NOW).endswith(
        "... and more (--limit N to list more)"
    )
    assert render_lost([]) == "no lost keys"


def test_status_block_shows_liveness_grace_and_events() -> None:
    status = dataclasses.replace(
        _status(running=True, cycles=4, replicas=1, lost_keys=3, stale_workers=1),
        recent_events=(
            Event(NOW - timedelta(seconds=5), "key-lost", "h:2", ("a", "b", "c"), "3 key(s) lost"),
            Event(NOW - timedelta(seconds=9), "worker-dead", "h:2", (), "no answer for 30 s"),
        ),
        startup_grace=True,
    )
    lines = render_status("h:50051", status, now=NOW).splitlines()
    words = [" ".join(line.split()) for line in lines]
    assert "stale 1 worker" in words
    assert "lost 3 keys (no copy left)" in words
    assert any(w.startswith("drops held back: start-up grace") for w in words)
    events = lines[lines.index("recent events:") + 1 :]
    assert events[0].split() == ["WHEN", "KIND", "WORKER", "MESSAGE"]
    assert events[1].split()[:5] == ["5.00", "s", "ago", "key-lost", "h:2"]
    assert events[2].endswith("no answer for 30 s")


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

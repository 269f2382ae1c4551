"""Plain-text rendering of client results: aligned tables and short summaries.

Hand-formatted so that the client needs no table library; shared by the CLI and the demo. Every
function is pure (``now`` is a parameter where time matters), returns a string without a trailing
newline, and shows sizes with ``amm.base.units.format_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from amm.base.units import format_bytes, format_duration
from amm.models import (
    CycleReport,
    GoalChange,
    LostKey,
    ReplicationGoal,
    RetirementResult,
    Status,
    Unpinned,
    WorkerInfo,
)

EMPTY = "-"
EVENTS_SHOWN = 10
_REPORTED = frozenset({"running", "paused", "closing", "unspecified"})


def render_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], right: Iterable[int] = ()
) -> str:
    """Columns padded to their widest cell; columns listed in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    aligned = set(right)
    lines = []
    for row in cells:
        padded = [
            cell.rjust(width) if i in aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    return f"{format_duration(max(0.0, (now - when).total_seconds()))} ago"


def _size(n: int) -> str:
    return format_bytes(n) if n else EMPTY


def _worker_status(w: WorkerInfo) -> str:
    """The AMM's verdict (stale, retiring, ...), or ``unreachable (N)`` over what the agent
    reported while it misses polls; ``unconfirmed`` for a worker of an earlier run of the AMM
    that has not shown up in this one."""
    if w.unconfirmed:
        return f"unconfirmed ({w.missed_polls} missed)" if w.missed_polls else "unconfirmed"
    if not w.missed_polls:
        return w.status
    if w.status in _REPORTED:
        return f"unreachable ({w.missed_polls})"
    return f"{w.status} ({w.missed_polls} missed)"


def render_workers(workers: Sequence[WorkerInfo], now: datetime | None = None) -> str:
    """One row per worker: address, name, zone, status, keys and memory figures, last poll."""
    if not workers:
        return "no workers"
    now = now or datetime.now(UTC)
    rows = [
        (
            w.address,
            w.name,
            w.zone or EMPTY,
            _worker_status(w),
            w.key_count,
            format_bytes(w.memory_bytes),
            format_bytes(w.managed_bytes),
            format_bytes(w.process_bytes),
            _size(w.limit_bytes),
            _ago(w.last_poll, now),
        )
        for w in workers
    ]
    headers = ("ADDRESS", "NAME", "ZONE", "STATUS", "KEYS", "MEMORY", "MANAGED", "PROCESS")
    return render_table((*headers, "LIMIT", "LAST POLL"), rows, right=range(4, 9))


def render_unpinned(released: Sequence[Unpinned]) -> str:
    """``amm unpin``: one row per key and worker, the pins released and those left."""
    if not released:
        return "no pin released"
    rows = [(u.key, u.worker, u.released, u.pins) for u in released]
    return render_table(("KEY", "WORKER", "RELEASED", "PINS LEFT"), rows, right=(2, 3))


def render_mapping(headers: tuple[str, str], mapping: Mapping[str, Sequence[str]]) -> str:
    """who-has / has-what: one row per entry, its values joined by commas."""
    if not mapping:
        return "nothing"
    rows = [(name, ", ".join(values) or EMPTY) for name, values in mapping.items()]
    return render_table(headers, rows)


def summarize_cycle(report: CycleReport) -> str:
    """One line: what the cycle suggested, sent, achieved and rejected, and how long it took."""
    if report.dry_run:
        done = (
            f"dry run {report.number}: {_plural(report.suggestions, 'suggestion')}, "
            f"{_plural(len(report.directives), 'directive')} would be sent (nothing was), "
        )
    else:
        done = (
            f"cycle {report.number}: {_plural(report.suggestions, 'suggestion')}, "
            f"{_plural(report.directives_sent, 'directive')} sent "
            f"({report.applied} applied, {report.refused} refused, {report.failed} failed), "
        )
    grace = "; drops held back (start-up grace)" if report.startup_grace else ""
    return (
        f"{done}{report.rejected} rejected, in {format_duration(report.duration)} "
        f"(planning {format_duration(report.plan_duration)}){grace}"
    )


def render_cycle(report: CycleReport) -> str:
    """The cycle's summary, its directives and the rejected suggestions."""
    parts = [summarize_cycle(report)]
    if report.unreachable_workers:
        parts.append(f"unreachable: {', '.join(report.unreachable_workers)}")
    if report.directives and report.dry_run:
        planned = [
            (d.op, d.key, d.worker, d.policy, d.policy_reason or EMPTY) for d in report.directives
        ]
        parts += ["", render_table(("OP", "KEY", "WORKER", "POLICY", "REASON"), planned)]
    elif report.directives:
        why = any(d.policy_reason for d in report.directives)
        rows = [
            (
                d.op,
                d.key,
                d.worker,
                d.policy,
                "timed out" if d.timed_out else d.outcome or "pending",
                d.reason or d.message or EMPTY,
                *((d.policy_reason or EMPTY,) if why else ()),
            )
            for d in report.directives
        ]
        headers = ("OP", "KEY", "WORKER", "POLICY", "OUTCOME", "REASON", *(("WHY",) if why else ()))
        parts += ["", render_table(headers, rows)]
    if report.rejections:
        rejected = [(r.policy, r.op, r.key, r.reason) for r in report.rejections]
        parts += ["", "rejected:", render_table(("POLICY", "OP", "KEY", "REASON"), rejected)]
        hidden = report.rejected - len(report.rejections)
        if hidden > 0:
            parts.append(f"... and {hidden} more")
    return "\n".join(parts)


def render_status(address: str, status: Status, now: datetime | None = None) -> str:
    """Configuration, totals, policies, the last cycle and recent refusals."""
    now = now or datetime.now(UTC)
    totals = status.totals
    summary = [
        ("AMM", address),
        (
            "running",
            f"no: fenced off by epoch {status.fenced_by_epoch} (another AMM is in charge)"
            if status.fenced
            else "yes"
            if status.running
            else "no",
        ),
        ("interval", format_duration(status.interval)),
        ("measure", status.measure),
        ("epoch", status.epoch),
        ("cycles", status.cycles),
        ("workers", totals.workers),
        ("keys", f"{totals.keys} ({_plural(totals.replicas, 'replica')})"),
        ("memory", format_bytes(totals.memory_bytes)),
        ("managed", format_bytes(totals.managed_bytes)),
        ("process", format_bytes(totals.process_bytes)),
        ("in flight", _plural(totals.directives_in_flight, "directive")),
    ]
    if totals.unreachable_workers:
        summary.append(("unreachable", _plural(totals.unreachable_workers, "worker")))
    if totals.keys_with_goal:
        below = f"{totals.keys_below_goal} below"
        summary.append(("goals", f"{_plural(totals.keys_with_goal, 'key')} ({below})"))
    if totals.retiring_workers:
        summary.append(("retiring", _plural(totals.retiring_workers, "worker")))
    if totals.conflicting_keys:
        summary.append(("conflicts", f"{_plural(totals.conflicting_keys, 'key')} left alone"))
    if totals.stale_workers:
        summary.append(("stale", _plural(totals.stale_workers, "worker")))
    if totals.lost_keys:
        summary.append(("lost", f"{_plural(totals.lost_keys, 'key')} (no copy left)"))
    if status.startup_grace:
        summary.append(("drops", "held back: start-up grace (known workers not all reported)"))
    parts = [render_table(("", ""), summary).split("\n", 1)[1]]
    if status.policies:
        policies = [(p.name, p.class_path, p.kwargs_json or "{}") for p in status.policies]
        parts += ["", "policies:", render_table(("NAME", "CLASS", "KWARGS"), policies)]
    last = status.last_cycle
    parts += ["", f"last {summarize_cycle(last)}" if last else "no cycle yet"]
    if status.recent_refusals:
        rows = [
            (r.op, r.key, r.worker, r.reason, r.message or EMPTY, _ago(r.at, now))
            for r in status.recent_refusals
        ]
        headers = ("OP", "KEY", "WORKER", "REASON", "MESSAGE", "WHEN")
        parts += ["", "recent refusals:", render_table(headers, rows)]
    if status.recent_events:
        shown = status.recent_events[:EVENTS_SHOWN]
        events = [(_ago(e.at, now), e.kind, e.worker or EMPTY, e.message) for e in shown]
        parts += ["", "recent events:", render_table(("WHEN", "KIND", "WORKER", "MESSAGE"), events)]
        if len(status.recent_events) > EVENTS_SHOWN:
            parts.append(f"... and {len(status.recent_events) - EVENTS_SHOWN} more (--json)")
    return "\n".join(parts)


def _goal(n: int | None) -> str:
    return "all" if n is None else str(n)


def render_goals(goals: Sequence[ReplicationGoal]) -> str:
    """One row per key with a goal: the goal, its current target, live copies, below or met."""
    if not goals:
        return "no goals"
    rows = [(g.key, _goal(g.n), g.target, g.live_copies, _goal_state(g)) for g in goals]
    return render_table(("KEY", "GOAL", "TARGET", "LIVE", "STATE"), rows, right=range(1, 4))


def _goal_state(g: ReplicationGoal) -> str:
    if g.lost:
        return "lost"
    return "below" if g.below else "met"


def render_lost(lost: Sequence[LostKey], more: bool = False, now: datetime | None = None) -> str:
    """``amm lost``: one row per lost key, the worker that held its last copy, when and how it
    was lost; ``more`` when the list was cut short."""
    if not lost:
        return "no lost keys"
    now = now or datetime.now(UTC)
    rows = [
        (k.key, k.worker or EMPTY, _ago(k.lost_at, now), "yes" if k.has_goal else "no", k.reason)
        for k in lost
    ]
    table = render_table(("KEY", "LAST HOLDER", "LOST", "GOAL", "HOW"), rows)
    return table + ("\n... and more (--limit N to list more)" if more else "")


def render_goal_change(change: GoalChange, n: int | None) -> str:
    """What ``amm replicate`` did."""
    if n == 1:
        return f"goal removed for {_plural(change.goals_removed, 'key')}"
    what = "every worker" if n is None else f"{n} copies"
    return f"goal of {what} set for {_plural(change.goals_set, 'key')}"


def render_retirements(results: Sequence[RetirementResult]) -> str:
    """``amm retire``: one row per worker, whether it was retired (and closed), and why."""
    if not results:
        return "no worker to retire"
    rows = [
        (
            r.worker,
            "yes" if r.retired else "no",
            "yes" if r.closed else "no",
            r.reason or EMPTY,
        )
        for r in results
    ]
    return render_table(("WORKER", "RETIRED", "CLOSED", "REASON"), rows)


def render_cluster(
    address: str, workers: Sequence[str], certs: Path | None = None, dashboard: str | None = None
) -> str:
    """What ``amm cluster`` prints once everything is up; ``certs``: its TLS folder, if any;
    ``dashboard``: the dashboard's address, if served."""
    rows = [("amm", address), *((f"worker-{i}", w) for i, w in enumerate(workers))]
    exports = [f"export AMM_ADDRESS={address}   # then: amm status, amm workers, ..."]
    if dashboard is not None:
        scheme = "https" if certs is not None else "http"
        exports.insert(0, f"dashboard: {scheme}://{dashboard}/")
    if certs is not None:
        exports.append(f"export AMM_TLS={certs}   # mutual TLS: the operator's certificate")
    return "\n".join(
        [
            render_table(("PROCESS", "ADDRESS"), rows),
            "",
            *exports,
            "Press Ctrl-C to stop the cluster.",
        ]
    )

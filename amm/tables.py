"""Plain-text rendering of client results: aligned tables and short summaries.

Hand-formatted so that the client needs no table library; shared by the CLI and the demo. Every
function is pure (``now`` is a parameter where time matters), returns a string without a trailing
newline, and shows sizes with ``amm.units.format_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime

from amm.models import CycleReport, RetirementResult, Status, WorkerInfo
from amm.units import format_bytes, format_duration

EMPTY = "-"


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


def render_workers(workers: Sequence[WorkerInfo], now: datetime | None = None) -> str:
    """One row per worker: address, name, status, keys and memory figures, last poll."""
    if not workers:
        return "no workers"
    now = now or datetime.now(UTC)
    rows = [
        (
            w.address,
            w.name,
            f"unreachable ({w.missed_polls})" if w.missed_polls else w.status,
            w.key_count,
            format_bytes(w.memory_bytes),
            format_bytes(w.managed_bytes),
            format_bytes(w.process_bytes),
            _size(w.limit_bytes),
            _ago(w.last_poll, now),
        )
        for w in workers
    ]
    headers = ("ADDRESS", "NAME", "STATUS", "KEYS", "MEMORY", "MANAGED", "PROCESS", "LIMIT")
    return render_table((*headers, "LAST POLL"), rows, right=range(3, 8))


def render_mapping(headers: tuple[str, str], mapping: Mapping[str, Sequence[str]]) -> str:
    """who-has / has-what: one row per entry, its values joined by commas."""
    if not mapping:
        return "nothing"
    rows = [(name, ", ".join(values) or EMPTY) for name, values in mapping.items()]
    return render_table(headers, rows)


def summarize_cycle(report: CycleReport) -> str:
    """One line: what the cycle suggested, sent, achieved and rejected, and how long it took."""
    return (
        f"cycle {report.number}: {_plural(report.suggestions, 'suggestion')}, "
        f"{_plural(report.directives_sent, 'directive')} sent "
        f"({report.applied} applied, {report.refused} refused, {report.failed} failed), "
        f"{report.rejected} rejected, in {format_duration(report.duration)} "
        f"(planning {format_duration(report.plan_duration)})"
    )


def render_cycle(report: CycleReport) -> str:
    """The cycle's summary, its directives and the rejected suggestions."""
    parts = [summarize_cycle(report)]
    if report.unreachable_workers:
        parts.append(f"unreachable: {', '.join(report.unreachable_workers)}")
    if report.directives:
        rows = [
            (
                d.op,
                d.key,
                d.worker,
                d.policy,
                "timed out" if d.timed_out else d.outcome or "pending",
                d.reason or d.message or EMPTY,
            )
            for d in report.directives
        ]
        headers = ("OP", "KEY", "WORKER", "POLICY", "OUTCOME", "REASON")
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
        ("running", "yes" if status.running else "no"),
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
    if totals.retiring_workers:
        summary.append(("retiring", _plural(totals.retiring_workers, "worker")))
    if totals.conflicting_keys:
        summary.append(("conflicts", f"{_plural(totals.conflicting_keys, 'key')} left alone"))
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
    return "\n".join(parts)


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


def render_cluster(address: str, workers: Sequence[str]) -> str:
    """What ``amm cluster`` prints once everything is up."""
    rows = [("amm", address), *((f"worker-{i}", w) for i, w in enumerate(workers))]
    return "\n".join(
        [
            render_table(("PROCESS", "ADDRESS"), rows),
            "",
            f"export AMM_ADDRESS={address}   # then: amm status, amm workers, ...",
            "Press Ctrl-C to stop the cluster.",
        ]
    )

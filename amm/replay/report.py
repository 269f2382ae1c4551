"""What a replay prints and writes: the honesty note, the results table and the JSON document.

Pure: every function takes the figures and returns text or plain data. The figures of a run come
from the runner (``ReplayStats``) and the memory samplers; Dask's come from the trace's metadata,
as the recording script stored them (``meta.dask.amm_off`` / ``amm_on``, medians over its
repeats when it made several).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from amm.base.units import format_bytes
from amm.replay.plan import ReplayPlan
from amm.tables import render_table

HONESTY_NOTE = (
    "This is a replay of data movement, not a computation: every task of the trace runs on the "
    "agent of its recorded worker, reads its inputs through that agent (creating replicas where "
    "Dask fetched them), pins them while it is queued there, waits for its recorded duration and "
    "puts bytes of its recorded size. Nothing is computed; the bytes, the transfers and the "
    "memory are real."
)
TRANSFERRED_NOTE = (
    "bytes transferred: what agents fetched from peers (and kept) to serve the tasks' reads of "
    "their inputs; the AMM's policy here, ReduceReplicas, only drops replicas and moves no bytes."
)


@dataclass(frozen=True, slots=True)
class RunFigures:
    """One replay run, as the table shows it; sizes in bytes, times in seconds."""

    label: str
    amm: bool
    wall_seconds: float
    peak_managed: int
    peak_process: int
    start_process: int
    bytes_transferred: int
    bytes_put: int
    replicas_dropped: int
    max_lag: float
    check: str
    check_ok: bool

    @property
    def process_added(self) -> int:
        """How far process memory rose above where it was before the replay."""
        return max(0, self.peak_process - self.start_process)


@dataclass(frozen=True, slots=True)
class DaskFigures:
    """Dask's own AMM on/off figures, measured when the trace was recorded."""

    off_peak_managed: float
    on_peak_managed: float
    off_peak_process: float
    on_peak_process: float
    off_wall: float
    on_wall: float
    source: str
    off_transferred: float | None = None
    on_transferred: float | None = None
    off_process_added: float | None = None
    on_process_added: float | None = None

    def ratios(self) -> dict[str, float]:
        ratios = {
            "peak_managed": self.on_peak_managed / self.off_peak_managed,
            "peak_process": self.on_peak_process / self.off_peak_process,
            "wall": self.on_wall / self.off_wall,
        }
        if self.off_transferred and self.on_transferred is not None:
            ratios["bytes_transferred"] = self.on_transferred / self.off_transferred
        if self.off_process_added and self.on_process_added is not None:
            ratios["process_added"] = self.on_process_added / self.off_process_added
        return ratios


def _median(runs: Sequence[Mapping[str, Any]], field: str) -> float:
    return float(statistics.median(float(run[field]) for run in runs))


def _optional_median(runs: Sequence[Mapping[str, Any]], field: str) -> float | None:
    """Older traces lack some figures (bytes transferred): None then."""
    return _median(runs, field) if all(field in run for run in runs) else None


def _added_median(runs: Sequence[Mapping[str, Any]]) -> float | None:
    """The median of each run's process memory peak above its first sample, when recorded."""
    if not all("start_process_bytes" in run for run in runs):
        return None
    return float(
        statistics.median(
            float(run["peak_process_bytes"]) - float(run["start_process_bytes"]) for run in runs
        )
    )


def dask_figures(
    meta: Mapping[str, Any], source: str = "recorded with the trace"
) -> DaskFigures | None:
    """Dask's figures from a trace's metadata, medians over the runs; None when absent."""
    dask = meta.get("dask")
    if not isinstance(dask, Mapping):
        return None
    settings = meta.get("dask_amm")
    if isinstance(settings, Mapping) and settings.get("interval"):
        source += f"; Dask's AMM ran every {settings['interval']}"
    try:
        off, on = dask["amm_off"], dask["amm_on"]
        offs = off.get("runs") or [off]
        ons = on.get("runs") or [on]
        return DaskFigures(
            off_peak_managed=_median(offs, "peak_managed_bytes"),
            on_peak_managed=_median(ons, "peak_managed_bytes"),
            off_peak_process=_median(offs, "peak_process_bytes"),
            on_peak_process=_median(ons, "peak_process_bytes"),
            off_wall=_median(offs, "wall_seconds"),
            on_wall=_median(ons, "wall_seconds"),
            source=source,
            off_transferred=_optional_median(offs, "bytes_transferred"),
            on_transferred=_optional_median(ons, "bytes_transferred"),
            off_process_added=_added_median(offs),
            on_process_added=_added_median(ons),
        )
    except (KeyError, TypeError, ValueError, AttributeError, statistics.StatisticsError):
        return None


def ratio(on: float, off: float) -> float | None:
    return on / off if off else None


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def amm_ratios(off: RunFigures, on: RunFigures) -> dict[str, float | None]:
    return {
        "peak_managed": ratio(on.peak_managed, off.peak_managed),
        "peak_process": ratio(on.peak_process, off.peak_process),
        "process_added": ratio(on.process_added, off.process_added),
        "wall": ratio(on.wall_seconds, off.wall_seconds),
        "bytes_transferred": ratio(on.bytes_transferred, off.bytes_transferred),
    }


def describe_scale(plan: ReplayPlan, largest: int) -> str:
    """One line saying what was scaled, with an example of the largest value."""
    scale = plan.scale
    if scale.time == 1 and scale.bytes == 1:
        return "times and sizes as recorded"
    parts = [f"times x{scale.time:g}"]
    if scale.bytes != 1:
        parts.append(
            f"sizes x{scale.bytes:g} (a recorded value of {format_bytes(largest)} is put as "
            f"{format_bytes(scale.size(largest))}; managed memory and bytes moved scale with "
            "sizes, process memory also counts each agent's own footprint)"
        )
    else:
        parts.append("sizes as recorded")
    return ", ".join(parts)


def render_table_text(runs: Sequence[RunFigures], dask: DaskFigures | None) -> str:
    """The results: one column per run, then amm's on/off ratio and Dask's, when both ran."""
    by_label = {run.amm: run for run in runs}
    off, on = by_label.get(False), by_label.get(True)
    both = off is not None and on is not None
    headers = ["", *(run.label for run in runs)]
    if both:
        headers.append("on/off")
        if dask is not None:
            headers.append("Dask on/off")
    dask_ratios: Mapping[str, float | None] = dask.ratios() if dask is not None else {}
    ours: Mapping[str, float | None] = amm_ratios(off, on) if off and on else {}

    def row(name: str, values: list[str], key: str | None) -> list[str]:
        cells = [name, *values]
        if both:
            cells.append(_fmt_ratio(ours.get(key)) if key else "")
            if dask is not None:
                cells.append(_fmt_ratio(dask_ratios.get(key)) if key else "")
        return cells

    rows = [
        row(
            "peak cluster memory, managed",
            [format_bytes(r.peak_managed) for r in runs],
            "peak_managed",
        ),
        row(
            "peak cluster memory, process",
            [format_bytes(r.peak_process) for r in runs],
            "peak_process",
        ),
        row(
            "  process memory before the replay",
            [format_bytes(r.start_process) for r in runs],
            None,
        ),
        row(
            "  peak process memory above that",
            [format_bytes(r.process_added) for r in runs],
            "process_added",
        ),
        row("wall time", [f"{r.wall_seconds:.1f} s" for r in runs], "wall"),
        row(
            "bytes transferred",
            [format_bytes(r.bytes_transferred) for r in runs],
            "bytes_transferred",
        ),
        row("bytes put (task outputs)", [format_bytes(r.bytes_put) for r in runs], None),
        row("replicas dropped by the AMM", [str(r.replicas_dropped) for r in runs], None),
        row("behind schedule, at worst", [f"{r.max_lag:.1f} s" for r in runs], None),
        row("end-state check", ["ok" if r.check_ok else "FAILED" for r in runs], None),
    ]
    return render_table(headers, rows, right=range(1, len(headers)))


def render_report(
    trace_name: str,
    workload: str,
    plan: ReplayPlan,
    largest: int,
    runs: Sequence[RunFigures],
    dask: DaskFigures | None,
    interval: float | None,
) -> str:
    lines = [
        f"amm replay of {trace_name}: {workload}",
        f"{len(plan.steps)} tasks on {plan.workers} agents; {describe_scale(plan, largest)}"
        + (f"; AMM interval {interval:g} s" if interval is not None else ""),
        "",
        render_table_text(runs, dask),
        "",
        TRANSFERRED_NOTE,
    ]
    if dask is not None and len(runs) == 2:
        lines.append(
            f"Dask on/off: Dask's own MemorySampler on a Dask LocalCluster, {dask.source}."
        )
    for run in runs:
        if not run.check_ok:
            lines.append(f"{run.label}: end-state check {run.check}")
    return "\n".join(lines)


def report_document(
    trace_name: str,
    plan: ReplayPlan,
    runs: Sequence[RunFigures],
    dask: DaskFigures | None,
) -> dict[str, Any]:
    """The same figures as JSON-ready data, for ``--json``."""
    by_label = {run.amm: run for run in runs}
    off, on = by_label.get(False), by_label.get(True)
    return {
        "trace": trace_name,
        "workers": plan.workers,
        "time_scale": plan.scale.time,
        "byte_scale": plan.scale.bytes,
        "tasks": len(plan.steps),
        "runs": [
            {
                "label": r.label,
                "amm": r.amm,
                "wall_seconds": r.wall_seconds,
                "peak_managed_bytes": r.peak_managed,
                "peak_process_bytes": r.peak_process,
                "start_process_bytes": r.start_process,
                "process_added_bytes": r.process_added,
                "bytes_transferred": r.bytes_transferred,
                "bytes_put": r.bytes_put,
                "replicas_dropped": r.replicas_dropped,
                "max_lag_seconds": r.max_lag,
                "end_check": r.check,
                "end_check_ok": r.check_ok,
            }
            for r in runs
        ],
        "ratios": amm_ratios(off, on) if off and on else None,
        "dask_ratios": dask.ratios() if dask is not None else None,
    }


def headline(runs: Sequence[RunFigures], dask: DaskFigures | None) -> str | None:
    """One sentence with the result, when both an AMM-off and an AMM-on run are there."""
    by_label = {run.amm: run for run in runs}
    off, on = by_label.get(False), by_label.get(True)
    if off is None or on is None or not off.peak_managed or not off.wall_seconds:
        return None
    managed = 1 - on.peak_managed / off.peak_managed
    wall = on.wall_seconds / off.wall_seconds - 1
    text = f"With the AMM on, peak managed memory was {managed:.0%} lower"
    if dask is not None:
        theirs = 1 - dask.ratios()["peak_managed"]
        text += f" (Dask's own AMM: {theirs:.0%} lower on the same workload)"
    change = "did not change" if abs(wall) < 0.0005 else f"changed by {wall:+.1%}"
    return text + f", and wall time {change}."

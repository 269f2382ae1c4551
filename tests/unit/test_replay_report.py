"""The replay's table, headline and JSON document, from figures built here."""

from __future__ import annotations

from dataclasses import replace

import pytest

from amm.replay.plan import ReplayPlan, Scale, make_plan
from amm.replay.report import (
    HONESTY_NOTE,
    RunFigures,
    dask_figures,
    headline,
    render_report,
    report_document,
)
from amm.replay.trace import TRACE_FORMAT, parse_trace

MiB = 2**20

OFF = RunFigures(
    label="AMM off",
    amm=False,
    wall_seconds=20.0,
    peak_managed=200 * MiB,
    peak_process=500 * MiB,
    start_process=300 * MiB,
    bytes_transferred=100 * MiB,
    bytes_put=400 * MiB,
    replicas_dropped=0,
    max_lag=0.2,
    check="ok: exactly the 1 expected key(s) exist",
    check_ok=True,
)
ON = replace(
    OFF,
    label="AMM on",
    amm=True,
    wall_seconds=20.2,
    peak_managed=150 * MiB,
    peak_process=450 * MiB,
    bytes_transferred=125 * MiB,
    replicas_dropped=42,
)
EXTRA = {"start_process_bytes": 1000, "bytes_transferred": 100}
META = {
    "dask": {
        "amm_off": {
            "peak_managed_bytes": 1000,
            "peak_process_bytes": 2000,
            "wall_seconds": 10,
            "runs": [
                {
                    "peak_managed_bytes": 900,
                    "peak_process_bytes": 2000,
                    "wall_seconds": 10,
                    **EXTRA,
                },
                {
                    "peak_managed_bytes": 1000,
                    "peak_process_bytes": 2100,
                    "wall_seconds": 12,
                    **EXTRA,
                },
                {
                    "peak_managed_bytes": 1100,
                    "peak_process_bytes": 1900,
                    "wall_seconds": 11,
                    **EXTRA,
                },
            ],
        },
        "amm_on": {
            "peak_managed_bytes": 750,
            "peak_process_bytes": 1800,
            "wall_seconds": 11.0,
            "start_process_bytes": 1000,
            "bytes_transferred": 120,
        },
    }
}


def plan() -> ReplayPlan:
    trace = parse_trace(
        {
            "format": TRACE_FORMAT,
            "outputs": ["a"],
            "tasks": [
                {"key": "a", "worker": 0, "start": 0, "stop": 1, "inputs": [], "nbytes": 8_000_000}
            ],
        }
    )
    return make_plan(trace, 8, Scale(bytes=1 / 16), "p")


def test_dask_figures_are_medians_over_the_recorded_runs() -> None:
    dask = dask_figures(META)
    assert dask is not None
    assert dask.off_peak_managed == 1000
    assert dask.off_wall == 11
    assert dask.ratios() == pytest.approx(
        {
            "peak_managed": 0.75,
            "peak_process": 1800 / 2000,
            "wall": 1.0,
            "bytes_transferred": 1.2,
            # Peaks above the first sample: 800 with the AMM on, a median of 1000 without.
            "process_added": 0.8,
        }
    )


@pytest.mark.parametrize("meta", [{}, {"dask": []}, {"dask": {"amm_off": {}}}])
def test_no_dask_figures_when_the_trace_has_none(meta: dict[str, object]) -> None:
    assert dask_figures(meta) is None


def test_the_table_shows_each_run_then_both_ratios() -> None:
    text = render_report(
        "dot.json.gz", "(A @ A.T).sum()", plan(), 8_000_000, [OFF, ON], dask_figures(META), 0.5
    )
    lines = text.splitlines()
    assert lines[0] == "amm replay of dot.json.gz: (A @ A.T).sum()"
    assert "8 agents" in lines[1]
    assert "sizes x0.0625" in lines[1]
    assert "AMM interval 0.5 s" in lines[1]
    header = next(line for line in lines if "AMM off" in line)
    assert header.split() == ["AMM", "off", "AMM", "on", "on/off", "Dask", "on/off"]
    managed = next(line for line in lines if line.startswith("peak cluster memory, managed"))
    assert managed.split()[-2:] == ["0.750", "0.750"]
    assert "200.00 MiB" in managed
    assert "150.00 MiB" in managed
    wall = next(line for line in lines if line.startswith("wall time"))
    assert wall.split()[-2:] == ["1.010", "1.000"]
    moved = next(line for line in lines if line.startswith("bytes transferred"))
    assert moved.split()[-2:] == ["1.250", "1.200"]
    added = next(line for line in lines if line.startswith("  peak process memory above"))
    assert added.split()[-2:] == ["0.750", "0.800"]
    dropped = next(line for line in lines if line.startswith("replicas dropped"))
    assert dropped.split()[-2:] == ["0", "42"]
    assert any("fetched from peers" in line for line in lines)


def test_a_single_run_has_no_ratio_column_and_a_failed_check_is_named() -> None:
    failed = replace(OFF, check="FAILED: 1 missing: p/a", check_ok=False)
    text = render_report("t", "", plan(), 8, [failed], None, None)
    assert "on/off" not in text
    assert "FAILED" in next(
        line for line in text.splitlines() if line.startswith("end-state check")
    )
    assert text.splitlines()[-1] == "AMM off: end-state check FAILED: 1 missing: p/a"


def test_headline_and_document() -> None:
    assert headline([OFF, ON], dask_figures(META)) == (
        "With the AMM on, peak managed memory was 25% lower (Dask's own AMM: 25% lower on the "
        "same workload), and wall time changed by +1.0%."
    )
    assert headline([OFF], None) is None
    same = replace(ON, wall_seconds=OFF.wall_seconds + 0.001)
    assert headline([OFF, same], None) == (
        "With the AMM on, peak managed memory was 25% lower, and wall time did not change."
    )
    document = report_document("t", plan(), [OFF, ON], None)
    assert document["ratios"]["peak_managed"] == pytest.approx(0.75)
    assert document["byte_scale"] == 1 / 16
    assert document["runs"][1]["replicas_dropped"] == 42
    assert "not a computation" in HONESTY_NOTE

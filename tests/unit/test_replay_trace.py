"""Reading and validating replay traces, and the trace committed for the demo."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import pytest

from amm.replay.trace import TRACE_FORMAT, TraceError, load_trace, parse_trace

COMMITTED = Path(__file__).resolve().parents[2] / "benchmarks" / "traces" / "dot-8000.json.gz"


def task(
    key: str, worker: str | int = "0", start: float = 0.0, stop: float = 1.0, **extra: Any
) -> dict[str, Any]:
    return {
        "key": key,
        "worker": worker,
        "queued": extra.pop("queued", None),
        "start": start,
        "stop": stop,
        "inputs": extra.pop("inputs", []),
        "nbytes": extra.pop("nbytes", 10),
        **extra,
    }


def document(*tasks: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    return {
        "format": TRACE_FORMAT,
        "meta": {"workload": "test"},
        "outputs": outputs or [],
        "tasks": list(tasks),
    }


def test_tasks_come_in_dependency_order_whatever_the_file_order() -> None:
    trace = parse_trace(
        document(
            task("c", start=2, stop=3, inputs=["a", "b"]),
            task("b", worker=1, start=0.5, stop=1),
            task("a", start=0, stop=1),
            outputs=["c"],
        )
    )
    assert [t.key for t in trace.tasks] == ["a", "b", "c"]
    assert trace.outputs == ("c",)
    assert trace.workers == ("0", "1")
    assert trace.tasks[2].inputs == ("a", "b")
    assert trace.tasks[2].duration == 1
    assert trace.total_bytes == 30
    assert trace.makespan == 3
    assert trace.meta["workload"] == "test"


def test_worker_names_sort_numerically() -> None:
    trace = parse_trace(
        document(*(task(f"t{i}", worker=i) for i in (10, 2, 1)), task("x", worker="w"))
    )
    assert trace.workers == ("1", "2", "10", "w")


@pytest.mark.parametrize(
    ("tasks", "outputs", "message"),
    [
        ([task("a"), task("a")], [], "'a' appears twice"),
        ([task("a", inputs=["nope"])], [], "input 'nope' is not a task"),
        ([task("a", inputs=["b"]), task("b", inputs=["a"])], [], "form a cycle"),
        ([task("a", inputs=["a"])], [], "its own input"),
        ([task("a", inputs=["b", "b"]), task("b")], [], "listed twice"),
        ([task("a", start=2, stop=1)], [], "stop (1.0) is before start (2.0)"),
        ([task("a", start=-1)], [], "start must be >= 0"),
        ([task("a", stop=math.nan)], [], "stop must be a finite number"),
        ([task("a", queued="soon")], [], "queued must be a finite number"),
        ([task("a", nbytes=-5)], [], "nbytes must be an integer >= 0"),
        ([task("a", nbytes=1.5)], [], "nbytes must be an integer >= 0"),
        ([task("a", worker="")], [], "worker must be a name or a number"),
        ([task("")], [], "key must be a non-empty string"),
        ([{"key": "a", "worker": "0"}], [], "missing inputs, nbytes, start, stop"),
        ([task("a")], ["b"], "output 'b' is not a task"),
    ],
)
def test_a_bad_trace_is_refused_naming_the_task(
    tasks: list[dict[str, Any]], outputs: list[str], message: str
) -> None:
    with pytest.raises(TraceError) as caught:
        parse_trace(document(*tasks, outputs=outputs))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "a trace is a JSON object"),
        ({"format": "other", "tasks": [task("a")]}, "unknown trace format 'other'"),
        ({"format": TRACE_FORMAT, "tasks": []}, "'tasks' must be a non-empty list"),
        ({"format": TRACE_FORMAT, "tasks": [task("a")], "outputs": "a"}, "'outputs' must be"),
        ({"format": TRACE_FORMAT, "tasks": [task("a")], "meta": []}, "'meta' must be an object"),
    ],
)
def test_a_bad_document_is_refused(doc: object, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        parse_trace(doc)


def test_load_reads_plain_and_gzipped_json(tmp_path: Path) -> None:
    doc = document(task("a"), outputs=["a"])
    plain = tmp_path / "t.json"
    plain.write_text(json.dumps(doc))
    packed = tmp_path / "t.json.gz"
    packed.write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert load_trace(plain) == load_trace(packed)


def test_load_says_what_is_wrong_with_the_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(TraceError, match="not valid JSON"):
        load_trace(broken)
    truncated = tmp_path / "truncated.json.gz"
    truncated.write_bytes(gzip.compress(b'{"format": 1}')[:12])
    with pytest.raises(TraceError, match="not a valid gzip file"):
        load_trace(truncated)


def test_the_committed_trace_is_the_dot_product_with_dasks_figures() -> None:
    trace = load_trace(COMMITTED)
    assert COMMITTED.stat().st_size < 5_000_000
    assert len(trace.workers) == 8
    assert len(trace.outputs) == 1
    # 64 chunks of A, 512 block products and the reductions of (A @ A.T).sum().
    assert len(trace.tasks) > 576
    assert sum(1 for t in trace.tasks if t.nbytes == 8_000_000) >= 576
    meta = trace.meta
    assert meta["cluster"]["workers"] == 8
    assert meta["cluster"]["threads_per_worker"] == 1
    assert {"dask", "distributed", "numpy", "python"} <= set(meta["versions"])
    for mode in ("amm_off", "amm_on"):
        figures = meta["dask"][mode]
        assert figures["peak_managed_bytes"] > 0
        assert figures["peak_process_bytes"] > 0
        assert figures["wall_seconds"] > 0

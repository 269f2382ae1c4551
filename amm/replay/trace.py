"""A recorded computation: what each task read, where it ran, when, and how much it produced.

A trace is a JSON document, optionally gzip-compressed (``benchmarks/record_dask_trace.py``
writes one from a Dask run)::

    {"format": "amm-trace/1",
     "meta": {...},                      # free-form: versions, cluster shape, Dask's figures
     "outputs": ["final-key"],           # keys the caller keeps once the computation is done
     "tasks": [{"key": "...", "worker": "3", "queued": 0.01, "start": 0.02, "stop": 0.15,
                "inputs": ["..."], "nbytes": 8000000}, ...]}

Times are seconds from the computation's submission; ``queued`` (when the worker was handed the
task) may be null, and is then taken to be the moment its last input was produced. Parsing
validates everything the replay relies on, so that a bad trace fails at once with a message that
names the task, never halfway through a replay: unique keys, inputs that are tasks of the trace,
no cycles, finite non-negative times with ``start <= stop``, non-negative sizes. Pure: no I/O but
``load_trace``'s reading of the file.
"""

from __future__ import annotations

import gzip
import heapq
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

TRACE_FORMAT = "amm-trace/1"


class TraceError(ValueError):
    """The trace cannot be replayed; the message says which task or field is wrong."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as it ran: ``worker`` is the recorded worker's name, times in seconds."""

    key: str
    worker: str
    queued: float | None
    start: float
    stop: float
    inputs: tuple[str, ...]
    nbytes: int

    @property
    def duration(self) -> float:
        return self.stop - self.start


@dataclass(frozen=True, slots=True)
class Trace:
    """Tasks in dependency order (every task after its inputs), and the keys kept at the end."""

    tasks: tuple[TaskRecord, ...]
    outputs: tuple[str, ...]
    meta: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def workers(self) -> tuple[str, ...]:
        """The recorded workers' names, numbers in numeric order, then the rest by name."""
        names = {task.worker for task in self.tasks}
        return tuple(sorted(names, key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n)))

    @property
    def total_bytes(self) -> int:
        return sum(task.nbytes for task in self.tasks)

    @property
    def makespan(self) -> float:
        return max((task.stop for task in self.tasks), default=0.0)


def _number(task: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TraceError(f"task {task!r}: {name} must be a finite number, not {value!r}")
    if value < 0:
        raise TraceError(f"task {task!r}: {name} must be >= 0, not {value!r}")
    return float(value)


def _task(index: int, raw: object) -> TaskRecord:
    if not isinstance(raw, Mapping):
        raise TraceError(f"tasks[{index}] must be an object, not {type(raw).__name__}")
    key = raw.get("key")
    if not isinstance(key, str) or not key:
        raise TraceError(f"tasks[{index}]: key must be a non-empty string, not {key!r}")
    missing = sorted({"worker", "start", "stop", "inputs", "nbytes"} - raw.keys())
    if missing:
        raise TraceError(f"task {key!r}: missing {', '.join(missing)}")
    worker = raw["worker"]
    if isinstance(worker, bool) or not isinstance(worker, str | int) or worker == "":
        raise TraceError(f"task {key!r}: worker must be a name or a number, not {worker!r}")
    start = _number(key, "start", raw["start"])
    stop = _number(key, "stop", raw["stop"])
    queued = None if raw.get("queued") is None else _number(key, "queued", raw["queued"])
    if stop < start:
        raise TraceError(f"task {key!r}: stop ({stop}) is before start ({start})")
    inputs = raw["inputs"]
    if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
        raise TraceError(f"task {key!r}: inputs must be a list of keys")
    if len(set(inputs)) != len(inputs):
        raise TraceError(f"task {key!r}: an input is listed twice")
    if key in inputs:
        raise TraceError(f"task {key!r}: it is its own input")
    nbytes = raw["nbytes"]
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise TraceError(f"task {key!r}: nbytes must be an integer >= 0, not {nbytes!r}")
    return TaskRecord(key, str(worker), queued, start, stop, tuple(inputs), nbytes)


def _dependency_order(tasks: Sequence[TaskRecord]) -> tuple[TaskRecord, ...]:
    """Tasks sorted so that each comes after its inputs, by start time otherwise; cycles fail."""
    by_key = {t.key: t for t in tasks}
    waiting = {t.key: len(t.inputs) for t in tasks}
    consumers: dict[str, list[str]] = {t.key: [] for t in tasks}
    for t in tasks:
        for name in t.inputs:
            consumers[name].append(t.key)
    ready = [(t.start, t.key) for t in tasks if not t.inputs]
    heapq.heapify(ready)
    ordered: list[TaskRecord] = []
    while ready:
        task = by_key[heapq.heappop(ready)[1]]
        ordered.append(task)
        for name in consumers[task.key]:
            waiting[name] -= 1
            if waiting[name] == 0:
                heapq.heappush(ready, (by_key[name].start, name))
    if len(ordered) != len(tasks):
        stuck = sorted(k for k, n in waiting.items() if n > 0)
        raise TraceError(f"the tasks' inputs form a cycle; tasks involved include {stuck[:3]}")
    return tuple(ordered)


def parse_trace(document: object) -> Trace:
    """Validate a decoded trace document and return it in dependency order."""
    if not isinstance(document, Mapping):
        raise TraceError("a trace is a JSON object with 'format', 'tasks' and 'outputs'")
    if document.get("format") != TRACE_FORMAT:
        raise TraceError(
            f"unknown trace format {document.get('format')!r}; expected {TRACE_FORMAT}"
        )
    raw_tasks = document.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise TraceError("'tasks' must be a non-empty list")
    tasks = [_task(i, raw) for i, raw in enumerate(raw_tasks)]
    keys: set[str] = set()
    for task in tasks:
        if task.key in keys:
            raise TraceError(f"task {task.key!r} appears twice")
        keys.add(task.key)
    for task in tasks:
        unknown = [name for name in task.inputs if name not in keys]
        if unknown:
            raise TraceError(f"task {task.key!r}: input {unknown[0]!r} is not a task of the trace")
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise TraceError("'outputs' must be a list of keys")
    unknown_outputs = [o for o in outputs if o not in keys]
    if unknown_outputs:
        raise TraceError(f"output {unknown_outputs[0]!r} is not a task of the trace")
    meta = document.get("meta", {})
    if not isinstance(meta, Mapping):
        raise TraceError("'meta' must be an object")
    return Trace(
        tasks=_dependency_order(tasks),
        outputs=tuple(dict.fromkeys(outputs)),
        meta=MappingProxyType(dict(meta)),
    )


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace file; ``.gz`` files are decompressed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TraceError(f"cannot read {path}: {err.strerror or err}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise TraceError(f"{path}: not a valid gzip file ({err})") from None
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TraceError(f"{path}: not valid JSON ({err})") from None
    return parse_trace(document)
